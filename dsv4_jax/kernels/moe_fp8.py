"""The kernel side of `dsv4_jax.ops.moe_experts` for FP8 experts (`Config(expert_dtype="fp8")`): per-row GEMVs for
decode sizes, m-grouped DeepGEMM GEMMs (masked or contiguous layout) for larger batches.

Input: the dispatched rows of `dsv4_jax.moe.dispatch`, sorted by expert: `x [R, d]` bf16, `expert [R]` (-1: no
expert, the row's output is zeros), `weight [R]` f32 routing weights, `group_sizes [E]`. Output `y [R, d]` bf16:
row r = `w2_e(bf16(weight[r] * swiglu(w1_e x_r, w3_e x_r)))`, e = expert[r] — the reference's numerics:

  1. our kernel quantizes (and, for the grouped layouts, gathers) the rows to FP8;
  2. w1 and w3 (GEMV: one launch for both); one kernel fuses bf16(weight * clamped SwiGLU) with the FP8 quantization
     for w2; then w2.

No host sync, static shapes: jit- and command-buffer-safe. Weights that are one layer of a stack (`LayerSlice`) reach
the GEMVs as the whole stack with expert ids offset by `layer * E` (no copy); the grouped GEMMs take the layer's slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import LayerSlice, materialize

__all__ = ["routed_experts", "routed_experts_unsupported", "grouped", "grouped_unsupported", "choose_layout",
           "choose_block_m", "plan_rows", "GEMV_MAX_PAIRS"]  # fmt: skip

F32 = jnp.float32

# Up to this many rows the per-row GEMV beats the masked tensor-core GEMM (decode batch <= 10 at top-6; H100,
# BENCHMARKS.md: 8 tokens 179 us GEMV, 16 tokens 333 us GEMV vs 291 us masked).
GEMV_MAX_PAIRS = 64


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def choose_layout(rows: int) -> str:
    if rows <= GEMV_MAX_PAIRS:
        return "gemv"
    return "masked" if rows <= 64 * 6 else "contig"


def choose_block_m(layout: str, rows: int) -> int:
    """BLOCK_M of the grouped GEMMs: 64 for the masked (decode) layout and small batches; 128 once experts get enough
    rows that the padding of each expert to a 128-row boundary stops dominating."""
    if layout == "masked" or rows <= 256 * 6:
        return 64
    return 128


def _dims(weights):
    w1 = weights[0]
    e, inter, d = w1.shape
    return e, inter, d


def routed_experts_unsupported(x, expert, weight, group_sizes, weights, limit: float) -> str | None:
    """Why the FP8 expert kernels cannot run these arguments (None: they can)."""
    if weights[0].dtype != jnp.float8_e4m3fn:
        return f"not FP8 experts ({weights[0].dtype})"
    e, inter, d = _dims(weights)
    if choose_layout(x.shape[0]) == "gemv":
        return None
    return grouped_unsupported(x.shape[0], e, inter, d)


def grouped_unsupported(rows: int, e: int, inter: int, d: int) -> str | None:
    """Why `grouped` cannot run `rows` dispatched rows through E experts of d -> inter -> d (None: it can): the
    layout's AOT GEMMs for both projections must exist."""
    layout = choose_layout(rows)
    if layout == "gemv":
        return f"{rows} rows take the GEMV, not a grouped layout"
    bm = choose_block_m(layout, rows)
    for n_, k_ in ((inter, d), (d, inter)):
        if not ffi_ops.instantiated(layout, n_, k_, e, bm):
            return f"no AOT {layout} grouped GEMM for N={n_} K={k_} G={e} BLOCK_M={bm}"
    return None


def _stacked_groups(w, s, expert):
    """A weight `[E, N, K]` (or one layer of a stack `[L, E, N, K]`) as a `[G, N, K]` operand and each row's group."""
    if isinstance(w, LayerSlice):
        n_layers, e = w.stack.shape[:2]
        groups = jnp.where(expert >= 0, w.index * e + expert, -1)
        ss = s.stack if isinstance(s, LayerSlice) else s
        return w.stack.reshape(n_layers * e, *w.stack.shape[2:]), ss.reshape(n_layers * e, *ss.shape[2:]), groups
    return w, s, expert


def _gemv(x, expert, weight, weights, limit):
    w1, s1, w3, s3, w2, s2 = weights
    w1, s1, groups = _stacked_groups(w1, s1, expert)
    w3, s3, _ = _stacked_groups(w3, s3, expert)
    w2, s2, _ = _stacked_groups(w2, s2, expert)
    q1, sfa1 = ffi_ops.act_quant_rows(x)
    g, u = ffi_ops.fp8_gemv_pair(q1, sfa1, w1, s1, w3, s3, groups=groups)
    q2, sfa2 = ffi_ops.swiglu_quant(g, u, weight, None, limit)
    return ffi_ops.fp8_gemv(q2, sfa2, w2, s2, groups=groups)


def plan_rows(expert, group_sizes, layout: str, block_m: int):
    """Where each dispatched row (sorted by expert) goes in a grouped GEMM's row layout: `(dest [R] int32 (rows with
    expert -1: `rows`, out of bounds), rows (the layout's static row count), the layout array)`; the layout array is
    the masked layout's per-expert counts `[E]` or the contiguous layout's prefix sums `[E]` (each expert's rows
    start on a `block_m` boundary)."""
    r = expert.shape[0]
    e = group_sizes.shape[0]
    starts = jnp.cumsum(group_sizes) - group_sizes
    rank = jnp.arange(r, dtype=jnp.int32) - starts[jnp.maximum(expert, 0)]
    if layout == "masked":
        m_max = _round_up(max(r, 1), block_m)
        dest = expert * m_max + rank
        rows, lay = e * m_max, group_sizes
    else:
        aligned = (group_sizes + block_m - 1) // block_m * block_m
        astart = jnp.cumsum(aligned) - aligned
        dest = astart[jnp.maximum(expert, 0)] + rank
        rows = _round_up(r + min(e, r) * (block_m - 1), block_m)
        lay = (astart + group_sizes).astype(jnp.int32)
    return jnp.where(expert >= 0, dest, rows).astype(jnp.int32), rows, lay.astype(jnp.int32)


def grouped(x, expert, weight, group_sizes, weights, limit):
    """The grouped-GEMM route (masked or contiguous layout by row count) for any number of rows."""
    w1, s1, w3, s3, w2, s2 = (materialize(w) for w in weights)
    r = x.shape[0]
    e = w1.shape[0]
    layout = choose_layout(r)
    block_m = choose_block_m(layout, r)
    dest, rows, lay = plan_rows(expert, group_sizes, layout, block_m)
    src = jnp.full((rows,), -1, jnp.int32).at[dest].set(jnp.arange(r, dtype=jnp.int32), mode="drop")
    wrow = jnp.zeros((rows,), F32).at[dest].set(weight, mode="drop")
    groups = e if layout == "masked" else 1
    s1, s3, s2 = (ffi_ops.sm90_weight_scales(s) for s in (s1, s3, s2))

    def gemm(q, sfa, w, s):
        if layout == "masked":
            return ffi_ops.grouped_gemm_masked(q.reshape(e, rows // e, -1), sfa, w, s, lay, block_m).reshape(rows, -1)
        return ffi_ops.grouped_gemm_contig(q, sfa, w, s, lay, block_m)

    q1, sfa1 = ffi_ops.act_quant_rows(x, src=src, rows_out=rows, groups=groups)
    g = gemm(q1, sfa1, w1, s1)
    u = gemm(q1, sfa1, w3, s3)
    q2, sfa2 = ffi_ops.swiglu_quant(g, u, wrow, src, limit, groups=groups)
    y = gemm(q2, sfa2, w2, s2)
    out = y[jnp.minimum(dest, rows - 1)]
    return jnp.where((expert >= 0)[:, None], out, jnp.zeros_like(out))


def routed_experts(x, expert, weight, group_sizes, weights, limit: float) -> jax.Array:
    """bf16 `[R, d]`: each dispatched row through its expert's clamped-SwiGLU MLP (see the module doc)."""
    if choose_layout(x.shape[0]) == "gemv":
        return _gemv(x, expert, weight, weights, limit)
    return grouped(x, expert, weight, group_sizes, weights, limit)
