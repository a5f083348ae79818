"""The kernel side of `dsv4_jax.ops.route_experts`: scores, top-k (or the hash table's experts) and weights of every
token in one launch."""

from __future__ import annotations

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import stack_and_index

__all__ = ["route_experts"]


def route_experts(logits_te, bias_e, table_vk, tokens_t, *, k: int, route_scale: float):
    """(`weights [T,k]` fp32, `idx [T,k]` int32); the bias or hash table goes in as its layer stack and the layer
    index (a plain array as a stack of one), so no step copies a layer's slice."""
    stack, layer = stack_and_index(bias_e if table_vk is None else table_vk)
    bias, table = (stack, None) if table_vk is None else (None, stack)
    return ffi_ops.route(logits_te, bias, table, tokens_t, layer, k=k, route_scale=route_scale)
