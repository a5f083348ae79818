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

from dsv4_jax.layer_view import materialize
from dsv4_jax.ops import registry
from dsv4_jax.options import Opts
from dsv4_jax.rounding import cast

__all__ = ["hc_split_mixes", "hc_pre", "mixes", "sinkhorn", "split_mixes"]

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


# ---- hc_pre: the whole collapse of the streams -----------------------------------------------------------------


def mixes(X_btnd: jax.Array, fn: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(flat fp32 streams `[b,t,n*d]`, `(xf @ fn.T) * rsqrt(mean(xf^2) + eps)`): RMS over all n*d values, no weight."""
    b, t, n, d = X_btnd.shape
    xf = X_btnd.reshape(b, t, n * d).astype(F32)
    rs = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + F32(eps))
    return xf, jnp.dot(xf, fn.astype(F32).T, precision="highest") * rs


def _hc_pre_reference(X_btnd, fn, scale, base, *, n: int, iters: int, eps: float, norm_eps: float,
                      split_backend: str = "reference", x_norm_w=None, x_norm_eps: float = 0.0,
                      quant_sim: bool = True):  # fmt: skip
    """(x `[b,t,d]` bf16, post `[b,t,n]`, comb `[b,t,n,n]`): the mixes, their split (`hc_split_mixes` under
    `split_backend`, so its own kernel still runs where this op falls back), `x = bf16(sum_j pre[j] * X[j])`; with
    `x_norm_w` (the sublayer's RMSNorm weight `[d]`) x is returned normed, `nn.rms_norm(x, x_norm_w, x_norm_eps)`."""
    del quant_sim  # fp32 throughout
    from dsv4_jax import nn  # nn's linears call ops: imported here, not at module load

    xf, mix = mixes(X_btnd, materialize(fn), norm_eps)
    pre, post, comb = hc_split_mixes(mix, materialize(scale), materialize(base), n=n, iters=iters, eps=eps,
                                     opts=Opts(backend=split_backend))  # fmt: skip
    x = cast(jnp.sum(pre[..., None] * xf.reshape(X_btnd.shape), axis=2), X_btnd.dtype)
    if x_norm_w is not None:
        x = nn.rms_norm(x, materialize(x_norm_w), x_norm_eps)
    return x, post, comb


# Widest d whose sublayer norm the kernel fuses (the extension's hc_pre_norm_max_d: 8 blocks of 1024 values).
HC_PRE_NORM_MAX_D = 8192


def _hc_pre_supports(X_btnd, fn, scale, base, *, n: int, iters: int, eps: float, norm_eps: float,
                     split_backend: str = "reference", x_norm_w=None, x_norm_eps: float = 0.0,
                     quant_sim: bool = True) -> str | None:  # fmt: skip
    if n not in (1, 2, 4) or X_btnd.shape[-1] % 2 or X_btnd.dtype != jnp.bfloat16 or iters < 1:
        return f"streams {X_btnd.dtype}{tuple(X_btnd.shape)}, n={n}, iters={iters}: the kernel takes bf16, n in 1, " \
               "2, 4, an even width"  # fmt: skip
    if x_norm_w is not None and X_btnd.shape[-1] > HC_PRE_NORM_MAX_D:
        return f"d={X_btnd.shape[-1]} with the sublayer norm: the kernel's normed form takes d <= {HC_PRE_NORM_MAX_D}"
    return None


# Two launches instead of ~6 (RMS, mix dot, the split kernel, the weighted sum of the streams; per connection, two per
# layer). Its GPU tests (tests/test_mhc_gpu.py) passed on an H200 on 2026-12-01.
hc_pre = registry.register(
    "hc_pre",
    reference=_hc_pre_reference,
    kernel="dsv4_jax.kernels.mhc:hc_pre",
    supports=_hc_pre_supports,
)
