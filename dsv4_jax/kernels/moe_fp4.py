"""The kernel side of `dsv4_jax.ops.moe_experts` for MXFP4 experts (the released format): our FP8 x MXFP4
tensor-core GEMVs, two launches per routed-expert step (`ffi/csrc/fp4_gemv_kernels.cu`):

  1. `fp4_moe_gate_up`: quantizes the rows to FP8 in-kernel, w1 and w3 of each row's expert, the clamped SwiGLU and
     the routing weight, bf16 h;
  2. `fp4_moe_down`: h quantized in-kernel, w2.

Rows arrive sorted by expert (`dsv4_jax.moe.dispatch`), so rows sharing an expert share one pass over its weights
(up to 8). A weight that is one layer of a stack (`LayerSlice`) is passed as the whole stack, its expert ids offset
by `layer * E`: no copy. Numerics: the reference's up to the order of the fp32 sums (BUILD.md).

Prefill sizes (at least `grouped_min_rows()` dispatched rows) take the grouped route instead, where the GEMV would
read every expert's weights once per 8 of its rows. Up to `FUSED_MAX_ROWS` rows (`prefill_kernel`) that is our
one-pass kernel `ffi_ops.fp4_grouped` (`ffi/csrc/fp4_grouped_kernels.cu`): tiles of 128 weight rows x up to 128 rows
of one expert on wgmma, the weights widened to e4m3 in shared memory with each 32-block's scale folded in (exact for
rows spanning at most 11 binades), gate and up in one launch, then `swiglu_quant`, then down; no FP8 copy of the
weights. Beyond that (measured faster there) the layer's experts are widened to the FP8 weight format by
`ffi_ops.fp4_widen` (one power-of-two scale per 128x128 tile) and run through the FP8 experts' DeepGEMM m-grouped
contiguous GEMMs (`moe_fp8`), at the cost of a pass over the weights (3x the FP4 bytes) and a transient FP8 copy.
Numerics of both: one fp32 promotion per 128 of K (the FP8 linears' numerics) instead of one per 32-block; BUILD.md
has the measured difference.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import ffi_ops, moe_fp8
from dsv4_jax.layer_view import LayerSlice, stacks_and_index

__all__ = ["routed_experts", "routed_experts_unsupported", "grouped_min_rows", "prefill_kernel", "MAX_ROWS",
           "GROUPED_MIN_ROWS", "FUSED_MAX_ROWS"]  # fmt: skip

# One block row per output row: CUDA's grid y dimension caps a launch at 65535 rows.
MAX_ROWS = 65535

# Dispatched rows from which the grouped route replaces the GEMVs, and above which its widen kernels replace the
# one-pass kernel where DeepGEMM has the GEMMs. One Flash layer on an H200 (BENCHMARKS.md, "MXFP4 experts at prefill
# in one pass", gate/up in slabs): the GEMVs 2.7 / 10.0 ms at 3,072 / 12,288 rows, the one-pass kernel 4.4-4.5 ms over
# 3,072..12,288 rows, 5.0 at 24,576 and 9.5 at 49,152, the widen route 6.3 and 8.0 there: the lines cross near
# 5,300 and 36,000 rows (interpolated). DSV4_FFI_FP4_GROUPED_MIN_ROWS overrides the first (0: never),
# DSV4_FFI_FP4_PREFILL=fused|widen the second.
GROUPED_MIN_ROWS = 5120
FUSED_MAX_ROWS = 32768


def grouped_min_rows() -> int:
    v = os.environ.get("DSV4_FFI_FP4_GROUPED_MIN_ROWS")
    if v is None:
        return GROUPED_MIN_ROWS
    if not v.isdigit():
        raise ValueError(f"DSV4_FFI_FP4_GROUPED_MIN_ROWS={v!r}: expected a row count (0: never)")
    return int(v) or 1 << 62


def _prefill_setting() -> str:
    v = os.environ.get("DSV4_FFI_FP4_PREFILL", "auto")
    if v not in ("auto", "fused", "widen"):
        raise ValueError(f"DSV4_FFI_FP4_PREFILL={v!r}: expected 'auto', 'fused' or 'widen'")
    return v


def prefill_kernel(rows: int | None = None) -> str:
    """The grouped route's kernels for `rows` dispatched rows (trace time): "fused" (`fp4_grouped`) or "widen"
    (`fp4_widen` + the FP8 grouped GEMMs). DSV4_FFI_FP4_PREFILL: "auto" (unset: fused up to `FUSED_MAX_ROWS`, widen
    beyond), "fused" or "widen"."""
    return _kernel_for(rows, _prefill_setting())


def _kernel_for(rows: int | None, setting: str) -> str:
    if setting == "auto":
        return "fused" if rows is None or rows <= FUSED_MAX_ROWS else "widen"
    return setting


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


def _grouped_route(x, weights) -> str | None:
    """The kernels of the grouped route for these rows ("fused" or "widen"), or None: the GEMVs (fewer than
    `grouped_min_rows()` rows, or neither grouped kernel set can run them)."""
    rows, e, inter, d = x.shape[0], weights[0].shape[-3], weights[0].shape[-2], x.shape[-1]
    if rows < grouped_min_rows() or inter % 128 or d % 128:
        return None
    setting = _prefill_setting()
    want = _kernel_for(rows, setting)
    if want == "widen" and moe_fp8.grouped_unsupported(rows, e, inter, d) is not None:
        return "fused" if setting == "auto" else None
    return want


def _fused(x, weight, group_sizes, weights, limit):
    """The grouped route in our one-pass kernel: gate and up in one launch, the SwiGLU and its requantization, down.
    The six operands read in place where they are all one layer of their stacks, else materialised."""
    (a1, b1, a3, b3, a2, b2), layer = stacks_and_index(*weights)
    q1, sfa1 = ffi_ops.act_quant_rows(x, wgmma=True)
    g, u = ffi_ops.fp4_grouped(q1, sfa1, group_sizes, ((a1, b1), (a3, b3)), layer)
    q2, sfa2 = ffi_ops.swiglu_quant(g, u, weight, None, limit, wgmma=True)
    return ffi_ops.fp4_grouped(q2, sfa2, group_sizes, ((a2, b2),), layer)[0]


def widen_experts(weights):
    """The six expert operands `(w1, s1, w3, s3, w2, s2)` (MXFP4, or one layer of a stack, read in place) in the FP8
    expert format, by our kernel of `quant.fp4_to_fp8_blocks`."""
    out = []
    for w, s in zip(weights[0::2], weights[1::2], strict=True):
        stacks, layer = stacks_and_index(w, s)
        out += ffi_ops.fp4_widen(*stacks, layer)
    return tuple(out)


def routed_experts(x, expert, weight, group_sizes, weights, limit: float) -> jax.Array:
    """bf16 `[R, d]`: each dispatched row through its expert's clamped-SwiGLU MLP (rows with expert -1: zeros)."""
    route = _grouped_route(x, weights)
    if route == "fused":
        return _fused(x, weight, group_sizes, weights, limit)
    if route == "widen":
        return moe_fp8.grouped(x, expert, weight, group_sizes, widen_experts(weights), limit)
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
