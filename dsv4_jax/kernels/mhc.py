"""The kernel sides of `dsv4_jax.ops.hc_split_mixes` (the whole mHC split, sigmoids and Sinkhorn, in one launch) and
`dsv4_jax.ops.hc_pre` (RMS, mix dot, split and the collapse of the streams in two)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import LayerSlice, materialize, stacks_and_index
from dsv4_jax.rounding import cast

# Tokens up to which hc_pre runs its two kernels (decode); beyond, the mix dot is a GEMM (XLA's, as the reference
# computes it) and only the split is ours.
HC_PRE_MAX_ROWS = 64

__all__ = ["split_mixes", "hc_pre"]


def split_mixes(mix: jax.Array, scale: jax.Array, base: jax.Array, *, n: int, iters: int, eps: float):
    """(pre `[..., n]`, post `[..., n]`, comb `[..., n, n]`) fp32 from mixes `[..., (2+n)*n]`."""
    lead = mix.shape[:-1]
    pre, post, comb = ffi_ops.hc_split_sinkhorn(
        mix.reshape(-1, mix.shape[-1]).astype(jnp.float32), scale, base, n=n, iters=iters, eps=eps
    )
    return pre.reshape(*lead, n), post.reshape(*lead, n), comb.reshape(*lead, n, n)


def hc_pre(X_btnd, fn, scale, base, *, n: int, iters: int, eps: float, norm_eps: float, split_backend: str = "",
           x_norm_w=None, x_norm_eps: float = 0.0):  # fmt: skip
    """(x `[b,t,d]` bf16, post `[b,t,n]`, comb `[b,t,n,n]`); parameters that are `LayerSlice`s of one stack position
    go to the kernel as their stacks and the layer index (no per-call copy of fn). With `x_norm_w` x comes out
    RMS-normed (`nn.rms_norm(x, x_norm_w, x_norm_eps)`), inside the finishing launch where d allows."""
    del split_backend  # the split is inside the kernel
    *lead, _, d = X_btnd.shape
    if X_btnd.size // (n * d) > HC_PRE_MAX_ROWS:  # the reference's arithmetic (`ops.mhc.mixes`), our split
        xf = X_btnd.reshape(*lead, n * d).astype(jnp.float32)
        rs = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + jnp.float32(norm_eps))
        mix = jnp.dot(xf, materialize(fn).astype(jnp.float32).T, precision="highest") * rs
        pre, post, comb = split_mixes(mix, materialize(scale), materialize(base), n=n, iters=iters, eps=eps)
        x = cast(jnp.sum(pre[..., None] * xf.reshape(X_btnd.shape), axis=-2), X_btnd.dtype)
        if x_norm_w is not None:  # nn.rms_norm's arithmetic (kernels do not import the model's code)
            xf = x.astype(jnp.float32)
            y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + jnp.float32(x_norm_eps))
            x = cast(materialize(x_norm_w).astype(jnp.float32) * y, x.dtype)
        return x, post, comb
    stacks, layer = stacks_and_index(fn, scale, base)
    norm_w = None  # with a norm, d <= HC_PRE_NORM_MAX_D (ops.hc_pre's supports)
    if x_norm_w is not None:  # the weight's stack where it is one layer of a stack at fn's position, else the weight
        same = isinstance(x_norm_w, LayerSlice) and layer is not None and x_norm_w.index is layer
        norm_w = x_norm_w.stack if same else materialize(x_norm_w)
    x, post, comb = ffi_ops.hc_pre(X_btnd.reshape(-1, n, d), *stacks, layer, n=n, iters=iters, eps=eps,
                                   norm_eps=norm_eps, norm_w=norm_w, x_norm_eps=x_norm_eps)  # fmt: skip
    return x.reshape(*lead, d), post.reshape(*lead, n), comb.reshape(*lead, n, n)
