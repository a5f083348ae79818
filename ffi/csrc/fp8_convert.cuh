// Register-level conversions shared by the FP8 kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace dsv4ffi {

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

}  // namespace dsv4ffi
