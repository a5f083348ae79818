"""Explicit rounding points.

The reference rounds to bf16 at specific points (sublayer outputs, bf16 tensor arithmetic in the per-head q norm
and the indexer score, probabilities before PV, ...). XLA may drop an f32 -> bf16 -> f32 convert pair inside a fusion
("excess precision"), which silently removes such a rounding; `lax.reduce_precision` is never removed. Every
f32 -> bf16 cast that the numerics depend on goes through `to_bf16`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["to_bf16", "cast"]


def to_bf16(x: jax.Array) -> jax.Array:
    """Round to bf16 (nearest even) in a way XLA keeps; returns a bf16 array."""
    if x.dtype == jnp.bfloat16:
        return x
    return jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=8, mantissa_bits=7).astype(jnp.bfloat16)


def cast(x: jax.Array, dtype) -> jax.Array:
    """`x.astype(dtype)`, with the bf16 rounding made explicit (see module doc)."""
    return to_bf16(x) if jnp.dtype(dtype) == jnp.bfloat16 else x.astype(dtype)
