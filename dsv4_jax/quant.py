"""Storage formats and the reference (pure-JAX) quantization numerics of DeepSeek-V4.

Formats, exactly as the released checkpoint stores them (spec §5):
  * FP8 weights: `float8_e4m3fn [N, K]` with `float8_e8m0fnu [ceil(N/128), ceil(K/128)]` block scales.
  * MXFP4 routed experts: `uint8 [N, K/2]`, element 2m in the low nibble, 2m+1 in the high nibble, with
    `float8_e8m0fnu [N, K/32]` scales.

Simulations that the official forward pass performs (spec §2.3, §8):
  * `act_quant`: per-token 1x128 FP8 quantization with power-of-two (UE8M0) scales in front of every FP8/FP4 GEMM.
  * `fp8_sim`/`fp4_sim`: in-place fake quantization of KV and indexer vectors.

Power-of-two scales are computed from the IEEE bits (exponent + (mantissa != 0)) exactly as the official kernels do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = [
    "FP8_MAX",
    "FP4_MAX",
    "E2M1_VALUES",
    "e8m0_to_f32",
    "fp4_to_fp8_blocks",
    "f32_to_e8m0",
    "pow2_ceil",
    "act_quant",
    "fp8_sim",
    "fp4_sim",
    "cast_e2m1",
    "e4m3_to_f32",
    "dequant_fp8_weight",
    "unpack_fp4",
    "pack_fp4",
    "dequant_fp4_weight",
    "FP4_SLAB_ROWS",
    "fp4_to_slabs",
    "fp4_slab_bytes",
    "fp4_slab_words",
    "fp4_from_slabs",
    "quantize_fp8_weight",
    "quantize_fp4_weight",
]

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0**-126

# e4m3 byte -> value (NaN at 0x7F/0xFF). Decoding by table lookup instead of a dtype convert matters on GPUs: XLA
# rewrites dot(convert(f8), convert(f8)) into a cuBLASLt FP8 GEMM, whose result was measured ~2.7e-2 off the exact
# product on an H100 (benchmarks/gpu_reference_check.py); a gather is never pattern-matched.
# The fake quantisations (`fp8_sim`, `fp4_sim`) decode by table too: XLA's GPU pipeline drops an
# f32 -> f8 -> f32 (or -> f4 -> f32) convert pair as "excess precision", so `x.astype(f8).astype(f32)` was the identity
# there (measured on an H200: the reference's compressor entries came out unquantised), while the CPU kept it.
E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)

# e2m1 code -> value; bit 3 is the sign.
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def e8m0_to_f32(s: jax.Array) -> jax.Array:
    """UE8M0 scale bytes -> float32 `2**(byte - 127)`; byte 0xFF decodes to NaN (as the format defines).
    Float32 scales (already decoded, see `dsv4_jax.kernels.prepare_params`) pass through."""
    if s.dtype == jnp.float32:
        return s
    b = jax.lax.bitcast_convert_type(s, jnp.uint8) if s.dtype != jnp.uint8 else s
    b32 = b.astype(jnp.uint32)
    # 2**(b-127) is the float32 with biased exponent b; b == 0 is 2**-127, a denormal: 0x00400000.
    bits = jnp.where(b32 == 0, jnp.uint32(0x00400000), b32 << 23)
    val = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(b32 == 255, jnp.float32(jnp.nan), val)


def f32_to_e8m0(x: jax.Array) -> jax.Array:
    """Exact powers of two (float32, normal range) -> UE8M0 bytes, as `float8_e8m0fnu`."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jax.lax.bitcast_convert_type(((bits >> 23) & 0xFF).astype(jnp.uint8), jnp.float8_e8m0fnu)


def pow2_ceil(x: jax.Array) -> jax.Array:
    """`2**ceil(log2(x))` for positive normal float32 `x`, from the IEEE bits (the official `fast_round_scale`)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    exp = ((bits >> 23) & 0xFF).astype(jnp.int32)
    exp = exp + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
    return jax.lax.bitcast_convert_type((exp.astype(jnp.uint32) << 23), jnp.float32)


def _block_scale(xb: jax.Array, floor: float, qmax: float) -> jax.Array:
    amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), jnp.float32(floor))
    # Multiply by the float32 reciprocal (not divide): that is what the kernels do, and it changes the rounding.
    return pow2_ceil(amax * jnp.float32(1.0 / qmax))


def act_quant(x: jax.Array, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """Per-token FP8 quantization in blocks of `block` along the last axis.

    Args:
      x: `[..., K]` (bf16 or f32), `K % block == 0`.
    Returns:
      `(x_q, s)`: `x_q` float8_e4m3fn `[..., K]`, `s` float32 powers of two `[..., K // block]`, with
      `x ~= x_q * s` blockwise.
    """
    *lead, k = x.shape
    if k % block:
        raise ValueError(f"act_quant: last dim {k} is not a multiple of the block {block}")
    xb = x.astype(jnp.float32).reshape(*lead, k // block, block)
    s = _block_scale(xb, FP8_AMAX_FLOOR, FP8_MAX)
    q = jnp.clip(xb / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return q.reshape(*lead, k), s[..., 0]


def fp8_sim(x: jax.Array, block: int = 64) -> jax.Array:
    """FP8 fake quantization (round trip through e4m3 with pow2 block scales), result in `x.dtype`."""
    *lead, k = x.shape
    xb = x.astype(jnp.float32).reshape(*lead, k // block, block)
    s = _block_scale(xb, FP8_AMAX_FLOOR, FP8_MAX)
    q = e4m3_to_f32(jnp.clip(xb / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn))
    return (q * s).reshape(x.shape).astype(x.dtype)


def cast_e2m1(x: jax.Array) -> jax.Array:
    """Round float32 values in [-6, 6] to the nearest e2m1 value, ties to even (hardware `cvt.rn.satfinite`).
    Decoded by table lookup on the codes, never a convert back (see the note at `E4M3_VALUES`)."""
    return _e2m1_values(_e2m1_codes(x))


def _e2m1_codes(x: jax.Array) -> jax.Array:
    """The e2m1 codes (uint8 0..15, bit 3 the sign) of `x`, rounded to nearest e2m1, ties to even."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.float4_e2m1fn), jnp.uint4).astype(jnp.uint8)


def _e2m1_values(codes: jax.Array) -> jax.Array:
    """float32 values of e2m1 codes, by table lookup."""
    return jnp.asarray(E2M1_VALUES)[codes.astype(jnp.int32)]


def fp4_sim(x: jax.Array, block: int = 32) -> jax.Array:
    """FP4 (e2m1) fake quantization with pow2 block scales, result in `x.dtype`."""
    *lead, k = x.shape
    xb = x.astype(jnp.float32).reshape(*lead, k // block, block)
    s = _block_scale(xb, FP4_AMAX_FLOOR, FP4_MAX)
    q = cast_e2m1(jnp.clip(xb / s, -FP4_MAX, FP4_MAX))
    return (q * s).reshape(x.shape).astype(x.dtype)


# ---- weights ---------------------------------------------------------------------------------------------------


def _expand_block_scale(s: jax.Array, n: int, k: int, bn: int, bk: int) -> jax.Array:
    s32 = e8m0_to_f32(s)
    s32 = jnp.repeat(jnp.repeat(s32, bn, axis=-2), bk, axis=-1)
    return s32[..., :n, :k]


def e4m3_to_f32(x: jax.Array) -> jax.Array:
    """Exact float32 values of `float8_e4m3fn` data, by table lookup on the bytes (see `E4M3_VALUES`)."""
    return jnp.asarray(E4M3_VALUES)[jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.int32)]


def dequant_fp8_weight(w: jax.Array, s: jax.Array) -> jax.Array:
    """`float8_e4m3fn [..., N, K]` with e8m0 `[..., ceil(N/128), ceil(K/128)]` scales -> float32 `[..., N, K]`."""
    n, k = w.shape[-2:]
    return e4m3_to_f32(w) * _expand_block_scale(s, n, k, 128, 128)


def unpack_fp4(packed: jax.Array) -> jax.Array:
    """Packed e2m1 bytes `[..., N, K/2]` -> float32 values `[..., N, K]` (low nibble = even element)."""
    b = jax.lax.bitcast_convert_type(packed, jnp.uint8) if packed.dtype != jnp.uint8 else packed
    lo, hi = b & 0x0F, b >> 4
    return _e2m1_values(jnp.stack([lo, hi], axis=-1).reshape(*b.shape[:-1], b.shape[-1] * 2))


def pack_fp4(values: jax.Array) -> jax.Array:
    """e2m1 values `[..., K]` (any float dtype, exactly representable) -> packed uint8 `[..., K/2]`, low nibble
    first."""
    codes = _e2m1_codes(values)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def dequant_fp4_weight(packed: jax.Array, s: jax.Array) -> jax.Array:
    """Packed MXFP4 `[..., N, K/2]` with e8m0 `[..., N, K/32]` scales -> float32 `[..., N, K]`."""
    v = unpack_fp4(packed)
    return v * jnp.repeat(e8m0_to_f32(s), 32, axis=-1)


# The slab layout of MXFP4 expert weights, made once at load by `dsv4_jax.prepare_params` for the SM90 decode kernel
# (ffi/csrc/kernels.h): rows in slabs of 16, and in each slab one piece per 128-wide K chunk (16 rows x 64 packed
# bytes, 1 KB), so that the kernel's warp streams one contiguous kilobyte per chunk instead of 16 pieces of 64 bytes
# 2 KB apart (measured 11-15% faster for the gate/up launch, BENCHMARKS.md). Same bytes, same container shape; the
# scales become uint32 words `[..., N, K/128]` (the four UE8M0 bytes of a row's chunk, byte j = 32-block j, in the
# same slab order): their dtype is what marks the layout.
FP4_SLAB_ROWS = 16


def fp4_to_slabs(packed: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MXFP4 `[..., N, K/2]` with e8m0 scales `[..., N, K/32]` -> the slab layout: (uint8 `[..., N, K/2]`, uint32
    `[..., N, K/128]`), a permutation of the same bytes. N a multiple of 16, K of 128."""
    *lead, n, half_k = packed.shape
    k = 2 * half_k
    if packed.dtype != jnp.uint8 or n % FP4_SLAB_ROWS or k % 128 or s.shape != (*lead, n, k // 32):
        raise ValueError(
            f"fp4_to_slabs: weight {packed.dtype}{list(packed.shape)} / scales {list(s.shape)} are not "
            f"uint8 [..., N, K/2] / [..., N, K/32] with N % {FP4_SLAB_ROWS} == 0 and K % 128 == 0"
        )
    return fp4_slab_bytes(packed), fp4_slab_words(s)


def fp4_slab_bytes(packed: jax.Array) -> jax.Array:
    """The weight half of `fp4_to_slabs` (shapes as it checks them): packed `[..., N, K/2]` in slab order."""
    *lead, n, half_k = packed.shape
    r, c = FP4_SLAB_ROWS, 2 * half_k // 128
    return jnp.swapaxes(packed.reshape(*lead, n // r, r, c, 64), -3, -2).reshape(*lead, n, half_k)


def fp4_slab_words(s: jax.Array) -> jax.Array:
    """The scale half of `fp4_to_slabs`: e8m0 scales `[..., N, K/32]` -> uint32 words `[..., N, K/128]` in slab
    order."""
    *lead, n, kb = s.shape
    r, c = FP4_SLAB_ROWS, kb // 4
    b = (jax.lax.bitcast_convert_type(s, jnp.uint8) if s.dtype != jnp.uint8 else s).astype(jnp.uint32)
    b = b.reshape(*lead, n, c, 4)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return jnp.swapaxes(words.reshape(*lead, n // r, r, c), -2, -1).reshape(*lead, n, c)


def fp4_from_slabs(packed: jax.Array, words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of `fp4_to_slabs`: (uint8 `[..., N, K/2]`, UE8M0 bytes as uint8 `[..., N, K/32]`) as stored."""
    *lead, n, half_k = packed.shape
    r, c = FP4_SLAB_ROWS, 2 * half_k // 128
    if words.dtype != jnp.uint32 or words.shape != (*lead, n, c):
        raise ValueError(
            f"fp4_from_slabs: scales {words.dtype}{list(words.shape)} are not the uint32 words "
            f"[..., N, K/128] of the weight {list(packed.shape)}"
        )
    w = jnp.swapaxes(packed.reshape(*lead, n // r, c, r, 64), -3, -2).reshape(*lead, n, half_k)
    words = jnp.swapaxes(words.reshape(*lead, n // r, c, r), -2, -1).reshape(*lead, n, c)
    b = jnp.stack([(words >> (8 * j)) & 0xFF for j in range(4)], axis=-1).astype(jnp.uint8)
    return w, b.reshape(*lead, n, 4 * c)


# Headroom of the MXFP4 -> FP8 widening: the largest 32-block of a 128x128 tile is scaled by 2^6 (6 * 64 = 384 <= 448);
# a block 2^t below it (t >= -8) keeps every e2m1 value exact in e4m3 (0.5 * 2^-8 = 2^-9, the least subnormal).
FP4_WIDEN_HEADROOM = 6
FP4_WIDEN_EXACT_SPAN = FP4_WIDEN_HEADROOM + 8


def fp4_to_fp8_blocks(packed: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MXFP4 `[..., N, K/2]` (scales e8m0 `[..., N, K/32]`) -> the released FP8 weight format: (e4m3 `[..., N, K]`,
    float32 powers of two `[..., N/128, K/128]`), for the FP8 block-scaled GEMMs. N and K multiples of 128.

    Each 32-block's scale is folded into its values relative to the largest scale byte of its 128x128 tile:
    value * 2^(byte - max + 6) in e4m3, the tile's scale 2^(max - 6 - 127). Exact (the dequantized weights equal
    `dequant_fp4_weight`'s bit for bit) wherever a tile's scale bytes span at most FP4_WIDEN_EXACT_SPAN (14)
    binades; further below, a value rounds to nearest in e4m3 (an error of at most 2^-16 times the tile's largest
    block scale). A scale byte 255 (NaN) makes its tile's scale NaN."""
    *lead, n, half_k = packed.shape
    k = 2 * half_k
    if n % 128 or k % 128 or s.shape != (*lead, n, k // 32):
        raise ValueError(f"fp4_to_fp8_blocks: weight {packed.shape} and scales {s.shape} must be [..., N, K/2] and "
                         "[..., N, K/32] with N and K multiples of 128")  # fmt: skip
    b = jax.lax.bitcast_convert_type(s, jnp.uint8) if s.dtype != jnp.uint8 else s
    tile_max = jnp.max(b.reshape(*lead, n // 128, 128, k // 128, 4), axis=(-3, -1)).astype(jnp.int32)
    shift = b.astype(jnp.int32) - jnp.repeat(jnp.repeat(tile_max, 128, axis=-2), 4, axis=-1) + FP4_WIDEN_HEADROOM
    values = unpack_fp4(packed).reshape(*lead, n, k // 32, 32)
    q = (values * jnp.ldexp(jnp.float32(1), jnp.maximum(shift, -64))[..., None]).astype(jnp.float8_e4m3fn)
    scale = jnp.ldexp(jnp.float32(1), tile_max - (127 + FP4_WIDEN_HEADROOM))
    return q.reshape(*lead, n, k), jnp.where(tile_max == 255, jnp.float32(jnp.nan), scale)


def quantize_fp8_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 `[..., N, K]` -> (e4m3 `[..., N, K]`, e8m0 `[..., ceil(N/128), ceil(K/128)]`): 128x128 blocks with
    power-of-two scales (amax floor 1e-4), the format of the released FP8 weights."""
    *lead, n, k = w.shape
    nb, kb = -(-n // 128), -(-k // 128)
    pad = jnp.pad(w.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, nb * 128 - n), (0, kb * 128 - k)])
    blocks = pad.reshape(*lead, nb, 128, kb, 128)
    amax = jnp.maximum(jnp.max(jnp.abs(blocks), axis=(-3, -1)), jnp.float32(FP8_AMAX_FLOOR))
    s = pow2_ceil(amax * jnp.float32(1.0 / FP8_MAX))
    q = jnp.clip(blocks / s[..., :, None, :, None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    q = q.reshape(*lead, nb * 128, kb * 128)[..., :n, :k]
    return q, f32_to_e8m0(s)


def quantize_fp4_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 `[..., N, K]` -> (packed uint8 `[..., N, K/2]`, e8m0 `[..., N, K/32]`): MXFP4 with pow2 1x32 scales."""
    *lead, n, k = w.shape
    blocks = w.astype(jnp.float32).reshape(*lead, n, k // 32, 32)
    s = _block_scale(blocks, FP4_AMAX_FLOOR, FP4_MAX)
    q = jnp.clip(blocks / s, -FP4_MAX, FP4_MAX).astype(jnp.float4_e2m1fn).reshape(*lead, n, k)
    return pack_fp4(q), f32_to_e8m0(s[..., 0])
