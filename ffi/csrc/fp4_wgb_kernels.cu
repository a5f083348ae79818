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
// elements the k32 A fragment wants from it for that block), bit placement (or a prmt table) widens them to e4m3, and
// each 32-wide block is one wgmma m64n8k32 starting from zero; its fp32 partial is scaled by s_w (the block's UE8M0
// scale) and the chunk's sum by s_act, added in K order within each half, the halves added at the end. The 8 columns
// of the wgmma are the segment's tokens (B: the activation rows quantized to e4m3 when the block starts a segment,
// quantize_segment's K-tile layout). Which segments and row tiles a block streams: the work plan below.
// Numerics: the reference's per-block sums, except that Hopper's FP8 tensor core adds the 32 exact products of a
// block with a 13-bit-mantissa accumulator (see wg8 in fp4_wg_kernels.cu) instead of fp32; measured against ring
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

// ==== Work plan: the segments' row tiles dealt evenly over the grid ==============================================
// Output rows form segments (runs of one valid group cut every kMaxSeg rows from the run's first row, as
// find_segment); every segment has ntiles row tiles of 64 weight rows, all of them the same work. Block b of G
// streams its share (wgb_share: total / G tiles or one more, total = segments x ntiles) of the segments' tiles in
// row order, so the launch is one even wave whatever the routing: the host knows only the row count, the device the
// segments. A block's range spans at most kWgbMaxPieces segments (the host sizes G for it). Rows of invalid groups
// are zeroed by the block row % G names (wgb_zero_invalid).
constexpr int kWgbMaxPieces = 8;
constexpr int kWgbStartsKept = 256;  // segment starts kept from the first scan (more: a second scan finds the block's)

struct WgbPlan {
  int32_t r0[kWgbMaxPieces];  // the piece's segment: first output row, group
  int32_t group[kWgbMaxPieces];
  int32_t t0[kWgbMaxPieces];  // its row tiles [t0, t0 + nt)
  int32_t nt[kWgbMaxPieces];
  int32_t pieces;
  int32_t segments;                // in the whole launch
  int32_t starts[kWgbStartsKept];  // scan scratch: the first segments' start rows and groups
  int32_t start_group[kWgbStartsKept];
};

__device__ __forceinline__ bool wgb_valid(const Fp4Params& p, int32_t g) { return g >= 0 && g < p.groups; }

// Block b's share [lo, hi) of `total` row tiles, the first total % G blocks one more: 32-bit arithmetic (the launch
// keeps out_rows * tiles below 2^31), one division; the 64-bit ones cost ~1 us at a block's start.
__device__ __forceinline__ void wgb_share(uint32_t total, uint32_t& lo, uint32_t& hi) {
  const uint32_t g = gridDim.x, b = blockIdx.x, q = total / g, r = total - q * g;
  lo = b * q + (b < r ? b : r);
  hi = lo + q + (b < r ? 1u : 0u);
}

// One scan of the expert map by one warp (32 rows per step, the next step's load in flight): returns the number of
// segments and calls found(index, row, group) for each segment start.
template <typename Found>
__device__ int32_t wgb_scan(const Fp4Params& p, int lane, Found found) {
  int64_t run = -1;   // first row of the run the last row seen belongs to
  int32_t last = -1;  // the group of the row before the step
  int32_t count = 0;
  const unsigned below = (1u << lane) - 1u, upto_me = lane == 31 ? 0xffffffffu : (2u << lane) - 1u;
  int32_t g_next = lane < p.out_rows ? p.group_map[lane] : -1;
#pragma unroll 1
  for (int64_t row0 = 0; row0 < p.out_rows; row0 += 32) {
    const int64_t r = row0 + lane;
    const int32_t g = g_next;
    g_next = r + 32 < p.out_rows ? p.group_map[r + 32] : -1;
    const bool in = r < p.out_rows;
    int32_t gp = __shfl_up_sync(0xffffffffu, g, 1);
    gp = lane == 0 ? last : gp;
    const unsigned change = __ballot_sync(0xffffffffu, in && (r == 0 || g != gp));
    const unsigned upto = change & upto_me;
    const int64_t my_run = upto ? row0 + 31 - __clz(upto) : run;
    const bool start = in && wgb_valid(p, g) && (r - my_run) % kMaxSeg == 0;
    const unsigned starts = __ballot_sync(0xffffffffu, start);
    if (start) found(count + __popc(starts & below), static_cast<int32_t>(r), g);
    count += __popc(starts);
    run = change ? row0 + 31 - __clz(change) : run;
    last = __shfl_sync(0xffffffffu, g, 31);
  }
  return count;
}

// Zeros for the rows of invalid groups (experts elsewhere or none) this block owns (row % G == b): a warp per row.
__device__ void wgb_zero_invalid(const Fp4Params& p, int warp, int lane) {
  if (p.group_map == nullptr) return;
  for (int64_t r = blockIdx.x + static_cast<int64_t>(gridDim.x) * warp; r < p.out_rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    if (wgb_valid(p, p.group_map[r])) continue;
    for (int64_t c = lane; c < p.n; c += 32) p.out[r * p.n + c] = __float2bfloat16_rn(0.f);
  }
}

// The block's pieces into plan, by warp 0 (then __syncthreads; plan.pieces = 0: nothing to stream).
__device__ void wgb_make_plan(const Fp4Params& p, int64_t ntiles, int lane, WgbPlan& plan) {
  int32_t segments;
  if (p.group_map == nullptr) {
    segments = static_cast<int32_t>((p.out_rows + kMaxSeg - 1) / kMaxSeg);
  } else {
    segments = wgb_scan(p, lane, [&](int32_t i, int32_t r, int32_t g) {
      if (i < kWgbStartsKept) plan.starts[i] = r, plan.start_group[i] = g;
    });
  }
  if (lane == 0) plan.segments = segments;
  uint32_t lo, hi;
  wgb_share(static_cast<uint32_t>(segments) * static_cast<uint32_t>(ntiles), lo, hi);
  if (lo >= hi) {
    if (lane == 0) plan.pieces = 0;
    return;
  }
  const uint32_t nt32 = static_cast<uint32_t>(ntiles), s_lo = lo / nt32, s_hi = (hi - 1) / nt32;
  if (s_hi - s_lo + 1 > kWgbMaxPieces) __trap();  // the launch sizes the grid so this cannot happen
  const int pieces = static_cast<int>(s_hi - s_lo + 1);
  if (p.group_map != nullptr && s_hi >= kWgbStartsKept) {  // the window's starts from a second scan
    __syncwarp();
    wgb_scan(p, lane, [&](int32_t i, int32_t r, int32_t g) {
      if (i >= s_lo && i <= s_hi) plan.r0[i - s_lo] = r, plan.group[i - s_lo] = g;
    });
  }
  __syncwarp();
  if (lane < pieces) {
    const int64_t sg = s_lo + lane;
    if (p.group_map == nullptr) {
      plan.r0[lane] = static_cast<int32_t>(sg * kMaxSeg), plan.group[lane] = 0;
    } else if (s_hi < kWgbStartsKept) {
      plan.r0[lane] = plan.starts[sg], plan.group[lane] = plan.start_group[sg];
    }
    const uint32_t a = sg == s_lo ? lo - s_lo * nt32 : 0, b = sg == s_hi ? hi - s_hi * nt32 : nt32;
    plan.t0[lane] = static_cast<int32_t>(a);
    plan.nt[lane] = static_cast<int32_t>(b - a);
  }
  if (lane == 0) plan.pieces = pieces;
}

// BITS: e2m1 -> e4m3 by bit placement (e2m1x8_to_e4m3_bits: 2^-6 times the value, 0.5 an e4m3 subnormal, the 2^6 in
// the activation scale; 7 instructions per 8 codes against the prmt table's 11), else the table. SLABS: the weights
// and scales in the slab layout (kernels.h), each chunk of a warp one contiguous piece.
template <int NW, bool BITS, bool SLABS>
__global__ void __launch_bounds__(kWarps * 32, 2) fp4_wgb_kernel(const Fp4Params p) {
  using C = WgbCfg<NW>;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int32_t seg_src[kMaxSeg];
  __shared__ int32_t seg_rows_s;
  __shared__ WgbPlan plan;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
  const int wgi = warp / 4, ww = warp % 4;  // the warpgroup (half of K) and the warp's 16-row slab in the tile
  const int64_t k = p.k, half_k = k / 2, sk = k / 32;
  const int nch = static_cast<int>(k / kStepK);
  const int c_lo = wgi == 0 ? 0 : nch / 2, c_hi = wgi == 0 ? nch / 2 : nch, my_chunks = c_hi - c_lo;
  const int64_t ntiles = (p.n + kWgbRows - 1) / kWgbRows;

  uint8_t* bsm = smem;                                                  // B: k / 32 steps of 256 bytes
  float* sa = reinterpret_cast<float*>(smem + k * 8);                   // [chunk][token]
  uint8_t* ring = reinterpret_cast<uint8_t*>(sa + (k / kStepK) * kMaxSeg) + warp * C::kWarpBytes;
  float* red = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(sa + (k / kStepK) * kMaxSeg) +
                                        kWarps * C::kWarpBytes);       // [warp of warpgroup 1][lane][NW * 4]
  const uint32_t ring_addr = smem_addr(ring);

  // Item j of this warp's stream: chunk c_lo + j % my_chunks of the (j / my_chunks)-th row tile of the plan's pieces,
  // into stage j % kWgbStages. The lane's source pointers (two 16-byte pieces and, lanes < 16, a scale word per
  // weight) move by one chunk per item and are set again at each new tile.
  int pf_piece = 0, pf_tile = 0, pf_c = c_hi, pf_j = 0, pf_stage = 0, total = 0;
  const uint8_t* src_w[NW][2];
  const uint8_t* src_s[NW];
  auto start_tile = [&](int64_t ge, int64_t tile) {
    pf_c = c_lo;
    const int64_t row_base = tile * kWgbRows + 16 * ww;
#pragma unroll
    for (int wi = 0; wi < NW; ++wi) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int piece = lane + 32 * i;
        int64_t n_row = row_base + piece / 4;
        n_row = n_row < p.n ? n_row : p.n - 1;  // rows past N repeat row N - 1 (their outputs are not stored)
        const int64_t kb = c_lo * (kStepK / 2) + (piece % 4) * 16;
        src_w[wi][i] = (wi == 0 ? p.w0 : p.w1) +
                       (SLABS ? slab_weight_offset(ge * p.n + n_row, kb, k) : (ge * p.n + n_row) * half_k + kb);
      }
      int64_t n_row = row_base + (lane % 16);
      n_row = n_row < p.n ? n_row : p.n - 1;
      src_s[wi] = (wi == 0 ? p.s0 : p.s1) +
                  (SLABS ? slab_scale_offset(ge * p.n + n_row, c_lo, k) : (ge * p.n + n_row) * sk + c_lo * 4);
    }
  };
  auto issue_chunk = [&]() {
    const uint32_t st = ring_addr + pf_stage * C::kStageBytes;
#pragma unroll
    for (int wi = 0; wi < NW; ++wi) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int piece = lane + 32 * i;
        cp_async16_l2line(st + wi * C::kWeightBytes + (piece / 4) * kWgbPitch + (piece % 4) * 16, src_w[wi][i]);
        src_w[wi][i] += SLABS ? kFp4SlabRows * kStepK / 2 : kStepK / 2;  // the next chunk
      }
      if (lane < 16) cp_async4(st + wi * C::kWeightBytes + 16 * kWgbPitch + lane * 4, src_s[wi]);
      src_s[wi] += SLABS ? kFp4SlabRows * 4 : 4;
    }
    ++pf_j, ++pf_c;
    pf_stage = pf_stage == kWgbStages - 1 ? 0 : pf_stage + 1;
  };
  auto issue_next = [&]() {
    if (pf_j < total) {
      if (pf_c == c_hi) {  // the next row tile
        if (pf_tile == plan.nt[pf_piece]) ++pf_piece, pf_tile = 0;
        start_tile(plan.group[pf_piece], plan.t0[pf_piece] + pf_tile++);
      }
      issue_chunk();
    }
    cp_async_commit();  // an empty group past the end keeps the wait counts uniform
  };

  // While warp 0 plans, the first chunks go out on a guess: every output row its own segment (a token's experts are
  // distinct: one token always, two almost always), which gives the plan from one load. A wrong guess waits its
  // copies out and starts again from the plan.
  bool guessed = false;
  if (p.group_map != nullptr) {
    const int64_t all = p.out_rows * ntiles;
    uint32_t lo, hi;
    wgb_share(static_cast<uint32_t>(all), lo, hi);
    const uint32_t row = lo / static_cast<uint32_t>(ntiles);
    const int32_t g = lo < hi ? p.group_map[row] : -1;
    if (wgb_valid(p, g)) {
      guessed = true;
      start_tile(g, lo - row * static_cast<uint32_t>(ntiles));
      pf_tile = 1;
      for (int s = 0; s < kWgbStages - 1; ++s) issue_chunk(), cp_async_commit();
    }
  }
  if (warp == 0) wgb_make_plan(p, ntiles, lane, plan);
  __syncthreads();
  const int pieces = plan.pieces;
  if (guessed && plan.segments != p.out_rows) {
    cp_async_wait<0>();
    guessed = false;
    pf_piece = 0, pf_tile = 0, pf_c = c_hi, pf_j = 0, pf_stage = 0;
  }
  if (pieces == 0) {
    cp_async_wait<0>();
    wgb_zero_invalid(p, warp, lane);
    return;
  }
  for (int i = 0; i < pieces; ++i) total += plan.nt[i];
  total *= my_chunks;
  // The first chunks in flight while the first segment's activations are quantized (already, on a right guess).
  if (!guessed)
    for (int s = 0; s < kWgbStages - 1; ++s) issue_next();

  float acc[NW][4];
#pragma unroll
  for (int wi = 0; wi < NW; ++wi) acc[wi][0] = acc[wi][1] = acc[wi][2] = acc[wi][3] = 0.f;
  const uint32_t b_addr = smem_addr(bsm);
  // This lane's ldmatrix row address: matrix mi = (rows 8 (mi % 2).., block mi / 2).
  const int mi = lane / 8, rr = lane % 8;
  int stage = 0;
  for (int pc = 0; pc < pieces; ++pc) {
    const int64_t r0 = plan.r0[pc];
    if (warp == 0) {
      const int rows = segment_sources<kMaxSeg>(p, r0, plan.group[pc], lane, seg_src);
      if (lane == 0) seg_rows_s = rows;
    }
    __syncthreads();  // seg_src; and every warp is past the previous piece's last use of B
    const int seg_rows = seg_rows_s;
    quantize_segment<BITS, true>(p, seg_rows, seg_src, bsm, 0, sa);
    // wgmma reads B through the async proxy: make the ordinary stores to it visible there, then the barrier
    DSV4_WGMMA("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    for (int tile = 0; tile < plan.nt[pc]; ++tile) {
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
            if constexpr (BITS) {
              e2m1x8_to_e4m3_bits(v[m / 2][2 * (m % 2)], a[wi][m][0], a[wi][m][2]);
              e2m1x8_to_e4m3_bits(v[m / 2][2 * (m % 2) + 1], a[wi][m][1], a[wi][m][3]);
            } else {
              e2m1x8_to_e4m3_tab(v[m / 2][2 * (m % 2)], 0x3C383000u, 0x4C484440u, a[wi][m][0], a[wi][m][2]);
              e2m1x8_to_e4m3_tab(v[m / 2][2 * (m % 2) + 1], 0x3C383000u, 0x4C484440u, a[wi][m][1], a[wi][m][3]);
            }
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
        // The rows' scale words; one test per chunk for the bytes 0 and 255 (exact decoding, off the common path).
        uint32_t sw[NW][2], special = 0u;
#pragma unroll
        for (int wi = 0; wi < NW; ++wi) {
          const uint32_t* s4 = reinterpret_cast<const uint32_t*>(ring + stage * C::kStageBytes +
                                                                 wi * C::kWeightBytes + 16 * kWgbPitch);
          sw[wi][0] = s4[gq], sw[wi][1] = s4[gq + 8];
          special |= e8m0x4_special(sw[wi][0]) | e8m0x4_special(sw[wi][1]);
        }
#pragma unroll
        for (int wi = 0; wi < NW; ++wi) {
#pragma unroll
          for (int m = 0; m < 4; ++m)
#pragma unroll
            for (int i = 0; i < 4; ++i) reg_fence(d[wi][m][i]);
          float f0[4], f1[4];
          if (special != 0u) {
            e8m0x4(sw[wi][0], f0);
            e8m0x4(sw[wi][1], f1);
          } else {
            e8m0x4_plain(sw[wi][0], f0);
            e8m0x4_plain(sw[wi][1], f1);
          }
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
        store_tile<NW>(p, acc, lane, r0, seg_rows, seg_src, (plan.t0[pc] + tile) * kWgbRows + 16 * ww, false);
      }
      __syncthreads();
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) acc[wi][0] = acc[wi][1] = acc[wi][2] = acc[wi][3] = 0.f;
    }
  }
  cp_async_wait<0>();
  wgb_zero_invalid(p, warp, lane);  // last: off the weight stream's critical path
}

template <int NW, bool BITS, bool SLABS>
cudaError_t launch_wgb(Fp4Params p, cudaStream_t stream) {
  auto* kernel = fp4_wgb_kernel<NW, BITS, SLABS>;
  const size_t smem = wgb_smem_bytes<NW>(p.k);
  cudaError_t err = cudaSuccess;
  const int limit = dynamic_smem_limit(reinterpret_cast<const void*>(kernel), &err);
  if (limit < 0) return err;
  if (smem > static_cast<size_t>(limit)) return cudaErrorInvalidValue;  // the handlers check fp4_gemv_smem first
  if (p.out_rows == 0) return cudaSuccess;
  // One wave of resident blocks (fewer where there are fewer row tiles, every output row taken as a segment: one
  // tile per block measured faster than two at one token); at least out_rows / (kWgbMaxPieces - 3) blocks, which
  // bounds the segments a block's range spans. DSV4_FFI_FP4_TILES=t: blocks for about t row tiles each instead.
  const int64_t ntiles = (p.n + kWgbRows - 1) / kWgbRows;
  int major = 0, sms = 0;
  device_info(&major, &major, &sms);
  const char* tiles_env = std::getenv("DSV4_FFI_FP4_TILES");
  const int64_t tiles = tiles_env != nullptr && std::atoi(tiles_env) > 1 ? std::atoi(tiles_env) : 1;
  const int64_t most = (p.out_rows * ntiles + tiles - 1) / tiles;  // blocks of `tiles` row tiles, every row a segment
  const int64_t slots =
      static_cast<int64_t>(sms) * resident_blocks(reinterpret_cast<const void*>(kernel), kWarps * 32, smem);
  int64_t blocks = tiles > 1 || most < slots ? most : slots;
  const int64_t floor_blocks = (p.out_rows + kWgbMaxPieces - 4) / (kWgbMaxPieces - 3);
  blocks = blocks < floor_blocks ? floor_blocks : blocks;
  if (blocks > 0x7FFFFFFF || p.out_rows * ntiles > 0x7FFFFFFF) return cudaErrorInvalidValue;  // (wgb_share)
  kernel<<<static_cast<unsigned>(blocks), kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t fp4_wgb_smem(bool fused, int64_t k) { return fused ? wgb_smem_bytes<2>(k) : wgb_smem_bytes<1>(k); }

cudaError_t launch_fp4_wgb(const Fp4GemvArgs& a, cudaStream_t stream) {
  const Fp4Params p = fp4_params(a, 1);
  const bool fused = a.w[1] != nullptr;
  if (a.slabs && (a.n % kFp4SlabRows != 0 || a.k % kStepK != 0)) return cudaErrorInvalidValue;  // (the handlers check)
  if (fp4_cvt_request() != 0) {  // bit placement unless DSV4_FFI_FP4_CVT=lut
    if (a.slabs) return fused ? launch_wgb<2, true, true>(p, stream) : launch_wgb<1, true, true>(p, stream);
    return fused ? launch_wgb<2, true, false>(p, stream) : launch_wgb<1, true, false>(p, stream);
  }
  if (a.slabs) return fused ? launch_wgb<2, false, true>(p, stream) : launch_wgb<1, false, true>(p, stream);
  return fused ? launch_wgb<2, false, false>(p, stream) : launch_wgb<1, false, false>(p, stream);
}

}  // namespace dsv4ffi
