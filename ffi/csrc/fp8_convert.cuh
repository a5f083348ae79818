// Register-level conversions shared by the FP8 kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace dsv4ffi {

// PTX prmt in its default mode: bit 3 of a selector nibble replicates the sign of the selected byte (the CUDA
// __byte_perm intrinsic documents only the 3-bit selection, so this is spelled out).
static __device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// Eight e2m1 codes (nibble i = element i, bit 3 the sign) -> the e4m3 bytes of the same values, elements 0-3 in
// `lo`, 4-7 in `hi` (byte i = element i). Exact: |code| 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6 = e4m3 0x00, 0x30, 0x38,
// 0x3C, 0x40, 0x44, 0x48, 0x4C (all normal), by one prmt table lookup per 4 elements; the sign bits by a second
// prmt in sign-replicate mode (element 2m's sign is bit 3 of byte m: bit 7 of byte m of w << 4; element 2m+1's is
// bit 7 of byte m of w).
static __device__ __forceinline__ void e2m1x8_to_e4m3_lut(uint32_t w, uint32_t& lo, uint32_t& hi) {
  constexpr uint32_t kLut0 = 0x3C383000u, kLut1 = 0x4C484440u;
  const uint32_t mag = w & 0x77777777u, w4 = w << 4;
  lo = prmt(kLut0, kLut1, mag) | (prmt(w4, w, 0xD9C8u) & 0x80808080u);
  hi = prmt(kLut0, kLut1, mag >> 16) | (prmt(w4, w, 0xFBEAu) & 0x80808080u);
}

// 8 e4m3 bytes -> 8 floats, exactly (every e4m3 value is an f16 value); the low byte is the first element.
static __device__ __forceinline__ void e4m3x8_to_f32(const uint2 v, float f[8]) {
  const uint32_t w[2] = {v.x, v.y};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w[i] & 0xFFFFu), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w[i] >> 16), __NV_E4M3);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&lo));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&hi));
    f[4 * i + 0] = a.x, f[4 * i + 1] = a.y, f[4 * i + 2] = b.x, f[4 * i + 3] = b.y;
  }
}

// 16 e4m3 bytes -> 16 floats, exactly; the low byte is the first element.
static __device__ __forceinline__ void e4m3x16_to_f32(const uint4 v, float f[16]) {
  e4m3x8_to_f32(make_uint2(v.x, v.y), f);
  e4m3x8_to_f32(make_uint2(v.z, v.w), f + 8);
}

// float32(1/448), the constant dsv4_jax.quant.act_quant multiplies by (0x1.24924ap-9).
constexpr float kInvFp8Max = 0x1.24924ap-9f;

// 2^ceil(log2(t)) from the IEEE bits of a positive normal t (dsv4_jax.quant.pow2_ceil, the official
// fast_round_scale).
static __device__ __forceinline__ float pow2_ceil(float t) {
  const uint32_t bits = __float_as_uint(t);
  const uint32_t e = ((bits >> 23) & 0xFFu) + ((bits & 0x7FFFFFu) != 0u);
  return __uint_as_float(e << 23);
}

// The power-of-two scale of one FP8 block (quant.act_quant, quant.fp8_sim): 2^ceil(log2(max(amax, 1e-4) * f32(1/448))).
// Shared by every kernel that quantises to e4m3 (activation rows, the GEMVs' fused quantisation, the compressor's
// entries), so that all derive the scale from the same code.
static __device__ __forceinline__ float act_pow2_scale(float amax) {
  return pow2_ceil(__fmul_rn(fmaxf(amax, 1e-4f), kInvFp8Max));
}

// x rounded to bf16 (nearest even) and back: the reference's bf16 rounding points.
static __device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// w * silu(min(g, L)) * clip(u, -L, L) in fp32 in the reference's order (moe.swiglu; no clamp if L <= 0): the experts'
// SwiGLU epilogue, shared by the FP8 quantization and the MXFP4 gate/up kernels.
static __device__ __forceinline__ float swiglu_weighted(float g, float u, float w, float limit) {
  if (limit > 0.f) {
    u = fminf(fmaxf(u, -limit), limit);
    g = fminf(g, limit);
  }
  const float act = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
  return __fmul_rn(w, __fmul_rn(act, u));
}

}  // namespace dsv4ffi
