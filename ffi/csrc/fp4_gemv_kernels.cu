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
#include <type_traits>
#include <utility>

#include "fp4_gemv_common.cuh"

namespace dsv4ffi {
namespace {

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
  if (warp == 0) find_segment<TBMAX>(p, r0, g0, lane, seg_src, seg_info);
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
  quantize_segment<BITS>(p, seg_rows, seg_src, act, act_pitch, sa);
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

int fp4_cvt_request() {
  // DSV4_FFI_FP4_CVT=bits|lut: e2m1 -> e4m3 by bit placement (2^-6 scaled, subnormal e4m3 for 0.5) or by the prmt
  // table. An A/B knob, read at every launch.
  const char* v = std::getenv("DSV4_FFI_FP4_CVT");
  if (v == nullptr) return -1;
  return std::strcmp(v, "bits") == 0 ? 1 : std::strcmp(v, "lut") == 0 ? 0 : -1;
}

bool fp4_uses_bit_conversion() { return fp4_cvt_request() == 1; }

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

int fp4_resolve_variant(int requested) {
  if (requested == kFp4Ring || requested == kFp4Wg || requested == kFp4Wg8 || requested == kFp4Wgb) return requested;
  // DSV4_FFI_FP4_VARIANT=wg|wg8|ring: the kernels the handlers that do not name a variant launch. Read at every
  // launch. Default wgb, the fastest at every token count measured (BENCHMARKS.md, ninth session: 38-50% of copy
  // bandwidth against ring's 34-38%); non-SM90 devices fall back to ring at launch.
  const char* v = std::getenv("DSV4_FFI_FP4_VARIANT");
  if (v != nullptr && std::strcmp(v, "wg") == 0) return kFp4Wg;
  if (v != nullptr && std::strcmp(v, "wg8") == 0) return kFp4Wg8;
  if (v != nullptr && std::strcmp(v, "ring") == 0) return kFp4Ring;
  return kFp4Wgb;
}

namespace {

bool is_sm90() {
  int major = 0, dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return major == 9;
}

}  // namespace

bool fp4_reads_slabs(int variant) { return fp4_resolve_variant(variant) == kFp4Wgb && is_sm90(); }

size_t fp4_gemv_smem(bool fused, int64_t k, int64_t max_share, int variant) {
  const bool one = fp4_tokens_per_pass(max_share) == 1;
  const int v = fp4_resolve_variant(variant);
  if (v == kFp4Wgb) return fp4_wgb_smem(fused, k);
  if (v == kFp4Wg || v == kFp4Wg8) return fp4_wg_smem(fused, v == kFp4Wg, k, max_share);
  if (fused) return one ? smem_bytes<2, 1, false>(k) : smem_bytes<2, kMaxSeg, false>(k);
  return one ? smem_bytes<1, 1, false>(k) : smem_bytes<1, kMaxSeg, false>(k);
}

cudaError_t launch_fp4_gemv(const Fp4GemvArgs& a, cudaStream_t stream) {
  if (a.out_rows == 0 || a.n == 0) return cudaSuccess;
  const Fp4Params p = fp4_params(a, fp4_ksplit(a.k));
  const bool fused = a.w[1] != nullptr;
  const bool one = fp4_tokens_per_pass(a.max_share) == 1;
  int v = fp4_resolve_variant(a.variant);
  if ((v == kFp4Wg || v == kFp4Wg8 || v == kFp4Wgb) && !is_sm90()) v = kFp4Ring;  // wgmma: SM90 only
  if (v == kFp4Wgb) return launch_fp4_wgb(a, stream);
  if (a.slabs) return cudaErrorNotSupported;  // the slab layout is the wgb kernel's (the handlers check first)
  if (v == kFp4Wg || v == kFp4Wg8) return launch_fp4_wg(a, v == kFp4Wg, stream);
  const bool bits = fp4_uses_bit_conversion();
  if (fused) return one ? launch_cvt<2, 1>(p, bits, stream) : launch_cvt<2, kMaxSeg>(p, bits, stream);
  return one ? launch_cvt<1, 1>(p, bits, stream) : launch_cvt<1, kMaxSeg>(p, bits, stream);
}

}  // namespace dsv4ffi
