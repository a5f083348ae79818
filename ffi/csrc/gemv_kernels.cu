// Small-M FP8 block-scaled GEMM ("GEMV"), our own kernels, for decode-sized batches (<= 8 tokens per weight pass).
//
// Why not the DeepGEMM GEMMs: at M <= 8 a 64-row WGMMA tile is >= 87% padding and the persistent tile grid over
// N alone gives each SM one or two long K loops: far too few bytes in flight to stream the weights at HBM speed.
// Here warps stream weight rows with 16-byte loads, K may be split across the warps of a block, and each warp
// multiplies its rows with up to 8 tokens, either
//   * gemv_mma_kernel (default): 16 rows x 8 tokens per warp on the tensor cores with mma.sync m16n8k32, or
//   * gemv_fp8_kernel (DSV4_FFI_GEMV=cuda): 4 rows per warp on the CUDA cores (bound by arithmetic at 8 tokens).
//
// Numerics: the same FP8 operands and power-of-two scales as the reference blockwise GEMM: FP8 x FP8 products are
// exact in FP32, each partial sum of 16 (CUDA cores) or 32 (one mma) products is scaled by s_a[row, kb] *
// s_b[n/128, kb] (a power of two: exact) and accumulated in FP32; only the summation order differs from the
// reference. Output bf16 (round to nearest even).
//
// Addressing: output row r (of `out_rows`) belongs to segment r / TB; a segment's rows share one weight group.
//   activation row of r = rows_map ? rows_map[r] : r;   group of r = group_map ? group_map[r / TB] : 0.
// Rows with a negative or out-of-range activation row or group are written as zeros.
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

namespace dsv4ffi {
namespace {

constexpr int kWarps = 8;  // per block (DSV4_FFI_GEMV_WARPS=4 halves it: a benchmarking knob)
constexpr int kRowsPerWarp = 4;  // output columns (weight rows) per warp; 128 % 4 == 0 keeps them in one scale block
constexpr int kLaneBytes = 16;
constexpr int kBlocksPerStep = 32 * kLaneBytes / 128;  // 128-wide K blocks covered by one warp step (4)

// The block's segment (blockIdx.y) and its expert g (group_ok false: out of range, the rows are written as zeros;
// g = 0 then). Blocks past the first projection's segments compute the second: b, sfb and d switch to b2, sfb2, d2
// (the gate/up pair in one launch).
template <int TB>
__device__ __forceinline__ int64_t block_segment(int64_t out_rows, const int32_t* group_map, int64_t groups,
                                                 const uint8_t* __restrict__& b, const float* __restrict__& sfb,
                                                 __nv_bfloat16* __restrict__& d, const uint8_t* b2, const float* sfb2,
                                                 __nv_bfloat16* d2, int64_t* g, bool* group_ok) {
  const int64_t segs = (out_rows + TB - 1) / TB;
  int64_t seg = blockIdx.y;
  if (seg >= segs) seg -= segs, b = b2, sfb = sfb2, d = d2;
  *g = group_map != nullptr ? group_map[seg] : 0;
  *group_ok = *g >= 0 && *g < groups;
  if (!*group_ok) *g = 0;
  return seg;
}

template <int TB>
__global__ void __launch_bounds__(kWarps * 32)
gemv_fp8_kernel(const uint8_t* __restrict__ a, int64_t a_rows, const float* __restrict__ sfa, int64_t sfa_row_stride,
                int64_t sfa_kb_stride, const uint8_t* __restrict__ b, const float* __restrict__ sfb, int64_t groups,
                const int32_t* __restrict__ rows_map, const int32_t* __restrict__ group_map,
                __nv_bfloat16* __restrict__ d, int64_t out_rows, int64_t n, int64_t k, int ksplit,
                const uint8_t* __restrict__ b2, const float* __restrict__ sfb2, __nv_bfloat16* __restrict__ d2) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_groups = static_cast<int>(blockDim.x / 32) / ksplit;
  const int rg = warp / ksplit, kc = warp % ksplit;
  int64_t g;
  bool group_ok;
  const int64_t seg = block_segment<TB>(out_rows, group_map, groups, b, sfb, d, b2, sfb2, d2, &g, &group_ok);
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * row_groups + rg) * kRowsPerWarp;
  const int64_t kblocks = k / 128, nblocks = (n + 127) / 128;

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

// Tensor-core variant: one warp computes 16 weight rows x 8 tokens with mma.sync m16n8k32 (gemv_mma.cuh).
// Why: the CUDA-core loop above spends 4 FMAs + conversions per weight byte and token, so at 8 tokens it is bound by
// arithmetic (and registers), not by streaming the weights; one mma does the same 16x8x32 products in one issue.
constexpr int kMmaKbPerChunk = 2;  // K blocks whose loads are issued together (8 x 16 B weights per lane in flight)

template <int TB>
__global__ void __launch_bounds__(kWarps * 32)
gemv_mma_kernel(const uint8_t* __restrict__ a, int64_t a_rows, const float* __restrict__ sfa, int64_t sfa_row_stride,
                int64_t sfa_kb_stride, const uint8_t* __restrict__ b, const float* __restrict__ sfb, int64_t groups,
                const int32_t* __restrict__ rows_map, const int32_t* __restrict__ group_map,
                __nv_bfloat16* __restrict__ d, int64_t out_rows, int64_t n, int64_t k, int ksplit,
                const uint8_t* __restrict__ b2, const float* __restrict__ sfb2, __nv_bfloat16* __restrict__ d2) {
  static_assert(TB >= 1 && TB <= 8, "at most 8 tokens per mma");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gq = lane / 4, q = lane % 4;
  const int row_groups = static_cast<int>(blockDim.x / 32) / ksplit;
  const int rg = warp / ksplit, kc = warp % ksplit;
  int64_t g;
  bool group_ok;
  const int64_t seg = block_segment<TB>(out_rows, group_map, groups, b, sfb, d, b2, sfb2, d2, &g, &group_ok);
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * row_groups + rg) * kMmaRows;
  const int64_t kblocks = k / 128, nblocks = (n + 127) / 128;

  // This lane feeds token gq to the mma (B operand) and owns the outputs of tokens 2q, 2q+1 (C fragment).
  auto act_row = [&](int t) -> int64_t {
    const int64_t r = seg * TB + t;
    if (t >= TB || r >= out_rows || !group_ok) return -1;
    const int64_t src = rows_map != nullptr ? rows_map[r] : r;
    return src >= 0 && src < a_rows ? src : -1;
  };
  const int64_t b_row = act_row(gq), c_row0 = act_row(2 * q), c_row1 = act_row(2 * q + 1);
  const int64_t r_lo = n0 + gq, r_hi = n0 + gq + 8;
  const uint8_t* bg = b + (g * n) * k;
  const uint8_t* w_lo = r_lo < n ? bg + r_lo * k : nullptr;
  const uint8_t* w_hi = r_hi < n ? bg + r_hi * k : nullptr;
  const uint8_t* x_row = b_row >= 0 ? a + b_row * k : nullptr;
  const float* sfb_row = sfb + (g * nblocks + (n0 < n ? n0 : 0) / 128) * kblocks;

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  // K offsets fit in 32 bits (K <= 2^31); the row pointers above carry the 64-bit part.
  const int kbs = static_cast<int>(kblocks), kb_per = (kbs + ksplit - 1) / ksplit;
  const int kb_begin = kc * kb_per, kb_end = kbs < kb_begin + kb_per ? kbs : kb_begin + kb_per;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const float* sfa0 = c_row0 >= 0 ? sfa + c_row0 * sfa_row_stride : nullptr;
  const float* sfa1 = c_row1 >= 0 ? sfa + c_row1 * sfa_row_stride : nullptr;
  for (int kb0 = kb_begin; kb0 < kb_end; kb0 += kMmaKbPerChunk) {
    // Issue every load of the chunk before the first mma: the weight bytes in flight are what sets the bandwidth.
    uint4 wl[kMmaKbPerChunk][2], wh[kMmaKbPerChunk][2], xv[kMmaKbPerChunk][2];
#pragma unroll
    for (int c = 0; c < kMmaKbPerChunk; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int kb = kb0 + c;
        const int col = kb * 128 + h * 64 + q * 16;
        const bool in = kb < kb_end;
        wl[c][h] = in && w_lo ? __ldg(reinterpret_cast<const uint4*>(w_lo + col)) : zero;
        wh[c][h] = in && w_hi ? __ldg(reinterpret_cast<const uint4*>(w_hi + col)) : zero;
        xv[c][h] = in && x_row ? __ldg(reinterpret_cast<const uint4*>(x_row + col)) : zero;
      }
#pragma unroll
    for (int c = 0; c < kMmaKbPerChunk; ++c) {
      const int kb = kb0 + c;
      if (kb >= kb_end) break;
      float blk[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) mma_step64(wl[c][h], wh[c][h], xv[c][h], blk);
      const float sb = sfb_row[kb];
      const float s0 = sfa0 ? sfa0[kb * sfa_kb_stride] * sb : 0.f;
      const float s1 = sfa1 ? sfa1[kb * sfa_kb_stride] * sb : 0.f;
      add_scaled(blk, s0, s1, acc);
    }
  }

  __shared__ float part[kWarps][4][32];
  if (ksplit > 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) part[warp][i][lane] = acc[i];
    __syncthreads();
    if (kc != 0) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = 0.f;
      for (int c = 0; c < ksplit; ++c) v += part[warp + c][i][lane];
      acc[i] = v;
    }
  }
  store_c_fragment<TB>(acc, lane, seg, n0, c_row0 >= 0, c_row1 >= 0, d, out_rows, n);
}

template <int TB>
cudaError_t launch_tb(const GemvArgs& p, bool mma, int warps, int ksplit, cudaStream_t stream) {
  const int64_t cols_per_block = static_cast<int64_t>(warps / ksplit) * (mma ? kMmaRows : kRowsPerWarp);
  const int64_t segs = (p.out_rows + TB - 1) / TB;
  const dim3 grid(static_cast<unsigned>((p.n + cols_per_block - 1) / cols_per_block),
                  static_cast<unsigned>(p.b2 != nullptr ? 2 * segs : segs));
  auto* kernel = mma ? gemv_mma_kernel<TB> : gemv_fp8_kernel<TB>;
  kernel<<<grid, warps * 32, 0, stream>>>(
      static_cast<const uint8_t*>(p.a), p.a_rows, p.sfa, p.sfa_row_stride, p.sfa_kb_stride,
      static_cast<const uint8_t*>(p.b), p.sfb, p.groups, p.rows_map, p.group_map,
      static_cast<__nv_bfloat16*>(p.d), p.out_rows, p.n, p.k, ksplit, static_cast<const uint8_t*>(p.b2), p.sfb2,
      static_cast<__nv_bfloat16*>(p.d2));
  return cudaGetLastError();
}

}  // namespace

bool gemv_uses_mma() {
  // DSV4_FFI_GEMV=cuda selects the CUDA-core loop (kill switch and A/B knob); read at every launch like the other
  // DSV4_FFI_* switches, so a process can compare both.
  const char* v = std::getenv("DSV4_FFI_GEMV");
  return v == nullptr || std::strcmp(v, "cuda") != 0;
}

int gemv_ksplit(int64_t out_rows, int tokens_per_block, int64_t n, int64_t k, int num_sms, bool mma) {
  // Split K across the block's warps, keeping >= 2 chunks of K blocks per split:
  //   * mma: as deep as that allows. Many short blocks balance the weight stream across the SMs better than a few
  //     waves of long ones (H100 sweep, BENCHMARKS.md: at T = 1 ksplit 8 gave 70% of copy bandwidth where the
  //     earlier "two blocks per SM" rule's ksplit 4 gave 67%; 82% vs 78% at T = 2).
  //   * CUDA-core loop: until about two blocks per SM exist (a block is 8 warps; ~2 fit per SM).
  const int64_t segs = (out_rows + tokens_per_block - 1) / tokens_per_block;
  const int64_t rows_per_warp = mma ? kMmaRows : kRowsPerWarp;
  const int64_t min_kb = mma ? 2 * kMmaKbPerChunk : 2 * kBlocksPerStep;
  const int64_t want_blocks = 2 * static_cast<int64_t>(num_sms);
  int ksplit = 1;
  while (ksplit < kWarps) {
    const int64_t cols = static_cast<int64_t>(kWarps / ksplit) * rows_per_warp;
    const int64_t blocks = segs * ((n + cols - 1) / cols);
    if ((!mma && blocks >= want_blocks) || (k / 128) / (2 * ksplit) < min_kb) break;
    ksplit *= 2;
  }
  return ksplit;
}

cudaError_t launch_gemv(const GemvArgs& p, cudaStream_t stream) {
  if (p.out_rows == 0 || p.n == 0) return cudaSuccess;
  int major, minor, sms;
  device_info(&major, &minor, &sms);
  const bool mma = gemv_uses_mma();
  int ksplit = gemv_ksplit(p.out_rows, p.tokens_per_block, p.n, p.k, sms, mma);
  if (const char* v = std::getenv("DSV4_FFI_GEMV_KSPLIT")) {  // tuning knob for benchmarks: 1, 2, 4 or 8
    const int f = std::atoi(v);
    if (f == 1 || f == 2 || f == 4 || f == 8) ksplit = f;
  }
  int warps = kWarps;
  if (const char* v = std::getenv("DSV4_FFI_GEMV_WARPS"); v != nullptr && std::atoi(v) == 4) warps = 4;
  if (ksplit > warps) ksplit = warps;
  switch (p.tokens_per_block) {
    case 1: return launch_tb<1>(p, mma, warps, ksplit, stream);
    case 2: return launch_tb<2>(p, mma, warps, ksplit, stream);
    case 4: return launch_tb<4>(p, mma, warps, ksplit, stream);
    case 8: return launch_tb<8>(p, mma, warps, ksplit, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dsv4ffi
