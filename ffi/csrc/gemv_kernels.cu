// Small-M FP8 block-scaled GEMM on CUDA cores ("GEMV"), our own kernel, for decode-sized batches.
//
// Why not the tensor-core GEMMs: at M <= 8 a 64-row WGMMA tile is >= 87% padding and the persistent tile grid over
// N alone gives each SM one or two long K loops: far too few bytes in flight to stream the weights at HBM speed.
// Here every warp streams 4 weight rows with 16-byte loads, K may be split across the warps of a block, and the
// arithmetic (<= 8 FMAs per weight byte) stays under the CUDA-core rate.
//
// Numerics: the same FP8 operands and power-of-two scales as the reference blockwise GEMM: FP8 x FP8 products are
// exact in FP32, each 16-element partial sum is scaled by s_a[row, kb] * s_b[n/128, kb] (a power of two: exact) and
// accumulated in FP32; only the summation order differs from the reference. Output bf16 (round to nearest even).
//
// Addressing: output row r (of `out_rows`) belongs to segment r / TB; a segment's rows share one weight group.
//   activation row of r = rows_map ? rows_map[r] : r;   group of r = group_map ? group_map[r / TB] : 0.
// Rows with a negative or out-of-range activation row or group are written as zeros.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace dsv4ffi {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 4;  // output columns (weight rows) per warp; 128 % 4 == 0 keeps them in one scale block
constexpr int kLaneBytes = 16;
constexpr int kBlocksPerStep = 32 * kLaneBytes / 128;  // 128-wide K blocks covered by one warp step (4)

__device__ __forceinline__ void e4m3x16_to_f32(const uint4 v, float f[16]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // cvt.rn.f16x2.e4m3x2: exact (every e4m3 value is an f16 value); the low byte is the first element.
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w[i] & 0xFFFFu), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w[i] >> 16), __NV_E4M3);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&lo));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&hi));
    f[4 * i + 0] = a.x, f[4 * i + 1] = a.y, f[4 * i + 2] = b.x, f[4 * i + 3] = b.y;
  }
}

template <int TB>
__global__ void __launch_bounds__(kWarps * 32)
gemv_fp8_kernel(const uint8_t* __restrict__ a, int64_t a_rows, const float* __restrict__ sfa, int64_t sfa_row_stride,
                int64_t sfa_kb_stride, const uint8_t* __restrict__ b, const float* __restrict__ sfb, int64_t groups,
                const int32_t* __restrict__ rows_map, const int32_t* __restrict__ group_map,
                __nv_bfloat16* __restrict__ d, int64_t out_rows, int64_t n, int64_t k, int ksplit) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_groups = kWarps / ksplit;
  const int rg = warp / ksplit, kc = warp % ksplit;
  const int64_t seg = blockIdx.y;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * row_groups + rg) * kRowsPerWarp;
  const int64_t kblocks = k / 128, nblocks = (n + 127) / 128;

  int64_t g = group_map != nullptr ? group_map[seg] : 0;
  const bool group_ok = g >= 0 && g < groups;
  if (!group_ok) g = 0;
  int64_t arow[TB];
  bool live[TB];
#pragma unroll
  for (int j = 0; j < TB; ++j) {
    const int64_t r = seg * TB + j;
    int64_t src = r < out_rows ? (rows_map != nullptr ? rows_map[r] : r) : -1;
    live[j] = group_ok && src >= 0 && src < a_rows;
    arow[j] = live[j] ? src : 0;
  }

  float acc[kRowsPerWarp][TB];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int j = 0; j < TB; ++j) acc[i][j] = 0.f;

  const int64_t kb_per = (kblocks + ksplit - 1) / ksplit;
  const int64_t kb_begin = kc * kb_per, kb_end = kblocks < kb_begin + kb_per ? kblocks : kb_begin + kb_per;
  const uint8_t* bg = b + (g * n) * k;
  const float* sfb_row = sfb + (g * nblocks + (n0 < n ? n0 : 0) / 128) * kblocks;
#pragma unroll 2
  for (int64_t kb0 = kb_begin; kb0 < kb_end; kb0 += kBlocksPerStep) {
    const int64_t kb = kb0 + lane / (128 / kLaneBytes);
    if (kb >= kb_end) continue;
    const int64_t col = kb * 128 + (lane % (128 / kLaneBytes)) * kLaneBytes;
    uint4 wv[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i)
      wv[i] = n0 + i < n ? __ldg(reinterpret_cast<const uint4*>(bg + (n0 + i) * k + col)) : make_uint4(0, 0, 0, 0);
    const float sb = sfb_row[kb];
    float wf[kRowsPerWarp][16];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) e4m3x16_to_f32(wv[i], wf[i]);
#pragma unroll
    for (int j = 0; j < TB; ++j) {
      if (!live[j]) continue;
      float af[16];
      e4m3x16_to_f32(__ldg(reinterpret_cast<const uint4*>(a + arow[j] * k + col)), af);
      const float s = sfa[arow[j] * sfa_row_stride + kb * sfa_kb_stride] * sb;
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        float p = 0.f;
#pragma unroll
        for (int e = 0; e < 16; ++e) p = fmaf(af[e], wf[i][e], p);
        acc[i][j] = fmaf(p, s, acc[i][j]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int j = 0; j < TB; ++j)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[i][j] += __shfl_xor_sync(0xffffffffu, acc[i][j], off);

  __shared__ float part[kWarps][kRowsPerWarp * TB];
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
      for (int j = 0; j < TB; ++j) part[warp][i * TB + j] = acc[i][j];
  }
  __syncthreads();
  if (kc != 0 || lane >= kRowsPerWarp * TB) return;
  const int i = lane / TB, j = lane % TB;
  float v = 0.f;
  for (int c = 0; c < ksplit; ++c) v += part[warp + c][lane];
  const int64_t r = seg * TB + j, col = n0 + i;
  // Rows that are not live accumulated nothing: v is 0 for them.
  if (r < out_rows && col < n) d[r * n + col] = __float2bfloat16_rn(v);
}

template <int TB>
cudaError_t launch_tb(const GemvArgs& p, int ksplit, cudaStream_t stream) {
  const int64_t cols_per_block = static_cast<int64_t>(kWarps / ksplit) * kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((p.n + cols_per_block - 1) / cols_per_block),
                  static_cast<unsigned>((p.out_rows + TB - 1) / TB));
  gemv_fp8_kernel<TB><<<grid, kWarps * 32, 0, stream>>>(
      static_cast<const uint8_t*>(p.a), p.a_rows, p.sfa, p.sfa_row_stride, p.sfa_kb_stride,
      static_cast<const uint8_t*>(p.b), p.sfb, p.groups, p.rows_map, p.group_map,
      static_cast<__nv_bfloat16*>(p.d), p.out_rows, p.n, p.k, ksplit);
  return cudaGetLastError();
}

}  // namespace

int gemv_ksplit(int64_t out_rows, int tokens_per_block, int64_t n, int64_t k, int num_sms) {
  // Split K across the block's warps until about two blocks per SM exist (a block is 8 warps; ~2 fit per SM at
  // this kernel's register use), keeping >= 4 K blocks (two warp steps) per split.
  const int64_t segs = (out_rows + tokens_per_block - 1) / tokens_per_block;
  int ksplit = 1;
  while (ksplit < kWarps) {
    const int64_t cols = static_cast<int64_t>(kWarps / ksplit) * kRowsPerWarp;
    const int64_t blocks = segs * ((n + cols - 1) / cols);
    if (blocks >= 2 * num_sms || (k / 128) / (2 * ksplit) < 2 * kBlocksPerStep) break;
    ksplit *= 2;
  }
  return ksplit;
}

cudaError_t launch_gemv(const GemvArgs& p, cudaStream_t stream) {
  if (p.out_rows == 0 || p.n == 0) return cudaSuccess;
  int major, minor, sms;
  device_info(&major, &minor, &sms);
  const int ksplit = gemv_ksplit(p.out_rows, p.tokens_per_block, p.n, p.k, sms);
  switch (p.tokens_per_block) {
    case 1: return launch_tb<1>(p, ksplit, stream);
    case 2: return launch_tb<2>(p, ksplit, stream);
    case 4: return launch_tb<4>(p, ksplit, stream);
    case 8: return launch_tb<8>(p, ksplit, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dsv4ffi
