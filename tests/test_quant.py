"""Storage formats and fake quantization, against hand-derived values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4_jax import ops, quant


def test_e8m0_decoding():
    b = jnp.array([127, 128, 126, 0, 254, 255], jnp.uint8)
    s = jax.lax.bitcast_convert_type(b, jnp.float8_e8m0fnu)
    got = np.asarray(quant.e8m0_to_f32(s))
    np.testing.assert_array_equal(got[:5], [1.0, 2.0, 0.5, 2.0**-127, 2.0**127])
    assert np.isnan(got[5]), "0xFF is NaN in UE8M0"
    # round trip of exact powers of two
    p = jnp.array([2.0**-20, 0.25, 1.0, 64.0], jnp.float32)
    np.testing.assert_array_equal(quant.e8m0_to_f32(quant.f32_to_e8m0(p)), p)


@pytest.mark.parametrize(
    "x,want",
    [(1.0, 1.0), (1.0000001, 2.0), (0.75, 1.0), (0.5, 0.5), (3.0, 4.0), (2.0**-30, 2.0**-30), (100.0, 128.0)],
)
def test_pow2_ceil(x, want):
    assert float(quant.pow2_ceil(jnp.float32(x))) == want


def test_act_quant_scales_and_values():
    x = np.zeros((2, 256), np.float32)
    x[0, :128] = np.linspace(-448, 448, 128)  # amax 448 -> scale exactly 1
    x[0, 128] = 452.0  # amax 452 (bf16-exact) -> 452/448 > 1 -> scale 2
    x[1, :128] = 0.0  # all zeros: amax floored at 1e-4 -> 2**ceil(log2(1e-4/448)) = 2**-22
    x[1, 128:] = 3.0  # 3/448 -> 2**-7; 3 / 2**-7 = 384 exactly
    q, s = quant.act_quant(jnp.asarray(x, jnp.bfloat16), 128)
    np.testing.assert_array_equal(np.asarray(s), [[1.0, 2.0], [2.0**-22, 2.0**-7]])
    qf = np.asarray(q.astype(jnp.float32))
    assert qf[0, 127] == 448 and qf[0, 0] == -448
    assert qf[0, 128] == 224.0  # 452/2 = 226 -> e4m3 rounds to 224 (spacing 16 there: 224, 240)
    np.testing.assert_array_equal(qf[1, :128], 0.0)
    np.testing.assert_array_equal(qf[1, 128:], 384.0)


def test_fp8_sim_round_to_nearest_even_and_saturation():
    # Block of 64 with amax 448 (scale 1): e4m3 spacing is 32 in [256, 448]: 272 is a tie -> 256 (even), 304 -> 320.
    x = np.zeros((1, 64), np.float32)
    x[0, :5] = [448.0, 272.0, 304.0, -17.0, 0.0078125]
    y = np.asarray(quant.fp8_sim(jnp.asarray(x, jnp.bfloat16), 64).astype(jnp.float32))
    np.testing.assert_array_equal(y[0, :5], [448.0, 256.0, 320.0, -16.0, 0.0078125])


def test_fp4_sim_grid_ties_and_floor():
    # amax 6 -> scale 1: values land on the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even.
    row = [6.0, 0.25, 0.75, 1.25, 2.5, 5.0, -3.5, 0.1] + [0.0] * 24
    y = np.asarray(quant.fp4_sim(jnp.asarray([row], jnp.float32), 32))
    np.testing.assert_array_equal(y[0, :8], [6.0, 0.0, 1.0, 1.0, 2.0, 4.0, -4.0, 0.0])
    # amax 12 -> 12/6 = 2 -> scale 2; 7 / 2 = 3.5 -> tie between 3 and 4 -> 4 (even code) -> 8
    y = np.asarray(quant.fp4_sim(jnp.asarray([[12.0, 7.0] + [0.0] * 30], jnp.float32), 32))
    np.testing.assert_array_equal(y[0, :2], [12.0, 8.0])
    # all zero: the amax floor 6 * 2**-126 keeps the scale finite and the output zero
    y = quant.fp4_sim(jnp.zeros((1, 32), jnp.float32), 32)
    assert np.all(np.asarray(y) == 0)


def test_e2m1_nibble_order_low_first():
    # byte 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1; 0xF8: -0 then -6
    packed = jnp.array([[0x21, 0xF8]], jnp.uint8)
    np.testing.assert_array_equal(np.asarray(quant.unpack_fp4(packed)), [[0.5, 1.0, -0.0, -6.0]])
    vals = jnp.array([[0.5, 1.0, 0.0, -6.0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(quant.pack_fp4(vals)), [[0x21, 0xF0]])


def test_weight_quantizers_round_trip():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(192, 256)).astype(np.float32)
    q, s = quant.quantize_fp8_weight(jnp.asarray(w))
    assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float8_e8m0fnu and s.shape == (2, 2)
    deq = np.asarray(quant.dequant_fp8_weight(q, s))
    assert np.max(np.abs(deq - w) / (np.abs(w) + 0.5)) < 0.07  # 3 mantissa bits
    # FP4: every dequantized value is an e2m1 grid value times its 1x32 block scale, within half a grid step
    p, s4 = quant.quantize_fp4_weight(jnp.asarray(w))
    assert p.shape == (192, 128) and s4.shape == (192, 8)
    d4 = np.asarray(quant.dequant_fp4_weight(p, s4))
    scale = np.repeat(np.asarray(quant.e8m0_to_f32(s4)), 32, axis=-1)
    assert np.all(np.isin(np.abs(d4 / scale), quant.E2M1_VALUES[:8]))
    assert np.all(np.abs(d4 - w) <= scale)  # the widest e2m1 gap is 2 (4 -> 6)
    assert np.all(np.abs(w).reshape(192, 8, 32).max(-1) <= 6 * scale[:, ::32])  # the scale covers the block


def test_fp8_linear_blockwise_matches_dequantized_math():
    """The simulated FP8 GEMM equals bf16(dequant(x_q) @ dequant(W).T) up to fp32 summation order."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(5, 256)), jnp.bfloat16)
    w, s = quant.quantize_fp8_weight(jnp.asarray(rng.normal(size=(384, 256)) * 0.05, jnp.float32))
    y = ops.fp8_linear(x, w, s, opts=ops.Opts())
    xq, sx = quant.act_quant(x, 128)
    xd = np.asarray(xq.astype(jnp.float32)).reshape(5, 2, 128) * np.asarray(sx)[..., None]
    ref = xd.reshape(5, 256).astype(np.float64) @ np.asarray(quant.dequant_fp8_weight(w, s), np.float64).T
    ref_bf16 = ref.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    got = np.asarray(y, np.float32)
    assert np.mean(got == ref_bf16) > 0.99
    # and quant_sim=False skips the activation quantization
    y0 = ops.fp8_linear(x, w, s, opts=ops.Opts(quant_sim=False))
    assert not np.array_equal(np.asarray(y0), np.asarray(y))


def test_fp4_linear_uses_32_wide_weight_scales():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 128)), jnp.bfloat16)
    w = rng.normal(size=(64, 128)).astype(np.float32)
    w[:, 32:64] *= 100.0  # a different scale per 32-block must be honoured
    p, s = quant.quantize_fp4_weight(jnp.asarray(w))
    y = np.asarray(ops.fp4_linear(x, p, s, quant_sim=False), np.float32)
    ref = np.asarray(x, np.float32) @ np.asarray(quant.dequant_fp4_weight(p, s)).T
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def _fp4_with_scale_bytes(rng, shape, scale_bytes):
    """Packed MXFP4 `[..., N, K/2]` with every code in either nibble and the given e8m0 scale bytes `[..., N, K/32]`."""
    packed = jnp.asarray(rng.integers(0, 256, (*shape[:-1], shape[-1] // 2), dtype=np.uint8))
    return packed, jax.lax.bitcast_convert_type(jnp.asarray(scale_bytes, jnp.uint8), jnp.float8_e8m0fnu)


def test_fp4_to_fp8_blocks_exact_within_the_span_and_bounded_beyond():
    """The MXFP4 -> FP8-block widening of the experts' prefill route: dequantized, it equals
    `dequant_fp4_weight` bit for bit while each 128x128 tile's scale bytes span <= 14 binades (tile 0: exactly 14),
    and beyond that (tile 1: 20) it errs by at most 2^-16 times the tile's largest block scale; a 255 byte (NaN)
    makes its tile NaN and leaves the others alone."""
    rng = np.random.default_rng(0)
    b = rng.integers(110, 125, (2, 256, 256 // 32)).astype(np.uint8)
    b[0, :128, :4] = np.where(rng.random((128, 4)) < 0.5, 130, 116)  # one tile spans 130 - 116 = 14
    b[0, 0, 0] = 130
    b[0, 128:, 4:] = np.where(rng.random((128, 4)) < 0.5, 130, 110)  # and one spans 20
    b[0, 128, 4], b[0, 129, 4] = 130, 110
    b[1, 5, 7] = 255  # N tile 0, K tile 1
    packed, s = _fp4_with_scale_bytes(rng, (2, 256, 256), b)
    q, sc = quant.fp4_to_fp8_blocks(packed, s)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (2, 256, 256) and sc.shape == (2, 2, 2)
    got = np.asarray(quant.e4m3_to_f32(q) * jnp.repeat(jnp.repeat(sc, 128, -2), 128, -1), np.float64)
    want = np.asarray(quant.dequant_fp4_weight(packed, s), np.float64)
    tiles = lambda a: a.reshape(2, 2, 128, 2, 128).transpose(0, 1, 3, 2, 4)  # noqa: E731
    gt, wt = tiles(got), tiles(want)
    np.testing.assert_array_equal(gt[0, 0, 0], wt[0, 0, 0])  # span 14: exact
    np.testing.assert_array_equal(gt[0, 0, 1], wt[0, 0, 1])
    np.testing.assert_array_equal(gt[0, 1, 0], wt[0, 1, 0])
    err = np.abs(gt[0, 1, 1] - wt[0, 1, 1]).max()
    assert 0 < err <= 2.0 ** (130 - 127 - 16), err  # span 20: the smallest blocks round in e4m3
    assert np.isnan(gt[1, 0, 1]).all() and np.isfinite(gt[1, 1]).all() and np.isfinite(gt[1, 0, 0]).all()
    np.testing.assert_array_equal(gt[1, 1], wt[1, 1])
    with pytest.raises(ValueError, match="multiples of 128"):
        quant.fp4_to_fp8_blocks(packed[:, :200], s[:, :200])


def test_fp4_slabs_layout_roundtrip_and_offsets():
    """The slab layout (`quant.fp4_to_slabs`, what the SM90 decode kernel reads): the same bytes, packed byte kb of row
    r at ((r / 16) * K/128 + kb / 64) * 1024 + (r % 16) * 64 + kb % 64, the scale word of row r's 128-wide chunk c at
    word ((r / 16) * K/128 + c) * 16 + r % 16 holding its four UE8M0 bytes (byte j = 32-block 4c + j) -- the offsets
    of ffi/csrc/fp4_slabs.cuh; `fp4_from_slabs` gives the stored layout back, with leading (layer, expert) dims."""
    rng = np.random.default_rng(3)
    w = rng.integers(0, 256, (2, 3, 48, 256), dtype=np.uint8)  # K = 512: 4 chunks; N = 48: 3 slabs
    b = rng.integers(0, 256, (2, 3, 48, 16), dtype=np.uint8)
    s = jax.lax.bitcast_convert_type(jnp.asarray(b), jnp.float8_e8m0fnu)
    ws, words = quant.fp4_to_slabs(jnp.asarray(w), s)
    assert ws.dtype == jnp.uint8 and ws.shape == w.shape and words.dtype == jnp.uint32 and words.shape == (2, 3, 48, 4)
    flat_w, flat_s = np.asarray(ws)[1, 2].reshape(-1), np.asarray(words)[1, 2].reshape(-1)
    for r in range(48):
        for kb in range(256):
            assert flat_w[((r // 16) * 4 + kb // 64) * 1024 + (r % 16) * 64 + kb % 64] == w[1, 2, r, kb]
        for c in range(4):
            word = int(flat_s[((r // 16) * 4 + c) * 16 + r % 16])
            assert [(word >> (8 * j)) & 0xFF for j in range(4)] == list(b[1, 2, r, 4 * c : 4 * c + 4])
    back_w, back_s = quant.fp4_from_slabs(ws, words)
    np.testing.assert_array_equal(np.asarray(back_w), w)
    np.testing.assert_array_equal(np.asarray(back_s), b)
    with pytest.raises(ValueError, match="N % 16"):
        quant.fp4_to_slabs(jnp.asarray(w[..., :40, :]), s[..., :40, :])
    with pytest.raises(ValueError, match="uint32 words"):
        quant.fp4_from_slabs(ws, words.astype(jnp.int32))
