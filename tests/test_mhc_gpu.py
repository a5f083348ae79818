"""GPU tests of the two-launch mHC hc_pre (`dsv4_hc_pre`, `ffi/csrc/mhc_kernels.cu`) against its reference twin
`ops.hc_pre` with the reference split: RMS over the n*d stream values, the mix dot with fn, the split (sigmoids and
Sinkhorn) and the collapse `x = bf16(sum_j pre_j X_j)`.

Inputs as the model has them: bf16 streams, fn drawn as the model initialises it, a stack of 3 layers of parameters
read at layer 1 through `LayerSlice`s (the kernel takes the stacks and the index); outputs poisoned first.

Bounds and why: the kernel sums the 16384-long mix dot and the sum of squares in another order than XLA (fp32 noise,
~1e-6 relative), which the split carries into pre, post and comb (the Sinkhorn iterations are contractions: the
same size), so post and comb within 1e-4 relative of the reference; x is bf16 of a 4-term fp32 sum with those pre
weights: the same bf16 value except where the noise crosses a rounding boundary, so >= 99% of x bit-identical and
every element within one bf16 ulp (2^-7 relative) plus that noise on the terms (1e-5 of sum_j |X_j|: where the
weighted streams cancel, the result is small and the noise is not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison

from dsv4_jax import ops
from dsv4_jax.layer_view import LayerSlice

pytestmark = pytest.mark.gpu


def _inputs(seed: int, rows: int, n: int, d: int):
    rng = np.random.default_rng(seed)
    m = (2 + n) * n
    X = jnp.asarray(rng.normal(size=(rows, 1, n, d)), jnp.bfloat16)
    fn = jnp.asarray(rng.normal(size=(3, m, n * d)) * 0.1 * (n * d) ** -0.5 * 10, jnp.float32)
    scale = jnp.asarray(1 + 0.1 * rng.normal(size=(3, 3)), jnp.float32)
    base = jnp.asarray(rng.normal(size=(3, m)), jnp.float32)
    i = jnp.int32(1)
    return X, LayerSlice(fn, i), LayerSlice(scale, i), LayerSlice(base, i)


def _run(backend: str, args, n: int):
    kw = dict(n=n, iters=20, eps=1e-6, norm_eps=1e-6, split_backend="reference")
    f = jax.jit(lambda *a: ops.hc_pre(*a, **kw, opts=ops.Opts(backend=backend)))
    return [np.asarray(v) for v in f(*args)]


@pytest.mark.parametrize("rows,n,d", [(1, 4, 4096), (3, 4, 4096), (64, 4, 4096), (2, 4, 7168), (5, 2, 256),
                                      (4, 1, 512)])  # fmt: skip
def test_hc_pre_kernel_vs_reference(ffi, rows, n, d):
    """Flash (4 x 4096), Pro (4 x 7168) and small widths; 1 to 64 tokens; a layer of a stack."""
    args = _inputs(rows * 31 + d + n, rows, n, d)
    x_ref, post_ref, comb_ref = _run("reference", args, n)
    poison()
    x, post, comb = _run("ffi", args, n)
    np.testing.assert_allclose(post, post_ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(comb, comb_ref, rtol=1e-4, atol=1e-7)
    xf, xr = x.astype(np.float32), x_ref.astype(np.float32)
    assert np.isfinite(xf).all()
    assert np.mean(x.view(np.uint16) == x_ref.view(np.uint16)) >= 0.99
    # one bf16 ulp of the result, plus the fp32 noise of pre (<= ~1, 1e-5 relative) on the terms: where the four
    # weighted streams cancel, that noise is large against the small result
    terms = np.sum(np.abs(np.asarray(args[0], np.float32)), axis=-2)
    assert np.all(np.abs(xf - xr) <= 2.0**-7 * np.abs(xr) + 1e-5 * terms)


def test_hc_pre_unstacked_and_many_rows(ffi):
    """Plain (unstacked) parameters; more tokens than the kernel takes (prefill: the mix dot stays XLA's GEMM, the split
    our kernel) gives the reference's numbers the same way."""
    X, fn, scale, base = _inputs(9, 100, 4, 4096)
    args = (X, fn.get(), scale.get(), base.get())
    x_ref, post_ref, comb_ref = _run("reference", args, 4)
    poison()
    x, post, comb = _run("ffi", args, 4)
    np.testing.assert_allclose(post, post_ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(comb, comb_ref, rtol=1e-4, atol=1e-7)
    assert np.mean(x.view(np.uint16) == x_ref.view(np.uint16)) >= 0.99


def test_hc_pre_refuses_bad_shapes(ffi):
    X, fn, scale, base = _inputs(1, 2, 4, 512)
    with pytest.raises(Exception, match="fn"):
        jax.block_until_ready(ffi.hc_pre(X[:, 0], fn.stack[:, :, :100], scale.stack, base.stack, 1, n=4, iters=20,
                                         eps=1e-6, norm_eps=1e-6))  # fmt: skip
    with pytest.raises(Exception, match="n=3"):
        jax.block_until_ready(ffi.hc_pre(X[:, 0, :3], fn.stack, scale.stack, base.stack, 1, n=3, iters=20, eps=1e-6,
                                         norm_eps=1e-6))  # fmt: skip


# ---- the sublayer's RMSNorm fused into the finishing launch (x_norm_w) ----------------------------------------------
# The normed x is bf16(w * (x * rs)) of the collapsed x above (>= 99% bit-identical to the reference's) and rs from
# the sum of its squares in another order (fp32 noise, ~1e-6 relative): the same bf16 value but where x differed or
# the noise crosses a rounding boundary, so >= 98% bit-identical and every element within two bf16 ulps of the
# reference plus x's bound above carried through w * rs.


def _run_norm(backend: str, args, norm_w, n: int):
    kw = dict(n=n, iters=20, eps=1e-6, norm_eps=1e-6, split_backend="reference", x_norm_eps=1e-6)
    f = jax.jit(lambda w, *a: ops.hc_pre(*a, **kw, x_norm_w=w, opts=ops.Opts(backend=backend)))
    return [np.asarray(v) for v in f(norm_w, *args)]


def _check_normed(x, x_ref, args, w, n: int):
    """x against the reference's normed x; the bound's scale from the reference's collapse before the norm."""
    xf, xr = x.astype(np.float32), x_ref.astype(np.float32)
    assert np.isfinite(xf).all()
    assert np.mean(x.view(np.uint16) == x_ref.view(np.uint16)) >= 0.98
    plain = _run("reference", args, n)[0].astype(np.float32)
    rs = 1.0 / np.sqrt(np.mean(np.square(plain), axis=-1, keepdims=True) + 1e-6)
    terms = np.sum(np.abs(np.asarray(args[0], np.float32)), axis=-2)
    wf = np.abs(np.asarray(w, np.float32))
    assert np.all(np.abs(xf - xr) <= 2.0**-7 * np.abs(xr) + wf * rs * (2.0**-7 * np.abs(plain) + 1e-5 * terms))


@pytest.mark.parametrize("rows,n,d", [(1, 4, 4096), (3, 4, 4096), (64, 4, 4096), (2, 4, 7168), (5, 2, 256),
                                      (4, 1, 512), (2, 4, 8192)])  # fmt: skip
def test_hc_pre_fused_norm_vs_reference(ffi, rows, n, d):
    """x_norm_w a layer of a stack at fn's position (the layer scan's form), the widest d the fused form takes."""
    args = _inputs(rows * 17 + d + n, rows, n, d)
    rng = np.random.default_rng(d + rows)
    w = LayerSlice(jnp.asarray(1 + 0.3 * rng.normal(size=(3, d)), jnp.bfloat16), args[1].index)
    x_ref, post_ref, comb_ref = _run_norm("reference", args, w, n)
    poison()
    x, post, comb = _run_norm("ffi", args, w, n)
    np.testing.assert_allclose(post, post_ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(comb, comb_ref, rtol=1e-4, atol=1e-7)
    _check_normed(x, x_ref, args, w.get(), n)


@pytest.mark.parametrize("rows,stacked", [(2, False), (100, True)])
def test_hc_pre_fused_norm_plain_weight_and_many_rows(ffi, rows, stacked):
    """A plain `[d]` weight beside stacked parameters (read at index 0 of a stack of one); more tokens than the kernel
    takes (the norm then runs after XLA's collapse), with the weight a LayerSlice."""
    args = _inputs(rows + 5, rows, 4, 4096)
    w_all = jnp.asarray(1 + 0.3 * np.random.default_rng(rows).normal(size=(3, 4096)), jnp.bfloat16)
    w = LayerSlice(w_all, args[1].index) if stacked else w_all[1]
    x_ref, _, _ = _run_norm("reference", args, w, 4)
    poison()
    x, _, _ = _run_norm("ffi", args, w, 4)
    _check_normed(x, x_ref, args, w_all[1], 4)


def test_hc_pre_fused_norm_refuses_bad_weight(ffi):
    X, fn, scale, base = _inputs(2, 2, 4, 512)
    with pytest.raises(Exception, match="norm_w"):
        jax.block_until_ready(ffi.hc_pre(X[:, 0], fn.stack, scale.stack, base.stack, 1, n=4, iters=20, eps=1e-6,
                                         norm_eps=1e-6, norm_w=jnp.ones((2, 512), jnp.bfloat16)))  # fmt: skip
    with pytest.raises(Exception, match="norm_w"):
        jax.block_until_ready(ffi.hc_pre(X[:, 0], fn.stack, scale.stack, base.stack, 1, n=4, iters=20, eps=1e-6,
                                         norm_eps=1e-6, norm_w=jnp.ones((500,), jnp.bfloat16)))  # fmt: skip
