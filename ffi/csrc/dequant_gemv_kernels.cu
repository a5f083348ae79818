// V4 attention's grouped low-rank output projection (`wo_a`) at decode sizes: y = x . bf16(W * s), where the FP8
// weight is dequantised to bf16 exactly as the reference converts it (f32(e4m3) * UE8M0 block scale, rounded to
// bf16), and the activation stays bf16 (no FP8 quantisation: the reference's wo_a is a bf16 einsum).
//
// Why a kernel: XLA runs the reference as one reduce fusion per layer at ~1 TB/s (~30 us of a ~300 us decode layer
// on an H200). Here each warp streams one weight row with 16-byte loads, dequantises it in registers and multiplies
// it with up to 8 token rows of its group: the 32 MB weight is read once at memory speed.
//
// Numerics: bf16 x bf16 products are exact in fp32 (so fma equals multiply then add), accumulated in fp32; only the
// summation order differs from the reference's fp32 einsum. Output bf16, round to nearest even.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp8_convert.cuh"
#include "kernels.h"

namespace dsv4ffi {
namespace {

constexpr int kWarps = 8;  // weight rows per block, one per warp
constexpr int kLaneBytes = 16;

__device__ __forceinline__ void bf16x8_to_f32(const uint4 v, float f[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

// x [M, groups, k] bf16; w [layers, n, k] e4m3; s [layers, ceil(n/128), k/128] f32; layer: [1] int32 or null;
// out [M, n] bf16. Weight row r belongs to group r / rows_per_group.
template <int M>
__global__ void __launch_bounds__(kWarps * 32)
    dequant_bf16_gemv_kernel(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                             const float* __restrict__ s, const int32_t* __restrict__ layer,
                             __nv_bfloat16* __restrict__ out, int64_t n, int64_t k, int64_t rows_per_group,
                             int64_t groups) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n) return;
  const int64_t l = layer != nullptr ? int64_t(*layer) : 0;
  const int64_t kb = k / 128;
  const uint8_t* wr = w + (l * n + row) * k;
  const float* sr = s + (l * ((n + 127) / 128) + row / 128) * kb;
  const int64_t g = row / rows_per_group;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
#pragma unroll 2
  for (int64_t c = int64_t(lane) * kLaneBytes; c < k; c += 32 * kLaneBytes) {
    float f[16];
    e4m3x16_to_f32(__ldg(reinterpret_cast<const uint4*>(wr + c)), f);
    const float sc = sr[c / 128];
#pragma unroll
    for (int i = 0; i < 16; ++i) f[i] = __bfloat162float(__float2bfloat16_rn(f[i] * sc));
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const __nv_bfloat16* xm = x + (int64_t(m) * groups + g) * k + c;
      float xf[16];
      bf16x8_to_f32(__ldg(reinterpret_cast<const uint4*>(xm)), xf);
      bf16x8_to_f32(__ldg(reinterpret_cast<const uint4*>(xm + 8)), xf + 8);
#pragma unroll
      for (int i = 0; i < 16; ++i) acc[m] = fmaf(xf[i], f[i], acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) out[int64_t(m) * n + row] = __float2bfloat16_rn(acc[m]);
  }
}

template <int M>
cudaError_t launch_m(const DequantGemvArgs& a, cudaStream_t stream) {
  const int64_t blocks = (a.n + kWarps - 1) / kWarps;
  dequant_bf16_gemv_kernel<M><<<dim3(unsigned(blocks)), kWarps * 32, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(a.x), static_cast<const uint8_t*>(a.w), a.s, a.layer,
      static_cast<__nv_bfloat16*>(a.out), a.n, a.k, a.rows_per_group, a.groups);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dequant_bf16_gemv(const DequantGemvArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  switch (a.m) {
    case 1: return launch_m<1>(a, stream);
    case 2: return launch_m<2>(a, stream);
    case 3: return launch_m<3>(a, stream);
    case 4: return launch_m<4>(a, stream);
    case 5: return launch_m<5>(a, stream);
    case 6: return launch_m<6>(a, stream);
    case 7: return launch_m<7>(a, stream);
    case 8: return launch_m<8>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dsv4ffi
