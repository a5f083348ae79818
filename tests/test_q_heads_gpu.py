"""GPU tests of the query heads' norm and RoPE (`dsv4_q_heads`, `ffi/csrc/q_heads_kernels.cu`) against its reference
twin `ops.q_heads`: each head's weightless RMS norm in bf16 tensor arithmetic (`head_rms_norm_bf16`), then RoPE of the
tail at the token's position.

Inputs as `wq_b` gives them: bf16 `[b, t, 64, 512]` (decode rows, a short extend), heads of very different
magnitudes, a head of zeros (rsqrt of eps), positions from 0 to past 128K, both RoPE tables; outputs poisoned first.

Bounds and why: the squares' fp32 sum runs in another order than XLA's (noise ~1e-7 relative), which moves the bf16
mean across a rounding boundary now and then (then that head's scale differs by one bf16 ulp), and the RoPE takes
CUDA's cosf / sinf (within an ulp or two of XLA's): >= 98% of the elements bit-identical and every element within two
bf16 ulps (2^-6 relative) of the reference plus 2^-8 of the head's RMS-normed scale (a RoPE output near zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison

from dsv4_jax import ops
from dsv4_jax.config import Config
from dsv4_jax.kernels import ffi_ops
from dsv4_jax.nn import layer_inv_freq

pytestmark = pytest.mark.gpu


def _inputs(seed: int, b: int, t: int, h: int, d: int):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d)) * np.exp(rng.normal(size=(b, t, h, 1)) * 2.0)
    q[0, 0, 3] = 0.0
    pos = rng.integers(0, 140_000, size=(b, t))
    pos[0, 0] = 0
    return jnp.asarray(q, jnp.bfloat16), jnp.asarray(pos, jnp.int32)


def _run(backend: str, args, inv_freq):
    f = jax.jit(lambda q, p: ops.q_heads(q, p, inv_freq, eps=1e-6, opts=ops.Opts(backend=backend)))
    return np.asarray(f(*args))


@pytest.mark.parametrize("b,t,h,ratio", [(1, 1, 64, 4), (32, 1, 64, 128), (2, 5, 64, 0), (3, 1, 128, 4)])
def test_q_heads_kernel_vs_reference(ffi, b, t, h, ratio):
    inv_freq = layer_inv_freq(Config.flash(), ratio)
    args = _inputs(b * 13 + t + h + ratio, b, t, h, 512)
    ref = _run("reference", args, inv_freq)
    poison()
    got = _run("ffi", args, inv_freq)
    assert got.shape == ref.shape and np.isfinite(got.astype(np.float32)).all()
    assert np.mean(got.view(np.uint16) == ref.view(np.uint16)) >= 0.98
    gf, rf = got.astype(np.float32), ref.astype(np.float32)
    scale = np.sqrt(np.mean(np.square(rf), axis=-1, keepdims=True))  # ~1 per head after the norm (0 for the zero head)
    assert np.all(np.abs(gf - rf) <= 2.0**-6 * np.abs(rf) + 2.0**-8 * scale)
    assert np.all(got[0, 0, 3].astype(np.float32) == 0.0)  # a zero head stays zero


def test_q_heads_refuses_bad_operands(ffi):
    q, pos = _inputs(1, 2, 1, 8, 512)
    inv_freq = layer_inv_freq(Config.flash(), 4)
    with pytest.raises(Exception, match="pos"):
        jax.block_until_ready(ffi_ops.q_heads(q.reshape(2, 8, 512), pos.reshape(2)[:1], inv_freq, eps=1e-6))
    with pytest.raises(Exception, match="head width"):
        jax.block_until_ready(ffi_ops.q_heads(q.reshape(2, 8, 512)[..., :384], pos.reshape(2), inv_freq, eps=1e-6))
