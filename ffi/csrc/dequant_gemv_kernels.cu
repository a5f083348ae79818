// V4 attention's grouped low-rank output projection (`wo_a`) at decode sizes: y = x . bf16(W * s), where the FP8
// weight is dequantised to bf16 exactly as the reference converts it (f32(e4m3) * UE8M0 block scale, rounded to
// bf16), and the activation stays bf16 (no FP8 quantisation: the reference's wo_a is a bf16 einsum).
//
// Why a kernel: XLA runs the reference as a dequantisation fusion that writes the layer's weight as bf16 (64 MB for
// Flash's 32 MB of FP8) and a GEMM that reads it back (~62 us a layer on an H200 at batch 32), or at one token as one
// reduce fusion at ~1 TB/s. Here the 32 MB weight is read once at memory speed and dequantised in registers:
//   * dequant_bf16_mma_kernel (default, up to 32 token rows): a warp takes 16 weight rows and 8, 16 or 32 tokens of
//     their group on the tensor cores (mma.sync m16n8k16 bf16), K split across the block's warps as the FP8 GEMV;
//   * dequant_bf16_gemv_kernel (DSV4_FFI_DEQUANT_GEMV=cuda, up to 8 rows; any rows per group): a warp per weight row
//     on the CUDA cores.
//
// Numerics: bf16 x bf16 products are exact in fp32; sums in fp32, the tensor-core kernel adding each mma's 16
// products (summed from zero inside the tensor core) to its fp32 accumulator on the CUDA cores; only the summation
// order differs from the reference's fp32 einsum. Output bf16, round to nearest even.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "fp8_convert.cuh"
#include "gemv_mma.cuh"
#include "kernels.h"
#include "mma_bf16.cuh"

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

// out[i] = the bf16 pair (f32(e4m3 byte 2i) * s, f32(byte 2i + 1) * s), each rounded to nearest even, the first in the
// low half: the reference's dequantisation of 16 weight bytes.
__device__ __forceinline__ void dequant16(const uint4 v, float s, uint32_t out[8]) {
  float f[16];
  e4m3x16_to_f32(v, f);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(f[2 * i] * s, f[2 * i + 1] * s);
    out[i] = *reinterpret_cast<const uint32_t*>(&p);
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

// Tensor-core variant. A warp multiplies weight rows n0 + gq and n0 + gq + 8 (one group: rows_per_group % 16 == 0)
// by NT tiles of 8 tokens. K order (as gemv_mma.cuh): lane (gq, q) holds 16 contiguous K positions at offset 16q of
// each 64-wide step, of both weight rows and of its tile's token gq, and feeds positions 4j..4j+3 to the j-th
// m16n8k16 (as the fragments' k = 2q, 2q+1 and 2q+8, 2q+9): every weight element meets the activation of its own K
// position, a permutation of the summation order only.
// (The launch bound: at NT = 2, ptxas chose 80 registers by itself and spilt.)
template <int NT>
__global__ void __launch_bounds__(kWarps * 32, NT == 1 ? 2 : 1)
    dequant_bf16_mma_kernel(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                            const float* __restrict__ s, const int32_t* __restrict__ layer,
                            __nv_bfloat16* __restrict__ out, int64_t m, int64_t n, int64_t k, int64_t rows_per_group,
                            int64_t groups, int ksplit) {
  constexpr int kKbChunk = NT == 1 ? 2 : 1;  // 128-wide K blocks whose loads are issued together
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
  const int rg = warp / ksplit, kc = warp % ksplit;
  const int64_t n0 = (int64_t(blockIdx.x) * (kWarps / ksplit) + rg) * kMmaRows;
  const int64_t l = layer != nullptr ? int64_t(*layer) : 0;
  const int kbs = int(k / 128), kb_per = (kbs + ksplit - 1) / ksplit;
  const int kb_begin = kc * kb_per, kb_end = kbs < kb_begin + kb_per ? kbs : kb_begin + kb_per;
  const int64_t g = (n0 < n ? n0 : 0) / rows_per_group;
  const uint8_t* w_lo = n0 + gq < n ? w + (l * n + n0 + gq) * k : nullptr;
  const uint8_t* w_hi = n0 + gq + 8 < n ? w + (l * n + n0 + gq + 8) * k : nullptr;
  const float* s_row = s + (l * ((n + 127) / 128) + (n0 < n ? n0 : 0) / 128) * (k / 128);
  const __nv_bfloat16* x_row[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) x_row[t] = 8 * t + gq < m ? x + ((8 * t + gq) * groups + g) * k : nullptr;
  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int kb0 = kb_begin; kb0 < kb_end; kb0 += kKbChunk) {
    uint4 wl[kKbChunk][2], wh[kKbChunk][2], xv[kKbChunk][NT][2][2];
#pragma unroll
    for (int c = 0; c < kKbChunk; ++c) {
      const bool in = kb0 + c < kb_end;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = (kb0 + c) * 128 + h * 64 + q * 16;
        wl[c][h] = in && w_lo ? __ldg(reinterpret_cast<const uint4*>(w_lo + col)) : zero;
        wh[c][h] = in && w_hi ? __ldg(reinterpret_cast<const uint4*>(w_hi + col)) : zero;
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            xv[c][t][h][e] = in && x_row[t] ? __ldg(reinterpret_cast<const uint4*>(x_row[t] + col + 8 * e)) : zero;
      }
    }
#pragma unroll
    for (int c = 0; c < kKbChunk; ++c) {
      if (kb0 + c >= kb_end) break;
      const float sc = s_row[kb0 + c];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t alo[8], ahi[8];  // bf16(f32(e4m3) * s) of K positions 2i, 2i+1 (the first in the low half)
        dequant16(wl[c][h], sc, alo);
        dequant16(wh[c][h], sc, ahi);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const uint32_t xw[8] = {xv[c][t][h][0].x, xv[c][t][h][0].y, xv[c][t][h][0].z, xv[c][t][h][0].w,
                                  xv[c][t][h][1].x, xv[c][t][h][1].y, xv[c][t][h][1].z, xv[c][t][h][1].w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t a[4] = {alo[2 * j], ahi[2 * j], alo[2 * j + 1], ahi[2 * j + 1]};
            float p[4] = {0.f, 0.f, 0.f, 0.f};
            mma_bf16_16x8x16(a, xw[2 * j], xw[2 * j + 1], p);
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[t][i] += p[i];
          }
        }
      }
    }
  }

  if (!sum_k_splits<NT, kWarps>(acc, warp, lane, ksplit, kc)) return;
#pragma unroll
  for (int t = 0; t < NT; ++t)
    store_c_fragment<8>(acc[t], lane, t, n0, 8 * t + 2 * q < m, 8 * t + 2 * q + 1 < m, out, m, n);
}

template <int M>
cudaError_t launch_m(const DequantGemvArgs& a, cudaStream_t stream) {
  const int64_t blocks = (a.n + kWarps - 1) / kWarps;
  dequant_bf16_gemv_kernel<M><<<dim3(unsigned(blocks)), kWarps * 32, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(a.x), static_cast<const uint8_t*>(a.w), a.s, a.layer,
      static_cast<__nv_bfloat16*>(a.out), a.n, a.k, a.rows_per_group, a.groups);
  return cudaGetLastError();
}

template <int NT>
cudaError_t launch_mma(const DequantGemvArgs& a, cudaStream_t stream) {
  int major, minor, sms;
  device_info(&major, &minor, &sms);
  int ksplit = gemv_ksplit(1, 1, a.n, a.k, sms, true);  // the FP8 GEMV's rule: K as deep as 2 chunks allow
  if (const char* v = std::getenv("DSV4_FFI_GEMV_KSPLIT")) {  // the GEMV's tuning knob (benchmarks): 1, 2, 4 or 8
    const int f = std::atoi(v);
    if (f == 1 || f == 2 || f == 4 || f == 8) ksplit = f;
  }
  const int64_t rows_per_block = (kWarps / ksplit) * kMmaRows;
  dequant_bf16_mma_kernel<NT><<<dim3(unsigned((a.n + rows_per_block - 1) / rows_per_block)), kWarps * 32, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(a.x), static_cast<const uint8_t*>(a.w), a.s, a.layer,
      static_cast<__nv_bfloat16*>(a.out), a.m, a.n, a.k, a.rows_per_group, a.groups, ksplit);
  return cudaGetLastError();
}

}  // namespace

bool dequant_gemv_uses_mma() {
  // DSV4_FFI_DEQUANT_GEMV=cuda: the CUDA-core kernel (kill switch and A/B knob, up to 8 rows; read at every launch).
  const char* v = std::getenv("DSV4_FFI_DEQUANT_GEMV");
  return v == nullptr || std::strcmp(v, "cuda") != 0;
}

// Whether the tensor-core kernel takes groups of rows_per_group rows (whole 16-row tiles, and not switched off).
static bool dequant_gemv_on_mma(int64_t rows_per_group) {
  return rows_per_group % kMmaRows == 0 && dequant_gemv_uses_mma();
}

int64_t dequant_gemv_max_m(int64_t rows_per_group) {
  return dequant_gemv_on_mma(rows_per_group) ? kDequantGemvMaxM : kDequantGemvCudaMaxM;
}

cudaError_t launch_dequant_bf16_gemv(const DequantGemvArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  const bool mma = dequant_gemv_on_mma(a.rows_per_group);  // the switch read once per launch
  if (a.m > (mma ? kDequantGemvMaxM : kDequantGemvCudaMaxM)) return cudaErrorInvalidValue;
  if (mma) {
    if (a.m <= 8) return launch_mma<1>(a, stream);
    if (a.m <= 16) return launch_mma<2>(a, stream);
    return launch_mma<4>(a, stream);
  }
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
