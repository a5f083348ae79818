// Sparse-MLA decode of DeepSeek-V4: one query per batch row, every head, attending over the KV rows its index list
// names, read straight from the packed FP8 cache (dsv4_jax.kv_format: 448 e4m3 NoPE values in 7 tiles of 64 with
// UE8M0 scales, 64 bf16 RoPE values; 584 bytes per row). One row is both K and V. The reference is
// dsv4_jax.attention.sparse_attention (the op `ops.sparse_decode`); FlashMLA's SM90 split-KV decode is the
// behavioural model (read for facts only).
//
// Work split: a block takes one batch row, 16 heads (one m16 tile) and a contiguous run of 64-key tiles of the index
// list (split-KV); a second kernel combines the splits and adds the attention sink. Per tile:
//   1. the tile's source rows are copied raw (cp.async, 8-byte pieces) into shared memory;
//   2. widened to bf16 (exact: an e4m3 value times a power of two has 4 significant bits);
//   3. S = Q K^T on the tensor cores (bf16 x bf16 products are exact in fp32, fp32 sums), the 512 dims split over
//      the 4 warps and the partial sums added in shared memory;
//   4. the online softmax of the reference: running max, p = exp(z - max) rounded to bf16 for the PV product, the
//      unrounded p summed into the denominator;
//   5. O = alpha O + P V on the tensor cores, each warp owning 128 of the 512 output dims.
// Only the fp32 summation order differs from the reference (and, with several splits, the running max that the
// bf16 rounding of p is taken against: the reference's own kernel order, per split).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cp_async.cuh"
#include "fp8_convert.cuh"
#include "kernels.h"
#include "mma_bf16.cuh"
#include "sparse_mla_common.cuh"

namespace dsv4ffi {
namespace {

using namespace sparse_mla;  // kD, kNope, kRowBytes, kScaleAt, kKeys, kChunks; the row sources and their copies

constexpr int kHeads = 16;               // heads per block: one m16 tile
constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kDimsPerWarp = kD / kWarps;  // 128
constexpr int kKPitch = kD + 8;          // bf16 per widened row: rows 16 bytes apart mod 128, ldmatrix conflict-free
constexpr int kSPitch = kKeys + 8;       // f32 per partial-score row
constexpr int kPPitch = kKeys + 8;       // bf16 per probability row

// Shared memory: widened K [64][520] bf16, raw rows [64][584] (reused for the partial scores and the bf16
// probabilities once widened), the tile's source pointers and the per-head rescale factors.
constexpr int kKBytes = kKeys * kKPitch * 2;
constexpr int kRawBytes = kKeys * kRowBytes;
constexpr int kSPartBytes = kWarps * kHeads * kSPitch * 4;
constexpr int kPBytes = kHeads * kPPitch * 2;
static_assert(kSPartBytes + kPBytes <= kRawBytes, "scores and probabilities must fit in the raw-row buffer");
constexpr int kSrcAt = kKBytes + kRawBytes;          // const unsigned char* [64]: each key row's source (null: none)
constexpr int kValidAt = kSrcAt + kKeys * 8;         // int [64]: index >= 0
constexpr int kAlphaAt = kValidAt + kKeys * 4;       // float [16]: the tile's rescale factor per head
constexpr int kSmemBytes = kAlphaAt + kHeads * 4;

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The raw rows widened to bf16 rows of k_s: 64 pieces of 8 values per row (56 NoPE pieces of e4m3 x scale, 8 RoPE
// pieces copied); zeros for rows without a source.
template <int NT>
__device__ __forceinline__ void widen_rows(const unsigned char* raw_s, const unsigned char* const* srcs,
                                           __nv_bfloat16* k_s, int tid) {
  for (int c = tid; c < kKeys * (kD / 8); c += NT) {
    const int row = c / (kD / 8), piece = c % (kD / 8);
    const unsigned char* r = raw_s + row * kRowBytes;
    const uint4 out = srcs[row] ? widen_piece(r, piece) : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(k_s + row * kKPitch + piece * 8) = out;
  }
}

// One tile of the reference's online softmax for one head, 8 lanes of a warp holding 8 scores z each (-inf: masked):
// the running max m_run -> m_new, alpha = exp(m_run - m_new), p = exp(z - m_new) rounded to bf16 in pb (for PV) and
// the unrounded p summed into psum over the 8 lanes (a max of -inf counts as 0).
__device__ __forceinline__ void softmax_tile8(const float z[8], float m_run, float& m_new, float& alpha,
                                              uint32_t pb[4], float& psum) {
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < 8; ++i) mx = fmaxf(mx, z[i]);
#pragma unroll
  for (int off = 1; off < 8; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  m_new = fmaxf(m_run, mx);
  const float m_safe = isfinite(m_new) ? m_new : 0.f;
  alpha = expf(m_run - m_safe);
  psum = 0.f;
#pragma unroll
  for (int i = 0; i < 8; i += 2) {
    const float p0 = expf(z[i] - m_safe), p1 = expf(z[i + 1] - m_safe);
    psum += p0 + p1;
    pb[i / 2] = pack_bf16x2(p0, p1);
  }
#pragma unroll
  for (int off = 1; off < 8; off <<= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
}

__global__ void __launch_bounds__(kThreads) sparse_mla_decode_kernel(const SparseMlaDecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(smem);
  unsigned char* raw_s = smem + kKBytes;
  float* spart_s = reinterpret_cast<float*>(raw_s);  // after widening: [warp][head][key]
  __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(raw_s + kSPartBytes);
  const unsigned char** src_s = reinterpret_cast<const unsigned char**>(smem + kSrcAt);
  int* valid_s = reinterpret_cast<int*>(smem + kValidAt);
  float* alpha_s = reinterpret_cast<float*>(smem + kAlphaAt);

  const int split = blockIdx.x, h0 = blockIdx.y * kHeads;
  const int64_t b = a.row0 + blockIdx.z;  // the query row
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, q = lane % 4;
  const auto [t0, t1] = split_tiles(a, split);

  const RowSources sources = row_sources(a, b);
  const int32_t* idx = a.idx + b * a.n_idx;

  // The warp's Q fragments: heads h0 + g and h0 + g + 8, its 128 dims, as 8 k16 steps (A operand, row-major).
  uint32_t qa[kDimsPerWarp / 16][4];
  {
    const __nv_bfloat16* qb = static_cast<const __nv_bfloat16*>(a.q) + (b * a.heads + h0) * kD + warp * kDimsPerWarp;
#pragma unroll
    for (int s = 0; s < kDimsPerWarp / 16; ++s) {
      const __nv_bfloat16* p = qb + s * 16 + 2 * q;
      qa[s][0] = *reinterpret_cast<const uint32_t*>(p + g * kD);
      qa[s][1] = *reinterpret_cast<const uint32_t*>(p + (g + 8) * kD);
      qa[s][2] = *reinterpret_cast<const uint32_t*>(p + g * kD + 8);
      qa[s][3] = *reinterpret_cast<const uint32_t*>(p + (g + 8) * kD + 8);
    }
  }

  // Softmax state of head h0 + tid / 8, kept identical by the 8 lanes that own it.
  const int sm_head = tid / 8, sm_part = tid % 8;
  float m_run = -INFINITY, den = 0.f;
  float o[kDimsPerWarp / 8][4];
#pragma unroll
  for (int j = 0; j < kDimsPerWarp / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  for (int64_t t = t0; t < t1; ++t) {
    __syncthreads();  // the previous tile's readers of k_s, p_s and src_s are done
    if (tid < kKeys) {  // 1. where each key row lives (null: no row; a -1 entry is masked below)
      const int64_t col = t * kKeys + tid;
      const int64_t r = col < a.n_idx ? idx[col] : -1;
      src_s[tid] = sources(r);
      valid_s[tid] = r >= 0;  // an index >= 0 is a key even where it names no row
    }
    __syncthreads();
    request_rows<kThreads>(src_s, raw_s, tid);
    cp_async_wait_all();
    __syncthreads();
    widen_rows<kThreads>(raw_s, src_s, k_s, tid);  // 2.
    __syncthreads();
    // 3. partial scores of the warp's dims: 8 key groups of 8 x 8 k16 steps.
    {
      const int mi = lane / 8, ri = lane % 8;
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
        float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int s = 0; s < kDimsPerWarp / 16; s += 2) {
          uint32_t kb[4];  // keys 8j..8j+7, dims of steps s (kb[0], kb[1]) and s + 1 (kb[2], kb[3])
          ldmatrix_x4(kb, smem_addr(k_s + (8 * j + ri) * kKPitch + warp * kDimsPerWarp + s * 16 + mi * 8));
          mma_bf16_16x8x16(qa[s], kb[0], kb[1], c);
          mma_bf16_16x8x16(qa[s + 1], kb[2], kb[3], c);
        }
        float* sp = spart_s + (warp * kHeads + g) * kSPitch + 8 * j + 2 * q;
        *reinterpret_cast<float2*>(sp) = make_float2(c[0], c[1]);
        *reinterpret_cast<float2*>(sp + 8 * kSPitch) = make_float2(c[2], c[3]);
      }
    }
    __syncthreads();
    // 4. online softmax: thread owns head sm_head, keys 8 sm_part .. + 7.
    {
      float z[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int key = 8 * sm_part + i;
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) acc += spart_s[(w * kHeads + sm_head) * kSPitch + key];
        z[i] = valid_s[key] ? acc * a.scale : -INFINITY;
      }
      float m_new, alpha, psum;
      uint32_t pb[4];
      softmax_tile8(z, m_run, m_new, alpha, pb, psum);
      den = den * alpha + psum;
      m_run = m_new;
      *reinterpret_cast<uint4*>(p_s + sm_head * kPPitch + 8 * sm_part) = make_uint4(pb[0], pb[1], pb[2], pb[3]);
      if (sm_part == 0) alpha_s[sm_head] = alpha;
    }
    __syncthreads();
    // 5. O = alpha O + P V over the warp's 128 dims: 4 k16 steps over the keys x 16 dim groups of 8.
    {
      const float al = alpha_s[g], ah = alpha_s[g + 8];
#pragma unroll
      for (int j = 0; j < kDimsPerWarp / 8; ++j) o[j][0] *= al, o[j][1] *= al, o[j][2] *= ah, o[j][3] *= ah;
      const int mi = lane / 8, ri = lane % 8;
#pragma unroll
      for (int s = 0; s < kKeys / 16; ++s) {
        uint32_t pa[4];
        ldmatrix_x4(pa, smem_addr(p_s + (lane % 16) * kPPitch + s * 16 + (lane / 16) * 8));
#pragma unroll
        for (int j = 0; j < kDimsPerWarp / 8; j += 2) {
          uint32_t vb[4];  // keys 16s..16s+15; dims of groups j (vb[0], vb[1]) and j + 1 (vb[2], vb[3])
          ldmatrix_x4_trans(vb, smem_addr(k_s + (16 * s + (mi % 2) * 8 + ri) * kKPitch + warp * kDimsPerWarp +
                                          8 * j + (mi / 2) * 8));
          mma_bf16_16x8x16(pa, vb[0], vb[1], o[j]);
          mma_bf16_16x8x16(pa, vb[2], vb[3], o[j + 1]);
        }
      }
    }
  }

  // The split's unnormalised output and (running max, denominator) per head.
  float* po = a.part_o + ((b * a.splits + split) * a.heads + h0) * kD + warp * kDimsPerWarp;
#pragma unroll
  for (int j = 0; j < kDimsPerWarp / 8; ++j) {
    *reinterpret_cast<float2*>(po + g * kD + 8 * j + 2 * q) = make_float2(o[j][0], o[j][1]);
    *reinterpret_cast<float2*>(po + (g + 8) * kD + 8 * j + 2 * q) = make_float2(o[j][2], o[j][3]);
  }
  if (sm_part == 0) {
    float* ml = a.part_ml + ((b * a.splits + split) * a.heads + h0 + sm_head) * 2;
    ml[0] = m_run;
    ml[1] = den;
  }
}

// ==== All 64 heads per block (heads a multiple of 64: Flash 64, Pro 128) =============================================
// The kernel above reads and widens every key row once per 16-head group, and waits for each tile's rows before any
// work. Here a block of 16 warps takes 64 heads: each tile's rows are read and widened once, the next tile's raw rows
// are in flight (cp.async) while the current one is multiplied, and Q stays in shared memory. Per tile:
//   1. widen the raw rows to bf16 (all threads); the next tile's sources worked out;
//   2. the next tile's raw rows requested;
//   3. S = Q K^T: warp w takes heads 16 (w % 4) .. + 15 and keys 16 (w / 4) .. + 15 over all 512 dims (fp32 sums);
//   4. the online softmax (warp w: heads 4w .. 4w + 3), the same arithmetic as the kernel above;
//   5. O = alpha O + P V: warp w owns all 64 heads x dims 32w .. 32w + 31 (each V element read by one warp).
// The index lists are read a tile ahead of the rows they name.
// Numerics: those of the kernel above except the fp32 order of a score's 512-term sum (one accumulator here).
constexpr int kHeads64 = 64;
constexpr int kWarps64 = 16, kThreads64 = 32 * kWarps64;
constexpr int kSPitch64 = kKeys + 4;  // f32 per score row
constexpr int kQBytes64 = kHeads64 * kKPitch * 2;
constexpr int kKAt64 = kQBytes64;
constexpr int kRawAt64 = kKAt64 + kKeys * kKPitch * 2;
constexpr int kSAt64 = kRawAt64 + kRawBytes;
constexpr int kPAt64 = kSAt64 + kHeads64 * kSPitch64 * 4;
constexpr int kSrcAt64 = kPAt64 + kHeads64 * kPPitch * 2;     // const unsigned char* [2][64]
constexpr int kValidAt64 = kSrcAt64 + 2 * kKeys * 8;          // int [2][64]
constexpr int kStateAt64 = kValidAt64 + 2 * kKeys * 4;        // float [3][64]: running max, denominator, alpha
constexpr int kSmemBytes64 = kStateAt64 + 3 * kHeads64 * 4;

__global__ void __launch_bounds__(kThreads64, 1) sparse_mla_decode64_kernel(const SparseMlaDecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(smem + kKAt64);
  unsigned char* raw_s = smem + kRawAt64;
  float* s_s = reinterpret_cast<float*>(smem + kSAt64);
  __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(smem + kPAt64);
  const unsigned char** src_s = reinterpret_cast<const unsigned char**>(smem + kSrcAt64);
  int* valid_s = reinterpret_cast<int*>(smem + kValidAt64);
  float* m_s = reinterpret_cast<float*>(smem + kStateAt64);
  float* den_s = m_s + kHeads64;
  float* alpha_s = den_s + kHeads64;

  const int split = blockIdx.x, h0 = blockIdx.y * kHeads64;
  const int64_t b = a.row0 + blockIdx.z;  // the query row
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, q = lane % 4;
  const int hw = 16 * (warp % 4);  // the warp's heads (within the block) for S
  const auto [t0, t1] = split_tiles(a, split);

  const RowSources row_of = row_sources(a, b);
  const int32_t* idx = a.idx + b * a.n_idx;

  // The index of key tid of tile t (threads < 64; -1 past the run or the list), read a tile before its rows are
  // requested so that its latency hides behind a tile's work; sources() turns it into the row's address.
  auto idx_of = [&](int64_t t) -> int32_t {
    const int64_t col = t * kKeys + tid;
    return tid < kKeys && t < t1 && col < a.n_idx ? idx[col] : -1;
  };
  auto sources = [&](int64_t r, int buf) {
    if (tid < kKeys) {
      src_s[buf * kKeys + tid] = row_of(r);
      valid_s[buf * kKeys + tid] = r >= 0;  // an index >= 0 is a key even where it names no row
    }
  };
  auto request = [&](int buf) {
    request_rows<kThreads64>(src_s + buf * kKeys, raw_s, tid);
    cp_async_commit();
  };

  // Q of the block's 64 heads (64 KB) and the first tile's rows, in flight together.
  {
    const unsigned char* qg = static_cast<const unsigned char*>(a.q) + (b * a.heads + h0) * kD * 2;
    for (int c = tid; c < kHeads64 * (kD / 8); c += kThreads64) {
      const int h = c / (kD / 8), piece = c % (kD / 8);
      cp_async16(smem_addr(q_s + h * kKPitch + piece * 8), qg + (h * kD + piece * 8) * 2);
    }
  }
  if (tid < kHeads64) m_s[tid] = -INFINITY, den_s[tid] = 0.f;
  if (t0 < t1) sources(idx_of(t0), 0);
  int32_t idx_next = idx_of(t0 + 1);
  __syncthreads();
  if (t0 < t1) request(0);
  cp_async_wait_all();
  __syncthreads();

  float o[4][4][4];  // [m-tile: heads 16 mt + g (+8)][dims 32 warp + 8 j + 2q (+1)]
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
  const int mi = lane / 8, ri = lane % 8;
  int buf = 0;
  for (int64_t t = t0; t < t1; ++t, buf ^= 1) {
    // 1. widen tile t (its raw rows are in raw_s); the next tile's sources
    widen_rows<kThreads64>(raw_s, src_s + buf * kKeys, k_s, tid);
    if (t + 1 < t1) sources(idx_next, buf ^ 1);
    idx_next = idx_of(t + 2);
    __syncthreads();
    // 2. the next tile's raw rows, while this one is multiplied
    if (t + 1 < t1) request(buf ^ 1);
    // 3. S for heads hw.., keys 16 (warp / 4) .. + 15
    {
      const int key0 = 16 * (warp / 4);
      float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll 4
      for (int s = 0; s < kD / 16; ++s) {
        uint32_t qa[4], kb[4];
        ldmatrix_x4(qa, smem_addr(q_s + (hw + (lane % 16)) * kKPitch + s * 16 + (lane / 16) * 8));
        // matrices: keys 0-7 / dims 0-7, keys 0-7 / dims 8-15, keys 8-15 / dims 0-7, keys 8-15 / dims 8-15
        ldmatrix_x4(kb, smem_addr(k_s + (key0 + (mi / 2) * 8 + ri) * kKPitch + s * 16 + (mi % 2) * 8));
        mma_bf16_16x8x16(qa, kb[0], kb[1], c[0]);
        mma_bf16_16x8x16(qa, kb[2], kb[3], c[1]);
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        float* sp = s_s + (hw + g) * kSPitch64 + key0 + 8 * nt + 2 * q;
        *reinterpret_cast<float2*>(sp) = make_float2(c[nt][0], c[nt][1]);
        *reinterpret_cast<float2*>(sp + 8 * kSPitch64) = make_float2(c[nt][2], c[nt][3]);
      }
    }
    __syncthreads();
    // 4. online softmax: lane owns head 4 warp + lane / 8, keys 8 (lane % 8) .. + 7
    {
      const int head = 4 * warp + lane / 8, part = lane % 8;
      const int* valid = valid_s + buf * kKeys;
      float z[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int key = 8 * part + i;
        z[i] = valid[key] ? s_s[head * kSPitch64 + key] * a.scale : -INFINITY;
      }
      float m_new, alpha, psum;
      uint32_t pb[4];
      softmax_tile8(z, m_s[head], m_new, alpha, pb, psum);
      *reinterpret_cast<uint4*>(p_s + head * kPPitch + 8 * part) = make_uint4(pb[0], pb[1], pb[2], pb[3]);
      __syncwarp();  // every lane has read m_s[head] before lane 8x writes it
      if (part == 0) {
        den_s[head] = den_s[head] * alpha + psum;
        m_s[head] = m_new;
        alpha_s[head] = alpha;
      }
    }
    __syncthreads();
    // 5. O = alpha O + P V over all 64 heads and the warp's 32 dims: 4 k16 steps over the keys (P read once per
    // warp, each V element by one warp)
    {
      const int d0 = 32 * warp;
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const float al = alpha_s[16 * mt + g], ah = alpha_s[16 * mt + g + 8];
#pragma unroll
        for (int j = 0; j < 4; ++j) o[mt][j][0] *= al, o[mt][j][1] *= al, o[mt][j][2] *= ah, o[mt][j][3] *= ah;
      }
#pragma unroll
      for (int s = 0; s < kKeys / 16; ++s) {
        uint32_t vb[2][4];  // keys 16s..16s+15; dims of groups 2jj (vb[jj][0..1]) and 2jj + 1 (vb[jj][2..3])
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
          ldmatrix_x4_trans(vb[jj],
                            smem_addr(k_s + (16 * s + (mi % 2) * 8 + ri) * kKPitch + d0 + 16 * jj + (mi / 2) * 8));
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          uint32_t pa[4];
          ldmatrix_x4(pa, smem_addr(p_s + (16 * mt + (lane % 16)) * kPPitch + s * 16 + (lane / 16) * 8));
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            mma_bf16_16x8x16(pa, vb[jj][0], vb[jj][1], o[mt][2 * jj]);
            mma_bf16_16x8x16(pa, vb[jj][2], vb[jj][3], o[mt][2 * jj + 1]);
          }
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();  // k_s and p_s read; the next tile's raw rows have landed
  }

  // The split's unnormalised output and (running max, denominator) per head.
  float* po = a.part_o + ((b * a.splits + split) * a.heads + h0) * kD + 32 * warp;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      *reinterpret_cast<float2*>(po + (16 * mt + g) * kD + 8 * j + 2 * q) = make_float2(o[mt][j][0], o[mt][j][1]);
      *reinterpret_cast<float2*>(po + (16 * mt + g + 8) * kD + 8 * j + 2 * q) = make_float2(o[mt][j][2], o[mt][j][3]);
    }
  if (tid < kHeads64) {
    float* ml = a.part_ml + ((b * a.splits + split) * a.heads + h0 + tid) * 2;
    ml[0] = m_s[tid];
    ml[1] = den_s[tid];
  }
}

// out[b, h] = bf16(sum_s O_s w_s / (sum_s den_s w_s + exp(sink_h - M))), w_s = exp(m_s - M), M the largest m_s
// (0 where every key was masked: the output is then 0, as the reference's 0 / inf).
__global__ void __launch_bounds__(128) sparse_mla_combine_kernel(const SparseMlaDecodeArgs a) {
  const int64_t h = blockIdx.x, b = a.row0 + blockIdx.y;
  const float* ml = a.part_ml + (b * a.splits * a.heads + h) * 2;
  float mx = -INFINITY;
  for (int s = 0; s < a.splits; ++s) mx = fmaxf(mx, ml[s * a.heads * 2]);
  const float m_safe = isfinite(mx) ? mx : 0.f;
  float den = 0.f;
  for (int s = 0; s < a.splits; ++s) den += ml[s * a.heads * 2 + 1] * expf(ml[s * a.heads * 2] - m_safe);
  den += expf(a.sink[h] - mx);
  for (int d = threadIdx.x * 4; d < kD; d += blockDim.x * 4) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < a.splits; ++s) {
      const float w = expf(ml[s * a.heads * 2] - m_safe);
      const float4 v = *reinterpret_cast<const float4*>(a.part_o + ((b * a.splits + s) * a.heads + h) * kD + d);
      acc.x += v.x * w, acc.y += v.y * w, acc.z += v.z * w, acc.w += v.w * w;
    }
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(a.out) + (b * a.heads + h) * kD + d;
    *reinterpret_cast<uint2*>(out) = make_uint2(pack_bf16x2(acc.x / den, acc.y / den), pack_bf16x2(acc.z / den, acc.w / den));
  }
}

// Which kernel takes the heads: wgmma (64 heads a block, two warpgroups, sm_90a) by default where heads are a multiple
// of 64, the 64-head mma.sync kernel on other GPUs, the 16-head one otherwise. DSV4_FFI_SPARSE_DECODE=16 | mma64 |
// wgmma | wgmma4 (four warpgroups) picks one where it applies (an A/B knob, read at every launch).
enum class SparseKernel { k16, kMma64, kWgmma, kWgmma4 };

SparseKernel sparse_kernel(int64_t heads) {
  if (heads % kHeads64 != 0) return SparseKernel::k16;
  const char* v = std::getenv("DSV4_FFI_SPARSE_DECODE");
  if (v != nullptr && std::strcmp(v, "16") == 0) return SparseKernel::k16;
  if (v != nullptr && std::strcmp(v, "mma64") == 0) return SparseKernel::kMma64;
  int major = 0, minor = 0, sms = 0;
  device_info(&major, &minor, &sms);
  if (major != 9) return SparseKernel::kMma64;
  return v != nullptr && std::strcmp(v, "wgmma4") == 0 ? SparseKernel::kWgmma4 : SparseKernel::kWgmma;
}

}  // namespace

cudaError_t launch_sparse_mla_decode(const SparseMlaDecodeArgs& a, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  const SparseKernel which = sparse_kernel(a.heads);
  if (a.q_per_src < 1 || a.batch % a.q_per_src != 0) return cudaErrorInvalidValue;
  if (which != SparseKernel::kWgmma && which != SparseKernel::kWgmma4) {  // (the wgmma launcher opts in for itself)
    const bool wide = which == SparseKernel::kMma64;
    const void* kernel = wide ? reinterpret_cast<const void*>(sparse_mla_decode64_kernel)
                              : reinterpret_cast<const void*>(sparse_mla_decode_kernel);
    cudaError_t err = cudaSuccess;
    const int limit = dynamic_smem_limit(kernel, &err);  // (opted in, per device)
    if (limit < 0) return err;
    if ((wide ? kSmemBytes64 : kSmemBytes) > limit) return cudaErrorInvalidValue;
  }
  constexpr int64_t kMaxGridRows = 65535;  // gridDim.y / z
  for (int64_t r0 = 0; r0 < a.batch; r0 += kMaxGridRows) {
    SparseMlaDecodeArgs c = a;
    c.row0 = r0;
    const unsigned rows = static_cast<unsigned>(a.batch - r0 < kMaxGridRows ? a.batch - r0 : kMaxGridRows);
    if (which == SparseKernel::kWgmma || which == SparseKernel::kWgmma4) {
      const int warpgroups = which == SparseKernel::kWgmma4 ? 4 : 2;
      if (const cudaError_t e = launch_sparse_mla_decode_wgmma(c, rows, warpgroups, stream); e != cudaSuccess) return e;
    } else if (which == SparseKernel::kMma64) {
      const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.heads / kHeads64), rows);
      sparse_mla_decode64_kernel<<<grid, kThreads64, kSmemBytes64, stream>>>(c);
    } else {
      const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.heads / kHeads), rows);
      sparse_mla_decode_kernel<<<grid, kThreads, kSmemBytes, stream>>>(c);
    }
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    sparse_mla_combine_kernel<<<dim3(static_cast<unsigned>(a.heads), rows), 128, 0, stream>>>(c);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace dsv4ffi
