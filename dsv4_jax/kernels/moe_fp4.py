"""The kernel side of `dsv4_jax.ops.moe_experts` for MXFP4 experts (the released format): our FP8 x MXFP4
tensor-core GEMVs, two launches per routed-expert step (`ffi/csrc/fp4_gemv_kernels.cu`):

  1. `fp4_moe_gate_up`: quantizes the rows to FP8 in-kernel, w1 and w3 of each row's expert, the clamped SwiGLU and
     the routing weight, bf16 h;
  2. `fp4_moe_down`: h quantized in-kernel, w2.

Rows arrive sorted by expert (`dsv4_jax.moe.dispatch`), so rows sharing an expert share one pass over its weights
(up to 8). A weight that is one layer of a stack (`LayerSlice`) is passed as the whole stack, its expert ids offset
by `layer * E`: no copy. Numerics: the reference's up to the order of the fp32 sums (BUILD.md).

This is the decode kernel; it is also correct, if not fast (the weights are read once per 8 rows of an expert), for
the thousands of rows of a prefill, where no grouped MXFP4 GEMM exists yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import LayerSlice

__all__ = ["routed_experts", "routed_experts_unsupported", "MAX_ROWS"]

# One block row per output row: CUDA's grid y dimension caps a launch at 65535 rows.
MAX_ROWS = 65535


def _stack(w, s, expert):
    """`[E, N, K/2]` weights (or one layer of `[L, E, ...]`) as a `[G, N, K/2]` operand and each row's group."""
    if isinstance(w, LayerSlice):
        n_layers, e = w.stack.shape[:2]
        ss = s.stack if isinstance(s, LayerSlice) else s
        groups = jnp.where(expert >= 0, w.index * e + expert, -1).astype(jnp.int32)
        return w.stack.reshape(n_layers * e, *w.stack.shape[2:]), ss.reshape(n_layers * e, *ss.shape[2:]), groups
    return w, s, expert.astype(jnp.int32)


def routed_experts_unsupported(x, expert, weight, group_sizes, weights, limit: float) -> str | None:
    w1 = weights[0]
    if w1.dtype != jnp.uint8:
        return "not MXFP4 experts"
    k = x.shape[-1]
    if k % 128 or weights[4].shape[-1] * 2 % 128:
        return f"K={k} (and the expert width) must be multiples of 128"
    return None


def routed_experts(x, expert, weight, group_sizes, weights, limit: float) -> jax.Array:
    """bf16 `[R, d]`: each dispatched row through its expert's clamped-SwiGLU MLP (rows with expert -1: zeros)."""
    w1, s1, w3, s3, w2, s2 = weights
    w1, s1, groups = _stack(w1, s1, expert)
    w3, s3, _ = _stack(w3, s3, expert)
    w2, s2, _ = _stack(w2, s2, expert)
    out = []
    for lo in range(0, x.shape[0], MAX_ROWS):  # the kernels take at most MAX_ROWS output rows a launch
        hi = min(lo + MAX_ROWS, x.shape[0])
        rows = jnp.arange(hi - lo, dtype=jnp.int32)
        h = ffi_ops.fp4_moe_gate_up(x[lo:hi], rows, groups[lo:hi], weight[lo:hi], w1, s1, w3, s3, limit)
        out.append(ffi_ops.fp4_moe_down(h, groups[lo:hi], w2, s2, tokens=hi - lo))
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=0)
