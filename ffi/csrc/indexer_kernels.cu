// The lightning indexer's scores at decode: every cached MXFP4 key of a batch row against the step's query rows,
// reduced over the index heads, in one launch (`dsv4_jax.ops.indexer_scores`; the reference is
// `dsv4_jax.ops.indexer.score_keys`):
//
//   qk[h, j] = bf16(sum_c q[h, c] K[j, c])   wq = bf16(relu(qk) * w[h])   score[j] = bf16(sum_h wq[h, j])
//
// The keys are read packed (68 B each: 64 B of e2m1 pairs, low nibble = even element, then one UE8M0 scale byte per
// 32 values) and dequantized to bf16 in registers, where they are the B operand of mma.sync m16n8k16 (bf16 x bf16,
// fp32 accumulation); q is the A operand, 16 heads per m16 tile. The dequantized keys are exact in bf16 and q is
// bf16, so every product is exact in fp32: only the order of the fp32 sums differs from the reference (over c inside
// the tensor core; over heads a butterfly of shuffles here), i.e. a bf16 rounding may flip where a sum lies within
// an ulp of a rounding boundary.
//
// Work split: a block is 8 warps; a warp owns 16 consecutive keys (two n8 tiles) and computes all H heads of them for
// each staged query row; a block tile is 128 keys; blocks stride over the tiles (grid.x sized to fill the device),
// grid.y is the batch row. The query rows of the batch row (up to kStagedRows at a time) are staged once per block in
// shared memory, permuted into the fragment order described at `stage_queries`.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "fp8_convert.cuh"
#include "kernels.h"
#include "mma_bf16.cuh"
#include "wgmma.cuh"

namespace dsv4ffi {
namespace {

constexpr int kHeadDim = 128;                        // values per key and per query head
constexpr int kKeyBytes = kHeadDim / 2 + kHeadDim / 32;  // 68
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kKeysPerWarp = 16;
constexpr int kTileKeys = kWarps * kKeysPerWarp;  // 128
// A staged query head: its 256 bytes then 64 bytes of padding, so that the 16-byte fragment loads of a quarter warp
// (heads g and g + 1, four 16-byte chunks each) fall on distinct banks.
constexpr int kHeadStride = 2 * kHeadDim + 64;
constexpr int kSmemBudget = 48 * 1024;  // no opt-in to large shared memory: a few query rows fit

__device__ __forceinline__ uint32_t hmul2_bf16(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));  // bf16 arithmetic keeps subnormals (no ftz form)
  return d;
}

// UE8M0 byte s -> the bf16 2^(s-127), in both halves: s = 0 is the subnormal 2^-127, s = 255 NaN (as
// `quant.e8m0_to_f32`, whose f32 product the reference rounds to bf16: the same value for every finite key).
__device__ __forceinline__ uint32_t e8m0_bf16x2(uint32_t s) {
  const uint32_t h = s == 0 ? 0x0040u : (s == 255 ? 0x7FC0u : s << 7);
  return h | (h << 16);
}

// Eight e2m1 codes (nibble i = element i) times the bf16x2 factor f -> four bf16x2: o[i] = (element i, element i+4).
// The magnitude bits (e1 e0 m) go to bf16 bits 8-6 and the sign to bit 15: the bf16 of value * 2^-126 for every code
// (0.5 becomes the subnormal 2^-127); one exact multiplication by 2^126 makes it the e2m1 value, a second by f its
// dequantized value (exact unless it under- or overflows bf16, where the reference's f32 product rounds the same).
__device__ __forceinline__ void e2m1x8_to_bf16(uint32_t w, uint32_t f, uint32_t o[4]) {
  constexpr uint32_t kTwo126 = 0x7E807E80u, kMag = 0x01C001C0u, kSign = 0x80008000u;
  o[0] = ((w << 12) & kSign) | ((w << 6) & kMag);
  o[1] = ((w << 8) & kSign) | ((w << 2) & kMag);
  o[2] = ((w << 4) & kSign) | ((w >> 2) & kMag);
  o[3] = (w & kSign) | ((w >> 6) & kMag);
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = hmul2_bf16(hmul2_bf16(o[i], kTwo126), f);
}

struct Params {
  const uint4* q;         // bf16 [rows, H, 128]
  const uint16_t* w;      // bf16 [rows, H]
  const uint8_t* keys;    // [L, B, n, 68]
  const int32_t* layer;   // [1] or null (layer 0)
  float* out;             // [rows, n]
  int64_t t, n, batch, layers;
  int heads, staged_rows;
};

// The raw bytes of the lane's keys (two n8 tiles): the 4-byte word of 32-wide block `blk` this lane reads (bytes
// 16 blk + 4 qd .. +3, i.e. values 32 blk + 8 qd .. + 7) and the key's four scale bytes. Keys past n read as zeros.
struct RawKeys {
  uint32_t word[2][4];
  uint32_t scales[2];
};

__device__ __forceinline__ void load_keys(const uint8_t* kbase, int64_t j0, int64_t n, int g, int qd, RawKeys& r) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const int64_t j = j0 + nt * 8 + g;
    const bool live = j < n;
    const uint32_t* row = reinterpret_cast<const uint32_t*>(kbase + (live ? j : 0) * kKeyBytes);
#pragma unroll
    for (int blk = 0; blk < 4; ++blk) r.word[nt][blk] = live ? __ldg(row + 4 * blk + qd) : 0u;
    r.scales[nt] = live ? __ldg(row + 16) : 0u;
  }
}

// B fragments of m16n8k16 (col): lane (g, qd) holds column (key) g, k = 2qd, 2qd+1 in b0 and 2qd+8, 2qd+9 in b1.
// The k order within a step is ours to choose as long as A uses the same: k-step 2 blk + h reads the lane's word of
// block blk, b0 = o[2h] (values 2h, 2h+4 of the word), b1 = o[2h+1]. kb[nt][4 blk + 2h + r] = o[2h + r].
__device__ __forceinline__ void dequant_keys(const RawKeys& r, uint32_t kb[2][16]) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int blk = 0; blk < 4; ++blk) e2m1x8_to_bf16(r.word[nt][blk], e8m0_bf16x2((r.scales[nt] >> (8 * blk)) & 0xFF),
                                                     &kb[nt][4 * blk]);
  }
}

// Stages query rows [r0, r0 + nr) of batch row b: head h of row rr at byte (rr H + h) kHeadStride; its 8-value group
// v (values 8v .. 8v+7, bf16 pairs x = (0,1), y = (2,3), z = (4,5), w = (6,7)) stored as the words (0,4), (1,5),
// (2,6), (3,7), the pairing of `e2m1x8_to_bf16`. Group v = 4 blk + qd is what lane qd reads for block blk. The head
// weights go to wsm [rr H + h] as f32.
__device__ __forceinline__ void stage_queries(const Params& p, int64_t b, int64_t r0, int nr, uint8_t* qsm,
                                              float* wsm) {
  const int H = p.heads, groups = nr * H * (kHeadDim / 8);
  const int64_t row0 = b * p.t + r0;
  for (int c = threadIdx.x; c < groups; c += kThreads) {
    const int rh = c / (kHeadDim / 8), v = c % (kHeadDim / 8);  // rh = rr * H + h
    const uint4 x = __ldg(p.q + (row0 * H + rh) * (kHeadDim / 8) + v);
    uint4 o;
    o.x = prmt(x.x, x.z, 0x5410u);
    o.y = prmt(x.x, x.z, 0x7632u);
    o.z = prmt(x.y, x.w, 0x5410u);
    o.w = prmt(x.y, x.w, 0x7632u);
    *reinterpret_cast<uint4*>(qsm + rh * kHeadStride + v * 16) = o;
  }
  for (int c = threadIdx.x; c < nr * H; c += kThreads)
    wsm[c] = __bfloat162float(__ushort_as_bfloat16(p.w[row0 * H + c]));
}

__global__ void __launch_bounds__(kThreads, 2) indexer_scores_kernel(const Params p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int H = p.heads, m_tiles = H / 16;
  uint8_t* qsm = smem;
  float* wsm = reinterpret_cast<float*>(smem + p.staged_rows * H * kHeadStride);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, qd = lane % 4;
  const int64_t b = blockIdx.y;
  int64_t layer = p.layer != nullptr ? *p.layer : 0;
  layer = layer < 0 ? 0 : (layer >= p.layers ? p.layers - 1 : layer);  // clamped, as a dynamic index in XLA
  const uint8_t* kbase = p.keys + (layer * p.batch + b) * p.n * kKeyBytes;
  const int64_t tiles = (p.n + kTileKeys - 1) / kTileKeys;

  for (int64_t r0 = 0; r0 < p.t; r0 += p.staged_rows) {
    const int nr = int(p.t - r0 < p.staged_rows ? p.t - r0 : p.staged_rows);
    __syncthreads();  // the previous chunk's rows are no longer read
    stage_queries(p, b, r0, nr, qsm, wsm);
    __syncthreads();

    RawKeys raw;
    if (blockIdx.x < tiles) load_keys(kbase, int64_t(blockIdx.x) * kTileKeys + warp * kKeysPerWarp, p.n, g, qd, raw);
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t j0 = tile * kTileKeys + warp * kKeysPerWarp;
      uint32_t kb[2][16];
      dequant_keys(raw, kb);
      if (tile + gridDim.x < tiles) load_keys(kbase, j0 + int64_t(gridDim.x) * kTileKeys, p.n, g, qd, raw);  // next

      for (int rr = 0; rr < nr; ++rr) {
        float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // [n tile][key 2qd + col]: the lane's heads g, g+8 of each m tile
        for (int mt = 0; mt < m_tiles; ++mt) {
          const uint8_t* qa = qsm + (rr * H + mt * 16 + g) * kHeadStride + qd * 16;
          float c[2][4] = {};
#pragma unroll
          for (int blk = 0; blk < 4; ++blk) {
            const uint4 lo = *reinterpret_cast<const uint4*>(qa + blk * 64);                    // head g
            const uint4 hi = *reinterpret_cast<const uint4*>(qa + 8 * kHeadStride + blk * 64);  // head g + 8
            const uint32_t a0[4] = {lo.x, hi.x, lo.y, hi.y}, a1[4] = {lo.z, hi.z, lo.w, hi.w};
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
              mma_bf16_16x8x16(a0, kb[nt][4 * blk], kb[nt][4 * blk + 1], c[nt]);
              mma_bf16_16x8x16(a1, kb[nt][4 * blk + 2], kb[nt][4 * blk + 3], c[nt]);
            }
          }
          // C fragment: c[nt][0, 1] = head g, keys 2qd, 2qd+1 of n tile nt; c[nt][2, 3] = head g + 8.
          const float w_lo = wsm[rr * H + mt * 16 + g], w_hi = wsm[rr * H + mt * 16 + g + 8];
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float qk = fmaxf(bf16_round(c[nt][i]), 0.f);
              acc[nt][i & 1] += bf16_round(qk * (i < 2 ? w_lo : w_hi));
            }
          }
        }
        // Sum over the heads: the 8 lanes of a qd hold heads g and g+8 of every m tile.
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int col = 0; col < 2; ++col) {
            float v = acc[nt][col];
            v += __shfl_xor_sync(0xffffffffu, v, 4);
            v += __shfl_xor_sync(0xffffffffu, v, 8);
            v += __shfl_xor_sync(0xffffffffu, v, 16);
            acc[nt][col] = v;
          }
        }
        // Lane g = 2 nt + col writes key j0 + 8 nt + 2 qd + col.
        if (g < 4) {
          const int nt = g >> 1, col = g & 1;
          const int64_t j = j0 + nt * 8 + 2 * qd + col;
          const float v = nt ? (col ? acc[1][1] : acc[1][0]) : (col ? acc[0][1] : acc[0][0]);
          if (j < p.n) p.out[(b * p.t + r0 + rr) * p.n + j] = bf16_round(v);
        }
      }
    }
  }
}

// ==== The wgmma variant (one query row per batch row, 64 heads) =====================================================
//
// A warpgroup scores 64 keys at a time with wgmma.m64n64k16 (bf16 x bf16, fp32 accumulation): the keys are the A
// operand, dequantized into registers as above; the query row's 64 heads are the B operand, staged once per block in
// shared memory (K-major core matrices, no swizzle); K = 128 in eight k16 steps. The K order inside the sum is a
// permutation, the same on both sides: lane quad qd holds its keys' 32-wide block qd, whose word m (values 32 qd + 8m
// .. + 7, dequantized as the pairs (i, i + 4)) feeds k-steps 2m and 2m + 1 (pairs (0, 4), (1, 5) and (2, 6), (3, 7));
// the query is staged in that order. Thread (warp w, g, qd) ends with the fp32 sums of keys 16w + g and 16w + g + 8
// against heads 8j + 2qd and 8j + 2qd + 1 (j < 8): the epilogue (relu, head weight, bf16 roundings, the head sum over
// its 16 heads, then over the quad) is the mma.sync kernel's. The products are exact in fp32 as there; only the order
// of the fp32 sums differs from the reference. Two warpgroups per block, each striding over its own key tiles.
constexpr int kWgHeads = 64;
constexpr int kWgThreads = 256;
constexpr int kWgTileKeys = 64;
constexpr int kWgStepBytes = 2048;  // B of one k16 step: 8 head groups x 2 core matrices (K halves) x 128 B

__device__ __forceinline__ void wgmma_m64n64k16_bf16(float d[32], const uint32_t a[4], uint64_t desc, int accumulate) {
  DSV4_WGMMA(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

__global__ void __launch_bounds__(kWgThreads, 2) indexer_scores_wg_kernel(const Params p) {
  __shared__ __align__(128) uint8_t bsm[8 * kWgStepBytes];
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, qd = lane % 4;
  const int64_t b = blockIdx.y;
  int64_t layer = p.layer != nullptr ? *p.layer : 0;
  layer = layer < 0 ? 0 : (layer >= p.layers ? p.layers - 1 : layer);  // clamped, as a dynamic index in XLA
  const uint8_t* kbase = p.keys + (layer * p.batch + b) * p.n * kKeyBytes;
  const int64_t tiles = (p.n + kWgTileKeys - 1) / kWgTileKeys;
  const int64_t stride = int64_t(gridDim.x) * 2;

  // The raw words of this thread's two keys of a tile: block qd (4 words) and the scale word of each.
  uint32_t raw[2][5];
  auto load = [&](int64_t tile) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = tile * kWgTileKeys + 16 * warp + g + 8 * h;
      const bool live = j < p.n;
      const uint32_t* row = reinterpret_cast<const uint32_t*>(kbase + (live ? j : 0) * kKeyBytes);
#pragma unroll
      for (int m = 0; m < 4; ++m) raw[h][m] = live ? __ldg(row + 4 * qd + m) : 0u;
      raw[h][4] = live ? __ldg(row + 16) : 0u;
    }
  };
  int64_t tile = int64_t(blockIdx.x) * 2 + wg;
  if (tile < tiles) load(tile);

  // Stage the query row (batch row b: one query row each) in the k-step order above, and this thread's head weights.
  const int64_t row_q = b;
  for (int c = threadIdx.x; c < kWgHeads * 16; c += kWgThreads) {
    const int h = c / 16, qq = (c / 4) % 4, m = c % 4;  // head, block, word
    const uint4 x = __ldg(p.q + (row_q * kWgHeads + h) * (kHeadDim / 8) + 4 * qq + m);
    const uint32_t pair[4] = {prmt(x.x, x.z, 0x5410u), prmt(x.x, x.z, 0x7632u), prmt(x.y, x.w, 0x5410u),
                              prmt(x.y, x.w, 0x7632u)};  // (0, 4), (1, 5), (2, 6), (3, 7)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      uint8_t* core = bsm + (2 * m + hh) * kWgStepBytes + (h / 8) * 256 + (h % 8) * 16 + 4 * qq;
      *reinterpret_cast<uint32_t*>(core) = pair[2 * hh];
      *reinterpret_cast<uint32_t*>(core + 128) = pair[2 * hh + 1];
    }
  }
  uint32_t wp[8];  // bf16x2: the weights of heads 8j + 2qd (low half) and 8j + 2qd + 1
#pragma unroll
  for (int j = 0; j < 8; ++j) wp[j] = *reinterpret_cast<const uint32_t*>(p.w + row_q * kWgHeads + 8 * j + 2 * qd);
  DSV4_WGMMA("fence.proxy.async.shared::cta;\n" ::: "memory");  // the staged B, visible to wgmma's async proxy
  __syncthreads();
  const uint32_t b_addr = smem_addr(bsm);

  for (; tile < tiles; tile += stride) {
    uint32_t ak[2][4][4];  // [key h][word m][pair]: bf16x2 of values (i, i + 4) of word m
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int m = 0; m < 4; ++m) e2m1x8_to_bf16(raw[h][m], e8m0_bf16x2((raw[h][4] >> (8 * qd)) & 0xFF), ak[h][m]);
    const int64_t j0 = tile * kWgTileKeys + 16 * warp + g;
    if (tile + stride < tiles) load(tile + stride);

    float d[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      d[i] = 0.f;
      reg_fence(d[i]);
    }
    wgmma_fence();
#pragma unroll
    for (int st = 0; st < 8; ++st) {
      const int m = st / 2, hh = st % 2;
      const uint32_t a[4] = {ak[0][m][2 * hh], ak[1][m][2 * hh], ak[0][m][2 * hh + 1], ak[1][m][2 * hh + 1]};
      wgmma_m64n64k16_bf16(d, a, wgmma_desc(b_addr + st * kWgStepBytes, 128, 256), st);
    }
    wgmma_commit();
    wgmma_wait0();
#pragma unroll
    for (int i = 0; i < 32; ++i) reg_fence(d[i]);

    // d[4j + c]: key j0, head 8j + 2qd + c; d[4j + 2 + c]: key j0 + 8. The two heads of a pair go through the
    // roundings together in bf16x2: qk rounded to bf16 (one pack), relu (a bf16x2 max with 0), times the head
    // weight rounded once to bf16 (mul.rn.bf16x2: the exact product of two bf16 rounded, as the reference's f32
    // product of them rounded to bf16), then each added in f32 in the order of the scalar form (head 2qd, then
    // 2qd + 1): 3.5 instructions a score where the scalar roundings took 7.
    float v[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const __nv_bfloat162 qk = __floats2bfloat162_rn(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
        const __nv_bfloat162 r = __hmax2(qk, __float2bfloat162_rn(0.f));
        const uint32_t wq = hmul2_bf16(*reinterpret_cast<const uint32_t*>(&r), wp[j]);
        v[h] += __uint_as_float(wq << 16);
        v[h] += __uint_as_float(wq & 0xFFFF0000u);
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      v[h] += __shfl_xor_sync(0xffffffffu, v[h], 1);
      v[h] += __shfl_xor_sync(0xffffffffu, v[h], 2);
    }
    if (qd == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (j0 + 8 * h < p.n) p.out[row_q * p.n + j0 + 8 * h] = bf16_round(v[h]);
    }
  }
}

// The variant an explicit or auto (kIndexerAuto) request launches, where it fits.
int indexer_resolve_variant(int requested) {
  if (requested == kIndexerMma || requested == kIndexerWgmma) return requested;
  // DSV4_FFI_INDEXER=mma|wgmma: what the plain target launches (read at every launch). Default wgmma, where it fits
  // (its GPU tests passed on an H200; 94 vs 127 us at 64 rows x 16,384 keys, BENCHMARKS.md); mma elsewhere.
  const char* v = std::getenv("DSV4_FFI_INDEXER");
  return v != nullptr && std::strcmp(v, "mma") == 0 ? kIndexerMma : kIndexerWgmma;
}

}  // namespace

int indexer_staged_rows(int64_t heads, int64_t t) {
  const int64_t per_row = heads * (kHeadStride + 4);
  const int64_t fit = kSmemBudget / per_row;
  return int(std::min<int64_t>(fit, std::max<int64_t>(t, 1)));
}

bool indexer_wgmma_fits(int64_t heads, int64_t rows, int64_t batch) {
  int major = 0, minor = 0, sms = 0;
  device_info(&major, &minor, &sms);
  return major == 9 && heads == kWgHeads && batch > 0 && rows == batch;
}

cudaError_t launch_indexer_scores(const IndexerScoresArgs& a, cudaStream_t stream) {
  if (a.heads % 16 != 0 || a.heads < 16 || a.batch < 1 || a.rows % a.batch != 0 || a.layers < 1)
    return cudaErrorInvalidValue;
  const int staged = indexer_staged_rows(a.heads, a.rows / a.batch);
  if (staged < 1) return cudaErrorInvalidValue;
  if (a.batch > 65535) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.n == 0) return cudaSuccess;
  Params p{static_cast<const uint4*>(a.q), static_cast<const uint16_t*>(a.w), a.keys, a.layer, a.out,
           a.rows / a.batch, a.n, a.batch, a.layers, int(a.heads), staged};
  int major = 0, minor = 0, sms = 0;
  device_info(&major, &minor, &sms);
  // One wave of resident blocks over the whole grid (a second, partial wave doubled the time at batch 64): each
  // block stages its query rows once and strides over key tiles. DSV4_FFI_INDEXER_GRID_X overrides the blocks per
  // batch row (a tuning knob, read at every launch).
  auto blocks_per_row = [&](const void* kernel, int threads, size_t smem, int64_t tiles) {
    const int resident = resident_blocks(kernel, threads, smem);
    int64_t want = std::max<int64_t>(1, int64_t(resident) * std::max(sms, 1) / a.batch);
    if (const char* v = std::getenv("DSV4_FFI_INDEXER_GRID_X")) want = std::max(1, std::atoi(v));
    return std::min(tiles, want);
  };
  if (indexer_resolve_variant(a.variant) == kIndexerWgmma && indexer_wgmma_fits(a.heads, a.rows, a.batch)) {
    const int64_t tiles = (a.n + kWgTileKeys - 1) / kWgTileKeys;  // two warpgroups (two tiles at once) per block
    const int64_t gx = blocks_per_row(reinterpret_cast<const void*>(indexer_scores_wg_kernel), kWgThreads, 0,
                                      (tiles + 1) / 2);
    indexer_scores_wg_kernel<<<dim3(unsigned(gx), unsigned(a.batch)), kWgThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const size_t smem = size_t(staged) * size_t(a.heads) * (kHeadStride + 4);
  const int64_t tiles = (a.n + kTileKeys - 1) / kTileKeys;
  const int64_t gx = blocks_per_row(reinterpret_cast<const void*>(indexer_scores_kernel), kThreads, smem, tiles);
  indexer_scores_kernel<<<dim3(unsigned(gx), unsigned(a.batch)), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dsv4ffi
