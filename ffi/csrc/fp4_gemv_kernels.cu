// MXFP4 small-M GEMV for decode (our own kernels): the routed experts of DeepSeek-V4 as released, packed e2m1
// weights `uint8 [E, N, K/2]` (low nibble = element 2m, high nibble = element 2m+1) with UE8M0 scales
// `[E, N, K/32]` (2^(byte-127); byte 0 -> 2^-127, 255 -> NaN), FP8 activations quantized inside the kernel.
//
//   fused gate/up (two weights): h[r] = bf16(route_w[r] * silu(min(g, L)) * clip(u, -L, L)),
//                                g = f32(bf16(x[row(r)] W1[grp(r)]^T)), u = f32(bf16(x[row(r)] W3[grp(r)]^T))
//   plain (one weight):          y[r] = bf16(x[row(r)] W[grp(r)]^T)   (the down projection: row(r) = r)
// row(r) = rows_map ? rows_map[r] : r, grp(r) = group_map ? group_map[r] : 0; a negative or out-of-range row or
// group gives a zero output row.
//
// Numerics (the official MXFP4 linear, `ops.fp4_linear`): each 128-wide chunk of an activation row is quantized to
// e4m3 with a power-of-two scale exactly as `quant.act_quant` does (bit-identical: amax floor 1e-4, scale from the
// IEEE bits of amax * f32(1/448), x * (1/s) = x / s for a power of two s, RN with saturation = clamp then RN).
// Every e2m1 value is exact in e4m3. One mma.sync m16n8k32 e4m3 covers exactly one 32-wide weight-scale block:
// it starts from zero, so the tensor core sums no more than those 32 exact products; the partial is then scaled by
// s_act * s_w (a product of powers of two: exact) and added to the fp32 accumulator with one fma, in K order within
// a warp's K slice; the K slices of a block are added in order at the end. The result differs from the reference
// only by that reordering (and the tensor core's internal summation of 32 products), then one bf16 rounding.
//
// Layout of the work: a warp owns 16 weight rows (of both weights when fused: the SwiGLU of a row needs its gate
// and its up output in the same lanes) and a K slice; K is split across the 8 warps of a block as deeply as four
// 128-wide steps per warp allow. Weights stream through a per-warp cp.async ring of 16-byte copies (no block
// barrier in the loop) and reach the mma through ldmatrix, which hands lane (g, q) bytes 4q..4q+3 of a row's
// 16-byte (= 32-element) block: exactly the 8 elements the m16n8k32 A fragment wants from it for that block, so no
// shuffles are needed. Output rows form segments of up to 8 consecutive rows with the same group (pairs sorted by
// expert share one weight pass; the 8 columns of the mma are the segment's tokens); one block per (row tile,
// segment start): blockIdx.y = output row, blocks of rows inside a segment return at once.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "gemv_mma.cuh"
#include "kernels.h"

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
// float32(1/448), the constant the reference multiplies by (0x1.24924ap-9).
constexpr float kInvFp8Max = 0x1.24924ap-9f;

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
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t r[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// PTX prmt in its default mode: bit 3 of a selector nibble replicates the sign of the selected byte (the CUDA
// __byte_perm intrinsic documents only the 3-bit selection, so this is spelled out).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// Eight e2m1 codes (nibble i = element i, bit 3 the sign) -> the e4m3 bytes of the same values, elements 0-3 in
// `lo`, 4-7 in `hi` (byte i = element i). Exact: |code| 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6 = e4m3 0x00, 0x30, 0x38,
// 0x3C, 0x40, 0x44, 0x48, 0x4C (all normal), by one prmt table lookup per 4 elements; the sign bits by a second
// prmt in sign-replicate mode (element 2m's sign is bit 3 of byte m: bit 7 of byte m of w << 4; element 2m+1's is
// bit 7 of byte m of w).
__device__ __forceinline__ void e2m1x8_to_e4m3_lut(uint32_t w, uint32_t& lo, uint32_t& hi) {
  constexpr uint32_t kLut0 = 0x3C383000u, kLut1 = 0x4C484440u;
  const uint32_t mag = w & 0x77777777u, w4 = w << 4;
  lo = prmt(kLut0, kLut1, mag) | (prmt(w4, w, 0xD9C8u) & 0x80808080u);
  hi = prmt(kLut0, kLut1, mag >> 16) | (prmt(w4, w, 0xFBEAu) & 0x80808080u);
}

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

// 2^ceil(log2(max(amax, 1e-4) * f32(1/448))) from the IEEE bits (quant.act_quant; quant_kernels.cu).
__device__ __forceinline__ float pow2_scale(float amax) {
  amax = fmaxf(amax, 1e-4f);
  const float t = __fmul_rn(amax, kInvFp8Max);
  const uint32_t bits = __float_as_uint(t);
  const uint32_t e = ((bits >> 23) & 0xFFu) + ((bits & 0x7FFFFFu) != 0u);
  return __uint_as_float(e << 23);
}

// w * silu(min(g, L)) * clip(u, -L, L) in fp32 in the reference's order (moe.swiglu; no clamp if L <= 0).
__device__ __forceinline__ float swiglu_weighted(float g, float u, float w, float limit) {
  if (limit > 0.f) {
    u = fminf(fmaxf(u, -limit), limit);
    g = fminf(g, limit);
  }
  const float act = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
  return __fmul_rn(w, __fmul_rn(act, u));
}

__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

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

// Occupancy targets: the fused kernel (two weights) fits two blocks of 256 threads per SM (<= 128 registers), the
// plain one three (<= 85 registers; its shared memory allows it).
template <int NW, int TBMAX, bool BITS>
__global__ void __launch_bounds__(kWarps * 32, NW == 1 ? 3 : 2) fp4_gemv_kernel(const Fp4Params p) {
  using C = Cfg<NW, TBMAX>;
  constexpr int S = C::kStages;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int32_t seg_src[kMaxSeg];
  __shared__ int32_t seg_info[2];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gq = lane / 4, q = lane % 4;
  const int64_t r0 = blockIdx.y;
  const int32_t g0 = p.group_map != nullptr ? p.group_map[r0] : 0;
  const int64_t g = g0;
  const bool group_ok = g >= 0 && g < p.groups;
  const int ksplit = p.ksplit, row_tiles = kWarps / ksplit;
  const int rg = warp / ksplit, kc = warp % ksplit;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * row_tiles + rg) * kRows;
  const bool tile_live = n0 < p.n;

  const int64_t k = p.k, kbs = k / kStepK;
  const int act_pitch = static_cast<int>(k) + kActPad;
  uint8_t* act = smem;
  float* sa = reinterpret_cast<float*>(smem + TBMAX * act_pitch);  // [kbs][8]
  uint8_t* ring = smem + TBMAX * act_pitch + kbs * kMaxSeg * 4;
  uint8_t* wsm = ring + warp * C::kWarpBytes;
  float* table = reinterpret_cast<float*>(wsm + S * C::kStageBytes);

  // ---- 1. start this warp's weight stream as soon as the expert is known: before the segment is worked out (a
  // block that turns out not to start a segment drops its copies) and before the activation work ----------------
  const int kb_per = static_cast<int>((kbs + ksplit - 1) / ksplit);
  const int kb_begin = kc * kb_per;
  const int kb_end = kbs < kb_begin + kb_per ? static_cast<int>(kbs) : kb_begin + kb_per;
  const int steps = group_ok && tile_live && kb_end > kb_begin ? kb_end - kb_begin : 0;
  // Lane copies 16 bytes (segment lane % 4) of rows lane / 4 and lane / 4 + 8 of each weight per step, and, for
  // lanes < 16 NW, the step's scale word of row lane % 16 of weight lane / 16. Rows past N repeat row N - 1 (their
  // outputs are not stored).
  const uint8_t* wsrc[NW][2];
  const uint8_t* ssrc = nullptr;
  {
    const int64_t half_k = k / 2, sk = k / 32, ge = group_ok ? g : 0;
#pragma unroll
    for (int wi = 0; wi < NW; ++wi) {
      const uint8_t* wb = wi == 0 ? p.w0 : p.w1;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        int64_t row = n0 + lane / 4 + 8 * h;
        row = row < p.n ? row : p.n - 1;
        wsrc[wi][h] = wb + (ge * p.n + row) * half_k + (lane % 4) * 16 +
                      static_cast<int64_t>(kb_begin) * kStepBytes;
      }
    }
    if (lane < NW * kRows) {
      int64_t row = n0 + lane % kRows;
      row = row < p.n ? row : p.n - 1;
      ssrc = (lane < kRows ? p.s0 : p.s1) + (ge * p.n + row) * sk + static_cast<int64_t>(kb_begin) * 4;
    }
  }
  const uint32_t ring_addr = smem_addr(wsm);
  auto issue = [&](int i) {  // step i (relative to kb_begin) into stage i % S
    const uint32_t st = ring_addr + (i % S) * C::kStageBytes;
#pragma unroll
    for (int wi = 0; wi < NW; ++wi)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        cp_async16(st + (wi * kRows + 8 * h + lane / 4) * kRowPitch + (lane % 4) * 16,
                   wsrc[wi][h] + static_cast<int64_t>(i) * kStepBytes);
    if (lane < NW * kRows) cp_async4(st + C::kStageW + lane * 4, ssrc + i * 4);
  };
  if (steps > 0) {
#pragma unroll
    for (int i = 0; i < S - 1; ++i) {
      if (i < steps) issue(i);
      cp_async_commit();
    }
  }

  // ---- 2. the segment starting at output row r0 (if it starts one): its rows and their activation rows ----------
  if (warp == 0) {
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
    if (lane == 0) seg_info[0] = (r0 - start) % TBMAX == 0, seg_info[1] = rows;
  }
  __syncthreads();
  if (!seg_info[0]) {  // a row inside a segment: its start block computes it
    cp_async_wait<0>();  // the speculative copies land before this block's shared memory can be reused
    return;
  }
  const int seg_rows = seg_info[1];
  if (!group_ok) {  // no such expert (nothing was copied): zeros
    if (kc == 0 && tile_live) {
      const float zero[NW][4] = {};
      store_tile<NW>(p, zero, lane, r0, seg_rows, seg_src, n0, true);
    }
    return;
  }

  // ---- 3. the segment's activation rows quantized to e4m3 in shared memory (all threads; 16 lanes per chunk) ---
  {
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
      const float s = pow2_scale(amax);
      const float inv = __frcp_rn(s);  // exact: s is a power of two in the normal range (or inf -> 0, as x / inf)
      uint32_t qw[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        qw[i] = __nv_cvt_float2_to_fp8x2(make_float2(v[2 * i] * inv, v[2 * i + 1] * inv), __NV_SATFINITE,
                                         __NV_E4M3);
      uint32_t lo = qw[0] | (qw[1] << 16), hi = qw[2] | (qw[3] << 16);
      if constexpr (BITS) {  // even elements first, then odd (the order of e2m1x8_to_e4m3_bits)
        const uint32_t e = prmt(lo, hi, 0x6420u), o = prmt(lo, hi, 0x7531u);
        lo = e, hi = o;
      }
      if (in) {
        *reinterpret_cast<uint2*>(act + t * act_pitch + kb * kStepK + l16 * 8) = make_uint2(lo, hi);
        if (l16 == 0) sa[kb * kMaxSeg + t] = src >= 0 ? (BITS ? s * 64.f : s) : 0.f;
      }
    }
  }
  __syncthreads();

  // ---- 4. the weight stream: per step, decode the scales, ldmatrix, e2m1 -> e4m3, one mma per 32-wide block ------
  float acc[NW][4];
#pragma unroll
  for (int wi = 0; wi < NW; ++wi)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[wi][i] = 0.f;

  auto stream = [&](auto tb_tag) {
    constexpr int TB = decltype(tb_tag)::value;
    // B operand: token gq of the segment (a token past the segment repeats the last one; its column is not stored).
    const int tb = TB == 1 ? 0 : (gq < seg_rows ? gq : seg_rows - 1);
    const uint8_t* arow = act + tb * act_pitch + 8 * q;
    for (int i = 0; i < steps; ++i) {
      if (i + S - 1 < steps) issue(i + S - 1);
      cp_async_commit();
      cp_async_wait<S - 1>();
      __syncwarp();
      const int kb = kb_begin + i;
      const uint8_t* st = wsm + (i % S) * C::kStageBytes;
      if (lane < NW * kRows) {
        float f[4];
        e8m0x4(*reinterpret_cast<const uint32_t*>(st + C::kStageW + lane * 4), f);
        *reinterpret_cast<float4*>(table + lane * 4) = make_float4(f[0], f[1], f[2], f[3]);
      }
      __syncwarp();
      float sw[NW][2][4];  // [weight][row g, g + 8][32-wide block]
#pragma unroll
      for (int wi = 0; wi < NW; ++wi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float4 f = *reinterpret_cast<const float4*>(table + (wi * kRows + 8 * h + gq) * 4);
          sw[wi][h][0] = f.x, sw[wi][h][1] = f.y, sw[wi][h][2] = f.z, sw[wi][h][3] = f.w;
        }
      float sa0, sa1 = 0.f;
      if constexpr (TB == 1) {
        sa0 = sa[kb * kMaxSeg];
      } else {
        const float2 s2 = *reinterpret_cast<const float2*>(sa + kb * kMaxSeg + 2 * q);
        sa0 = s2.x, sa1 = s2.y;
      }
      uint2 bfrag[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) bfrag[j] = *reinterpret_cast<const uint2*>(arow + kb * kStepK + 32 * j);
      // Packed words: pk[wi][h][j] = bytes 4q..4q+3 of row g (+8h), 32-wide block j = its elements 8q..8q+7.
      uint32_t pk[NW][2][4];
      const uint32_t sta = smem_addr(st);
#pragma unroll
      for (int wi = 0; wi < NW; ++wi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          ldmatrix_x4(sta + (wi * kRows + 8 * h + lane % 8) * kRowPitch + (lane / 8) * 16, pk[wi][h]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t b[2] = {bfrag[j].x, bfrag[j].y};
#pragma unroll
        for (int wi = 0; wi < NW; ++wi) {
          // A fragment: {row g k-slots 4q.., row g+8 k-slots 4q.., row g k-slots 16+4q.., row g+8 16+4q..}
          // = {elements 8q..8q+3 of row g, the same of row g+8, elements 8q+4..8q+7 of row g, of row g+8}
          // (bits mode: even then odd elements), matching the activation bytes 8q..8q+7 in b.
          uint32_t a[4];
          if constexpr (BITS) {
            e2m1x8_to_e4m3_bits(pk[wi][0][j], a[0], a[2]);
            e2m1x8_to_e4m3_bits(pk[wi][1][j], a[1], a[3]);
          } else {
            e2m1x8_to_e4m3_lut(pk[wi][0][j], a[0], a[2]);
            e2m1x8_to_e4m3_lut(pk[wi][1][j], a[1], a[3]);
          }
          float blk[4];
          mma_e4m3_16x8x32(a, b, blk);
          acc[wi][0] = fmaf(blk[0], sw[wi][0][j] * sa0, acc[wi][0]);
          acc[wi][2] = fmaf(blk[2], sw[wi][1][j] * sa0, acc[wi][2]);
          if constexpr (TB > 1) {
            acc[wi][1] = fmaf(blk[1], sw[wi][0][j] * sa1, acc[wi][1]);
            acc[wi][3] = fmaf(blk[3], sw[wi][1][j] * sa1, acc[wi][3]);
          }
        }
      }
      __syncwarp();  // every lane is done with this stage before it is refilled
    }
  };
  if (seg_rows == 1) {
    stream(std::integral_constant<int, 1>{});
  } else if constexpr (TBMAX > 1) {
    stream(std::integral_constant<int, TBMAX>{});
  }
  cp_async_wait<0>();

  // ---- 5. K slices summed in order, then the epilogue (SwiGLU for the fused pair) -------------------------------
  if (ksplit > 1) {
    __syncthreads();  // every warp is done with its ring: the partials reuse it
    float* part = reinterpret_cast<float*>(ring);
#pragma unroll
    for (int wi = 0; wi < NW; ++wi)
#pragma unroll
      for (int i = 0; i < 4; ++i) part[((warp * NW + wi) * 4 + i) * 32 + lane] = acc[wi][i];
    __syncthreads();
    if (kc != 0) return;
#pragma unroll
    for (int wi = 0; wi < NW; ++wi)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float v = 0.f;
        for (int c = 0; c < ksplit; ++c) v += part[(((warp + c) * NW + wi) * 4 + i) * 32 + lane];
        acc[wi][i] = v;
      }
  }
  if (tile_live) store_tile<NW>(p, acc, lane, r0, seg_rows, seg_src, n0, false);
}

template <int NW, int TBMAX, bool BITS>
size_t smem_bytes(int64_t k) {
  return static_cast<size_t>(TBMAX) * (k + kActPad) + static_cast<size_t>(k / kStepK) * kMaxSeg * 4 +
         static_cast<size_t>(kWarps) * Cfg<NW, TBMAX>::kWarpBytes;
}

// Raises the kernel's dynamic shared-memory limit once per (kernel, device) to what the device allows (not a
// stream operation: capture-safe); returns that limit, or -1 with the CUDA error in *err.
int dynamic_smem_limit(const void* kernel, cudaError_t* err) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> limits;
  int dev = 0;
  cudaGetDevice(&dev);
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = limits.find({kernel, dev}); it != limits.end()) return it->second;
  int optin = 0;
  cudaFuncAttributes attr{};
  if ((*err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess ||
      (*err = cudaFuncGetAttributes(&attr, kernel)) != cudaSuccess)
    return -1;
  const int limit = optin - static_cast<int>(attr.sharedSizeBytes);
  if ((*err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit)) != cudaSuccess)
    return -1;
  limits[{kernel, dev}] = limit;
  return limit;
}

template <int NW, int TBMAX, bool BITS>
cudaError_t launch_impl(const Fp4Params& p, cudaStream_t stream) {
  auto* kernel = fp4_gemv_kernel<NW, TBMAX, BITS>;
  const size_t smem = smem_bytes<NW, TBMAX, BITS>(p.k);
  cudaError_t err = cudaSuccess;
  const int limit = dynamic_smem_limit(reinterpret_cast<const void*>(kernel), &err);
  if (limit < 0) return err;
  if (smem > static_cast<size_t>(limit)) return cudaErrorInvalidValue;  // the handlers check fp4_gemv_smem first
  const int64_t cols = static_cast<int64_t>(kWarps / p.ksplit) * kRows;
  const dim3 grid(static_cast<unsigned>((p.n + cols - 1) / cols), static_cast<unsigned>(p.out_rows));
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <int NW, int TBMAX>
cudaError_t launch_cvt(const Fp4Params& p, bool bits, cudaStream_t stream) {
  return bits ? launch_impl<NW, TBMAX, true>(p, stream) : launch_impl<NW, TBMAX, false>(p, stream);
}

}  // namespace

bool fp4_uses_bit_conversion() {
  // DSV4_FFI_FP4_CVT=bits: e2m1 -> e4m3 by bit placement (2^-6 scaled, subnormal e4m3 for 0.5) instead of the prmt
  // table (default). An A/B knob, read at every launch.
  const char* v = std::getenv("DSV4_FFI_FP4_CVT");
  return v != nullptr && std::strcmp(v, "bits") == 0;
}

int fp4_ksplit(int64_t k) {
  // As deep as four 128-wide steps per warp allow (K = 4096: 8; K = 2048: 4): many short blocks balance the
  // weight stream across the SMs (the FP8 GEMV's finding, BENCHMARKS.md). DSV4_FFI_FP4_KSPLIT=1|2|4|8 overrides.
  int ksplit = kWarps;
  while (ksplit > 1 && (k / kStepK) / ksplit < 4) ksplit /= 2;
  if (const char* v = std::getenv("DSV4_FFI_FP4_KSPLIT")) {
    const int f = std::atoi(v);
    if (f == 1 || f == 2 || f == 4 || f == 8) ksplit = f;
  }
  return ksplit;
}

int fp4_tokens_per_pass(int64_t max_share) { return max_share <= 1 ? 1 : kMaxSeg; }

size_t fp4_gemv_smem(bool fused, int64_t k, int64_t max_share) {
  const bool one = fp4_tokens_per_pass(max_share) == 1;
  if (fused) return one ? smem_bytes<2, 1, false>(k) : smem_bytes<2, kMaxSeg, false>(k);
  return one ? smem_bytes<1, 1, false>(k) : smem_bytes<1, kMaxSeg, false>(k);
}

cudaError_t launch_fp4_gemv(const Fp4GemvArgs& a, cudaStream_t stream) {
  if (a.out_rows == 0 || a.n == 0) return cudaSuccess;
  Fp4Params p{static_cast<const uint8_t*>(a.x), a.x_rows, a.rows_map, a.group_map, a.w[0], a.s[0], a.w[1], a.s[1],
              a.groups, static_cast<__nv_bfloat16*>(a.out), a.out_rows, a.n, a.k, a.route_w, a.limit,
              fp4_ksplit(a.k)};
  const bool fused = a.w[1] != nullptr, bits = fp4_uses_bit_conversion();
  const bool one = fp4_tokens_per_pass(a.max_share) == 1;
  if (fused) return one ? launch_cvt<2, 1>(p, bits, stream) : launch_cvt<2, kMaxSeg>(p, bits, stream);
  return one ? launch_cvt<1, 1>(p, bits, stream) : launch_cvt<1, kMaxSeg>(p, bits, stream);
}

}  // namespace dsv4ffi
