// MXFP4 small-M GEMV for decode, the wgb variant (kFp4Wgb, the default): the contract and numerics of
// fp4_gemv_kernels.cu (its header comment), one FP8 wgmma k32 step per 32-wide weight block. Launched through
// launch_fp4_gemv.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "fp4_gemv_common.cuh"

namespace dsv4ffi {
namespace {

// ==== The wgb variant: one FP8 wgmma k32 step per 32-wide weight-scale block ===================================
// Why: the wg kernels spend ~11 instructions per weight byte at one token (a per-block activation quantization for
// 8 rows of work, pre-MMA scale folding, a register prefetch only two chunks deep), the ring kernel ~9 (Hopper has no
// e4m3 mma.sync: each one is 12 F2FP conversions + 2 HMMA). Here a block is two warpgroups on one 64-row tile, each
// taking half of K; a warp streams its 16 rows through its own cp.async ring (kWgbStages chunks of 128 K: the weight
// bytes as stored plus their scale words), ldmatrix hands lane (g, q) bytes 4q..4q+3 of a row's 16-byte block (the 8
// elements the k32 A fragment wants from it for that block), a prmt table widens them to e4m3, and each 32-wide block
// is one wgmma m64n8k32 starting from zero; its fp32 partial is scaled by s_w (the block's UE8M0 scale) and the
// chunk's sum by s_act, added in K order within each half, the halves added at the end. The 8 columns of the wgmma are
// the segment's tokens (B: the activation rows quantized to e4m3 once per block, quantize_segment's K-tile layout).
// Numerics: the reference's per-block sums, except that Hopper's FP8 tensor core adds the 32 exact products of a
// block with a 13-bit-mantissa accumulator (see wg8 in fp4_gemv_kernels.cu) instead of fp32; measured against ring
// in fp4_bench (BENCHMARKS.md).
constexpr int kWgbStages = 3;
constexpr int kWgbPitch = 80;  // bytes per staged row (64 + 16): the 8 rows of an ldmatrix phase on distinct banks
constexpr int kWgbRows = 64;   // weight rows per block (one wgmma M)

template <int NW>
struct WgbCfg {
  static constexpr int kWeightBytes = 16 * kWgbPitch + 16 * 4;  // a warp's 16 rows of one weight + their scale words
  static constexpr int kStageBytes = NW * kWeightBytes;
  static constexpr int kWarpBytes = kWgbStages * kStageBytes;
  static_assert(kWeightBytes % 16 == 0, "16-byte alignment of the ring");
};

template <int NW>
size_t wgb_smem_bytes(int64_t k) {
  return static_cast<size_t>(k) * 8 + static_cast<size_t>(k / kStepK) * kMaxSeg * 4 +
         static_cast<size_t>(kWarps) * WgbCfg<NW>::kWarpBytes + static_cast<size_t>(NW) * 4 * 32 * 4 * 4;
}

template <int NW>
__global__ void __launch_bounds__(kWarps * 32, 2) fp4_wgb_kernel(const Fp4Params p) {
  using C = WgbCfg<NW>;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int32_t seg_src[kMaxSeg];
  __shared__ int32_t seg_info[2];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
  const int wgi = warp / 4, ww = warp % 4;  // the warpgroup (half of K) and the warp's 16-row slab in the tile
  const int64_t r0 = blockIdx.y;
  const int32_t g0 = p.group_map != nullptr ? p.group_map[r0] : 0;
  const bool group_ok = g0 >= 0 && g0 < p.groups;
  const int64_t k = p.k, half_k = k / 2, sk = k / 32, ge = group_ok ? g0 : 0;
  const int nch = static_cast<int>(k / kStepK);
  const int c_lo = wgi == 0 ? 0 : nch / 2, c_hi = wgi == 0 ? nch / 2 : nch, my_chunks = c_hi - c_lo;
  const int64_t ntiles = (p.n + kWgbRows - 1) / kWgbRows, tile0 = static_cast<int64_t>(blockIdx.x) * p.tiles;
  const int my_tiles = static_cast<int>(ntiles - tile0 < p.tiles ? ntiles - tile0 : p.tiles);
  const int total = my_tiles * my_chunks;

  uint8_t* bsm = smem;                                                  // B: k / 32 steps of 256 bytes
  float* sa = reinterpret_cast<float*>(smem + k * 8);                   // [chunk][token]
  uint8_t* ring = reinterpret_cast<uint8_t*>(sa + (k / kStepK) * kMaxSeg) + warp * C::kWarpBytes;
  float* red = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(sa + (k / kStepK) * kMaxSeg) +
                                        kWarps * C::kWarpBytes);       // [warp of warpgroup 1][lane][NW * 4]
  const uint32_t ring_addr = smem_addr(ring);

  // Item j of this warp's stream: chunk c_lo + j % my_chunks of row tile j / my_chunks, into stage j % kWgbStages.
  // The lane's source pointers (two 16-byte pieces and, lanes < 16, a scale word per weight) move by one chunk per
  // item and are set again at each new tile.
  int pf_tile = 0, pf_c = c_hi, pf_j = 0, pf_stage = 0;
  const uint8_t* src_w[NW][2];
  const uint8_t* src_s[NW];
  auto issue_next = [&]() {
    if (pf_j < total) {
      if (pf_c == c_hi) {  // the next row tile
        pf_c = c_lo;
        const int64_t row_base = (tile0 + pf_tile++) * kWgbRows + 16 * ww;
#pragma unroll
        for (int wi = 0; wi < NW; ++wi) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int piece = lane + 32 * i;
            int64_t n_row = row_base + piece / 4;
            n_row = n_row < p.n ? n_row : p.n - 1;  // rows past N repeat row N - 1 (their outputs are not stored)
            src_w[wi][i] = (wi == 0 ? p.w0 : p.w1) + (ge * p.n + n_row) * half_k + c_lo * (kStepK / 2) + (piece % 4) * 16;
          }
          int64_t n_row = row_base + (lane % 16);
          n_row = n_row < p.n ? n_row : p.n - 1;
          src_s[wi] = (wi == 0 ? p.s0 : p.s1) + (ge * p.n + n_row) * sk + c_lo * 4;
        }
      }
      const uint32_t st = ring_addr + pf_stage * C::kStageBytes;
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int piece = lane + 32 * i;
          cp_async16(st + wi * C::kWeightBytes + (piece / 4) * kWgbPitch + (piece % 4) * 16, src_w[wi][i]);
          src_w[wi][i] += kStepK / 2;
        }
        if (lane < 16) cp_async4(st + wi * C::kWeightBytes + 16 * kWgbPitch + lane * 4, src_s[wi]);
        src_s[wi] += 4;
      }
      ++pf_j, ++pf_c;
      pf_stage = pf_stage == kWgbStages - 1 ? 0 : pf_stage + 1;
    }
    cp_async_commit();  // an empty group past the end keeps the wait counts uniform
  };
  // The first chunks in flight before the segment is known, where r0 surely starts one (pairs sorted by expert: the
  // row before holds another group); otherwise after.
  const bool early = group_ok && (r0 == 0 || p.group_map == nullptr || p.group_map[r0 - 1] != g0);
  if (early)
    for (int s = 0; s < kWgbStages - 1; ++s) issue_next();

  if (warp == 0) find_segment<kMaxSeg>(p, r0, g0, lane, seg_src, seg_info);
  __syncthreads();
  if (!seg_info[0]) {
    cp_async_wait<0>();
    return;
  }
  const int seg_rows = seg_info[1];
  if (!group_ok) {  // no such expert: zeros
    if (wgi == 0)
      for (int t = 0; t < my_tiles; ++t) {
        const float zero[NW][4] = {};
        store_tile<NW>(p, zero, lane, r0, seg_rows, seg_src, (tile0 + t) * kWgbRows + 16 * ww, true);
      }
    return;
  }
  if (!early)
    for (int s = 0; s < kWgbStages - 1; ++s) issue_next();
  quantize_segment<false, true>(p, seg_rows, seg_src, bsm, 0, sa);
  // wgmma reads B through the async proxy: make the ordinary stores to it visible there, then the barrier
  DSV4_WGMMA("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();

  float acc[NW][4];
#pragma unroll
  for (int wi = 0; wi < NW; ++wi) acc[wi][0] = acc[wi][1] = acc[wi][2] = acc[wi][3] = 0.f;
  const uint32_t b_addr = smem_addr(bsm);
  const int mi = lane / 8, rr = lane % 8;  // this lane's ldmatrix row address: matrix mi = (rows 8 (mi % 2).., block mi / 2)
  int stage = 0;
  for (int tile = 0; tile < my_tiles; ++tile) {
    for (int c = c_lo; c < c_hi; ++c) {
      issue_next();  // item j + kWgbStages - 1 into the stage item j - 1 left
      cp_async_wait<kWgbStages - 1>();
      __syncwarp();
      const uint32_t st = ring_addr + stage * C::kStageBytes;
      uint32_t a[NW][4][4];
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
        uint32_t v[2][4];  // v[mm][2 * m' + h]: rows 8h + g, block 2 mm + m'
        const uint32_t at = st + wi * C::kWeightBytes + (8 * (mi % 2) + rr) * kWgbPitch + (mi / 2) * 16;
        ldmatrix_x4(at, v[0]);
        ldmatrix_x4(at + 32, v[1]);
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          e2m1x8_to_e4m3_tab(v[m / 2][2 * (m % 2)], 0x3C383000u, 0x4C484440u, a[wi][m][0], a[wi][m][2]);
          e2m1x8_to_e4m3_tab(v[m / 2][2 * (m % 2) + 1], 0x3C383000u, 0x4C484440u, a[wi][m][1], a[wi][m][3]);
        }
      }
      float d[NW][4][4];  // written, not read: every wgmma below starts from zero
      wgmma_fence();
#pragma unroll
      for (int wi = 0; wi < NW; ++wi)
#pragma unroll
        for (int m = 0; m < 4; ++m) wgmma_m64n8k32(d[wi][m], a[wi][m], wg_desc(b_addr + (c * 4 + m) * 256), 0);
      wgmma_commit();
      wgmma_wait0();
      const float s_a = sa[c * kMaxSeg + 2 * q], s_b = sa[c * kMaxSeg + 2 * q + 1];
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
#pragma unroll
        for (int m = 0; m < 4; ++m)
#pragma unroll
          for (int i = 0; i < 4; ++i) reg_fence(d[wi][m][i]);
        const uint32_t* sw = reinterpret_cast<const uint32_t*>(ring + stage * C::kStageBytes + wi * C::kWeightBytes +
                                                               16 * kWgbPitch);
        float f0[4], f1[4];
        e8m0x4_fast(sw[gq], f0);
        e8m0x4_fast(sw[gq + 8], f1);
        float t[4] = {d[wi][0][0] * f0[0], d[wi][0][1] * f0[0], d[wi][0][2] * f1[0], d[wi][0][3] * f1[0]};
#pragma unroll
        for (int m = 1; m < 4; ++m) {
          t[0] = fmaf(d[wi][m][0], f0[m], t[0]);
          t[1] = fmaf(d[wi][m][1], f0[m], t[1]);
          t[2] = fmaf(d[wi][m][2], f1[m], t[2]);
          t[3] = fmaf(d[wi][m][3], f1[m], t[3]);
        }
        acc[wi][0] = fmaf(t[0], s_a, acc[wi][0]);
        acc[wi][1] = fmaf(t[1], s_b, acc[wi][1]);
        acc[wi][2] = fmaf(t[2], s_a, acc[wi][2]);
        acc[wi][3] = fmaf(t[3], s_b, acc[wi][3]);
      }
      __syncwarp();  // the stage is refilled by the next item's issue
      stage = stage == kWgbStages - 1 ? 0 : stage + 1;
    }
    // The tile's two K halves: warpgroup 1 hands its sums to warpgroup 0, which adds them and stores.
    float* rl = red + (ww * 32 + lane) * NW * 4;
    if (wgi == 1)
#pragma unroll
      for (int wi = 0; wi < NW; ++wi)
#pragma unroll
        for (int i = 0; i < 4; ++i) rl[wi * 4 + i] = acc[wi][i];
    __syncthreads();
    if (wgi == 0) {
#pragma unroll
      for (int wi = 0; wi < NW; ++wi)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[wi][i] += rl[wi * 4 + i];
      store_tile<NW>(p, acc, lane, r0, seg_rows, seg_src, (tile0 + tile) * kWgbRows + 16 * ww, false);
    }
    __syncthreads();
#pragma unroll
    for (int wi = 0; wi < NW; ++wi) acc[wi][0] = acc[wi][1] = acc[wi][2] = acc[wi][3] = 0.f;
  }
  cp_async_wait<0>();
}

template <int NW>
cudaError_t launch_wgb(Fp4Params p, cudaStream_t stream) {
  auto* kernel = fp4_wgb_kernel<NW>;
  const size_t smem = wgb_smem_bytes<NW>(p.k);
  cudaError_t err = cudaSuccess;
  const int limit = dynamic_smem_limit(reinterpret_cast<const void*>(kernel), &err);
  if (limit < 0) return err;
  if (smem > static_cast<size_t>(limit)) return cudaErrorInvalidValue;  // the handlers check fp4_gemv_smem first
  // Blocks per segment: enough for one wave of resident blocks, taking every output row as a segment; the row tiles
  // dealt evenly over them (a block with many more tiles than its neighbours would be the launch's tail).
  // DSV4_FFI_FP4_TILES (row tiles per block) overrides.
  const int64_t ntiles = (p.n + kWgbRows - 1) / kWgbRows;
  int major = 0, sms = 0;
  device_info(&major, &major, &sms);
  const int64_t slots =
      static_cast<int64_t>(sms) * resident_blocks(reinterpret_cast<const void*>(kernel), kWarps * 32, smem);
  int64_t per_segment = (slots + p.out_rows - 1) / p.out_rows;
  per_segment = per_segment < 1 ? 1 : per_segment > ntiles ? ntiles : per_segment;
  int64_t tiles = (ntiles + per_segment - 1) / per_segment;
  if (const char* v = std::getenv("DSV4_FFI_FP4_TILES")) tiles = std::atoi(v);
  tiles = tiles < 1 ? 1 : tiles > ntiles ? ntiles : tiles;
  p.tiles = static_cast<int>(tiles);
  const dim3 grid(static_cast<unsigned>((ntiles + tiles - 1) / tiles), static_cast<unsigned>(p.out_rows));
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t fp4_wgb_smem(bool fused, int64_t k) { return fused ? wgb_smem_bytes<2>(k) : wgb_smem_bytes<1>(k); }

cudaError_t launch_fp4_wgb(const Fp4GemvArgs& a, cudaStream_t stream) {
  const Fp4Params p = fp4_params(a, 1);
  return a.w[1] != nullptr ? launch_wgb<2>(p, stream) : launch_wgb<1>(p, stream);
}

}  // namespace dsv4ffi
