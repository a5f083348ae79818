"""The kernel of `dsv4_jax.ops.moe_experts`, by expert format: MXFP4 (`moe_fp4`, the released checkpoints) or FP8
(`moe_fp8`)."""

from __future__ import annotations

import jax.numpy as jnp

from dsv4_jax.kernels import moe_fp4, moe_fp8

__all__ = ["routed_experts", "routed_experts_unsupported"]


def _impl(weights):
    return moe_fp4 if weights[0].dtype == jnp.uint8 else moe_fp8


def routed_experts_unsupported(x, expert, weight, group_sizes, weights, limit: float) -> str | None:
    return _impl(weights).routed_experts_unsupported(x, expert, weight, group_sizes, weights, limit)


def routed_experts(x, expert, weight, group_sizes, weights, limit: float):
    return _impl(weights).routed_experts(x, expert, weight, group_sizes, weights, limit)
