"""The kernel side of `dsv4_jax.ops.indexer_scores`: the lightning indexer's scores straight from the packed MXFP4
keys, one launch. A `LayerSlice` of the stacked cache goes to the kernel as the whole stack and the layer index (a
dynamic slice feeding a custom call would be materialised: a copy of the layer's keys every step)."""

from __future__ import annotations

import jax

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import stack_and_index

__all__ = ["scores"]


def scores(q_bthc: jax.Array, w_bth: jax.Array, keys) -> jax.Array:
    """f32 `[b, t, n]` (bf16 values) from q bf16 `[b, t, H, 128]`, w bf16 `[b, t, H]` and packed keys uint8
    `[b, n, 68]` (an array or a `LayerSlice`)."""
    b, t, h, c = q_bthc.shape
    stack, layer = stack_and_index(keys)
    out = ffi_ops.indexer_scores(q_bthc.reshape(b * t, h, c), w_bth.reshape(b * t, h), stack, layer)
    return out.reshape(b, t, stack.shape[2])
