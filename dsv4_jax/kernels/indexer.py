"""The kernel side of `dsv4_jax.ops.indexer_scores` and `ops.indexer_topk`: the lightning indexer's scores straight
from the packed MXFP4 keys, one launch, and its top-k selection, one launch. A `LayerSlice` of the stacked cache goes
to the kernel as the whole stack and the layer index (a dynamic slice feeding a custom call would be materialised: a
copy of the layer's keys every step)."""

from __future__ import annotations

import jax

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import stack_and_index

__all__ = ["scores", "topk"]


def scores(q_bthc: jax.Array, w_bth: jax.Array, keys) -> jax.Array:
    """f32 `[b, t, n]` (bf16 values) from q bf16 `[b, t, H, 128]`, w bf16 `[b, t, H]` and packed keys uint8
    `[b, n, 68]` (an array or a `LayerSlice`)."""
    b, t, h, c = q_bthc.shape
    stack, layer = stack_and_index(keys)
    out = ffi_ops.indexer_scores(q_bthc.reshape(b * t, h, c), w_bth.reshape(b * t, h), stack, layer)
    return out.reshape(b, t, stack.shape[2])


def topk(scores_btn: jax.Array, n_visible_bt: jax.Array, *, k: int) -> jax.Array:
    """int32 `[..., k]` picks (-1: not visible) from f32 scores `[..., n]` and int32 visible counts `[...]`."""
    n = scores_btn.shape[-1]
    out = ffi_ops.indexer_topk(scores_btn.reshape(-1, n), n_visible_bt.reshape(-1), k)
    return out.reshape(*scores_btn.shape[:-1], k)
