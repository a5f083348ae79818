"""The kernel side of `dsv4_jax.ops.indexer_scores` and `ops.indexer_topk`: the lightning indexer's scores straight
from the packed MXFP4 keys, one launch, and its top-k selection, one launch. A `LayerSlice` of the stacked cache goes
to the kernel as the whole stack and the layer index (a dynamic slice feeding a custom call would be materialised: a
copy of the layer's keys every step)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import stack_and_index

__all__ = ["scores", "topk", "topk_by_sort", "XLA_TOPK_MIN_N", "XLA_TOPK_MAX_ROWS"]


def scores(q_bthc: jax.Array, w_bth: jax.Array, keys) -> jax.Array:
    """f32 `[b, t, n]` (bf16 values) from q bf16 `[b, t, H, 128]`, w bf16 `[b, t, H]` and packed keys uint8
    `[b, n, 68]` (an array or a `LayerSlice`)."""
    b, t, h, c = q_bthc.shape
    stack, layer = stack_and_index(keys)
    out = ffi_ops.indexer_scores(q_bthc.reshape(b * t, h, c), w_bth.reshape(b * t, h), stack, layer)
    return out.reshape(b, t, stack.shape[2])


# A few rows past what the kernel keeps in shared memory go to XLA's sort (`topk_by_sort`: the same picks). The
# kernel gives each row one block: at 1 x 262,144 entries (1M tokens of context, batch 1) it took 260 us on an H200
# against XLA's 53 us, at 1 x 32,768 35 us against 43 (BENCHMARKS.md). The row bound is where the kernel's row
# leaves shared memory; the row count is an estimate (XLA's time grows with rows x n, the kernel's with n).
XLA_TOPK_MIN_N = 49152
XLA_TOPK_MAX_ROWS = 8


def topk_by_sort(scores_btn: jax.Array, n_visible_bt: jax.Array, *, k: int) -> jax.Array:
    """`ops.indexer_topk`'s picks by XLA's sort, computed as its reference does (`jax.lax.top_k` of the scores with
    -0 as +0 and the entries past the visible count as -inf; -1 for picks that are not visible)."""
    s = scores_btn.astype(jnp.float32)
    s = jnp.where(s == 0, 0.0, s)
    n_vis = n_visible_bt.astype(jnp.int32)[..., None]
    _, idx = jax.lax.top_k(jnp.where(jnp.arange(s.shape[-1]) < n_vis, s, -jnp.inf), k)
    return jnp.where(idx < n_vis, idx, -1).astype(jnp.int32)


def topk(scores_btn: jax.Array, n_visible_bt: jax.Array, *, k: int) -> jax.Array:
    """int32 `[..., k]` picks (-1: not visible) from f32 scores `[..., n]` and int32 visible counts `[...]`: the
    kernel, or `topk_by_sort` for fewer than XLA_TOPK_MAX_ROWS rows longer than XLA_TOPK_MIN_N."""
    n = scores_btn.shape[-1]
    if n > XLA_TOPK_MIN_N and math.prod(scores_btn.shape[:-1]) < XLA_TOPK_MAX_ROWS:
        return topk_by_sort(scores_btn, n_visible_bt, k=k)
    out = ffi_ops.indexer_topk(scores_btn.reshape(-1, n), n_visible_bt.reshape(-1), k)
    return out.reshape(*scores_btn.shape[:-1], k)
