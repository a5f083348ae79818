// Shared pieces of the MXFP4 decode kernels (fp4_gemv_kernels.cu: ring; fp4_wg_kernels.cu: wg, wg8;
// fp4_wgb_kernels.cu: wgb): the launch parameters, the copies into shared memory, the UE8M0 and e2m1 conversions, the
// segment of output rows a block serves, its activation rows quantized to FP8, the SwiGLU epilogue. An unnamed
// namespace: each kernel file keeps its own copy (internal linkage), as when they lived in one file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cp_async.cuh"
#include "fp4_slabs.cuh"
#include "fp8_convert.cuh"
#include "gemv_mma.cuh"
#include "kernels.h"
#include "wgmma.cuh"

namespace dsv4ffi {
namespace {

constexpr int kWarps = 8;
constexpr int kRows = kMmaRows;              // weight rows per warp tile (16)
constexpr int kStepK = 128;                  // K per pipeline step: one activation block = 4 weight-scale blocks
constexpr int kStepBytes = kStepK / 2;       // packed bytes of one row per step
constexpr int kRowPitch = kStepBytes + 16;   // 80: the 8 rows of an ldmatrix phase land on distinct banks
constexpr int kActPad = 32;                  // activation row pitch K + 32: the B-fragment loads of 8 tokens
                                             // take the minimum 2 wavefronts
constexpr int kMaxSeg = kFp4SegmentRows;     // 8: tokens per weight pass (the mma N)

template <int NW, int TBMAX>
struct Cfg {
  // Ring depth: 4 = a warp's whole K slice of four steps in flight at once, except for the fused kernel with an
  // 8-token activation buffer (33 KB at K = 4096), where 3 keeps two blocks per SM (the register limit anyway).
  static constexpr int kStages = NW == 2 && TBMAX > 1 ? 3 : 4;
  static constexpr int kStageW = NW * kRows * kRowPitch;       // weight bytes of a stage
  static constexpr int kStageBytes = kStageW + NW * kRows * 4; // + one scale word (4 x 32 K) per row
  static constexpr int kTableBytes = NW * kRows * 16;          // the step's decoded scales, 4 floats per row
  static constexpr int kWarpBytes = kStages * kStageBytes + kTableBytes;
  static_assert(kStageBytes % 16 == 0 && kWarpBytes % 16 == 0, "16-byte alignment of the ring");
};

struct Fp4Params {
  const uint8_t* x;  // bf16 [x_rows, k]
  int64_t x_rows;
  const int32_t* rows_map;
  const int32_t* group_map;
  const uint8_t* w0;
  const uint8_t* s0;
  const uint8_t* w1;  // fused: the up projection
  const uint8_t* s1;
  int64_t groups;
  __nv_bfloat16* out;
  int64_t out_rows, n, k;
  const float* route_w;
  float limit;
  int ksplit;
  int tiles = 1;  // wg kernels: row tiles a block streams in sequence
};

// The same codes as e4m3 bytes of 2^-6 * value, by bit placement alone (DSV4_FFI_FP4_CVT=bits): the magnitude bits
// (e1 e0 m) go to bits 4-2 and the sign to bit 7, so e2m1 0.5 becomes the e4m3 subnormal 2^-7 and 6 becomes
// 0x1C = 1.5 * 2^-4. Even elements 0, 2, 4, 6 in `lo`, odd 1, 3, 5, 7 in `hi` (the activation is stored in the same
// order); the 2^6 goes into the activation scale. Needs tensor cores that keep e4m3 subnormal inputs.
__device__ __forceinline__ void e2m1x8_to_e4m3_bits(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = ((w << 2) & 0x1C1C1C1Cu) | ((w << 4) & 0x80808080u);
  hi = ((w >> 2) & 0x1C1C1C1Cu) | (w & 0x80808080u);
}

// UE8M0 byte b, given as b << 23 -> 2^(b-127) as f32; b = 0 -> 2^-127 (a denormal), b = 255 -> NaN.
__device__ __forceinline__ float e8m0_at23(uint32_t bits) {
  uint32_t u = bits < 0x00400000u ? 0x00400000u : bits;
  u = bits == 0x7F800000u ? 0x7FC00000u : u;
  return __uint_as_float(u);
}

// Four UE8M0 bytes (byte j = the scale of 32-wide block j) -> f32.
__device__ __forceinline__ void e8m0x4(uint32_t s, float f[4]) {
  f[0] = e8m0_at23((s << 23) & 0x7F800000u);
  f[1] = e8m0_at23((s << 15) & 0x7F800000u);
  f[2] = e8m0_at23((s << 7) & 0x7F800000u);
  f[3] = e8m0_at23((s >> 1) & 0x7F800000u);
}

// Non-zero iff a byte of s may be 0 or 255 (the two UE8M0 bytes e8m0x4_plain gets wrong); false positives allowed.
__device__ __forceinline__ uint32_t e8m0x4_special(uint32_t s) {
  return ((s - 0x01010101u) & ~s & 0x80808080u) | ((~s - 0x01010101u) & s & 0x80808080u);
}

// Four UE8M0 bytes -> f32, two instructions per byte, for bytes 1..254.
__device__ __forceinline__ void e8m0x4_plain(uint32_t s, float f[4]) {
  f[0] = __uint_as_float((s << 23) & 0x7F800000u);
  f[1] = __uint_as_float((s << 15) & 0x7F800000u);
  f[2] = __uint_as_float((s << 7) & 0x7F800000u);
  f[3] = __uint_as_float((s >> 1) & 0x7F800000u);
}

// Stores the lane's C fragment (rows n0 + g, n0 + g + 8; segment tokens 2q, 2q+1) of both accumulators.
template <int NW>
__device__ __forceinline__ void store_tile(const Fp4Params& p, const float acc[NW][4], int lane, int64_t r0,
                                          int seg_rows, const int32_t* seg_src, int64_t n0, bool zero) {
  const int gq = lane / 4, q = lane % 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int t = 2 * q + (i & 1);
    const int64_t col = n0 + gq + 8 * (i >> 1);
    if (t >= seg_rows || col >= p.n) continue;
    const int64_t r = r0 + t;
    float v = 0.f;
    if (!zero && seg_src[t] >= 0) {
      if constexpr (NW == 2) {
        v = swiglu_weighted(bf16_round(acc[0][i]), bf16_round(acc[1][i]), p.route_w[r], p.limit);
      } else {
        v = acc[0][i];
      }
    }
    p.out[r * p.n + col] = __float2bfloat16_rn(v);
  }
}

// The segment starting at output row r0 (group g0), by one warp: returns its rows (up to TBMAX following rows of
// group g0) and writes their activation rows to seg_src[0, kMaxSeg) (-1: invalid or past the segment).
template <int TBMAX>
__device__ __forceinline__ int segment_sources(const Fp4Params& p, int64_t r0, int32_t g0, int lane,
                                               int32_t* seg_src) {
  const bool same = lane < TBMAX && r0 + lane < p.out_rows &&
                    (p.group_map == nullptr || p.group_map[r0 + lane < p.out_rows ? r0 + lane : r0] == g0);
  const int rows = __ffs(~__ballot_sync(0xffffffffu, same)) - 1;
  if (lane < kMaxSeg) {
    int32_t src = -1;
    if (lane < rows) {
      const int64_t s = p.rows_map != nullptr ? p.rows_map[r0 + lane] : r0 + lane;
      src = s >= 0 && s < p.x_rows ? static_cast<int32_t>(s) : -1;
    }
    seg_src[lane] = src;
  }
  return rows;
}

// The segment that output row r0 starts, worked out by one warp (call from warp 0, then __syncthreads): output rows
// form runs of equal groups (any order of pairs; a run of one group is cut into segments of TBMAX rows from its
// first row). seg_info[0]: whether r0 starts a segment; seg_info[1]: its rows; seg_src[t]: the activation row of
// its row t (-1: invalid or past the segment).
template <int TBMAX>
__device__ __forceinline__ void find_segment(const Fp4Params& p, int64_t r0, int32_t g0, int lane, int32_t* seg_src,
                                             int32_t* seg_info) {
  int64_t start = 0;  // first row of the run of equal groups holding r0
  if (p.group_map != nullptr) {
    start = r0;
    for (;;) {
      const int64_t i = start - 1 - lane;
      const unsigned m = __ballot_sync(0xffffffffu, i < 0 || p.group_map[i < 0 ? 0 : i] != g0);
      if (m != 0u) {
        start -= __ffs(m) - 1;
        break;
      }
      start -= 32;
    }
  }
  const int rows = segment_sources<TBMAX>(p, r0, g0, lane, seg_src);
  if (lane == 0) seg_info[0] = (r0 - start) % TBMAX == 0, seg_info[1] = rows;
}

// Eight bf16 activation values (one lane's 16 bytes; 16 lanes hold a 128-wide block) quantized to e4m3 as
// quant.act_quant does: the block's power-of-two scale s (amax over the 16 lanes, xor-shuffles within each half warp)
// and the four e4m3x2 words. Every lane of the warp must call it.
__device__ __forceinline__ float quantize8_e4m3(const uint4 raw, uint32_t qw[4]) {
  const uint32_t rw[4] = {raw.x, raw.y, raw.z, raw.w};
  float v[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(rw[i] << 16);
    v[2 * i + 1] = __uint_as_float(rw[i] & 0xFFFF0000u);
  }
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float s = act_pow2_scale(amax);
  const float inv = __frcp_rn(s);  // exact: s is a power of two in the normal range (or inf -> 0, as x / inf)
#pragma unroll
  for (int i = 0; i < 4; ++i)
    qw[i] = __nv_cvt_float2_to_fp8x2(make_float2(v[2 * i] * inv, v[2 * i + 1] * inv), __NV_SATFINITE, __NV_E4M3);
  return s;
}

// The segment's activation rows quantized to e4m3 (all threads of the block; 16 lanes per 128-wide chunk) into
// act[t * act_pitch + K position] (BITS: even elements of each 8 first, then odd: the order of
// e2m1x8_to_e4m3_bits) and their scales into sa[kb * kMaxSeg + t] (times 64 for BITS; 0 for invalid rows).
// KTILE (the wgb kernel): act is wgmma's B operand instead, one 256-byte k32 step per 32-wide block (two 8 x 16-byte
// core matrices: elements 8q'..8q'+3 of the block at column t, bytes 4q'.., of the first, 8q'+4..8q'+7 of the second).
template <bool BITS, bool KTILE = false>
__device__ __forceinline__ void quantize_segment(const Fp4Params& p, int seg_rows, const int32_t* seg_src,
                                                 uint8_t* act, int act_pitch, float* sa) {
  const int64_t k = p.k, kbs = k / kStepK;
  const int units = seg_rows * static_cast<int>(kbs);
  const int half = threadIdx.x / 16, l16 = threadIdx.x % 16;
  for (int u0 = 0; u0 < units; u0 += kWarps * 2) {  // the same trip count for every thread (shuffles below)
    const int u = u0 + half;
    const bool in = u < units;
    const int t = in ? u / static_cast<int>(kbs) : 0;
    const int kb = in ? u % static_cast<int>(kbs) : 0;
    const int32_t src = in ? seg_src[t] : -1;
    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
    if (src >= 0) {
      const int64_t e0 = static_cast<int64_t>(src) * k + kb * kStepK + l16 * 8;  // 8 bf16 = 16 bytes
      raw = __ldg(reinterpret_cast<const uint4*>(p.x + 2 * e0));
    }
    uint32_t qw[4];
    const float s = quantize8_e4m3(raw, qw);
    uint32_t lo = qw[0] | (qw[1] << 16), hi = qw[2] | (qw[3] << 16);
    if constexpr (BITS) {  // even elements first, then odd (the order of e2m1x8_to_e4m3_bits)
      const uint32_t e = prmt(lo, hi, 0x6420u), o = prmt(lo, hi, 0x7531u);
      lo = e, hi = o;
    }
    if (in) {
      if constexpr (KTILE) {
        uint8_t* base = act + (kb * 4 + l16 / 4) * 256 + t * 16 + 4 * (l16 % 4);
        *reinterpret_cast<uint32_t*>(base) = lo;
        *reinterpret_cast<uint32_t*>(base + 128) = hi;
      } else {
        *reinterpret_cast<uint2*>(act + t * act_pitch + kb * kStepK + l16 * 8) = make_uint2(lo, hi);
      }
      if (l16 == 0) sa[kb * kMaxSeg + t] = src >= 0 ? (BITS ? s * 64.f : s) : 0.f;
    }
  }
}

// Eight e2m1 codes -> e4m3 bytes through the table {t0, t1} (byte i of t0 | t1 << 32 = the e4m3 byte of magnitude
// code i; every byte < 0x80), signs as in e2m1x8_to_e4m3_lut: elements 0-3 in lo, 4-7 in hi.
__device__ __forceinline__ void e2m1x8_to_e4m3_tab(uint32_t w, uint32_t t0, uint32_t t1, uint32_t& lo, uint32_t& hi) {
  const uint32_t mag = w & 0x77777777u, w4 = w << 4;
  lo = prmt(t0, t1, mag) | (prmt(w4, w, 0xD9C8u) & 0x80808080u);
  hi = prmt(t0, t1, mag >> 16) | (prmt(w4, w, 0xFBEAu) & 0x80808080u);
}

// The kernels' parameters from the launch arguments.
inline Fp4Params fp4_params(const Fp4GemvArgs& a, int ksplit) {
  return Fp4Params{static_cast<const uint8_t*>(a.x), a.x_rows, a.rows_map, a.group_map, a.w[0], a.s[0], a.w[1],
                   a.s[1], a.groups, static_cast<__nv_bfloat16*>(a.out), a.out_rows, a.n, a.k, a.route_w, a.limit,
                   ksplit};
}

}  // namespace
}  // namespace dsv4ffi
