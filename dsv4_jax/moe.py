"""Mixture of experts: sqrt-softplus gate, hash or bias-corrected top-k routing, clamped SwiGLU experts (MXFP4
routed, FP8 shared), routing weight applied before w2 (spec §3.3).

The routed experts are sparse end to end: `route -> dispatch -> ops.moe_experts -> combine`.
  * `route(x)` gives each token its k experts and weights `(ids [T, k], w [T, k])`;
  * `dispatch` sorts the (token, expert) pairs by expert into rows `x [R, d]` (R = T * k) with an `ExpertLayout`;
  * `ops.moe_experts` (reference or kernel) runs every row through its expert;
  * `combine` sums each token's rows in fp32, in expert-index order (the official accumulation order).
Under expert parallelism dispatch and combine become all-to-alls and `moe_experts` sees only the local experts
(`dsv4_jax.parallel`). `T` tokens (flattened batch x sequence), `E` routed experts, `k` experts per token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax import nn, ops
from dsv4_jax.config import Config
from dsv4_jax.ops.router import route
from dsv4_jax.options import Opts
from dsv4_jax.rounding import to_bf16

__all__ = ["MoE", "Gate", "route", "swiglu", "ExpertLayout", "dispatch", "combine"]

BF16, F32 = jnp.bfloat16, jnp.float32
swiglu = ops.swiglu


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Where each (token, expert) pair went: rows sorted by expert (stable in token order), invalid pairs last.

    expert `[R]` int32 (-1: no expert); weight `[R]` f32 routing weight; group_sizes `[E]` int32 rows per expert;
    row_of_pair `[T, k]` int32: the row of each token's j-th expert, the experts of a token in index order.
    """

    expert: jax.Array
    weight: jax.Array
    group_sizes: jax.Array
    row_of_pair: jax.Array


# Up to this many (token, expert) pairs, `dispatch` ranks the pairs by counting (an R x R comparison, a few fused
# element-wise kernels) instead of sorting: a decode step's handful of pairs would otherwise cost two sort kernels and
# two scatters per layer, launches that dominate a batch-1 step. Both give the same permutation.
COUNTING_DISPATCH_MAX_PAIRS = 1024


def dispatch(x_td, idx_tk, w_tk, n_experts: int, valid_t=None) -> tuple[jax.Array, ExpertLayout]:
    """Sorts the (token, expert) pairs by expert: `(x_rows [T*k, d], layout)`. Tokens with `valid` False (padding)
    get no expert (their rows come last with expert -1).

    The order: by expert, then token, then the token's experts in index order; every row's position is that of a
    stable sort of the expert ids (invalid pairs keyed past the last expert) over the pairs in (token, index) order.
    """
    t, k = idx_tk.shape
    if t * k <= COUNTING_DISPATCH_MAX_PAIRS:
        return _dispatch_by_counting(x_td, idx_tk, w_tk, n_experts, valid_t)
    order = jnp.argsort(idx_tk, axis=-1)  # each token's experts in index order: the combine order
    idx = jnp.take_along_axis(idx_tk, order, axis=-1)
    w = jnp.take_along_axis(w_tk, order, axis=-1)
    if valid_t is not None:
        idx = jnp.where(valid_t[:, None], idx, -1)
    flat = idx.reshape(-1)
    key = jnp.where(flat >= 0, flat, n_experts)
    perm = jnp.argsort(key, stable=True)  # row -> pair
    expert = flat[perm]
    rows = jnp.zeros((t * k,), jnp.int32).at[perm].set(jnp.arange(t * k, dtype=jnp.int32))
    group_sizes = jnp.zeros((n_experts,), jnp.int32).at[key].add(1, mode="drop")
    layout = ExpertLayout(expert, w.reshape(-1)[perm], group_sizes, rows.reshape(t, k))
    return x_td[perm // k], layout


def _stable_rank(key_n, order_n=None):
    """Position of each entry of `key [..., n]` in an ascending sort along the last axis, equal keys in the order
    of `order [..., n]` (distinct values; default: their positions, i.e. a stable sort): `[..., n]` int32."""
    if order_n is None:
        order_n = jnp.broadcast_to(jnp.arange(key_n.shape[-1], dtype=jnp.int32), key_n.shape)
    a, b = key_n[..., :, None], key_n[..., None, :]  # a: the entry ranked, b: the others
    before = (b < a) | ((b == a) & (order_n[..., None, :] < order_n[..., :, None]))
    return jnp.sum(before, axis=-1, dtype=jnp.int32)


def _dispatch_by_counting(x_td, idx_tk, w_tk, n_experts: int, valid_t):
    """`dispatch` without sorts: the same permutation from ranks counted by comparison, inverted by one-hot sums."""
    t, k = idx_tk.shape
    r = t * k
    q_tk = _stable_rank(idx_tk)  # each pair's place among its token's experts (index order)
    expert_tk = idx_tk if valid_t is None else jnp.where(valid_t[:, None], idx_tk, -1)
    key_r = jnp.where(expert_tk >= 0, expert_tk, n_experts).reshape(r)
    # a pair's place in the (token, index-order) sequence, then its row: the key's rank, ties in that sequence's order
    seq_r = (jnp.arange(t, dtype=jnp.int32)[:, None] * k + q_tk).reshape(r)
    row_r = _stable_rank(key_r, seq_r)
    at_row = row_r[None, :] == jnp.arange(r, dtype=jnp.int32)[:, None]  # [row, pair] one-hot

    def by_row(v_r):
        return jnp.sum(jnp.where(at_row, v_r[None, :], jnp.zeros((), v_r.dtype)), axis=-1)

    token_r = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    expert = by_row(expert_tk.reshape(r))
    weight = by_row(w_tk.reshape(r))
    group_sizes = jnp.sum(key_r[None, :] == jnp.arange(n_experts, dtype=jnp.int32)[:, None], axis=-1, dtype=jnp.int32)
    at_q = q_tk[:, :, None] == jnp.arange(k, dtype=jnp.int32)  # [t, pair j, place q]
    row_of_pair = jnp.sum(jnp.where(at_q, row_r.reshape(t, k, 1), 0), axis=1, dtype=jnp.int32)
    return x_td[by_row(token_r)], ExpertLayout(expert, weight, group_sizes, row_of_pair)


def combine(y_rd, layout: ExpertLayout) -> jax.Array:
    """fp32 `[T, d]`: token t sums its rows in expert-index order, starting from 0 (the reference adds each expert's
    bf16 output to an fp32 accumulator in index order)."""
    # A barrier: else XLA fuses the counting dispatch's rank computation (`_stable_rank`) into this sum's consumer,
    # which recomputed it for each of its output elements (the MoE combine + mHC post fusion: 5 us a layer on an
    # H200 at batch 1, for 16K elements).
    rows = jax.lax.optimization_barrier(layout.row_of_pair)
    acc = jnp.zeros((rows.shape[0], y_rd.shape[-1]), F32)
    for j in range(rows.shape[1]):
        acc = acc + y_rd[rows[:, j]].astype(F32)
    return acc


class Gate(nnx.Module):
    def __init__(self, cfg: Config, hash_routed: bool, *, rngs: nnx.Rngs):
        e, k = cfg.n_routed_experts, cfg.n_activated_experts
        self.k, self.route_scale = k, cfg.route_scale
        self.is_hash = hash_routed
        self.weight = nn.param(nn.normal(rngs, (e, cfg.dim), cfg.dim**-0.5, BF16), ("expert_gate", "embed"))
        if self.is_hash:
            # A fixed token -> k distinct experts table (int64 in the checkpoint, held as int32).
            perm = jnp.argsort(jax.random.uniform(rngs.params(), (cfg.vocab_size, e)), axis=-1)[:, :k]
            self.tid2eid = nn.param(perm.astype(jnp.int32), ("vocab", None))
        else:
            self.bias = nn.param(jnp.zeros((e,), F32), ("expert_gate",))

    def __call__(self, x_td: jax.Array, tokens_t: jax.Array, opts: Opts):
        """(`weights [T,k]` fp32, `idx [T,k]` int32) of the tokens `x [T, dim]` (`ops.route_experts`); the bias or
        the hash table as stored (a `LayerSlice` inside the layer scan)."""
        logits = ops.f32_linear(x_td, self.weight[...])
        bias, table = (None, self.tid2eid.get_value()) if self.is_hash else (self.bias.get_value(), None)
        return ops.route_experts(logits, bias, table, tokens_t, k=self.k, route_scale=self.route_scale, opts=opts)


class ExpertWeight(nnx.Module):
    """Stacked weights of one projection of all routed experts: MXFP4 (`uint8 [E, out, in/2]` + e8m0 `[E, out,
    in/32]`) or FP8 (`e4m3 [E, out, in]` + e8m0 `[E, out/128, in/128]`)."""

    def __init__(self, n_experts, in_f, out_f, axes, fmt: str, std: float, *, rngs: nnx.Rngs):
        q, s = nn.quantized_weight(rngs, (n_experts, out_f, in_f), std, fmt)
        self.weight = nn.param(q, ("expert", *axes))
        self.scale = nn.param(s, ("expert", *axes))


class Experts(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        e, d, i, fmt = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.expert_dtype
        self.limit = cfg.swiglu_limit
        self.w1 = ExpertWeight(e, d, i, ("expert_ffn", "embed"), fmt, d**-0.5, rngs=rngs)
        self.w3 = ExpertWeight(e, d, i, ("expert_ffn", "embed"), fmt, d**-0.5, rngs=rngs)
        self.w2 = ExpertWeight(e, i, d, ("embed", "expert_ffn"), fmt, i**-0.5 * (2 * cfg.n_blocks) ** -0.5, rngs=rngs)

    def weights(self) -> tuple:
        """(w1, s1, w3, s3, w2, s2) as stored (a `LayerSlice` each inside the layer scan)."""
        return tuple(p.get_value() for m in (self.w1, self.w3, self.w2) for p in (m.weight, m.scale))

    def __call__(self, x_rd, layout: ExpertLayout, opts: Opts) -> jax.Array:
        """bf16 `[R, d]`: each dispatched row through its expert (`ops.moe_experts`); split over the mesh's
        `expert` axis when a mesh with one is in context (`dsv4_jax.parallel.expert_parallel`)."""
        from dsv4_jax.parallel import expert_parallel

        args = (x_rd, layout.expert, layout.weight, layout.group_sizes, self.weights(), self.limit)
        if expert_parallel.expert_axis_size() > 1:
            return expert_parallel.routed_experts(*args, opts)
        return ops.moe_experts(*args, opts=opts)


class SharedExpert(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        d, i = cfg.dim, cfg.moe_inter_dim * cfg.n_shared_experts
        self.limit = cfg.swiglu_limit
        self.w1 = nn.Fp8Linear(d, i, ("ffn", "embed"), rngs=rngs)
        self.w3 = nn.Fp8Linear(d, i, ("ffn", "embed"), rngs=rngs)
        self.w2 = nn.Fp8Linear(i, d, ("embed", "ffn"), rngs=rngs, std=i**-0.5 * (2 * cfg.n_blocks) ** -0.5)

    def __call__(self, x_td, opts: Opts) -> jax.Array:
        gate, up = nn.fp8_linear_pair(x_td, self.w1, self.w3, opts)
        h = swiglu(gate.astype(F32), up.astype(F32), self.limit)
        return self.w2(to_bf16(h), opts)


class MoE(nnx.Module):
    def __init__(self, cfg: Config, hash_routed: bool, *, rngs: nnx.Rngs):
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg, hash_routed, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        self.shared_experts = SharedExpert(cfg, rngs=rngs)

    def __call__(self, x_btd, tokens_bt, opts: Opts, rec=None, valid_bt=None) -> jax.Array:
        """`bf16(sum_routed + shared)` for the ffn_norm output `x [b, s, dim]`. Tokens with `valid` False (padding)
        get no routed experts. `rec` (a `dsv4_jax.runner.Capture`) receives the routing."""
        b, s, d = x_btd.shape
        x = x_btd.reshape(b * s, d)
        with jax.named_scope("router"):
            w, idx = self.gate(x, tokens_bt.reshape(-1), opts)
            valid = None if valid_bt is None else valid_bt.reshape(-1)
            x_rows, layout = dispatch(x, idx, w, self.n_experts, valid)
        if rec is not None:
            rec.route_idx, rec.route_w = idx, w
        with jax.named_scope("experts"):
            y = combine(self.experts(x_rows, layout, opts), layout)
        with jax.named_scope("shared_expert"):
            y = y + self.shared_experts(x, opts).astype(F32)
        return to_bf16(y).reshape(b, s, d)
