"""The MoE router (spec §3.3): `route`, the official routing from fp32 gate logits, and `route_experts`, the same
with the hash table lookup or the bias, registered with its kernel (`dsv4_jax.kernels.router`: one launch for the
scores, the top-k and the weights, which XLA runs as ~3 at decode).

    w_tk, idx_tk = route(logits_te, bias_e, hash_idx_tk, k, route_scale)
    w_tk, idx_tk = route_experts(logits_te, bias_e, None, None, k=6, route_scale=1.5, opts=opts)      # bias-routed
    w_tk, idx_tk = route_experts(logits_te, None, tid2eid_vk, tokens_t, k=6, route_scale=1.5, opts=opts)  # hash
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.layer_view import materialize
from dsv4_jax.ops import registry

__all__ = ["route", "route_experts"]

F32 = jnp.float32


def _softplus(x):
    # torch's F.softplus (beta 1, threshold 20): identity above the threshold, log1p(exp(x)) below.
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def route(logits_te, bias_e, hash_idx_tk, k: int, route_scale: float):
    """(`weights [T,k]` fp32, `idx [T,k]` int32) from fp32 gate logits.

    Scores are `sqrt(softplus(logits))`; experts come from `hash_idx` if given, else from top-k of `scores + bias`
    (the bias only selects; ties to the lower expert id); weights are the chosen scores, renormalised to sum 1, times
    `route_scale`.
    """
    scores = jnp.sqrt(_softplus(logits_te))
    if hash_idx_tk is not None:
        idx = hash_idx_tk.astype(jnp.int32)
    else:
        _, idx = jax.lax.top_k(scores + bias_e.astype(F32), k)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w * F32(route_scale), idx.astype(jnp.int32)


def _reference(logits_te, bias_e, table_vk, tokens_t, *, k: int, route_scale: float, quant_sim: bool = True):
    """`route` with the bias (`table` None) or the hash table's experts of each token (`bias` None); bias and table
    may be `LayerSlice`s."""
    del quant_sim  # fp32 throughout
    hash_idx = None if table_vk is None else materialize(table_vk)[tokens_t]
    return route(logits_te, None if bias_e is None else materialize(bias_e), hash_idx, k, route_scale)


def _supports(logits_te, bias_e, table_vk, tokens_t, *, k: int, route_scale: float, quant_sim: bool = True):
    e = logits_te.shape[-1]
    if logits_te.ndim != 2 or e > 512 or not 1 <= k <= min(e, 32):
        return f"logits {tuple(logits_te.shape)}, k={k}: the kernel takes [T, E <= 512] and 1 <= k <= min(E, 32)"
    if (bias_e is None) == (table_vk is None):
        return "give the bias or the hash table, not both or neither"
    return None


# Validated on an H200 (tests/test_router_gpu.py: 22 passed, 2026-12-01): "auto" takes it.
route_experts = registry.register(
    "route_experts",
    reference=_reference,
    kernel="dsv4_jax.kernels.router:route_experts",
    supports=_supports,
    validated=True,
)
