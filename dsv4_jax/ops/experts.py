"""`moe_experts`: the routed experts of one MoE layer on rows dispatched by `dsv4_jax.moe.dispatch`.

    y_rd = moe_experts(x_rd, expert_r, weight_r, group_sizes_e, weights, limit=10.0, opts=opts)

Rows are sorted by expert (`group_sizes[e]` rows for expert e, then the rows with `expert = -1`, which get exact
zeros). Row r computes `w2_e(bf16(weight[r] * swiglu(bf16(w1_e x_r), bf16(w3_e x_r))))` in bf16, e = expert[r], with
each linear's official numerics (`dsv4_jax.ops.linear`): MXFP4 (`uint8 [E, N, K/2]` + e8m0 `[E, N, K/32]`, or the
slab layout of `quant.fp4_to_slabs`) or FP8 (`e4m3 [E, N, K]` + e8m0 `[E, N/128, K/128]`) weights, each possibly one
layer of a stack (`LayerSlice`).

The reference computes only the routed rows, so its work grows with tokens x top-k, not tokens x experts:
  * few rows: each row gathers its expert's weights (`_per_row`);
  * many rows: a scan over the experts that have rows, each expert's weights decoded once and its rows processed in
    chunks (`_per_expert`).
Both compute each K block's partial dot, scale it and add the blocks in K order, exactly as the dense reference
linear does; a row's result does not depend on which other rows are in the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import quant
from dsv4_jax.layer_view import LayerSlice
from dsv4_jax.ops import registry
from dsv4_jax.ops.linear import sum_in_order
from dsv4_jax.rounding import to_bf16

__all__ = ["moe_experts", "swiglu"]

F32 = jnp.float32

# Rows whose gathered, decoded expert weights (fp32) fit this many elements take the per-row path: V4-Flash decode at
# batch 1 (6 rows x 25 M elements) does, a 2048-token prefill does not.
PER_ROW_ELEMENTS = 1 << 28
CHUNK_ROWS = 64


def swiglu(gate_f32, up_f32, limit: float):
    """`silu(min(gate, L)) * clip(up, -L, L)`: the gate is clamped from above only (L = 0: no clamp)."""
    if limit > 0:
        up_f32 = jnp.clip(up_f32, -limit, limit)
        gate_f32 = jnp.minimum(gate_f32, limit)
    return gate_f32 / (1.0 + jnp.exp(-gate_f32)) * up_f32


def _take(w, e):
    """`w[e]` for an expert stack `[E, ...]` or one layer of `[L, E, ...]` (a `LayerSlice`), without slicing the
    layer out first."""
    if isinstance(w, LayerSlice):
        return w.stack[w.index, e]
    return w[e]


def _decode(w, s):
    """(values f32 `[..., N, K]`, per-K-block scales f32 `[..., N, K/kblock]`, kblock) of gathered expert weights
    (MXFP4 in the slab layout, uint32 scales, read back to the stored order first)."""
    if w.dtype == jnp.uint8:
        if s.dtype == jnp.uint32:
            w, s = quant.fp4_from_slabs(w, s)
        return quant.unpack_fp4(w), quant.e8m0_to_f32(s), 32
    n = w.shape[-2]
    sw = jnp.repeat(quant.e8m0_to_f32(s), 128, axis=-2)[..., :n, :]
    return quant.e4m3_to_f32(w), sw, 128


def _linear(x, wv, sw, kblock: int, quant_sim: bool, per_row: bool):
    """bf16 `[R, N]`: rows of `x` (bf16 `[R, K]`) times weights `wv`/`sw` — per row (`[R, N, K]`) or shared
    (`[N, K]`) — with the official blockwise numerics."""
    r, k = x.shape
    n = wv.shape[-2]
    nb = k // kblock
    if not quant_sim:
        full = wv * jnp.repeat(sw, kblock, axis=-1)
        eq = "rk,rnk->rn" if per_row else "rk,nk->rn"
        return to_bf16(jnp.einsum(eq, x.astype(F32), full, precision="highest"))
    xq, sx = quant.act_quant(x, 128)
    sxb = jnp.repeat(sx, 128 // kblock, axis=-1)  # the activation scale of each weight K block
    xb = quant.e4m3_to_f32(xq).reshape(r, nb, kblock)
    if per_row:
        parts = jnp.einsum("rbk,rnbk->rnb", xb, wv.reshape(r, n, nb, kblock), precision="highest")
    else:
        parts = jnp.einsum("rbk,nbk->rnb", xb, wv.reshape(n, nb, kblock), precision="highest")
    return to_bf16(sum_in_order(parts * (sxb[:, None, :] * sw)))


def _mlp(x, weight, ws, limit, quant_sim, per_row):
    (v1, s1, b1), (v3, s3, b3), (v2, s2, b2) = ws
    g = _linear(x, v1, s1, b1, quant_sim, per_row).astype(F32)
    u = _linear(x, v3, s3, b3, quant_sim, per_row).astype(F32)
    h = to_bf16(weight[:, None] * swiglu(g, u, limit))
    return _linear(h, v2, s2, b2, quant_sim, per_row)


def _per_row(x, expert, weight, weights, limit, quant_sim):
    e = jnp.maximum(expert, 0)
    w1, s1, w3, s3, w2, s2 = weights
    ws = [_decode(_take(w, e), _take(s, e)) for w, s in ((w1, s1), (w3, s3), (w2, s2))]
    y = _mlp(x, weight, ws, limit, quant_sim, per_row=True)
    return jnp.where((expert >= 0)[:, None], y, jnp.zeros_like(y))


def _per_expert(x, expert, weight, group_sizes, weights, limit, quant_sim):
    r, d = x.shape
    n_exp = group_sizes.shape[0]
    c = min(CHUNK_ROWS, r)
    starts = (jnp.cumsum(group_sizes) - group_sizes).astype(jnp.int32)
    slots = min(n_exp, r)  # experts with rows, in index order; unused slots have no rows
    active = jnp.nonzero(group_sizes > 0, size=slots, fill_value=0)[0].astype(jnp.int32)
    sizes = jnp.where(jnp.arange(slots) < jnp.sum(group_sizes > 0), group_sizes[active], 0)
    xp = jnp.pad(x, ((0, c), (0, 0)))
    wp = jnp.pad(weight, (0, c))
    w1, s1, w3, s3, w2, s2 = weights

    def expert_rows(y, slot):
        e, start, size = active[slot], starts[active[slot]], sizes[slot]
        ws = [_decode(_take(w, e), _take(s, e)) for w, s in ((w1, s1), (w3, s3), (w2, s2))]

        def chunk(i, y):
            lo = start + i * c
            xc = jax.lax.dynamic_slice_in_dim(xp, lo, c)
            yc = _mlp(xc, jax.lax.dynamic_slice_in_dim(wp, lo, c), ws, limit, quant_sim, per_row=False)
            old = jax.lax.dynamic_slice_in_dim(y, lo, c)
            keep = (jnp.arange(c) < size - i * c)[:, None]
            return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(keep, yc, old), lo, 0)

        return jax.lax.fori_loop(0, (size + c - 1) // c, chunk, y), None

    y, _ = jax.lax.scan(expert_rows, jnp.zeros((r + c, d), jnp.bfloat16), jnp.arange(slots))
    return jnp.where((expert >= 0)[:, None], y[:r], jnp.zeros((r, d), jnp.bfloat16))


def _moe_experts_reference(x, expert, weight, group_sizes, weights, limit: float, *, quant_sim: bool) -> jax.Array:
    """Rows `x [R, d]` bf16 sorted by `expert [R]` (-1 last: zeros), routing `weight [R]` f32, `group_sizes [E]`,
    `weights = (w1, s1, w3, s3, w2, s2)` -> bf16 `[R, d]`."""
    r = x.shape[0]
    w1, w2 = weights[0], weights[4]
    per_row_elems = 2 * w1.shape[-2] * w1.shape[-1] + w2.shape[-2] * w2.shape[-1]
    if w1.dtype == jnp.uint8:
        per_row_elems *= 2
    if r * per_row_elems <= PER_ROW_ELEMENTS:
        return _per_row(x, expert, weight, weights, limit, quant_sim)
    return _per_expert(x, expert, weight, group_sizes, weights, limit, quant_sim)


def _moe_experts_supports(x, expert, weight, group_sizes, weights, limit: float, *, quant_sim: bool) -> str | None:
    if not quant_sim:
        return "the kernels implement the quant_sim numerics only"
    from dsv4_jax.kernels import experts

    return experts.routed_experts_unsupported(x, expert, weight, group_sizes, weights, limit)


moe_experts = registry.register(
    "moe_experts",
    _moe_experts_reference,
    kernel="dsv4_jax.kernels.experts:routed_experts",
    supports=_moe_experts_supports,
)
