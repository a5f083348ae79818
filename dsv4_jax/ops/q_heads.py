"""`q_heads`: the attention queries after `wq_b` (spec §3.3): each head's weightless RMS norm in the reference's bf16
tensor arithmetic, then RoPE on its tail at the token's position.

    q_bthd = q_heads(q_bthd, pos_bt, inv_freq, eps=1e-6, opts=opts)

The kernel twin (`dsv4_jax.kernels.q_heads`) is one launch; XLA runs the reference as three fusions per layer at
decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.ops import registry
from dsv4_jax.rounding import to_bf16

__all__ = ["q_heads", "head_rms_norm_bf16"]

F32 = jnp.float32


def head_rms_norm_bf16(q: jax.Array, eps: float) -> jax.Array:
    """Weightless per-head RMS norm with the reference's bf16 tensor arithmetic: each of square, mean, +eps, rsqrt and
    the product is rounded to bf16 (the means accumulate in fp32)."""
    qf = q.astype(F32)
    q2 = to_bf16(qf * qf).astype(F32)
    ms = to_bf16(jnp.sum(q2, axis=-1, keepdims=True) / F32(q.shape[-1])).astype(F32)
    r = to_bf16(jax.lax.rsqrt(to_bf16(ms + F32(eps)).astype(F32))).astype(F32)
    return to_bf16(qf * r)


def _reference(q_bthd, pos_bt, inv_freq, *, eps: float, quant_sim: bool = True):
    """`rope_tail(head_rms_norm_bf16(q), pos)`, bf16 `[b, t, H, D]`."""
    del quant_sim  # no quantization here
    from dsv4_jax import nn  # nn's linears call ops: imported here, not at module load

    return nn.rope_tail(head_rms_norm_bf16(q_bthd, eps), pos_bt[..., None], inv_freq)


def _supports(q_bthd, pos_bt, inv_freq, *, eps: float, quant_sim: bool = True) -> str | None:
    d, rope = q_bthd.shape[-1], 2 * len(inv_freq)
    if q_bthd.ndim != 4 or d not in (256, 512) or rope % 8 or rope > d or q_bthd.dtype != jnp.bfloat16:
        return f"q {q_bthd.dtype}{tuple(q_bthd.shape)}, rope {rope}: the kernel takes bf16 [b, t, H, 512 or 256], " \
               "RoPE dims a multiple of 8"  # fmt: skip
    if tuple(pos_bt.shape) != tuple(q_bthd.shape[:2]):
        return f"positions {tuple(pos_bt.shape)} for q {tuple(q_bthd.shape)}"
    return None


q_heads = registry.register(
    "q_heads", reference=_reference, kernel="dsv4_jax.kernels.q_heads:q_heads", supports=_supports
)
