"""The kernel side of `dsv4_jax.ops.hc_split_mixes`: the whole mHC split (sigmoids and Sinkhorn) in one launch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import ffi_ops

__all__ = ["split_mixes"]


def split_mixes(mix: jax.Array, scale: jax.Array, base: jax.Array, *, n: int, iters: int, eps: float):
    """(pre `[..., n]`, post `[..., n]`, comb `[..., n, n]`) fp32 from mixes `[..., (2+n)*n]`."""
    lead = mix.shape[:-1]
    pre, post, comb = ffi_ops.hc_split_sinkhorn(
        mix.reshape(-1, mix.shape[-1]).astype(jnp.float32), scale, base, n=n, iters=iters, eps=eps
    )
    return pre.reshape(*lead, n), post.reshape(*lead, n), comb.reshape(*lead, n, n)
