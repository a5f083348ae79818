// The tensor-core step shared by the GEMV kernels (gemv_kernels.cu; its C-fragment store and K-split sum also by the
// wo_a kernel, dequant_gemv_kernels.cu): one warp multiplies 16 weight rows by 8 tokens over 64 K positions with two
// mma.sync m16n8k32 (e4m3 x e4m3 -> f32).
//
// K order: lane (g = lane/4, q = lane%4) holds 16 contiguous bytes of weight rows g and g+8 and of token g at K offset
// 16q of the 64-wide step, and feeds bytes 0-7 to one mma and bytes 8-15 to the next. The fragment layouts of
// m16n8k32 (A: rows g/g+8, k = 4q..4q+3 and 16+4q..; B: token g, the same k) then pair every weight byte with the
// activation byte of the same K position: a permutation of the summation order only. Each mma starts from zero and
// is added in FP32 on the CUDA cores, so no more than 32 products are ever summed inside the tensor core.
//
// C fragment of a lane: c[0], c[1] = weight row g, tokens 2q and 2q+1; c[2], c[3] = row g + 8, the same tokens.
#pragma once
#include <cuda_bf16.h>
#include <cstdint>

namespace dsv4ffi {

constexpr int kMmaRows = 16;  // weight rows per warp tile (the mma M)

__device__ __forceinline__ void mma_e4m3_16x8x32(const uint32_t a[4], const uint32_t b[2], float d[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.f));
}

// blk += the 16x8 products of one 64-wide K step (w_lo: row g, w_hi: row g+8, x: token g; 16 bytes each).
__device__ __forceinline__ void mma_step64(const uint4 w_lo, const uint4 w_hi, const uint4 x, float blk[4]) {
  const uint32_t a0[4] = {w_lo.x, w_hi.x, w_lo.y, w_hi.y};
  const uint32_t b0[2] = {x.x, x.y};
  const uint32_t a1[4] = {w_lo.z, w_hi.z, w_lo.w, w_hi.w};
  const uint32_t b1[2] = {x.z, x.w};
  float p0[4], p1[4];
  mma_e4m3_16x8x32(a0, b0, p0);
  mma_e4m3_16x8x32(a1, b1, p1);
#pragma unroll
  for (int i = 0; i < 4; ++i) blk[i] += p0[i] + p1[i];
}

// acc += blk * (s_a[token] * s_b) for the lane's C fragment (s0: token 2q, s1: token 2q+1). The scales are powers of
// two, so the scaling is exact.
__device__ __forceinline__ void add_scaled(const float blk[4], float s0, float s1, float acc[4]) {
  acc[0] = fmaf(blk[0], s0, acc[0]);
  acc[1] = fmaf(blk[1], s1, acc[1]);
  acc[2] = fmaf(blk[2], s0, acc[2]);
  acc[3] = fmaf(blk[3], s1, acc[3]);
}

// Writes a lane's C fragment of the tile at weight row n0 of segment seg (TB output rows per segment) to d
// [out_rows, n] in bf16; tokens whose activation row is invalid (live0/live1 false) are written as zeros.
template <int TB>
__device__ __forceinline__ void store_c_fragment(const float c[4], int lane, int64_t seg, int64_t n0, bool live0,
                                                 bool live1, __nv_bfloat16* __restrict__ d, int64_t out_rows,
                                                 int64_t n) {
  const int gq = lane / 4, q = lane % 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int t = 2 * q + (i & 1);
    const int64_t r = seg * TB + t, col = n0 + gq + 8 * (i >> 1);
    const bool live = i & 1 ? live1 : live0;
    if (t < TB && r < out_rows && col < n) d[r * n + col] = __float2bfloat16_rn(live ? c[i] : 0.f);
  }
}

// Sums a block's K splits (warp w: row group w / ksplit, K split kc = w % ksplit, as the GEMV kernels number them):
// every warp leaves its NT C fragments in shared memory, then the first warp of each row group adds its group's
// partials in K-split order. Returns false for the other warps, which are done. Every thread of the block must call
// it (a barrier).
template <int NT, int WARPS>
__device__ __forceinline__ bool sum_k_splits(float (&acc)[NT][4], int warp, int lane, int ksplit, int kc) {
  __shared__ float part[WARPS][NT * 4][32];
  if (ksplit <= 1) return true;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) part[warp][4 * t + i][lane] = acc[t][i];
  __syncthreads();
  if (kc != 0) return false;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = 0.f;
      for (int c = 0; c < ksplit; ++c) v += part[warp + c][4 * t + i][lane];
      acc[t][i] = v;
    }
  return true;
}

}  // namespace dsv4ffi
