"""RoPE, YaRN, RMSNorm variants, Hadamard and mHC against hand-derived expectations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import Config, mhc, nn
from dsv4_jax.ops.q_heads import head_rms_norm_bf16


def test_rope_is_complex_multiplication_on_interleaved_pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    pos = np.array([0, 7, 1000])
    inv = nn.rope_inv_freq(64, 10000.0, 0, 1.0, 0, 0)
    got = np.asarray(nn.apply_rope(jnp.asarray(x), jnp.asarray(pos), inv))
    z = (x[:, 0::2] + 1j * x[:, 1::2]) * np.exp(1j * pos[:, None] * inv[None].astype(np.float64))
    want = np.stack([z.real, z.imag], -1).reshape(3, 64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[0], x[0])  # position 0 is the identity
    back = np.asarray(nn.apply_rope(jnp.asarray(got), jnp.asarray(pos), inv, inverse=True))
    np.testing.assert_allclose(back, x, atol=1e-4)


def test_rope_tail_leaves_nope_dims():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 512)), jnp.bfloat16)
    y = nn.rope_tail(x, jnp.array([5, 9]), nn.layer_inv_freq(Config.tiny(), 4))
    np.testing.assert_array_equal(np.asarray(y[:, :448]), np.asarray(x[:, :448]))
    assert not np.array_equal(np.asarray(y[:, 448:]), np.asarray(x[:, 448:]))


def test_yarn_frequencies():
    cfg = Config.flash()
    plain = nn.rope_inv_freq(64, 160000.0, 0, 1.0, 0, 0)
    yarn = nn.layer_inv_freq(cfg, 4)
    # correction range for beta_fast 32 / beta_slow 1 at theta 160000, original length 65536:
    low = math.floor(64 * math.log(65536 / (32 * 2 * math.pi)) / (2 * math.log(160000)))
    high = math.ceil(64 * math.log(65536 / (1 * 2 * math.pi)) / (2 * math.log(160000)))
    assert (low, high) == (15, 25)
    np.testing.assert_array_equal(yarn[: low + 1], plain[: low + 1])  # fast dims untouched
    np.testing.assert_allclose(yarn[high:], plain[high:] / 16, rtol=1e-6)  # slow dims interpolated by the factor
    mid = 20  # ramp 0.5: halfway between the two
    np.testing.assert_allclose(yarn[mid], plain[mid] * (0.5 / 16 + 0.5), rtol=1e-6)
    # sliding-only layers: theta 10000 without YaRN
    np.testing.assert_array_equal(nn.layer_inv_freq(cfg, 0), nn.rope_inv_freq(64, 10000.0, 0, 1.0, 0, 0))


def test_rms_norm_multiplies_weight_in_fp32_before_the_cast():
    x = jnp.asarray([[1.0, 3.0, -2.0, 0.5]], jnp.bfloat16)
    w = jnp.asarray([1.001, 0.7, 1.3, 2.0], jnp.float32)
    got = np.asarray(nn.rms_norm(x, w, 1e-6), np.float32)
    xf = np.asarray(x, np.float64)
    ref = np.asarray(w, np.float64) * xf / np.sqrt(np.mean(xf**2) + 1e-6)
    np.testing.assert_allclose(got, ref, rtol=4e-3)
    assert got.dtype == np.float32 and np.asarray(nn.rms_norm(x, w, 1e-6)).dtype == jnp.bfloat16


def test_head_rms_norm_bf16_arithmetic():
    q = jnp.asarray(np.random.default_rng(2).normal(size=(4, 512)) * 3, jnp.bfloat16)
    y = np.asarray(head_rms_norm_bf16(q, 1e-6), np.float32)
    np.testing.assert_allclose(np.sqrt(np.mean(y**2, -1)), 1.0, rtol=1e-2)  # unit RMS, no weight


def test_hadamard_is_orthonormal_sylvester():
    h = nn._hadamard(128)
    np.testing.assert_array_equal(h @ h.T, 128 * np.eye(128))
    np.testing.assert_array_equal(h, h.T)
    assert h[1, :4].tolist() == [1, -1, 1, -1]  # Sylvester ordering
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 128)), jnp.float32)
    y = nn.hadamard_128(x)
    np.testing.assert_allclose(np.asarray(y @ y.T), np.asarray(x @ x.T), rtol=1e-5)  # dot products kept


def test_sinkhorn_is_doubly_stochastic():
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(5, 4, 4)), jnp.float32)
    c = np.asarray(mhc.sinkhorn(logits, 20, 1e-6))
    np.testing.assert_allclose(c.sum(-2), 1.0, atol=1e-5)  # columns normalised last: exact to eps
    np.testing.assert_allclose(c.sum(-1), 1.0, atol=2e-3)
    one = np.asarray(mhc.sinkhorn(logits, 1, 1e-6))  # a single iteration is row softmax, then columns
    sm = np.asarray(jax.nn.softmax(logits, -1)) + 1e-6
    np.testing.assert_allclose(one, sm / (sm.sum(-2, keepdims=True) + 1e-6), rtol=1e-6)


def test_split_mixes_layout_and_ranges():
    n = 4
    mix = jnp.zeros((1, (2 + n) * n), jnp.float32)
    base = jnp.arange((2 + n) * n, dtype=jnp.float32) * 0.1
    pre, post, comb = mhc.split_mixes(mix, jnp.ones(3), base, n, 20, 1e-6)
    np.testing.assert_allclose(np.asarray(pre[0]), 1 / (1 + np.exp(-np.arange(4) * 0.1)) + 1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(post[0]), 2 / (1 + np.exp(-np.arange(4, 8) * 0.1)), rtol=1e-6)
    assert comb.shape == (1, 4, 4)


def test_hc_post_stream_k_receives_column_k():
    n, d = 4, 8
    R = jnp.asarray(np.arange(n)[None, None, :, None] * np.ones((1, 1, n, d)), jnp.bfloat16)  # stream j holds j
    comb = np.zeros((1, 1, n, n), np.float32)
    comb[0, 0, 3, 0] = 1.0  # column 0 takes stream 3
    comb[0, 0, 1, 2] = 0.5  # column 2 takes half of stream 1
    out = mhc.hc_post(jnp.ones((1, 1, d), jnp.bfloat16), R, jnp.zeros((1, 1, n)), jnp.asarray(comb))
    np.testing.assert_array_equal(np.asarray(out, np.float32)[0, 0, :, 0], [3.0, 0.0, 0.5, 0.0])


def test_hc_pre_collapses_with_pre_weights():
    rng = np.random.default_rng(5)
    X = jnp.asarray(rng.normal(size=(1, 2, 4, 16)), jnp.bfloat16)
    fn = jnp.zeros((24, 64), jnp.float32)  # mixes 0 -> pre = sigmoid(base) + eps
    base = jnp.zeros(24).at[:4].set(jnp.array([0.0, 1.0, -1.0, 2.0]))
    x, post, comb = mhc.hc_pre(X, fn, jnp.ones(3), base, iters=20, eps=1e-6, norm_eps=1e-6)
    pre = 1 / (1 + np.exp(-np.array([0.0, 1.0, -1.0, 2.0]))) + 1e-6
    want = np.einsum("j,btjd->btd", pre, np.asarray(X, np.float64))
    np.testing.assert_allclose(np.asarray(x, np.float32), want, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(post), 1.0, rtol=1e-6)  # 2 * sigmoid(0)
    np.testing.assert_allclose(np.asarray(comb), 0.25, rtol=1e-4)  # uniform logits -> uniform doubly stochastic
