"""FP8 routed experts through the m-grouped SM90 GEMMs: routing permute, grouped GEMMs, weighted unpermute.

Same function as the dense reference `dsv4_jax.moe.Experts.__call__` (`sum_e w2_e(bf16(weight[:, e] * swiglu(w1_e x,
w3_e x)))`, fp32, experts summed in index order), for FP8 experts (`Config(expert_dtype="fp8")`):

  1. top-k of the dense routing weights (experts with weight 0 add exact zeros, so any tie choice is equivalent);
     each token's experts sorted by index (the reference's accumulation order);
  2. rows grouped by expert: the contiguous prefix-sum layout (each expert's rows start on a BLOCK_M boundary; used
     for prefill) or the masked layout `[E, M_max]` (decode, T <= 64); the row maps are small int32 arrays.
     Smallest batches (T * k <= GEMV_MAX_PAIRS) skip grouping: one GEMV row per (token, expert) pair,
     `routed_experts_gemv`;
  3. `act_quant` gathers and quantizes token rows into that layout in one kernel (padding rows are never written);
  4. grouped GEMMs w1 and w3; one kernel fuses bf16(weight * clamped SwiGLU) with the FP8 quantization for w2;
  5. grouped GEMM w2, then each token sums its k rows in fp32 in expert-index order.

No host sync and no data-dependent shapes: the row buffers have static upper bounds, so this is jit- and
command-buffer-safe.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import ffi_ops

__all__ = ["routed_experts", "routed_experts_gemv", "plan_rows", "choose_block_m", "choose_layout"]

F32 = jnp.float32

# Up to this many (token, expert) pairs the per-pair GEMV beats the masked tensor-core GEMM (decode batch <= 10 at
# top-6; H100, BENCHMARKS.md: 8 tokens 179 us GEMV, 16 tokens 333 us GEMV vs 291 us masked).
GEMV_MAX_PAIRS = 64


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def plan_rows(idx_tk: jax.Array, n_experts: int, layout: str, block_m: int):
    """Row maps for grouped GEMMs. Returns (dest [T,k] row of each assignment, rows total, layout array), where the
    layout array is the int32 psum `[E]` (contig) or the per-expert counts `[E]` (masked)."""
    t, k = idx_tk.shape
    a = t * k
    e_flat = idx_tk.reshape(-1)
    counts = jnp.zeros((n_experts,), jnp.int32).at[e_flat].add(1)
    order = jnp.argsort(e_flat, stable=True)
    e_sorted = e_flat[order]
    first = jnp.cumsum(counts) - counts
    rank = jnp.arange(a, dtype=jnp.int32) - first[e_sorted]
    if layout == "masked":
        m_max = _round_up(max(t, 1), block_m)
        dest_sorted = e_sorted * m_max + rank
        rows, lay = n_experts * m_max, counts
    else:
        aligned = (counts + block_m - 1) // block_m * block_m
        starts = jnp.cumsum(aligned) - aligned
        dest_sorted = starts[e_sorted] + rank
        rows = _round_up(a + min(n_experts, a) * (block_m - 1), block_m)
        lay = (starts + counts).astype(jnp.int32)
    dest = jnp.zeros((a,), jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))
    return dest.reshape(t, k), rows, lay


def choose_block_m(layout: str, t: int, k: int, n_experts: int) -> int:
    """BLOCK_M of the grouped GEMMs: 64 for the masked (decode) layout and small batches; 128 once experts get
    enough rows that the per-expert padding to a 128-row boundary stops dominating."""
    if layout == "masked" or t <= 256:
        return 64
    return 128


def choose_layout(t: int, k: int) -> str:
    if t * k <= GEMV_MAX_PAIRS:
        return "gemv"
    return "masked" if t <= 64 else "contig"


def _top_k_sorted(weight_te, k: int):
    """Top-k experts of each token, sorted by expert index (the reference's accumulation order), and their weights."""
    wts, idx = jax.lax.top_k(weight_te.astype(F32), k)
    order = jnp.argsort(idx, axis=-1)
    return jnp.take_along_axis(idx, order, axis=-1).astype(jnp.int32), jnp.take_along_axis(wts, order, axis=-1)


def _sum_expert_rows(y_rd, row_tk):
    """fp32 `[T, d]`: token t sums rows `y[row_tk[t, j]]` over j, in expert-index order as the reference does."""
    acc = jnp.zeros((row_tk.shape[0], y_rd.shape[-1]), F32)
    for j in range(row_tk.shape[1]):
        acc = acc + y_rd[row_tk[:, j]].astype(F32)
    return acc


def routed_experts_gemv(x_td, weight_te, k: int, weights, limit: float):
    """Decode-sized batches: each (token, expert) pair is one GEMV row; no permutation, no padding, no AOT shape."""
    w1, s1, w3, s3, w2, s2 = weights
    t, _ = x_td.shape
    idx, wts = _top_k_sorted(weight_te, k)
    expert = idx.reshape(-1)
    token = jnp.arange(t * k, dtype=jnp.int32) // k
    q1, sfa1 = ffi_ops.act_quant_rows(x_td)
    g, u = ffi_ops.fp8_gemv_pair(q1, sfa1, w1, s1, w3, s3, rows=token, groups=expert)
    q2, sfa2 = ffi_ops.swiglu_quant(g, u, wts.reshape(-1), None, limit)
    y = ffi_ops.fp8_gemv(q2, sfa2, w2, s2, groups=expert)
    return _sum_expert_rows(y, jnp.arange(t * k, dtype=jnp.int32).reshape(t, k))  # pair row p = t * k + j


def routed_experts(x_td, weight_te, k: int, weights, limit: float, layout: str = "auto"):
    """fp32 `[T, d]` routed-expert output. `weights` = (w1, s1, w3, s3, w2, s2) with FP8 `[E, out, in]` weights and
    UE8M0 (or FP32) `[E, out/128, in/128]` scales. `layout`: "gemv", "masked", "contig" or "auto"
    (`choose_layout`). Returns None when a grouped shape has no AOT instantiation (the caller then runs the
    reference)."""
    w1, s1, w3, s3, w2, s2 = weights
    t, d = x_td.shape
    e, inter, _ = w1.shape
    if layout == "auto":
        layout = choose_layout(t, k)
    if layout == "gemv":
        return routed_experts_gemv(x_td, weight_te, k, weights, limit)
    block_m = choose_block_m(layout, t, k, e)
    for n_, k_ in ((inter, d), (d, inter)):
        if not ffi_ops.instantiated(layout, n_, k_, e, block_m):
            warnings.warn(
                f"dsv4_jax_ffi has no {layout} grouped GEMM for N={n_} K={k_} G={e} BLOCK_M={block_m}; "
                "using the dense reference experts",
                stacklevel=2,
            )
            return None
    idx, wts = _top_k_sorted(weight_te, k)
    dest, rows, lay = plan_rows(idx, e, layout, block_m)
    tok = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k)).reshape(-1)
    src = jnp.full((rows,), -1, jnp.int32).at[dest.reshape(-1)].set(tok)
    wrow = jnp.zeros((rows,), F32).at[dest.reshape(-1)].set(wts.reshape(-1))
    groups = e if layout == "masked" else 1
    s1, s3, s2 = (ffi_ops.sm90_weight_scales(s) for s in (s1, s3, s2))

    def gemm(q, sfa, w, s):
        if layout == "masked":
            return ffi_ops.grouped_gemm_masked(q.reshape(e, rows // e, -1), sfa, w, s, lay, block_m).reshape(rows, -1)
        return ffi_ops.grouped_gemm_contig(q, sfa, w, s, lay, block_m)

    q1, sfa1 = ffi_ops.act_quant_rows(x_td, src=src, rows_out=rows, groups=groups)
    g = gemm(q1, sfa1, w1, s1)
    u = gemm(q1, sfa1, w3, s3)
    q2, sfa2 = ffi_ops.swiglu_quant(g, u, wrow, src, limit, groups=groups)
    y = gemm(q2, sfa2, w2, s2)
    return _sum_expert_rows(y, dest)
