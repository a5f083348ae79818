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
// Fused activation quantisation (GemvArgs::x_bf16, the dense fp8_linear at decode; tensor-core kernel only): the
// kernel reads the bf16 activation rows and quantises them per 1x128 block itself, so the linear is one launch
// instead of quant_rows_kernel + GEMV (at batch 1 a decode step is launch-bound, issue #15). Every warp quantises the
// tokens and the K blocks it multiplies, in registers, right before their mma: the activation bytes are small next to
// the weight stream (and come from L2), and no shared memory or block barrier is needed. The e4m3 bytes and the scale
// are bit-identical to quant_rows_kernel's (same amax, act_pow2_scale, x * (1/s) = x / s for a power of two s, the
// same clamp, RN with saturation), so the output is bit-identical to the two-launch path.
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

// The block's segment and its expert g (group_ok false: out of range, the rows are written as zeros; g = 0 then).
// Blocks past the first projection's segments compute the second: b, sfb, d and n switch to b2, sfb2, d2, n2 (two
// projections of the same rows in one launch: an expert's gate/up pair, or two layer weights of different N).
template <int TB>
__device__ __forceinline__ int64_t block_segment(int64_t out_rows, const int32_t* group_map, int64_t groups,
                                                 const uint8_t* __restrict__& b, const float* __restrict__& sfb,
                                                 __nv_bfloat16* __restrict__& d, int64_t& n, const uint8_t* b2,
                                                 const float* sfb2, __nv_bfloat16* d2, int64_t n2, int64_t* g,
                                                 bool* group_ok) {
  const int64_t segs = (out_rows + TB - 1) / TB;
  int64_t seg = blockIdx.y;
  if (seg >= segs) seg -= segs, b = b2, sfb = sfb2, d = d2, n = n2;
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
                const uint8_t* __restrict__ b2, const float* __restrict__ sfb2, __nv_bfloat16* __restrict__ d2,
                int64_t n2) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_groups = static_cast<int>(blockDim.x / 32) / ksplit;
  const int rg = warp / ksplit, kc = warp % ksplit;
  int64_t g;
  bool group_ok;
  const int64_t seg = block_segment<TB>(out_rows, group_map, groups, b, sfb, d, n, b2, sfb2, d2, n2, &g, &group_ok);
  // Block-uniform (before the barrier): the columns past the narrower projection's N have nothing to compute.
  if (static_cast<int64_t>(blockIdx.x) * row_groups * kRowsPerWarp >= n) return;
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

// ---- fused quantisation helpers ------------------------------------------------------------------------------
// Who quantises what, per 128-wide K block: token t of the segment's TB tokens is quantised by the 32 / TB lanes
// t * (32 / TB) ..., each holding 4 * TB of its elements, so all 32 lanes do useful work even at TB = 1 (the amax is
// then a shuffle reduction over those lanes). TB < 8: a lane's elements are consecutive, from (lane % (32 / TB)) * 4TB;
// the mma then wants lane (g, q) to hold token g's elements 16q..16q+15 and 64+16q..64+16q+15 (gemv_mma.cuh), which
// 8 shuffles gather. TB = 8: the quantising lanes of a token are exactly its mma lanes (g = token, q = lane % 4), so a
// lane quantises those 32 elements itself and nothing moves.
template <int TB>
struct Qx {
  static constexpr int kLanes = 32 / TB;  // lanes per token (a power of two: xor reductions stay inside the group)
  static constexpr int kElems = 4 * TB;   // bf16 elements per lane per K block
  static constexpr int kRaw = kElems / 2;  // 32-bit words of raw bf16 per lane
  // Offset in the K block of the lane's element e.
  static __device__ __forceinline__ int elem(int lane, int e) {
    if constexpr (TB == 8) return (e / 16) * 64 + (lane % 4) * 16 + e % 16;
    else return (lane % kLanes) * kElems + e;
  }
};

// Loads the lane's bf16 elements of K block kb of row x (null: zeros), 16 bytes at a time (8 at TB = 1).
template <int TB>
__device__ __forceinline__ void qx_load(const __nv_bfloat16* x, int kb, int lane, uint32_t raw[Qx<TB>::kRaw]) {
  if constexpr (TB == 1) {
    const uint2 v = x ? __ldg(reinterpret_cast<const uint2*>(x + kb * 128 + Qx<TB>::elem(lane, 0))) : make_uint2(0, 0);
    raw[0] = v.x, raw[1] = v.y;
  } else {
#pragma unroll
    for (int c = 0; c < Qx<TB>::kRaw / 4; ++c) {
      const uint4 v = x ? __ldg(reinterpret_cast<const uint4*>(x + kb * 128 + Qx<TB>::elem(lane, 8 * c)))
                        : make_uint4(0, 0, 0, 0);
      raw[4 * c] = v.x, raw[4 * c + 1] = v.y, raw[4 * c + 2] = v.z, raw[4 * c + 3] = v.w;
    }
  }
}

// Quantises the lane's elements (all lanes must call: shuffles): qw[w] = e4m3 of elements 4w..4w+3 (the first in the
// low byte); returns the token's scale. The operations of quant_rows_kernel: amax over the block (fmax is exact and
// order-free), act_pow2_scale, clip(x / s, -448, 448) (x * (1/s) is the same rounding of the same real number: 1/s
// is exact for the powers of two act_pow2_scale gives), e4m3 RN with saturation.
// bf16 element 0 (low half) or 1 (high half) of a raw word, as f32 (exact).
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

template <int TB>
__device__ __forceinline__ float qx_quant(const uint32_t raw[Qx<TB>::kRaw], uint32_t qw[TB]) {
  // The bf16 -> f32 unpacking is redone for the second pass rather than kept in 4TB floats across the shuffles
  // (one integer op each; at TB = 8 the 32 floats made ptxas spill).
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < Qx<TB>::kRaw; ++i) amax = fmaxf(amax, fmaxf(fabsf(bf16_lo(raw[i])), fabsf(bf16_hi(raw[i]))));
#pragma unroll
  for (int off = Qx<TB>::kLanes / 2; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float s = act_pow2_scale(amax);
  const float inv = __frcp_rn(s);  // exact (a power of two in the normal range; s = inf -> 0, as x / inf)
  auto q2 = [&](uint32_t w) -> uint32_t {  // both elements of a raw word -> two e4m3 bytes (the first low)
    const float a = fminf(fmaxf(bf16_lo(w) * inv, -448.f), 448.f);
    const float b = fminf(fmaxf(bf16_hi(w) * inv, -448.f), 448.f);
    return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  };
#pragma unroll
  for (int w = 0; w < TB; ++w) qw[w] = q2(raw[2 * w]) | (q2(raw[2 * w + 1]) << 16);
  return s;
}

// The mma B fragment of lane (g, q) (token g, bytes 16q..16q+15 of each 64-wide half of the block) from the
// quantised words (all lanes must call). TB < 8: lanes g >= TB receive another token's bytes; their mma columns
// are never stored (store_c_fragment) and their scales are 0.
template <int TB>
__device__ __forceinline__ void qx_fragment(const uint32_t qw[TB], int lane, uint4 xv[2]) {
  if constexpr (TB == 8) {
    xv[0] = make_uint4(qw[0], qw[1], qw[2], qw[3]);
    xv[1] = make_uint4(qw[4], qw[5], qw[6], qw[7]);
  } else {
    const int gq = lane / 4, q = lane % 4;
    uint32_t w[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i)  // word 16h + 4q + i of token gq; 4 divides 16h + 4q, so its slot is i % TB
        w[h][i] = __shfl_sync(0xffffffffu, qw[i % TB], gq * Qx<TB>::kLanes + (16 * h + 4 * q + i) / TB);
    xv[0] = make_uint4(w[0][0], w[0][1], w[0][2], w[0][3]);
    xv[1] = make_uint4(w[1][0], w[1][1], w[1][2], w[1][3]);
  }
}

// Writes the lane's quantised words and (first lane of the token) its scale to the act_quant layout: q [rows, k],
// scale of (row, kb) at sfa[row * row_stride + kb * kb_stride].
template <int TB>
__device__ __forceinline__ void qx_store(const uint32_t qw[TB], float s, int64_t row, int kb, int lane, int64_t k,
                                         uint8_t* q, float* sfa, int64_t row_stride, int64_t kb_stride) {
  uint8_t* dst = q + row * k + kb * 128;
  if constexpr (TB == 1) {
    *reinterpret_cast<uint32_t*>(dst + Qx<TB>::elem(lane, 0)) = qw[0];
  } else if constexpr (TB == 2) {
    *reinterpret_cast<uint2*>(dst + Qx<TB>::elem(lane, 0)) = make_uint2(qw[0], qw[1]);
  } else {
#pragma unroll
    for (int c = 0; c < TB / 4; ++c)
      *reinterpret_cast<uint4*>(dst + Qx<TB>::elem(lane, 16 * c)) =
          make_uint4(qw[4 * c], qw[4 * c + 1], qw[4 * c + 2], qw[4 * c + 3]);
  }
  if (lane % Qx<TB>::kLanes == 0) sfa[row * row_stride + kb * kb_stride] = s;
}

// Where the fused kernel also writes the quantised activations (both null: nowhere).
struct QxOut {
  uint8_t* q;
  float* sfa;
};

// Tensor-core variant: one warp computes 16 weight rows x 8 tokens with mma.sync m16n8k32 (gemv_mma.cuh).
// Why: the CUDA-core loop above spends 4 FMAs + conversions per weight byte and token, so at 8 tokens it is bound by
// arithmetic (and registers), not by streaming the weights; one mma does the same 16x8x32 products in one issue.
constexpr int kMmaKbPerChunk = 2;  // K blocks whose loads are issued together (8 x 16 B weights per lane in flight)

// QX: fused quantisation: `a` holds bf16 rows [a_rows, k] (not e4m3), `sfa` is not read; the strides place the
// scales written to qo.sfa.
template <int TB, bool QX>
__global__ void __launch_bounds__(kWarps * 32)
gemv_mma_kernel(const uint8_t* __restrict__ a, int64_t a_rows, const float* __restrict__ sfa, int64_t sfa_row_stride,
                int64_t sfa_kb_stride, const uint8_t* __restrict__ b, const float* __restrict__ sfb, int64_t groups,
                const int32_t* __restrict__ rows_map, const int32_t* __restrict__ group_map,
                __nv_bfloat16* __restrict__ d, int64_t out_rows, int64_t n, int64_t k, int ksplit,
                const uint8_t* __restrict__ b2, const float* __restrict__ sfb2, __nv_bfloat16* __restrict__ d2,
                int64_t n2, QxOut qo) {
  static_assert(TB >= 1 && TB <= 8 && (TB & (TB - 1)) == 0, "1, 2, 4 or 8 tokens per mma");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gq = lane / 4, q = lane % 4;
  const int row_groups = static_cast<int>(blockDim.x / 32) / ksplit;
  const int rg = warp / ksplit, kc = warp % ksplit;
  int64_t g;
  bool group_ok;
  const int64_t seg = block_segment<TB>(out_rows, group_map, groups, b, sfb, d, n, b2, sfb2, d2, n2, &g, &group_ok);
  // Block-uniform (before any barrier): the columns past the narrower projection's N have nothing to compute.
  if (static_cast<int64_t>(blockIdx.x) * row_groups * kMmaRows >= n) return;
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
  const uint8_t* x_row = !QX && b_row >= 0 ? a + b_row * k : nullptr;
  const float* sfb_row = sfb + (g * nblocks + (n0 < n ? n0 : 0) / 128) * kblocks;
  // Fused quantisation: the token this lane quantises, its bf16 row, and whether this warp also writes the quantised
  // rows out (the warps of row group 0 in the first block column of the first projection cover all of K once).
  const int64_t qx_row = QX ? act_row(lane / Qx<TB>::kLanes) : -1;
  const __nv_bfloat16* qx_src = qx_row >= 0 ? reinterpret_cast<const __nv_bfloat16*>(a) + qx_row * k : nullptr;
  const bool qx_write = QX && qo.q != nullptr && blockIdx.x == 0 && rg == 0 &&
                        blockIdx.y < static_cast<unsigned>((out_rows + TB - 1) / TB);

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  // K offsets fit in 32 bits (K <= 2^31); the row pointers above carry the 64-bit part.
  const int kbs = static_cast<int>(kblocks), kb_per = (kbs + ksplit - 1) / ksplit;
  const int kb_begin = kc * kb_per, kb_end = kbs < kb_begin + kb_per ? kbs : kb_begin + kb_per;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const float* sfa0 = !QX && c_row0 >= 0 ? sfa + c_row0 * sfa_row_stride : nullptr;  // fused: sfa is null
  const float* sfa1 = !QX && c_row1 >= 0 ? sfa + c_row1 * sfa_row_stride : nullptr;
  for (int kb0 = kb_begin; kb0 < kb_end; kb0 += kMmaKbPerChunk) {
    // Issue every load of the chunk before the first mma: the weight bytes in flight are what sets the bandwidth.
    uint4 wl[kMmaKbPerChunk][2], wh[kMmaKbPerChunk][2], xv[kMmaKbPerChunk][2];
    uint32_t xr[kMmaKbPerChunk][QX ? Qx<TB>::kRaw : 1];  // fused: raw bf16 (in flight with the weights)
#pragma unroll
    for (int c = 0; c < kMmaKbPerChunk; ++c) {
      const int kb = kb0 + c;
      const bool in = kb < kb_end;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = kb * 128 + h * 64 + q * 16;
        wl[c][h] = in && w_lo ? __ldg(reinterpret_cast<const uint4*>(w_lo + col)) : zero;
        wh[c][h] = in && w_hi ? __ldg(reinterpret_cast<const uint4*>(w_hi + col)) : zero;
        if constexpr (!QX) xv[c][h] = in && x_row ? __ldg(reinterpret_cast<const uint4*>(x_row + col)) : zero;
      }
      if constexpr (QX) qx_load<TB>(in ? qx_src : nullptr, kb, lane, xr[c]);
    }
#pragma unroll
    for (int c = 0; c < kMmaKbPerChunk; ++c) {
      const int kb = kb0 + c;
      if (kb >= kb_end) break;  // warp-uniform: the shuffles of the fused quantisation below see every lane
      float s0, s1;
      const float sb = sfb_row[kb];
      if constexpr (QX) {
        uint32_t qw[TB];
        const float sq = qx_quant<TB>(xr[c], qw);
        qx_fragment<TB>(qw, lane, xv[c]);
        // the scales of this lane's C tokens 2q and 2q+1 live in the first lane of each token's group
        const float sc0 = __shfl_sync(0xffffffffu, sq, 2 * q * Qx<TB>::kLanes);
        const float sc1 = __shfl_sync(0xffffffffu, sq, (2 * q + 1) * Qx<TB>::kLanes);
        s0 = c_row0 >= 0 ? sc0 * sb : 0.f;
        s1 = c_row1 >= 0 ? sc1 * sb : 0.f;
      } else {
        s0 = sfa0 ? sfa0[kb * sfa_kb_stride] * sb : 0.f;
        s1 = sfa1 ? sfa1[kb * sfa_kb_stride] * sb : 0.f;
      }
      float blk[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) mma_step64(wl[c][h], wh[c][h], xv[c][h], blk);
      add_scaled(blk, s0, s1, acc);
    }
  }

  // Fused quantisation: the writing warps store their K slice of the quantised rows, quantised once more here rather
  // than kept from the loop above (where the stores' addresses cost registers the weight stream needs: TB = 8 spilt).
  if (qx_write) {  // warp-uniform
    for (int kb = kb_begin; kb < kb_end; ++kb) {
      uint32_t raw[Qx<TB>::kRaw], qw[TB];
      qx_load<TB>(qx_src, kb, lane, raw);
      const float sq = qx_quant<TB>(raw, qw);
      if (qx_row >= 0) qx_store<TB>(qw, sq, qx_row, kb, lane, k, qo.q, qo.sfa, sfa_row_stride, sfa_kb_stride);
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

// Wide variant: NT tiles of 8 tokens per warp, so a segment of 8 * NT rows (16 or 32) shares one pass over the
// weights; FP8 activations quantised beforehand (launch_quant_rows). Why: a stacked layer's 9..64 decode rows took a
// pass of the fused 8-token kernel per 8 rows, each warp re-quantising its bf16 rows per weight tile: the L2 traffic
// of the activations equalled the weights' on every pass (at batch 32, 4 passes: 1.13 ms of a six-layer step's 6.6
// ms of kernel time, ~3.3x the one-pass time). Here the weights are read once per launch and each 16-row weight tile
// reads its segment's 16 or 32 FP8 activation rows from L2 once. Per token the products, the per-block scaling and
// the K-split reduction are those of gemv_mma_kernel: the same output bits. No rows map; a second projection of the
// same rows as gemv_mma_kernel's (b2, sfb2, d2, n2).
template <int NT>
__global__ void __launch_bounds__(kWarps * 32, 1)  // 1: NT = 2 spilt at the 128 registers ptxas chose
gemv_mma_wide_kernel(const uint8_t* __restrict__ a, int64_t a_rows, const float* __restrict__ sfa,
                     int64_t sfa_row_stride, int64_t sfa_kb_stride, const uint8_t* __restrict__ b,
                     const float* __restrict__ sfb, int64_t groups, const int32_t* __restrict__ group_map,
                     __nv_bfloat16* __restrict__ d, int64_t out_rows, int64_t n, int64_t k, int ksplit,
                     const uint8_t* __restrict__ b2, const float* __restrict__ sfb2, __nv_bfloat16* __restrict__ d2,
                     int64_t n2) {
  constexpr int TB = 8 * NT;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gq = lane / 4, q = lane % 4;
  const int row_groups = static_cast<int>(blockDim.x / 32) / ksplit;
  const int rg = warp / ksplit, kc = warp % ksplit;
  int64_t g;
  bool group_ok;
  const int64_t seg = block_segment<TB>(out_rows, group_map, groups, b, sfb, d, n, b2, sfb2, d2, n2, &g, &group_ok);
  if (static_cast<int64_t>(blockIdx.x) * row_groups * kMmaRows >= n) return;  // block-uniform, as gemv_mma_kernel
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * row_groups + rg) * kMmaRows;
  const int64_t kblocks = k / 128, nblocks = (n + 127) / 128;
  auto act_row = [&](int t) -> int64_t {
    const int64_t r = seg * TB + t;
    return group_ok && r < out_rows && r < a_rows ? r : -1;
  };
  // Tile t: this lane feeds token 8t + gq to the mma and owns the outputs of tokens 8t + 2q and 8t + 2q + 1.
  const uint8_t* x_row[NT];
  const float* sfa_c[NT][2];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t br = act_row(8 * t + gq), c0 = act_row(8 * t + 2 * q), c1 = act_row(8 * t + 2 * q + 1);
    x_row[t] = br >= 0 ? a + br * k : nullptr;
    sfa_c[t][0] = c0 >= 0 ? sfa + c0 * sfa_row_stride : nullptr;
    sfa_c[t][1] = c1 >= 0 ? sfa + c1 * sfa_row_stride : nullptr;
  }
  const int64_t r_lo = n0 + gq, r_hi = n0 + gq + 8;
  const uint8_t* bg = b + (g * n) * k;
  const uint8_t* w_lo = r_lo < n ? bg + r_lo * k : nullptr;
  const uint8_t* w_hi = r_hi < n ? bg + r_hi * k : nullptr;
  const float* sfb_row = sfb + (g * nblocks + (n0 < n ? n0 : 0) / 128) * kblocks;

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;
  const int kbs = static_cast<int>(kblocks), kb_per = (kbs + ksplit - 1) / ksplit;
  const int kb_begin = kc * kb_per, kb_end = kbs < kb_begin + kb_per ? kbs : kb_begin + kb_per;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int kb0 = kb_begin; kb0 < kb_end; kb0 += kMmaKbPerChunk) {
    uint4 wl[kMmaKbPerChunk][2], wh[kMmaKbPerChunk][2], xv[kMmaKbPerChunk][NT][2];
#pragma unroll
    for (int c = 0; c < kMmaKbPerChunk; ++c) {
      const bool in = kb0 + c < kb_end;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = (kb0 + c) * 128 + h * 64 + q * 16;
        wl[c][h] = in && w_lo ? __ldg(reinterpret_cast<const uint4*>(w_lo + col)) : zero;
        wh[c][h] = in && w_hi ? __ldg(reinterpret_cast<const uint4*>(w_hi + col)) : zero;
#pragma unroll
        for (int t = 0; t < NT; ++t)
          xv[c][t][h] = in && x_row[t] ? __ldg(reinterpret_cast<const uint4*>(x_row[t] + col)) : zero;
      }
    }
#pragma unroll
    for (int c = 0; c < kMmaKbPerChunk; ++c) {
      const int kb = kb0 + c;
      if (kb >= kb_end) break;
      const float sb = sfb_row[kb];
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const float s0 = sfa_c[t][0] ? sfa_c[t][0][kb * sfa_kb_stride] * sb : 0.f;
        const float s1 = sfa_c[t][1] ? sfa_c[t][1][kb * sfa_kb_stride] * sb : 0.f;
        float blk[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int h = 0; h < 2; ++h) mma_step64(wl[c][h], wh[c][h], xv[c][t][h], blk);
        add_scaled(blk, s0, s1, acc[t]);
      }
    }
  }

  if (!sum_k_splits<NT, kWarps>(acc, warp, lane, ksplit, kc)) return;
  // Tile t of segment seg is the 8-row segment seg * NT + t.
#pragma unroll
  for (int t = 0; t < NT; ++t)
    store_c_fragment<8>(acc[t], lane, seg * NT + t, n0, sfa_c[t][0] != nullptr, sfa_c[t][1] != nullptr, d,
                        out_rows, n);
}

// N of the second projection (GemvArgs::n2 = 0: the first's N) and the grid's block columns: enough for the wider.
int64_t second_n(const GemvArgs& p) { return p.b2 != nullptr && p.n2 > 0 ? p.n2 : p.n; }
unsigned grid_columns(const GemvArgs& p, int64_t cols_per_block) {
  const int64_t n2 = second_n(p), n_max = n2 > p.n ? n2 : p.n;
  return static_cast<unsigned>((n_max + cols_per_block - 1) / cols_per_block);
}

template <int TB>
cudaError_t launch_tb(const GemvArgs& p, bool mma, int warps, int ksplit, cudaStream_t stream) {
  const int64_t cols_per_block = static_cast<int64_t>(warps / ksplit) * (mma ? kMmaRows : kRowsPerWarp);
  const int64_t segs = (p.out_rows + TB - 1) / TB;
  const int64_t n2 = second_n(p);
  const unsigned columns = grid_columns(p, cols_per_block);
  const auto seg_blocks = static_cast<unsigned>(p.b2 != nullptr ? 2 * segs : segs);
  const bool qx = p.x_bf16 != nullptr;
  const dim3 grid(columns, seg_blocks);
  const auto* a = static_cast<const uint8_t*>(qx ? p.x_bf16 : p.a);
  auto launch = [&](auto* kernel, auto... extra) {
    kernel<<<grid, warps * 32, 0, stream>>>(
        a, p.a_rows, p.sfa, p.sfa_row_stride, p.sfa_kb_stride, static_cast<const uint8_t*>(p.b), p.sfb, p.groups,
        p.rows_map, p.group_map, static_cast<__nv_bfloat16*>(p.d), p.out_rows, p.n, p.k, ksplit,
        static_cast<const uint8_t*>(p.b2), p.sfb2, static_cast<__nv_bfloat16*>(p.d2), n2, extra...);
    return cudaGetLastError();
  };
  if (qx) return launch(gemv_mma_kernel<TB, true>, QxOut{static_cast<uint8_t*>(p.q_out), p.sfa_out});
  if (mma) return launch(gemv_mma_kernel<TB, false>, QxOut{nullptr, nullptr});
  return launch(gemv_fp8_kernel<TB>);
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

bool gemv_fuses_quant() {
  // DSV4_FFI_GEMV_QUANT=separate: the dense fp8_linear quantises in its own launch before the GEMV (A/B knob; read
  // at every launch). The CUDA-core loop (DSV4_FFI_GEMV=cuda) has no fused variant.
  const char* v = std::getenv("DSV4_FFI_GEMV_QUANT");
  return (v == nullptr || std::strcmp(v, "separate") != 0) && gemv_uses_mma();
}

cudaError_t launch_gemv(const GemvArgs& p, cudaStream_t stream) {
  if (p.out_rows == 0 || p.n == 0) return cudaSuccess;
  int major, minor, sms;
  device_info(&major, &minor, &sms);
  // The fused quantisation and the wide segments exist on the tensor-core kernels only.
  const bool wide = p.tokens_per_block == 16 || p.tokens_per_block == 32;
  const bool mma = wide || p.x_bf16 != nullptr || gemv_uses_mma();
  int ksplit = gemv_ksplit(p.out_rows, p.tokens_per_block, p.n, p.k, sms, mma);
  if (const char* v = std::getenv("DSV4_FFI_GEMV_KSPLIT")) {  // tuning knob for benchmarks: 1, 2, 4 or 8
    const int f = std::atoi(v);
    if (f == 1 || f == 2 || f == 4 || f == 8) ksplit = f;
  }
  int warps = kWarps;
  if (const char* v = std::getenv("DSV4_FFI_GEMV_WARPS"); v != nullptr && std::atoi(v) == 4) warps = 4;
  if (ksplit > warps) ksplit = warps;
  if (wide) {  // e4m3 rows, no rows map
    if (p.x_bf16 != nullptr || p.rows_map != nullptr) return cudaErrorInvalidValue;
    const int64_t cols_per_block = static_cast<int64_t>(warps / ksplit) * kMmaRows;
    const int64_t segs = (p.out_rows + p.tokens_per_block - 1) / p.tokens_per_block;
    const dim3 grid(grid_columns(p, cols_per_block), static_cast<unsigned>(p.b2 != nullptr ? 2 * segs : segs));
    auto* kernel = p.tokens_per_block == 16 ? gemv_mma_wide_kernel<2> : gemv_mma_wide_kernel<4>;
    kernel<<<grid, warps * 32, 0, stream>>>(
        static_cast<const uint8_t*>(p.a), p.a_rows, p.sfa, p.sfa_row_stride, p.sfa_kb_stride,
        static_cast<const uint8_t*>(p.b), p.sfb, p.groups, p.group_map, static_cast<__nv_bfloat16*>(p.d), p.out_rows,
        p.n, p.k, ksplit, static_cast<const uint8_t*>(p.b2), p.sfb2, static_cast<__nv_bfloat16*>(p.d2), second_n(p));
    return cudaGetLastError();
  }
  switch (p.tokens_per_block) {
    case 1: return launch_tb<1>(p, mma, warps, ksplit, stream);
    case 2: return launch_tb<2>(p, mma, warps, ksplit, stream);
    case 4: return launch_tb<4>(p, mma, warps, ksplit, stream);
    case 8: return launch_tb<8>(p, mma, warps, ksplit, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dsv4ffi
