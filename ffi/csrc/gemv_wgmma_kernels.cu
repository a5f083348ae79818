// The wide layer GEMV on wgmma (DSV4_FFI_GEMV_WIDE=wgmma; an A/B form of gemv_mma_wide_kernel, same launch
// arguments): y [rows, n] = x . W^T for a segment of 16 or 32 FP8 activation rows (quantised beforehand, act_quant's
// layout) against an FP8 weight with 128 x 128 block scales, for the 9..64 decode rows of a stacked layer.
//
// Why: the mma.sync kernel is bound by instruction issue, not bytes (Hopper has no e4m3 mma.sync: every 512 weights
// x 8 tokens cost 12 conversions and 2 HMMAs per lane); at 32 rows it streams wq_b (32768 x 1024) at ~0.9 TB/s, and
// the layer GEMVs were 0.72 ms of a 5.86 ms six-layer decode step at batch 32 against ~0.2 ms of weight bytes. Here a
// warpgroup multiplies a 64-row weight tile by the segment's tokens with e4m3 wgmma: the weights as A (registers, by
// ldmatrix from a per-warp cp.async ring, as the wgb MXFP4 kernel stages them), the tokens as B (shared memory, eight
// at a time, the wgb kernel's n8 core-matrix layout), one m64n8k32 per 8 tokens and 32 K.
//
// Grid: x = 64-row tiles x KS (a thread-block cluster of KS blocks splits K; the K ranges' partial sums are added in
// rank order through distributed shared memory by rank 0), y = segments (x 2 with a second projection).
// Numerics: per 128-wide K block the 4 k32 products accumulate inside the tensor core (Hopper's FP8 accumulator
// keeps ~14 mantissa bits there), then times s_w * s_act into fp32 in K order per split, the splits added in order:
// not bit-identical to the mma.sync kernel (fp32 products, per-64 partial sums); the reference's noise level.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cp_async.cuh"
#include "kernels.h"
#include "wgmma.cuh"

namespace dsv4ffi {
namespace {

constexpr int kWgWarps = 4;                   // one warpgroup: 64 weight rows, 16 a warp
constexpr int kWgRows = 64;
constexpr int kWgStages = 4;                  // chunks of 128 K in each warp's ring
constexpr int kWgPitch = 144;                 // bytes per staged 128-byte row: 8 rows of an ldmatrix on distinct banks
constexpr int kWgStageBytes = 16 * kWgPitch;  // a warp's 16 rows of one chunk
constexpr int kWgRingBytes = kWgWarps * kWgStages * kWgStageBytes;
constexpr int kWgMaxSplit = 8;                // the portable cluster size

// Largest K range a block stages its tokens for (TB rows x K bytes of B in shared memory).
constexpr int64_t wg_max_krange(int tb) { return tb == 32 ? 2048 : 4096; }

size_t wg_smem_bytes(int tb, int64_t krange) {
  return static_cast<size_t>(kWgRingBytes) + static_cast<size_t>(krange) * tb +
         static_cast<size_t>(krange / 128) * tb * sizeof(float);
}

struct WideArgs {
  const uint8_t* a;  // e4m3 [a_rows, k]
  int64_t a_rows;
  const float* sfa;
  int64_t sfa_row_stride, sfa_kb_stride;
  const uint8_t* b;  // e4m3 [groups, n, k]
  const float* sfb;  // f32 [groups, ceil(n/128), k/128]
  int64_t groups;
  const int32_t* group_map;
  __nv_bfloat16* d;
  int64_t out_rows, n, k;
  const uint8_t* b2;
  const float* sfb2;
  __nv_bfloat16* d2;
  int64_t n2;
  int kb_per_split;  // 128-wide K blocks a split covers (the last one fewer)
};

template <int NT>
__global__ void __launch_bounds__(kWgWarps * 32) gemv_wgmma_wide_kernel(WideArgs p) {
  constexpr int TB = 8 * NT;
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(128) uint8_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, q = lane % 4;
  const unsigned splits = cluster.num_blocks(), split = cluster.block_rank();
  const int64_t tile = blockIdx.x / splits;

  // The segment and projection (as block_segment): blocks past the first projection's segments compute the second.
  const int64_t segs = (p.out_rows + TB - 1) / TB;
  int64_t seg = blockIdx.y;
  const uint8_t* b = p.b;
  const float* sfb = p.sfb;
  __nv_bfloat16* d = p.d;
  int64_t n = p.n;
  if (seg >= segs) seg -= segs, b = p.b2, sfb = p.sfb2, d = p.d2, n = p.n2;
  int64_t g = p.group_map != nullptr ? p.group_map[seg] : 0;
  const bool group_ok = g >= 0 && g < p.groups;
  if (!group_ok) g = 0;
  const int64_t n0 = tile * kWgRows;
  if (n0 >= n) return;  // the whole cluster (one tile): no barrier is left waiting

  const int64_t kblocks = p.k / 128, nblocks = (n + 127) / 128;
  const int64_t kb_lo = static_cast<int64_t>(split) * p.kb_per_split;
  const int64_t kb_hi = kb_lo + p.kb_per_split < kblocks ? kb_lo + p.kb_per_split : kblocks;
  const int nkb = kb_hi > kb_lo ? static_cast<int>(kb_hi - kb_lo) : 0;

  uint8_t* ring = smem + warp * kWgStages * kWgStageBytes;
  uint8_t* bsm = smem + kWgRingBytes;                                      // [k32 step][NT][256]
  float* sa = reinterpret_cast<float*>(bsm + static_cast<int64_t>(p.kb_per_split) * 128 * TB);  // [kb][TB]
  const uint32_t ring_addr = smem_addr(ring), b_addr = smem_addr(bsm);

  // This warp's 16 weight rows (rows past N repeat row N - 1: their outputs are not stored); lane: 4 pieces of 16 B
  // per chunk, piece c = lane + 32 i: row c / 8, bytes 16 (c % 8).
  const uint8_t* w_src[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = lane + 32 * i;
    int64_t row = n0 + 16 * warp + c / 8;
    row = row < n ? row : n - 1;
    w_src[i] = b + (g * n + row) * p.k + kb_lo * 128 + (c % 8) * 16;
  }
  int issued = 0;
  auto issue = [&]() {  // chunk `issued` of this warp's K range into stage issued % kWgStages (empty past the end)
    if (issued < nkb) {
      const uint32_t st = ring_addr + (issued % kWgStages) * kWgStageBytes;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = lane + 32 * i;
        cp_async16_l2line(st + (c / 8) * kWgPitch + (c % 8) * 16, w_src[i] + static_cast<int64_t>(issued) * 128);
      }
    }
    ++issued;
    cp_async_commit();
  };
  for (int s = 0; s < kWgStages - 1; ++s) issue();

  // The segment's tokens over this split's K range (B), in the n8 core-matrix layout: k32 step s, token group t8,
  // token j: its bytes 0-15 at ((s NT + t8) 256 + 16 j), bytes 16-31 128 further. Rows without a source read zeros.
  {
    const int pieces = nkb * 4 * TB * 2;  // (k32 step, token, half)
    for (int c = threadIdx.x; c < pieces; c += kWgWarps * 32) {
      const int h = c % 2, t = (c / 2) % TB, s = c / (2 * TB);
      const int64_t r = seg * TB + t;
      const uint32_t dst = b_addr + (s * NT + t / 8) * 256 + h * 128 + (t % 8) * 16;
      if (group_ok && r < p.out_rows && r < p.a_rows) {
        cp_async16(dst, p.a + r * p.k + kb_lo * 128 + s * 32 + h * 16);
      } else {
        *reinterpret_cast<uint4*>(bsm + (dst - b_addr)) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    cp_async_commit();
    for (int c = threadIdx.x; c < nkb * TB; c += kWgWarps * 32) {
      const int t = c % TB, kb = c / TB;
      const int64_t r = seg * TB + t;
      const bool live = group_ok && r < p.out_rows && r < p.a_rows;
      sa[c] = live ? p.sfa[r * p.sfa_row_stride + (kb_lo + kb) * p.sfa_kb_stride] : 0.f;
    }
    cp_async_wait<0>();  // (also this warp's first chunks: fine, they are needed first)
    DSV4_WGMMA("fence.proxy.async.shared::cta;\n" ::: "memory");  // B's stores visible to the async proxy
    __syncthreads();
  }

  const float* sfb_row = sfb + (g * nblocks + n0 / 128) * kblocks;  // a 64-row tile lies in one 128-row block
  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  const int mi = lane / 8, rr = lane % 8;  // this lane's ldmatrix row address: matrix mi, row rr
  for (int j = 0; j < nkb; ++j) {
    issue();
    cp_async_wait<kWgStages - 1>();
    __syncwarp();
    const uint32_t st = ring_addr + (j % kWgStages) * kWgStageBytes;
    uint32_t a[4][4];  // k32 step m: rows g / g + 8, bytes 32 m + 4 q (a[m][0], a[m][1]) and 16 further (2, 3)
#pragma unroll
    for (int m = 0; m < 4; ++m) ldmatrix_x4(st + (8 * (mi % 2) + rr) * kWgPitch + 32 * m + 16 * (mi / 2), a[m]);
    float dd[NT][4];  // written, not read: the first k32 step starts from zero
    wgmma_fence();
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int m = 0; m < 4; ++m) wgmma_m64n8k32(dd[t], a[m], wg_desc(b_addr + ((4 * j + m) * NT + t) * 256), m);
    wgmma_commit();
    wgmma_wait0();
    const float sw = sfb_row[kb_lo + j];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        reg_fence(dd[t][i]);
        acc[t][i] = fmaf(dd[t][i], sa[j * TB + 8 * t + 2 * q + (i & 1)] * sw, acc[t][i]);
      }
    }
    __syncwarp();  // the stage is refilled by the next chunk's issue
  }
  cp_async_wait<0>();

  // The splits' sums: every block leaves its fragments in its own ring (each warp its part), rank 0 adds them in
  // rank order and stores; the second barrier keeps the others' shared memory alive until it has read them.
  float* part = reinterpret_cast<float*>(ring) + lane * NT * 4;
  if (splits > 1) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) part[t * 4 + i] = acc[t][i];
    cluster.sync();
    if (split == 0) {
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;
      for (unsigned r = 0; r < splits; ++r) {
        const float* peer = cluster.map_shared_rank(part, r);
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[t][i] += peer[t * 4 + i];
      }
    }
    cluster.sync();
    if (split != 0) return;
  }
  // Fragment (t, i): token 8 t + 2 q + (i & 1), weight row n0 + 16 warp + gq + 8 (i >> 1); rows of the segment
  // without a source are stored as zeros (as the mma.sync kernel does).
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = seg * TB + 8 * t + 2 * q + (i & 1), col = n0 + 16 * warp + gq + 8 * (i >> 1);
      if (r >= p.out_rows || col >= n) continue;
      const bool live = group_ok && r < p.a_rows;
      d[r * n + col] = __float2bfloat16_rn(live ? acc[t][i] : 0.f);
    }
  }
}

template <int NT>
cudaError_t launch_nt(const GemvArgs& g, int splits, int kb_per_split, cudaStream_t stream) {
  auto* kernel = gemv_wgmma_wide_kernel<NT>;
  const size_t smem = wg_smem_bytes(8 * NT, static_cast<int64_t>(kb_per_split) * 128);
  cudaError_t err = cudaSuccess;
  const int limit = dynamic_smem_limit(reinterpret_cast<const void*>(kernel), &err);
  if (limit < 0) return err;
  if (smem > static_cast<size_t>(limit)) return cudaErrorInvalidValue;
  const int64_t n2 = g.b2 != nullptr && g.n2 > 0 ? g.n2 : g.n, n_max = n2 > g.n ? n2 : g.n;
  const int64_t tiles = (n_max + kWgRows - 1) / kWgRows, segs = (g.out_rows + 8 * NT - 1) / (8 * NT);
  WideArgs p{static_cast<const uint8_t*>(g.a), g.a_rows, g.sfa, g.sfa_row_stride, g.sfa_kb_stride,
             static_cast<const uint8_t*>(g.b), g.sfb, g.groups, g.group_map, static_cast<__nv_bfloat16*>(g.d),
             g.out_rows, g.n, g.k, static_cast<const uint8_t*>(g.b2), g.sfb2, static_cast<__nv_bfloat16*>(g.d2), n2,
             kb_per_split};
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(tiles * splits), static_cast<unsigned>(g.b2 != nullptr ? 2 * segs : segs));
  cfg.blockDim = dim3(kWgWarps * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(splits), attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr, cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

}  // namespace

bool gemv_wide_wgmma_requested() {
  const char* v = std::getenv("DSV4_FFI_GEMV_WIDE");
  return v != nullptr && std::strcmp(v, "wgmma") == 0;
}

bool gemv_wgmma_wide_takes(const GemvArgs& g) {
  int major = 0, minor = 0, sms = 0;
  device_info(&major, &minor, &sms);
  const int tb = g.tokens_per_block;
  return major == 9 && (tb == 16 || tb == 32) && g.x_bf16 == nullptr && g.rows_map == nullptr && g.k % 128 == 0 &&
         (g.k / 128 + kWgMaxSplit - 1) / kWgMaxSplit <= wg_max_krange(tb) / 128;
}

cudaError_t launch_gemv_wgmma_wide(const GemvArgs& g, cudaStream_t stream) {
  if (!gemv_wgmma_wide_takes(g)) return cudaErrorInvalidValue;
  if (g.out_rows == 0 || g.n == 0) return cudaSuccess;
  const int tb = g.tokens_per_block;
  int major = 0, minor = 0, sms = 0;
  device_info(&major, &minor, &sms);
  // K splits: enough that a split's tokens fit (wg_max_krange), then more while the grid is under two blocks per SM
  // and each split keeps >= 4 chunks; at most the portable cluster size.
  const int64_t kblocks = g.k / 128, max_kb = wg_max_krange(tb) / 128;
  const int64_t n2 = g.b2 != nullptr && g.n2 > 0 ? g.n2 : g.n, n_max = n2 > g.n ? n2 : g.n;
  const int64_t units = ((n_max + kWgRows - 1) / kWgRows) * ((g.out_rows + tb - 1) / tb) * (g.b2 != nullptr ? 2 : 1);
  int splits = 1;
  while (splits < kWgMaxSplit && (kblocks + splits - 1) / splits > max_kb) splits *= 2;
  if ((kblocks + splits - 1) / splits > max_kb) return cudaErrorInvalidValue;
  while (splits < kWgMaxSplit && units * splits < 2 * static_cast<int64_t>(sms) && kblocks / (2 * splits) >= 4)
    splits *= 2;
  if (const char* v = std::getenv("DSV4_FFI_GEMV_WIDE_SPLITS")) {  // A/B knob: 1, 2, 4 or 8
    const int f = std::atoi(v);
    if ((f == 1 || f == 2 || f == 4 || f == 8) && (kblocks + f - 1) / f <= max_kb) splits = f;
  }
  const int kb_per_split = static_cast<int>((kblocks + splits - 1) / splits);
  return tb == 16 ? launch_nt<2>(g, splits, kb_per_split, stream) : launch_nt<4>(g, splits, kb_per_split, stream);
}

}  // namespace dsv4ffi
