// Own CUDA kernels of the dsv4_jax FFI extension: per-token 1x128 power-of-two FP8 activation quantization
// (optionally gathering rows, optionally fused with the clamped SwiGLU of the routed experts), and UE8M0 -> FP32.
//
// Numerics (bit-identical to dsv4_jax.quant.act_quant for the plain quantization):
//   amax = max(max_i |x_i|, 1e-4);  s = 2^ceil(log2(amax * f32(1/448))) from the IEEE bits;
//   q = e4m3_rn(clip(x / s, -448, 448)).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp8_convert.cuh"
#include "kernels.h"
#include "layer_index.cuh"

namespace dsv4ffi {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ void load4(const __nv_bfloat16* p, float v[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&raw.x);
  const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&raw.y);
  v[0] = __low2float(a);
  v[1] = __high2float(a);
  v[2] = __low2float(b);
  v[3] = __high2float(b);
}

// One warp per (row, 128-wide K block); each lane owns 4 consecutive elements.
template <bool kSwiglu>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
quant_rows_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ u,
                  const float* __restrict__ w, const int32_t* __restrict__ src, __nv_fp8_e4m3* __restrict__ q,
                  float* __restrict__ sfa, int64_t rows_out, int64_t k, int64_t rows_per_group, int64_t sf_pitch,
                  float limit, bool wgmma_order, const LayerRowGroups lg) {
  if (lg.map != nullptr && blockIdx.x == 0 && threadIdx.x < lg.padded) {
    const int32_t r = static_cast<int32_t>(threadIdx.x);
    lg.map[r] = r < lg.rows ? static_cast<int32_t>(device_layer(lg.layer, lg.layers)) : -1;
  }
  const int64_t kblocks = k / 128;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (item >= rows_out * kblocks) return;
  const int lane = threadIdx.x % 32;
  const int64_t r = item / kblocks, kb = item % kblocks;
  int64_t rin = r;
  if (src != nullptr) {
    const int32_t s = src[r];
    if (s < 0) return;
    if (!kSwiglu) rin = s;
  }
  const int64_t col = kb * 128 + lane * 4;
  float v[4];
  load4(x + rin * k + col, v);
  if constexpr (kSwiglu) {
    float uv[4];
    load4(u + r * k + col, uv);
    const float wr = w[r];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = bf16_round(swiglu_weighted(v[i], uv[i], wr, limit));
  }
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float s = act_pow2_scale(amax);
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float t = fminf(fmaxf(__fdiv_rn(v[i], s), -448.f), 448.f);
    const __nv_fp8_storage_t b = __nv_cvt_float_to_fp8(t, __NV_SATFINITE, __NV_E4M3);
    packed |= static_cast<uint32_t>(b) << (8 * i);
  }
  // wgmma order (kernels.h): the lane's 4 elements 8i + 4h .. of its 32-block go to bytes 16h + 4i ..
  const int64_t at = wgmma_order ? kb * 128 + (lane / 8) * 32 + (lane & 1) * 16 + ((lane % 8) >> 1) * 4 : col;
  *reinterpret_cast<uint32_t*>(reinterpret_cast<uint8_t*>(q) + r * k + at) = packed;
  if (lane == 0) {
    const int64_t grp = r / rows_per_group, m = r % rows_per_group;
    sfa[(grp * kblocks + kb) * sf_pitch + m] = s;
  }
}

__global__ void e8m0_kernel(const uint8_t* __restrict__ s, float* __restrict__ out, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const uint32_t b = s[i];
  out[i] = b == 255u ? __uint_as_float(0x7FC00000u) : (b == 0u ? __uint_as_float(0x00400000u) : __uint_as_float(b << 23));
}

int64_t blocks_for(int64_t items) { return (items + kWarpsPerBlock - 1) / kWarpsPerBlock; }

}  // namespace

cudaError_t launch_quant_rows(const void* x, const int32_t* src, void* q, float* sfa, int64_t rows_out, int64_t k,
                              int64_t rows_per_group, int64_t sf_pitch, cudaStream_t stream, bool wgmma_order,
                              const LayerRowGroups& groups) {
  const int64_t items = rows_out * (k / 128);
  if (items == 0) return cudaSuccess;
  if (groups.map != nullptr && groups.padded > kWarpsPerBlock * 32) return cudaErrorInvalidValue;  // one block writes it
  quant_rows_kernel<false><<<blocks_for(items), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x), nullptr, nullptr, src, static_cast<__nv_fp8_e4m3*>(q), sfa, rows_out, k,
      rows_per_group, sf_pitch, 0.f, wgmma_order, groups);
  return cudaGetLastError();
}

cudaError_t launch_swiglu_quant(const void* g, const void* u, const float* w, const int32_t* valid, void* q,
                                float* sfa, int64_t rows, int64_t k, int64_t rows_per_group, int64_t sf_pitch,
                                float limit, cudaStream_t stream, bool wgmma_order) {
  const int64_t items = rows * (k / 128);
  if (items == 0) return cudaSuccess;
  quant_rows_kernel<true><<<blocks_for(items), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(g), static_cast<const __nv_bfloat16*>(u), w, valid,
      static_cast<__nv_fp8_e4m3*>(q), sfa, rows, k, rows_per_group, sf_pitch, limit, wgmma_order, LayerRowGroups{});
  return cudaGetLastError();
}

cudaError_t launch_e8m0_to_f32(const uint8_t* s, float* out, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  e8m0_kernel<<<(count + 255) / 256, 256, 0, stream>>>(s, out, count);
  return cudaGetLastError();
}

}  // namespace dsv4ffi
