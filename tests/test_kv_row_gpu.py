"""GPU tests of the window KV row (`dsv4_kv_row`, `ffi/csrc/compressor_kernels.cu`) against its reference twin
`ops.kv_row`: `wkv`'s output RMS-normed, RoPE on the tail at each token's position, the NoPE channels FP8-simulated in
tiles of 64, and the same row packed (`kv_format.pack_kv`).

Inputs as a step has them: bf16 rows (decode: one per batch row; a short extend), the norm weight one layer of a stack
of 3 (a `LayerSlice`: the kernel takes the stack and the index), positions from 0 to past 128K, both RoPE tables (a
compressed layer's YaRN one and the window layer's plain one), a NoPE tile of zeros and tiles of very different
magnitudes; outputs poisoned first.

Bounds and why: the norm's sum of squares runs in another order than XLA's (fp32 noise, ~1e-7 relative) and the RoPE
takes CUDA's cosf / sinf (within an ulp or two of XLA's); everything else is the reference's arithmetic. So the row is
the same bf16 (and FP8) value except where that noise crosses a rounding boundary (a bf16 ulp, or one e4m3 step of
a tile): >= 98% of the elements bit-identical and the rel-RMS difference within 2e-2. The packed row must be exactly
`pack_kv` of the kernel's own row (packing is lossless and deterministic), and equal to the reference's packed row in
>= 98% of its bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison

from dsv4_jax import kv_format, ops
from dsv4_jax.config import Config
from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import LayerSlice
from dsv4_jax.nn import layer_inv_freq

pytestmark = pytest.mark.gpu


def _inputs(seed: int, b: int, t: int, d: int):
    rng = np.random.default_rng(seed)
    tile_scale = np.exp(rng.normal(size=(b, t, d // 64, 1)) * 1.5).repeat(64, -1).reshape(b, t, d)
    kva = rng.normal(size=(b, t, d)) * tile_scale
    kva[0, 0, :64] = 0.0  # a NoPE tile of zeros: the scale's floor
    norm_w = jnp.asarray(1 + 0.2 * rng.normal(size=(3, d)), jnp.bfloat16)
    pos = rng.integers(0, 140_000, size=(b, t))
    pos[0, 0] = 0
    return jnp.asarray(kva, jnp.bfloat16), LayerSlice(norm_w, jnp.int32(1)), jnp.asarray(pos, jnp.int32)


def _run(backend: str, args, inv_freq, row_bytes: int):
    f = jax.jit(lambda *a: ops.kv_row(*a, inv_freq, eps=1e-6, row_bytes=row_bytes, opts=ops.Opts(backend=backend)))
    kv, packed = f(*args)
    return np.asarray(kv), None if packed is None else np.asarray(packed)


def _rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2))


@pytest.mark.parametrize("b,t,d,ratio", [(3, 1, 512, 4), (64, 1, 512, 128), (2, 5, 512, 0), (4, 1, 128, 4)])
def test_kv_row_kernel_vs_reference(ffi, b, t, d, ratio):
    cfg = Config.flash()
    inv_freq = layer_inv_freq(cfg, ratio)
    rope = 2 * len(inv_freq)
    row_bytes = kv_format.kv_row_bytes(d, rope)
    args = _inputs(b * 7 + t + d + ratio, b, t, d)
    kv_ref, packed_ref = _run("reference", args, inv_freq, row_bytes)
    poison()
    kv, packed = _run("ffi", args, inv_freq, row_bytes)
    assert kv.shape == kv_ref.shape and packed.shape == packed_ref.shape == (b, t, row_bytes)
    assert np.isfinite(kv.astype(np.float32)).all()
    assert np.mean(kv.view(np.uint16) == kv_ref.view(np.uint16)) >= 0.98
    assert _rel_rms(kv.astype(np.float32), kv_ref.astype(np.float32)) <= 2e-2
    np.testing.assert_array_equal(packed, np.asarray(kv_format.pack_kv(jnp.asarray(kv), rope)))
    assert np.mean(packed == packed_ref) >= 0.98
    # without the packed row: the same kv, no second output
    kv2, none = _run("ffi", args, inv_freq, 0)
    assert none is None
    np.testing.assert_array_equal(kv2.view(np.uint16), kv.view(np.uint16))


def test_kv_row_refuses_bad_operands(ffi):
    kva, w, pos = _inputs(1, 2, 1, 512)
    inv_freq = layer_inv_freq(Config.flash(), 4)
    x = kva.reshape(2, 512)
    with pytest.raises(Exception, match="norm_w"):
        jax.block_until_ready(ffi_ops.kv_row(x, w.stack[:, :500], 1, pos.reshape(2), inv_freq, eps=1e-6))
    with pytest.raises(Exception, match="pos"):
        jax.block_until_ready(ffi_ops.kv_row(x, w.stack, 1, pos.reshape(2)[:1], inv_freq, eps=1e-6))
    with pytest.raises(Exception, match="row width"):
        jax.block_until_ready(ffi_ops.kv_row(x[:, :256], w.stack[:, :256], 1, pos.reshape(2), inv_freq, eps=1e-6))
