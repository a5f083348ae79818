"""`hc_split_mixes`: the split of an mHC connection's mixes into its pre and post weights and the Sinkhorn-normalised
comb matrix (the official `hc_split_sinkhorn`, spec §3.1).

    pre_rn, post_rn, comb_rnn = hc_split_mixes(mix_rm, scale, base, n=4, iters=20, eps=1e-6, opts=opts)

mix: fp32 `[..., (2+n)*n]` (the normalised dot of the streams with `fn`); scale `[3]`; base `[(2+n)*n]`. The kernel
twin (`dsv4_jax.kernels.mhc`) does the whole split in one launch; the reference's Sinkhorn loop is ~80 tiny launches
per connection on a GPU, more than the rest of a decode layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.ops import registry

__all__ = ["hc_split_mixes", "sinkhorn", "split_mixes"]

F32 = jnp.float32


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def sinkhorn(logits_btnn: jax.Array, iters: int, eps: float) -> jax.Array:
    """Row softmax (+eps), column normalise, then `iters - 1` rounds of (row, column) normalisation, eps in every
    denominator. Rows are the first index j (source stream), columns the second index k (target stream)."""
    c = jax.nn.softmax(logits_btnn, axis=-1) + F32(eps)
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + F32(eps))

    def rows_then_columns(_, c):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + F32(eps))
        return c / (jnp.sum(c, axis=-2, keepdims=True) + F32(eps))

    # A loop, not unrolled: 19 unrolled rounds were one of the costliest things to compile in a layer (~2.5 s).
    return jax.lax.fori_loop(0, iters - 1, rows_then_columns, c)


def split_mixes(mix: jax.Array, scale: jax.Array, base: jax.Array, n: int, iters: int, eps: float):
    """The official `hc_split_sinkhorn`: mixes `[..., (2+n)*n]` -> (pre `[..., n]`, post `[..., n]`,
    comb `[..., n, n]`)."""
    scale, base = scale.astype(F32), base.astype(F32)
    pre = _sigmoid(mix[..., :n] * scale[0] + base[:n]) + F32(eps)
    post = 2.0 * _sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    comb = mix[..., 2 * n :] * scale[2] + base[2 * n :]
    comb = comb.reshape(*comb.shape[:-1], n, n)
    return pre, post, sinkhorn(comb, iters, eps)


def _reference(mix, scale, base, *, n: int, iters: int, eps: float, quant_sim: bool = True):
    del quant_sim  # fp32 throughout: nothing is quantised
    return split_mixes(mix, scale, base, n, iters, eps)


def _supports(mix, scale, base, *, n: int, iters: int, eps: float, quant_sim: bool = True) -> str | None:
    if n not in (1, 2, 4):
        return f"{n} hyper-connection streams (the kernel has 1, 2, 4: a token's n*n lanes within one warp)"
    if iters < 1:
        return f"iters={iters}"
    return None


hc_split_mixes = registry.register(
    "hc_split_mixes", reference=_reference, kernel="dsv4_jax.kernels.mhc:split_mixes", supports=_supports
)
