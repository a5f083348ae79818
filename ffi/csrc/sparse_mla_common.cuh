// What the sparse-MLA decode kernels share (sparse_mla_kernels.cu: mma.sync; sparse_mla_wgmma_kernels.cu: wgmma): the
// packed row's layout (dsv4_jax.kv_format), where the key row an index names lives, and the raw rows' copy into
// shared memory.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "cp_async.cuh"
#include "fp8_convert.cuh"
#include "kernels.h"

namespace dsv4ffi {
namespace sparse_mla {

constexpr int kD = kSparseMlaDim;                   // 512 = 448 NoPE + 64 RoPE
constexpr int kNope = kSparseMlaNope;               // 448
constexpr int kRowBytes = kSparseMlaRowBytes;       // 584
constexpr int kScaleAt = kNope + 2 * (kD - kNope);  // 576: the 7 UE8M0 bytes
constexpr int kKeys = 64;                           // keys per tile
constexpr int kChunks = kRowBytes / 8;              // 73 eight-byte pieces per raw row

// UE8M0 byte -> 2^(b - 127) as dsv4_jax.quant.e8m0_to_f32 decodes it (0 -> 2^-127, 255 -> NaN).
// Selects, not branches: a branch per value kept the widening loops from batching their loads.
__device__ __forceinline__ float e8m0_to_f32(uint32_t b) {
  const int plain = b == 0u ? 0x00400000 : static_cast<int>(b << 23);
  return __int_as_float(b == 255u ? 0x7fc00000 : plain);
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Where the key row an index r names lives: the window ring (r < window), the cached compressed entries, this
// step's completed entries; null where it names no row (the reference gathers zeros there and still counts the key).
struct RowSources {
  const unsigned char *ring, *ent, *extra;
  int64_t window, cap, n_extra;
  __device__ __forceinline__ const unsigned char* operator()(int64_t r) const {
    if (r >= 0 && r < window) return ring + r * kRowBytes;
    if (r >= window && r - window < cap && ent) return ent + (r - window) * kRowBytes;
    if (r >= window + cap && r - window - cap < n_extra && extra) return extra + (r - window - cap) * kRowBytes;
    return nullptr;
  }
};

// The 64-key tiles [t0, t1) of the index list that split `split` takes: an even share of them (the last splits
// shorter or empty).
struct TileRange {
  int64_t t0, t1;
};
__device__ __forceinline__ TileRange split_tiles(const SparseMlaDecodeArgs& a, int split) {
  const int64_t n_tiles = (a.n_idx + kKeys - 1) / kKeys;
  const int64_t per_split = (n_tiles + a.splits - 1) / a.splits;
  const int64_t t0 = split * per_split;
  return {t0, t0 + per_split < n_tiles ? t0 + per_split : n_tiles};
}

// The sources of query row b's keys: those of batch row b / q_per_src.
__device__ __forceinline__ RowSources row_sources(const SparseMlaDecodeArgs& a, int64_t b) {
  const int64_t sb = b / a.q_per_src, layer = a.layer ? a.layer[0] : 0, src_batch = a.batch / a.q_per_src;
  return {a.ring + sb * a.window * kRowBytes,
          a.entries ? a.entries + (layer * src_batch + sb) * a.cap * kRowBytes : nullptr,
          a.extra ? a.extra + sb * a.n_extra * kRowBytes : nullptr,
          a.window,
          a.cap,
          a.n_extra};
}

// Values 8 piece .. 8 piece + 7 of a raw row as bf16: NoPE pieces (0..55) e4m3 x their tile's scale (exact: an e4m3
// value times a power of two has 4 significant bits), RoPE pieces (56..63) copied.
__device__ __forceinline__ uint4 widen_piece(const unsigned char* row, int piece) {
  if (piece * 8 < kNope) {
    const uint2 v = *reinterpret_cast<const uint2*>(row + piece * 8);
    const float sc = e8m0_to_f32(row[kScaleAt + piece / 8]);
    float f[8];
    e4m3x8_to_f32(v, f);
    return make_uint4(pack_bf16x2(f[0] * sc, f[1] * sc), pack_bf16x2(f[2] * sc, f[3] * sc),
                      pack_bf16x2(f[4] * sc, f[5] * sc), pack_bf16x2(f[6] * sc, f[7] * sc));
  }
  const uint2* v = reinterpret_cast<const uint2*>(row + kNope + (piece * 8 - kNope) * 2);
  const uint2 lo = v[0], hi = v[1];
  return make_uint4(lo.x, lo.y, hi.x, hi.y);
}

// A tile's 64 raw rows copied into raw_s (cp.async, 8-byte pieces; rows without a source are left as they are).
template <int NT>
__device__ __forceinline__ void request_rows(const unsigned char* const* srcs, unsigned char* raw_s, int tid) {
  for (int c = tid; c < kKeys * kChunks; c += NT) {
    const int row = c / kChunks, piece = c % kChunks;
    const unsigned char* src = srcs[row];
    if (src) cp_async8(smem_addr(raw_s + row * kRowBytes + piece * 8), src + piece * 8);
  }
}

}  // namespace sparse_mla
}  // namespace dsv4ffi
