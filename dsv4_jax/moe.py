"""Mixture of experts: sqrt-softplus gate, hash or bias-corrected top-k routing, clamped SwiGLU experts (MXFP4
routed, FP8 shared), routing weight applied before w2 (spec §3.3).

`T` tokens (flattened batch x sequence), `E` routed experts, `k` experts per token, `I` expert width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax import nn, ops, quant
from dsv4_jax.config import Config
from dsv4_jax.rounding import to_bf16

__all__ = ["MoE", "Gate", "route", "swiglu"]

BF16, F32 = jnp.bfloat16, jnp.float32


def _softplus(x):
    # torch's F.softplus (beta 1, threshold 20): identity above the threshold, log1p(exp(x)) below.
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def route(logits_te, bias_e, hash_idx_tk, k: int, route_scale: float):
    """(`weights [T,k]` fp32, `idx [T,k]` int32) from fp32 gate logits.

    Scores are `sqrt(softplus(logits))`; experts come from `hash_idx` if given, else from top-k of `scores + bias`
    (the bias only selects); weights are the chosen scores, renormalised to sum 1, times `route_scale`.
    """
    scores = jnp.sqrt(_softplus(logits_te))
    if hash_idx_tk is not None:
        idx = hash_idx_tk.astype(jnp.int32)
    else:
        _, idx = jax.lax.top_k(scores + bias_e.astype(F32), k)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w * F32(route_scale), idx.astype(jnp.int32)


def swiglu(gate_f32, up_f32, limit: float):
    """`silu(min(gate, L)) * clip(up, -L, L)`: the gate is clamped from above only."""
    if limit > 0:
        up_f32 = jnp.clip(up_f32, -limit, limit)
        gate_f32 = jnp.minimum(gate_f32, limit)
    return gate_f32 / (1.0 + jnp.exp(-gate_f32)) * up_f32


class Gate(nnx.Module):
    def __init__(self, cfg: Config, layer_id: int, *, rngs: nnx.Rngs):
        e, k = cfg.n_routed_experts, cfg.n_activated_experts
        self.k, self.route_scale = k, cfg.route_scale
        self.is_hash = cfg.is_hash_layer(layer_id)
        self.weight = nn.param(nn.normal(rngs, (e, cfg.dim), cfg.dim**-0.5, BF16), ("expert_gate", "embed"))
        if self.is_hash:
            # A fixed token -> k distinct experts table (int64 in the checkpoint, held as int32).
            perm = jnp.argsort(jax.random.uniform(rngs.params(), (cfg.vocab_size, e)), axis=-1)[:, :k]
            self.tid2eid = nn.param(perm.astype(jnp.int32), ("vocab", None))
        else:
            self.bias = nn.param(jnp.zeros((e,), F32), ("expert_gate",))

    def __call__(self, x_td: jax.Array, tokens_t: jax.Array):
        logits = ops.f32_linear(x_td, self.weight[...])
        hash_idx = self.tid2eid[...][tokens_t] if self.is_hash else None
        return route(logits, None if self.is_hash else self.bias[...], hash_idx, self.k, self.route_scale)


class ExpertWeight(nnx.Module):
    """Stacked weights of one projection of all routed experts: MXFP4 (`uint8 [E, out, in/2]` + e8m0 `[E, out,
    in/32]`) or FP8 (`e4m3 [E, out, in]` + e8m0 `[E, out/128, in/128]`)."""

    def __init__(self, n_experts, in_f, out_f, axes, fmt: str, std: float, *, rngs: nnx.Rngs):
        w = nn.normal(rngs, (n_experts, out_f, in_f), std)
        q, s = quant.quantize_fp4_weight(w) if fmt == "fp4" else quant.quantize_fp8_weight(w)
        self.weight = nn.param(q, ("expert", *axes))
        self.scale = nn.param(s, ("expert", *axes))


class Experts(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        e, d, i, fmt = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.expert_dtype
        self.limit, self.k = cfg.swiglu_limit, cfg.n_activated_experts
        self.w1 = ExpertWeight(e, d, i, ("expert_ffn", "embed"), fmt, d**-0.5, rngs=rngs)
        self.w3 = ExpertWeight(e, d, i, ("expert_ffn", "embed"), fmt, d**-0.5, rngs=rngs)
        self.w2 = ExpertWeight(e, i, d, ("embed", "expert_ffn"), fmt, i**-0.5 * (2 * cfg.n_blocks) ** -0.5, rngs=rngs)

    def __call__(self, x_td: jax.Array, weight_te: jax.Array, opts: ops.Opts) -> jax.Array:
        """`sum_e` over experts in index order of `w2_e(bf16(weight[:, e] * swiglu(w1_e x, w3_e x)))`, fp32 `[T, d]`.

        Reference implementation: every expert runs on every token with a dense weight (0 where not routed), which
        adds exact zeros and so equals the official per-expert accumulation bit for bit.
        """
        # Kernel dispatch: FP8 experts through m-grouped GEMMs (dsv4_jax.kernels.moe_grouped) when selected.
        if opts.quant_sim and self.w1.weight.dtype == jnp.float8_e4m3fn and (kern := ops._kernel("moe_grouped", opts)):
            ws = tuple(p[...] for m in (self.w1, self.w3, self.w2) for p in (m.weight, m.scale))
            if (y := kern(x_td, weight_te, self.k, ws, self.limit)) is not None:
                return y

        def one_expert(acc, ew):
            (w1, s1, w3, s3, w2, s2), wt = ew
            g = ops.expert_linear(x_td, w1, s1, opts).astype(F32)
            u = ops.expert_linear(x_td, w3, s3, opts).astype(F32)
            h = to_bf16(wt[:, None] * swiglu(g, u, self.limit))
            return acc + ops.expert_linear(h, w2, s2, opts).astype(F32), None

        ws = tuple(p[...] for m in (self.w1, self.w3, self.w2) for p in (m.weight, m.scale))
        acc0 = jnp.zeros((x_td.shape[0], self.w2.weight.shape[1]), F32)
        acc, _ = jax.lax.scan(one_expert, acc0, (ws, weight_te.T))
        return acc


class SharedExpert(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d, i = cfg.dim, cfg.moe_inter_dim * cfg.n_shared_experts
        self.limit = cfg.swiglu_limit
        self.w1 = nn.Fp8Linear(d, i, ("ffn", "embed"), rngs=rngs)
        self.w3 = nn.Fp8Linear(d, i, ("ffn", "embed"), rngs=rngs)
        self.w2 = nn.Fp8Linear(i, d, ("embed", "ffn"), rngs=rngs, std=i**-0.5 * (2 * cfg.n_blocks) ** -0.5)

    def __call__(self, x_td, opts: ops.Opts) -> jax.Array:
        h = swiglu(self.w1(x_td, opts).astype(F32), self.w3(x_td, opts).astype(F32), self.limit)
        return self.w2(to_bf16(h), opts)


class MoE(nnx.Module):
    def __init__(self, cfg: Config, layer_id: int, *, rngs: nnx.Rngs):
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg, layer_id, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        self.shared_experts = SharedExpert(cfg, rngs=rngs)

    def __call__(self, x_btd, tokens_bt, opts: ops.Opts, rec: dict | None = None, valid_bt=None) -> jax.Array:
        """`bf16(sum_routed + shared)` for the ffn_norm output `x [b, s, dim]`. Tokens with `valid` False (padding)
        get no routed experts."""
        b, s, d = x_btd.shape
        x = x_btd.reshape(b * s, d)
        w, idx = self.gate(x, tokens_bt.reshape(-1))
        if valid_bt is not None:
            w = w * valid_bt.reshape(-1, 1).astype(F32)
        if rec is not None:
            rec["route_idx"], rec["route_w"] = idx, w
        dense_w = jnp.zeros((b * s, self.n_experts), F32).at[jnp.arange(b * s)[:, None], idx].add(w)
        y = self.experts(x, dense_w, opts) + self.shared_experts(x, opts).astype(F32)
        return to_bf16(y).reshape(b, s, d)
