// MXFP4 small-M GEMV for decode, the wgmma variants "wg" (f16 operands) and "wg8" (FP8 operands): the contract and
// numerics of fp4_gemv_kernels.cu (its header comment). Launched through launch_fp4_gemv.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "fp4_gemv_common.cuh"

namespace dsv4ffi {
namespace {

// ==== The wgmma variants: "wg" (default; f16 operands) and "wg8" (FP8 operands) ===================================
//
// Why the first design is slow: on sm_90 `mma.sync` with e4m3 operands is not a hardware instruction. ptxas turns each
// m16n8k32 e4m3 mma into 12 F2FP conversions (e4m3 -> f16, half the rate of the other ALU instructions) plus two f16
// HMMAs, i.e. 48 F2FP per KB of FP4 weights on top of the e2m1 widening: the ring kernel is bound by the ALU pipe
// (~55% busy in ncu) at ~35% of the copy bandwidth, not by memory. Here the weights are widened straight into the
// operand format of wgmma (A from registers) and the activation sits in shared memory in the operand format of B
// (f16 for wg, e4m3 for wg8), so nothing is converted twice.
//
// Layout: a block is one warpgroup (4 warps) issuing wgmma m64n8k16 (wg) / m64n8k32 (wg8). Its 64 A rows are s
// K-slices x 64/s weight rows and its 8 B columns s K-slices x TBN tokens (s = 8 / TBN, TBN = tokens per weight pass,
// the next power of two of the launch's max_share): A row (rho, sigma) holds weight row rho over K-slice sigma
// (whole 128-chunks, S = K/s wide), B column (sigma', t) token t's activation over K-slice sigma', and only the
// "diagonal" outputs D[(rho, sigma)][(sigma, t)] are kept (the others cost tensor-core time, which is plentiful).
// The s slice partials of (rho, t) are summed in slice order at the end of each row tile. So a warpgroup covers 8 TBN
// weight rows: at one token 8 rows x full K, and a launch has enough blocks at every T (a block streams a few row
// tiles in sequence, about two waves of blocks in all). Lane (g, q) of warp w holds A rows 16w + g and 16w + g + 8
// (one slice, sigma = g % s) and loads, per 128-wide chunk, block q of each row: 16 bytes = 32 elements = one scale
// byte, into registers (a distance-2 register prefetch across chunks and tiles); word m of them holds elements
// 32q + 8m .. + 7, which feed k-step(s) m of the chunk, and the activation is stored in shared memory in the same K
// order (core matrices of 8 columns x 16 bytes): a permutation of K inside each chunk.
//
// Numerics. Each wgmma then mixes the chunk's 4 weight blocks, so the per-32 scales are folded into the widening
// relative to a per-(row, chunk) base ("pre-MMA scaling"), and the chunk's fp32 partial is multiplied by
// 2^(base - 127) * s_act and added in fp32, chunks in K order, slices in order:
//   * wg: e2m1 -> f16 by bit placement (the f16 of value * 2^-14, subnormal for 0.5) and one f16 multiplication by
//     2^(t + 14), t = byte_q - byte_0 - 6, base = byte_0 + 6: value * 2^t is exact in f16 for t in [-23, 1]. The
//     products (f16 x f16, e4m3 activation values) are exact in fp32 and the tensor core accumulates the chunk's 128
//     products with fp32 accumulation, as the f16 HMMAs behind the first design's e4m3 mma.sync did. So: the
//     reference's per-block sums up to summation order whenever every block of a (row, chunk) has
//     byte_q - byte_0 in [-17, 7] and byte_0 <= 247.
//   * wg8: e2m1 -> e4m3 by a per-lane prmt table of v * 2^t, t = byte_q - max + 6 (exact and normal for t in
//     [-5, 6]: spans <= 11 binades, 7 <= max <= 254), wgmma m64n8k32 e4m3 chaining the chunk's 4 k-steps. Faster
//     (half the widening instructions), but NOT the reference's numerics: Hopper's FP8 tensor cores keep only 13
//     mantissa bits of the accumulator (e8m13, truncated), measured here as ~1e-3 rel-RMS in h against the ring
//     variant (~89% of h bit-identical). Opt-in only (DSV4_FFI_FP4_VARIANT=wg8 or variant="wg8").
// Any other (row, chunk) (rare in real weights; a scale byte 255 = NaN, extreme spans) makes its warp's (chunk,
// weight) exact the slow way: zeros go into the wgmma for its 16 rows, and it adds the per-32-block sums from
// mma.sync (f16, one block at a time, every partial times its own decoded scale): the ring variant's numerics.
constexpr uint32_t kRegHeadroom = 6;  // wg8: t = byte - max + 6 (the largest block is scaled by 2^6: 6 * 64 = 384)

// 16 bytes of streamed weights (read once: no L1 allocation; L2 fetches 256-byte pieces, the next chunks of the row).
__device__ __forceinline__ uint4 ldg_stream16(const uint8_t* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ uint32_t ldg_b32(const uint8_t* ptr) {
  uint32_t v;
  asm volatile("ld.global.nc.b32 %0, [%1];\n" : "=r"(v) : "l"(ptr));
  return v;
}

__device__ __forceinline__ uint32_t vmax_u16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("max.u16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// The largest of the four bytes of s.
__device__ __forceinline__ uint32_t max_byte(uint32_t s) {
  const uint32_t c = vmax_u16x2(prmt(s, 0u, 0x4240u), prmt(s, 0u, 0x4341u));  // {max(b0, b1), max(b2, b3)}
  return max(c & 0xFFFFu, c >> 16);
}


__device__ __forceinline__ uint32_t word_of(const uint4& v, int m) {
  return m == 0 ? v.x : m == 1 ? v.y : m == 2 ? v.z : v.w;
}

template <int TBN>
struct WgCfg {
  static constexpr int kSlices = 8 / TBN;     // s
  static constexpr int kRowsWg = 8 * TBN;     // weight rows per warpgroup (64 / s)
};
constexpr int kWgThreads = 128;


// d (+)= A . B for one k16 step in f16 (fp32 accumulation): A = the lane's 4 f16x2 registers, B by descriptor.
__device__ __forceinline__ void wgmma_m64n8k16_f16(float d[4], const uint32_t a[4], uint64_t desc, int accumulate) {
  DSV4_WGMMA(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

__device__ __forceinline__ void mma_f16_16x8x16(const uint32_t a[4], const uint32_t b[2], float d[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.f));
}

__device__ __forceinline__ uint32_t hmul2_bits(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));  // f16 keeps subnormals (no ftz)
  return d;
}

// Eight e2m1 codes (nibble i = element i) -> four f16x2: o[i] = (element i, element i + 4) * f (f16x2 factor). The
// magnitude bits (e1 e0 m) go to f16 bits 11-9 and the sign to bit 15: the f16 of value * 2^-14 for every code (0.5
// becomes the subnormal 2^-15), then one exact multiplication by f = 2^(t + 14) gives value * 2^t.
__device__ __forceinline__ void e2m1x8_to_f16(uint32_t w, uint32_t f, uint32_t o[4]) {
  o[0] = hmul2_bits(((w << 12) & 0x80008000u) | ((w << 9) & 0x0E000E00u), f);
  o[1] = hmul2_bits(((w << 8) & 0x80008000u) | ((w << 5) & 0x0E000E00u), f);
  o[2] = hmul2_bits(((w << 4) & 0x80008000u) | ((w << 1) & 0x0E000E00u), f);
  o[3] = hmul2_bits((w & 0x80008000u) | ((w >> 3) & 0x0E000E00u), f);
}


template <int NW, int TBN, bool F16>
__global__ void __launch_bounds__(kWgThreads, 3) fp4_wg_kernel(const Fp4Params p) {
  using C = WgCfg<TBN>;
  constexpr int S_ = C::kSlices, R = C::kRowsWg;
  constexpr int kChunkB = F16 ? 2048 : 1024;  // B bytes per 128-wide chunk: (8 k16 | 4 k32 steps) x 2 core matrices
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int32_t seg_src[kMaxSeg];
  __shared__ int32_t seg_info[2];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int w4 = warp, gq = lane / 4, q = lane % 4;
  const int64_t r0 = blockIdx.y;
  const int32_t g0 = p.group_map != nullptr ? p.group_map[r0] : 0;
  const int64_t g = g0;
  const bool group_ok = g >= 0 && g < p.groups;
  const int64_t k = p.k;
  const int nch_all = static_cast<int>(k / kStepK);
  const int cps = (nch_all + S_ - 1) / S_;  // chunks per slice (the last slices may reach past K: zeros there)
  const int sigma = gq % S_;
  // A rows 16 w4 + gq (+ 8): local weight rows rho_h of this warpgroup's tile
  const int rho0 = (16 * w4 + gq) / S_, rho1 = (16 * w4 + gq + 8) / S_;
  const int64_t ntiles = (p.n + R - 1) / R;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * p.tiles;  // this block's first row tile
  const int my_tiles = static_cast<int>(ntiles - tile0 < p.tiles ? ntiles - tile0 : p.tiles);

  // ---- smem: B (the activation, [chunk][step][half][column][16]), sa [slot][8], partials ----------------------
  uint8_t* bsm = smem;                                              // cps * kChunkB bytes
  float* sa = reinterpret_cast<float*>(smem + cps * kChunkB);       // [S_ * cps][8]
  float* part = sa + S_ * cps * kMaxSeg;                            // [NW][S_][R][TBN]

  // ---- 1. this lane's first chunks in flight as soon as the expert is known -----------------------------------
  // Chunk j of the block's stream = chunk j % cps of row tile j / cps (tiles of R rows, in order).
  const int64_t half_k = k / 2, sk = k / 32, ge = group_ok ? g : 0;
  const int64_t k0 = static_cast<int64_t>(sigma) * cps * kStepK;  // the lane's slice's first K position
  const int my_chunks = max(0, min(cps, nch_all - sigma * cps));  // chunks of this lane's slice inside K
  const bool streams = group_ok;
  uint4 wva[NW][2], wvb[NW][2];  // ping-pong register buffers: chunk c in one while chunk c + 1 loads into the other
  uint32_t sva[NW][2], svb[NW][2];
  auto load = [&](uint4 (&wv)[NW][2], uint32_t (&sv)[NW][2], int j) {
    const int c = j % cps;
    const int64_t tr = (tile0 + j / cps) * R;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int64_t row = tr + (h == 0 ? rho0 : rho1);
      row = row < p.n ? row : p.n - 1;  // rows past N repeat row N - 1 (their outputs are not stored)
      const int64_t wo = (ge * p.n + row) * half_k + k0 / 2 + q * 16 + static_cast<int64_t>(c) * kStepBytes;
      const int64_t so = (ge * p.n + row) * sk + k0 / 32 + static_cast<int64_t>(c) * 4;
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
        if (c < my_chunks) {
          wv[wi][h] = ldg_stream16((wi == 0 ? p.w0 : p.w1) + wo);
          sv[wi][h] = ldg_b32((wi == 0 ? p.s0 : p.s1) + so);
        } else {  // past K: zero weights with neutral scales
          wv[wi][h] = make_uint4(0u, 0u, 0u, 0u);
          sv[wi][h] = 0x7F7F7F7Fu;
        }
      }
    }
  };
  const int total = my_tiles * cps;
  if (streams) {
    load(wva, sva, 0);
    if (total > 1) load(wvb, svb, 1);
  }

  // ---- 2. the segment r0 starts ---------------------------------------------------------------------------------
  if (warp == 0) find_segment<TBN>(p, r0, g0, lane, seg_src, seg_info);
  // Zero sa, and B where slices reach past K (there zero weights meet B: it must be finite). The columns of absent
  // tokens need nothing: a column's outputs depend on that column only, and they are not stored.
  if (S_ * cps * kStepK > k)
    for (int i = threadIdx.x; i < cps * kChunkB / 16; i += kWgThreads)
      reinterpret_cast<uint4*>(bsm)[i] = make_uint4(0, 0, 0, 0);
  for (int i = threadIdx.x; i < S_ * cps * kMaxSeg; i += kWgThreads) sa[i] = 0.f;
  __syncthreads();
  if (!seg_info[0]) return;
  const int seg_rows = seg_info[1];
  if (!group_ok) {  // no such expert: zeros
    const int cols = my_tiles * R;
    for (int i = threadIdx.x; i < cols * seg_rows; i += kWgThreads) {
      const int t = i / cols;
      const int64_t col = tile0 * R + i % cols;
      if (col < p.n) p.out[(r0 + t) * p.n + col] = __float2bfloat16_rn(0.f);
    }
    return;
  }

  // ---- 3. the segment's activation rows quantized to e4m3 into B (16 lanes per 128-wide block; the loads of up to
  // four blocks per thread issued together: the prologue is one L2 round trip, not one per block) ----------------
  {
    constexpr int kU = 4;
    const int units = seg_rows * nch_all;
    const int half = threadIdx.x / 16, l16 = threadIdx.x % 16;
    for (int u0 = 0; u0 < units; u0 += kU * (kWgThreads / 16)) {  // the same trip count for every thread
      uint4 raw[kU];
#pragma unroll
      for (int j = 0; j < kU; ++j) {
        const int u = u0 + j * (kWgThreads / 16) + half;
        const int32_t src = u < units ? seg_src[u / nch_all] : -1;
        raw[j] = make_uint4(0u, 0u, 0u, 0u);
        if (src >= 0) {
          const int64_t e0 = static_cast<int64_t>(src) * k + (u % nch_all) * kStepK + l16 * 8;
          raw[j] = __ldg(reinterpret_cast<const uint4*>(p.x + 2 * e0));
        }
      }
#pragma unroll
      for (int j = 0; j < kU; ++j) {
        const int u = u0 + j * (kWgThreads / 16) + half;
        const bool in = u < units;
        const int t = in ? u / nch_all : 0;
        const int kb = in ? u % nch_all : 0;
        const int32_t src = in ? seg_src[t] : -1;
        uint32_t qw[4];
        const float s = quantize8_e4m3(raw[j], qw);
        if (in) {
          const int sl = kb / cps, c = kb % cps, col = sl * TBN + t;
          const int qq = l16 / 4, m = l16 % 4;  // elements 32qq + 8m .. +7 of the chunk
          if constexpr (F16) {
            // k16 step 2m + p holds, per lane quad qq, elements (2p, 2p + 4) in its first core matrix and (2p + 1,
            // 2p + 5) in its second (e2m1x8_to_f16's pairs); the e4m3 values become f16 exactly.
            uint32_t h2[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const __half2_raw hr =
                  __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(qw[i]), __NV_E4M3);
              h2[i] = static_cast<uint32_t>(hr.x) | (static_cast<uint32_t>(hr.y) << 16);
            }
            uint8_t* base = bsm + (c * 8 + 2 * m) * 256 + col * 16 + 4 * qq;
            *reinterpret_cast<uint32_t*>(base) = prmt(h2[0], h2[2], 0x5410u);        // (0, 4)
            *reinterpret_cast<uint32_t*>(base + 128) = prmt(h2[0], h2[2], 0x7632u);  // (1, 5)
            *reinterpret_cast<uint32_t*>(base + 256) = prmt(h2[1], h2[3], 0x5410u);  // (2, 6)
            *reinterpret_cast<uint32_t*>(base + 384) = prmt(h2[1], h2[3], 0x7632u);  // (3, 7)
          } else {
            uint8_t* base = bsm + ((c * 4 + m) * 2) * 128 + col * 16 + 4 * qq;
            *reinterpret_cast<uint32_t*>(base) = qw[0] | (qw[1] << 16);
            *reinterpret_cast<uint32_t*>(base + 128) = qw[2] | (qw[3] << 16);
          }
          if (l16 == 0) sa[(sl * cps + c) * kMaxSeg + t] = src >= 0 ? s : 0.f;
        }
      }
    }
  }
  // wgmma reads B through the async proxy: make this thread's ordinary stores to it visible there, then the barrier
  DSV4_WGMMA("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();

  // ---- 4. the weight stream ---------------------------------------------------------------------------------------
  float acc[NW][4];
#pragma unroll
  for (int wi = 0; wi < NW; ++wi)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[wi][i] = 0.f;
  const uint32_t qsel = 0x4440u | static_cast<uint32_t>(q);
  const uint32_t bsm_addr = smem_addr(bsm);
  // the C fragment's columns 2q, 2q + 1: (slice, token) of each, and the sa slot base of their slice
  const int colA = 2 * q, colB = 2 * q + 1;
  const float* saA = sa + (colA / TBN) * cps * kMaxSeg + colA % TBN;
  const float* saB = sa + (colB / TBN) * cps * kMaxSeg + colB % TBN;
  auto chunk = [&](const uint4 (&wv)[NW][2], const uint32_t (&sv)[NW][2], int c) {
    if constexpr (F16) {
      // Per (row, chunk): base = byte_0 + 6, t = byte_q - base; the wgmma sees value * 2^t (exact in f16 for t in
      // [-23, 1], i.e. byte_q - byte_0 in [-17, 7]) and the chunk's partial is scaled by 2^(base - 127) * s_act.
      float sc[NW][2];
      bool bad[NW];
      float d[NW][4];
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
        uint32_t f2[2];
        bool b = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t sw = sv[wi][h];
          const uint32_t e0 = sw & 0xFFu;
          const uint32_t u = prmt(sw, 0u, qsel) - e0 + 17u;  // t + 23
          b |= u > 24u;
          b |= e0 > 247u;                           // also a byte 255 (NaN) anywhere: u > 24 or e0 > 247
          f2[h] = (u + 6u) * 0x04000400u;           // f16x2 2^(t + 14) (exponent field t + 29)
          sc[wi][h] = __uint_as_float((e0 + 6u) << 23);
        }
        bad[wi] = __any_sync(0xffffffffu, b);
        if (bad[wi]) f2[0] = f2[1] = 0u;  // the wgmma then sees only +-0 for this warp's rows
        uint32_t a[8][4];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          uint32_t p0[4], p1[4];
          e2m1x8_to_f16(word_of(wv[wi][0], m), f2[0], p0);
          e2m1x8_to_f16(word_of(wv[wi][1], m), f2[1], p1);
          a[2 * m][0] = p0[0], a[2 * m][1] = p1[0], a[2 * m][2] = p0[1], a[2 * m][3] = p1[1];
          a[2 * m + 1][0] = p0[2], a[2 * m + 1][1] = p1[2], a[2 * m + 1][2] = p0[3], a[2 * m + 1][3] = p1[3];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          d[wi][i] = 0.f;
          reg_fence(d[wi][i]);
        }
        wgmma_fence();
#pragma unroll
        for (int st = 0; st < 8; ++st) wgmma_m64n8k16_f16(d[wi], a[st], wg_desc(bsm_addr + (c * 8 + st) * 256), st);
        wgmma_commit();
        wgmma_wait0();  // before the next weight reuses the A registers
#pragma unroll
        for (int i = 0; i < 4; ++i) reg_fence(d[wi][i]);
      }
      const float s_a = saA[c * kMaxSeg], s_b = saB[c * kMaxSeg];
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
        if (bad[wi]) continue;
        acc[wi][0] = fmaf(d[wi][0], sc[wi][0] * s_a, acc[wi][0]);
        acc[wi][1] = fmaf(d[wi][1], sc[wi][0] * s_b, acc[wi][1]);
        acc[wi][2] = fmaf(d[wi][2], sc[wi][1] * s_a, acc[wi][2]);
        acc[wi][3] = fmaf(d[wi][3], sc[wi][1] * s_b, acc[wi][3]);
      }
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
        if (!bad[wi]) continue;
        // exact path: one 32-wide block at a time on mma.sync (f16, fp32 accumulation), values unscaled
#pragma unroll 1
        for (int jb = 0; jb < 4; ++jb) {
          float e[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 1
          for (int m = 0; m < 4; ++m) {
            uint32_t p0[4], p1[4];
            e2m1x8_to_f16(word_of(wv[wi][0], m), 0x74007400u, p0);  // * 2^14: the values themselves
            e2m1x8_to_f16(word_of(wv[wi][1], m), 0x74007400u, p1);
#pragma unroll
            for (int pp = 0; pp < 2; ++pp) {
              uint32_t aa[4] = {p0[2 * pp], p1[2 * pp], p0[2 * pp + 1], p1[2 * pp + 1]};
              if (q != jb) aa[0] = aa[1] = aa[2] = aa[3] = 0u;
              const uint8_t* bt = bsm + (c * 8 + 2 * m + pp) * 256 + gq * 16 + 4 * q;
              const uint32_t bb[2] = {*reinterpret_cast<const uint32_t*>(bt),
                                      *reinterpret_cast<const uint32_t*>(bt + 128)};
              float r[4];
              mma_f16_16x8x16(aa, bb, r);
#pragma unroll
              for (int i = 0; i < 4; ++i) e[i] += r[i];
            }
          }
          const float w0 = e8m0_at23(((sv[wi][0] >> (8 * jb)) & 0xFFu) << 23);
          const float w1 = e8m0_at23(((sv[wi][1] >> (8 * jb)) & 0xFFu) << 23);
          acc[wi][0] = fmaf(e[0], w0 * s_a, acc[wi][0]);
          acc[wi][1] = fmaf(e[1], w0 * s_b, acc[wi][1]);
          acc[wi][2] = fmaf(e[2], w1 * s_a, acc[wi][2]);
          acc[wi][3] = fmaf(e[3], w1 * s_b, acc[wi][3]);
        }
      }
    } else {
      uint32_t a[NW][4][4];
      float sc[NW][2];
      bool bad[NW];
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
        uint32_t t0[2], t1[2];
        bad[wi] = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t sw = sv[wi][h];
          const uint32_t mx = max_byte(sw);
          const uint32_t t = prmt(sw, 0u, qsel) - mx + kRegHeadroom;
          const uint32_t bits = (mx - kRegHeadroom) << 23;
          bad[wi] |= static_cast<int>(t) < -5;
          bad[wi] |= bits - 0x00800000u > 0x7B800000u;
          t0[h] = 0x3C383000u + t * 0x08080800u;
          t1[h] = 0x4C484440u + t * 0x08080808u;
          sc[wi][h] = __uint_as_float(bits);
        }
        bad[wi] = __any_sync(0xffffffffu, bad[wi]);
        if (bad[wi]) t0[0] = t1[0] = t0[1] = t1[1] = 0u;  // the wgmma then sees only +-0 for this warp's rows
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          e2m1x8_to_e4m3_tab(word_of(wv[wi][0], m), t0[0], t1[0], a[wi][m][0], a[wi][m][2]);
          e2m1x8_to_e4m3_tab(word_of(wv[wi][1], m), t0[1], t1[1], a[wi][m][1], a[wi][m][3]);
        }
      }
      float d[NW][4];
#pragma unroll
      for (int wi = 0; wi < NW; ++wi)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          d[wi][i] = 0.f;
          reg_fence(d[wi][i]);
        }
      wgmma_fence();
#pragma unroll
      for (int wi = 0; wi < NW; ++wi)
#pragma unroll
        for (int m = 0; m < 4; ++m) wgmma_m64n8k32(d[wi], a[wi][m], wg_desc(bsm_addr + (c * 4 + m) * 256), m);
      wgmma_commit();
      wgmma_wait0();
      const float s_a = saA[c * kMaxSeg], s_b = saB[c * kMaxSeg];
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
#pragma unroll
        for (int i = 0; i < 4; ++i) reg_fence(d[wi][i]);
        if (bad[wi]) continue;
        acc[wi][0] = fmaf(d[wi][0], sc[wi][0] * s_a, acc[wi][0]);
        acc[wi][1] = fmaf(d[wi][1], sc[wi][0] * s_b, acc[wi][1]);
        acc[wi][2] = fmaf(d[wi][2], sc[wi][1] * s_a, acc[wi][2]);
        acc[wi][3] = fmaf(d[wi][3], sc[wi][1] * s_b, acc[wi][3]);
      }
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
        if (!bad[wi]) continue;
        // exact path: one 32-wide block at a time on mma.sync, B fragment from the same shared-memory tile
  #pragma unroll 1
        for (int jb = 0; jb < 4; ++jb) {
          float e[4] = {0.f, 0.f, 0.f, 0.f};
  #pragma unroll 1
          for (int m = 0; m < 4; ++m) {
            uint32_t aa[4];
            e2m1x8_to_e4m3_tab(word_of(wv[wi][0], m), 0x3C383000u, 0x4C484440u, aa[0], aa[2]);
            e2m1x8_to_e4m3_tab(word_of(wv[wi][1], m), 0x3C383000u, 0x4C484440u, aa[1], aa[3]);
            if (q != jb) aa[0] = aa[1] = aa[2] = aa[3] = 0u;
            const uint8_t* bt = bsm + (c * 4 + m) * 256 + gq * 16 + 4 * q;
            const uint32_t bb[2] = {*reinterpret_cast<const uint32_t*>(bt), *reinterpret_cast<const uint32_t*>(bt + 128)};
            float r[4];
            mma_e4m3_16x8x32(aa, bb, r);
#pragma unroll
            for (int i = 0; i < 4; ++i) e[i] += r[i];
          }
          const float w0 = e8m0_at23(((sv[wi][0] >> (8 * jb)) & 0xFFu) << 23);
          const float w1 = e8m0_at23(((sv[wi][1] >> (8 * jb)) & 0xFFu) << 23);
          acc[wi][0] = fmaf(e[0], w0 * s_a, acc[wi][0]);
          acc[wi][1] = fmaf(e[1], w0 * s_b, acc[wi][1]);
          acc[wi][2] = fmaf(e[2], w1 * s_a, acc[wi][2]);
          acc[wi][3] = fmaf(e[3], w1 * s_b, acc[wi][3]);
        }
      }
    }
  };
  // ---- 5. per row tile: the diagonal outputs summed over the slices in order, then the epilogue -------------------
  auto finish_tile = [&](int tile) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = 2 * q + (i & 1);
      if (col / TBN != sigma) continue;  // not on the diagonal
      const int t = col % TBN, rho = (i >> 1) ? rho1 : rho0;
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) part[((wi * S_ + sigma) * R + rho) * TBN + t] = acc[wi][i];
    }
    // All s slices of a weight row are A rows of one warp (s divides 16): warp w sums its own 16/s rows.
    __syncwarp();
    constexpr int kRowsWarp = 16 / S_;
    for (int o = lane; o < kRowsWarp * TBN; o += 32) {
      const int rho = w4 * kRowsWarp + o / TBN, t = o % TBN;
      const int64_t col = (tile0 + tile) * R + rho;
      if (t >= seg_rows || col >= p.n) continue;
      float v[NW];
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
        float s = 0.f;
        for (int sl = 0; sl < S_; ++sl) s += part[((wi * S_ + sl) * R + rho) * TBN + t];
        v[wi] = s;
      }
      const int64_t r = r0 + t;
      float y = 0.f;
      if (seg_src[t] >= 0) {
        if constexpr (NW == 2) {
          y = swiglu_weighted(bf16_round(v[0]), bf16_round(v[1]), p.route_w[r], p.limit);
        } else {
          y = v[0];
        }
      }
      p.out[r * p.n + col] = __float2bfloat16_rn(y);
    }
    __syncwarp();  // part is rewritten by the next tile
#pragma unroll
    for (int wi = 0; wi < NW; ++wi)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[wi][i] = 0.f;
  };
  if (streams) {
    for (int j = 0; j < total; j += 2) {
      chunk(wva, sva, j % cps);
      if (j + 2 < total) load(wva, sva, j + 2);
      if (j % cps == cps - 1) finish_tile(j / cps);
      if (j + 1 >= total) break;
      chunk(wvb, svb, (j + 1) % cps);
      if (j + 3 < total) load(wvb, svb, j + 3);
      if ((j + 1) % cps == cps - 1) finish_tile((j + 1) / cps);
    }
  }
}

template <int NW, int TBN, bool F16>
size_t wg_smem_bytes(int64_t k) {
  constexpr int S_ = WgCfg<TBN>::kSlices;
  const int64_t nch = k / kStepK, cps = (nch + S_ - 1) / S_;
  return static_cast<size_t>(cps) * (F16 ? 2048 : 1024) + static_cast<size_t>(S_ * cps * kMaxSeg) * 4 +
         static_cast<size_t>(NW * S_ * WgCfg<TBN>::kRowsWg * TBN) * 4;
}

template <int NW, int TBN, bool F16>
cudaError_t launch_wg(Fp4Params p, cudaStream_t stream) {
  auto* kernel = fp4_wg_kernel<NW, TBN, F16>;
  const size_t smem = wg_smem_bytes<NW, TBN, F16>(p.k);
  cudaError_t err = cudaSuccess;
  const int limit = dynamic_smem_limit(reinterpret_cast<const void*>(kernel), &err);
  if (limit < 0) return err;
  if (smem > static_cast<size_t>(limit)) return cudaErrorInvalidValue;  // the handlers check fp4_gemv_smem first
  // Row tiles per block: about two waves of resident blocks over all (segment, tile) pairs, taking every output row
  // as a segment (pairs sorted by expert over many experts: most segments are one pair). DSV4_FFI_FP4_TILES overrides.
  constexpr int64_t R = WgCfg<TBN>::kRowsWg;
  const int64_t ntiles = (p.n + R - 1) / R;
  int major = 0, sms = 0;
  device_info(&major, &major, &sms);
  const int64_t target = 2LL * sms * resident_blocks(reinterpret_cast<const void*>(kernel), kWgThreads, smem);
  int64_t tiles = (ntiles * p.out_rows + target / 2) / target;
  if (const char* v = std::getenv("DSV4_FFI_FP4_TILES")) tiles = std::atoi(v);
  tiles = tiles < 1 ? 1 : tiles > ntiles ? ntiles : tiles;
  p.tiles = static_cast<int>(tiles);
  const dim3 grid(static_cast<unsigned>((ntiles + tiles - 1) / tiles), static_cast<unsigned>(p.out_rows));
  kernel<<<grid, kWgThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Tokens per weight pass of the wg kernels: the next power of two of max_share, at most kMaxSeg.
int wg_tokens(int64_t max_share) { return max_share <= 1 ? 1 : max_share <= 2 ? 2 : max_share <= 4 ? 4 : kMaxSeg; }

template <int NW, bool F16>
size_t wg_smem(int64_t k, int tb) {
  return tb == 1   ? wg_smem_bytes<NW, 1, F16>(k)
         : tb == 2 ? wg_smem_bytes<NW, 2, F16>(k)
         : tb == 4 ? wg_smem_bytes<NW, 4, F16>(k)
                   : wg_smem_bytes<NW, 8, F16>(k);
}

template <int NW, bool F16>
cudaError_t launch_wg_tb(const Fp4Params& p, int tb, cudaStream_t stream) {
  return tb == 1   ? launch_wg<NW, 1, F16>(p, stream)
         : tb == 2 ? launch_wg<NW, 2, F16>(p, stream)
         : tb == 4 ? launch_wg<NW, 4, F16>(p, stream)
                   : launch_wg<NW, 8, F16>(p, stream);
}

}  // namespace

size_t fp4_wg_smem(bool fused, bool f16, int64_t k, int64_t max_share) {
  const int tb = wg_tokens(max_share);
  if (f16) return fused ? wg_smem<2, true>(k, tb) : wg_smem<1, true>(k, tb);
  return fused ? wg_smem<2, false>(k, tb) : wg_smem<1, false>(k, tb);
}

cudaError_t launch_fp4_wg(const Fp4GemvArgs& a, bool f16, cudaStream_t stream) {
  const Fp4Params p = fp4_params(a, fp4_ksplit(a.k));
  const bool fused = a.w[1] != nullptr;
  const int tb = wg_tokens(a.max_share);
  if (f16) return fused ? launch_wg_tb<2, true>(p, tb, stream) : launch_wg_tb<1, true>(p, tb, stream);
  return fused ? launch_wg_tb<2, false>(p, tb, stream) : launch_wg_tb<1, false>(p, tb, stream);
}

}  // namespace dsv4ffi
