"""Manifold-constrained hyper-connections (mHC): `hc_pre`, `hc_post`, `hc_head` (spec §3.1).

The residual stream is `X_btnd` (`n = hc_mult` streams, bf16). All mixing is fp32. Parameters of one connection:
`fn [(2 + n) * n, n * d]`, `scale [3]`, `base [(2 + n) * n]` (head: `fn [n, n * d]`, `scale [1]`, `base [n]`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.ops.mhc import hc_pre as hc_pre_op
from dsv4_jax.ops.mhc import mixes, sinkhorn, split_mixes
from dsv4_jax.options import Opts
from dsv4_jax.rounding import cast

__all__ = ["hc_pre", "hc_post", "hc_head", "sinkhorn", "split_mixes"]

F32 = jnp.float32


def hc_pre(X_btnd, fn, scale, base, *, iters: int, eps: float, norm_eps: float, opts: Opts = Opts(), x_norm_w=None,
           x_norm_eps: float = 0.0):  # fmt: skip
    """Collapses the n streams into one sublayer input (op `ops.hc_pre`; the split of the mixes: `ops.hc_split_mixes`).
    `fn`, `scale`, `base` (and `x_norm_w`) may be `LayerSlice`s of stacked parameters (the kernel reads the stack at
    the layer).

    Returns `(x_btd bf16, post_btn fp32, comb_btnn fp32)`; `x = bf16(sum_j pre[j] * X[j])`, or with `x_norm_w` the
    sublayer's RMSNorm of it, `nn.rms_norm(x, x_norm_w, x_norm_eps)` (one launch fewer than normalising after).
    """
    return hc_pre_op(X_btnd, fn, scale, base, n=X_btnd.shape[2], iters=iters, eps=eps, norm_eps=norm_eps,
                     split_backend=opts.backend, x_norm_w=x_norm_w, x_norm_eps=x_norm_eps, opts=opts)  # fmt: skip


def hc_post(x_btd, R_btnd, post_btn, comb_btnn):
    """`X_new[k] = bf16(post[k] * x + sum_j comb[j, k] * R[j])`: stream k receives column k of comb."""
    y = post_btn[..., None] * x_btd.astype(F32)[:, :, None, :]
    y = y + jnp.sum(comb_btnn[..., None] * R_btnd.astype(F32)[:, :, :, None, :], axis=2)
    return cast(y, R_btnd.dtype)


def hc_head(X_btnd, fn, scale, base, *, eps: float, norm_eps: float):
    """Final collapse: `bf16(sum_j (sigmoid(mix_j * scale + base_j) + eps) * X[j])`; no Sinkhorn."""
    xf, mix = mixes(X_btnd, fn, norm_eps)
    pre = jax.nn.sigmoid(mix * scale.astype(F32)[0] + base.astype(F32)) + F32(eps)
    return cast(jnp.sum(pre[..., None] * xf.reshape(X_btnd.shape), axis=2), X_btnd.dtype)
