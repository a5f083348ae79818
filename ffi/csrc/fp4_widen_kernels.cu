// MXFP4 weights -> the FP8 weight format of the block-scaled GEMMs (the routed experts' prefill route; the reference
// is `dsv4_jax.quant.fp4_to_fp8_blocks`): per 128x128 tile, with m the largest UE8M0 scale byte of its 128 rows x 4
// blocks of 32,
//
//   q[g, n, k] = e4m3_rn(v[g, n, k] * 2^(s[g, n, k / 32] - m + 6))    sf[g, n / 128, k / 128] = 2^(m - 133)
//
// (v the e2m1 value; sf NaN when m = 255). For a 32-block with t = s - m + 6 >= -5 every v * 2^t is a normal e4m3:
// its byte is the e4m3 byte of v (a prmt table) with t added to the exponent field of the nonzero magnitudes (4 bytes
// at a time). Lower t (a tile spanning more than 11 binades; rare) takes the f32 route: v * 2^t built as the f32 with
// exponent field e + t, then cvt.rn, exact for t >= -8 and rounded below (to 0 under 2^-10), as the reference's
// convert does. A block of 256 threads takes TPB tiles along K: it loads every weight chunk of them first (16 bytes
// = one 32-block, 2 TPB per thread), then the scale words, the tiles' maxima, then converts and stores. Weights in
// the slab layout (kernels.h) are read from their slab positions; the output is the same.
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp4_slabs.cuh"
#include "fp8_convert.cuh"
#include "kernels.h"
#include "layer_index.cuh"

namespace dsv4ffi {
namespace {

constexpr int kTile = 128;
constexpr int kThreads = 256;
constexpr int kHeadroom = 6;  // quant.FP4_WIDEN_HEADROOM: the largest block times 2^6 (6 * 64 = 384 <= 448)

// The f32 of e2m1 code c (bit 3 the sign) times 2^t, for t >= -30 (every result a normal f32 or zero).
__device__ __forceinline__ float e2m1_times_pow2(uint32_t c, int t) {
  const uint32_t e = (c >> 1) & 3u, m = c & 1u;
  uint32_t bits;
  if (e == 0) {
    bits = m ? static_cast<uint32_t>(126 + t) << 23 : 0u;  // 0.5 * 2^t, or zero
  } else {
    bits = (static_cast<uint32_t>(e + 126 + t) << 23) | (m << 22);  // (1 + m/2) * 2^(e - 1 + t)
  }
  return __uint_as_float(bits | ((c & 8u) << 28));
}

// The 32 e4m3 bytes of one 32-block (16 packed bytes) times 2^t.
__device__ __forceinline__ void widen_block(const uint4 packed, int t, uint32_t out[8]) {
  const uint32_t in[4] = {packed.x, packed.y, packed.z, packed.w};
  if (t >= -5) {
    const uint32_t step = static_cast<uint32_t>((t < 0 ? -t : t) << 3) * 0x01010101u;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t v[2];
      e2m1x8_to_e4m3_lut(in[j], v[0], v[1]);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t nz = __vcmpne4(v[h] & 0x7F7F7F7Fu, 0u) & step;  // zeros keep their exponent field
        out[2 * j + h] = t < 0 ? __vsub4(v[h], nz) : __vadd4(v[h], nz);
      }
    }
    return;
  }
  const int tt = t < -30 ? -30 : t;  // below 2^-30 every value rounds to 0 in e4m3 either way
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // 4 packed bytes = 8 elements (element 2i = low nibble of byte i)
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t b = (in[j] >> (8 * i)) & 0xFF;
      const uint32_t pair = __nv_cvt_float2_to_fp8x2(
          make_float2(e2m1_times_pow2(b & 15u, tt), e2m1_times_pow2(b >> 4, tt)), __NV_SATFINITE, __NV_E4M3);
      if (i < 2) {
        lo |= pair << (16 * i);
      } else {
        hi |= pair << (16 * (i - 2));
      }
    }
    out[2 * j] = lo, out[2 * j + 1] = hi;
  }
}

template <int TPB>
__global__ void __launch_bounds__(kThreads) fp4_widen_kernel(const Fp4WidenArgs a) {
  __shared__ uint32_t words[TPB][kTile];  // row r's four scale bytes of each tile
  __shared__ int warp_max[kThreads / 32][TPB];
  const int tid = threadIdx.x;
  const int64_t g = blockIdx.z;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTile, k0 = static_cast<int64_t>(blockIdx.x) * TPB * kTile;
  const int64_t src_g = device_layer(a.layer, a.layers) * a.groups + g;
  const int64_t half_k = a.k / 2, sk = a.k / 32;
  // Every weight chunk first (they do not wait for the maxima): tile i, chunk c = row c / 4, block c % 4.
  uint4 packed[TPB][2];
#pragma unroll
  for (int i = 0; i < TPB; ++i)
#pragma unroll
    for (int step = 0; step < 2; ++step) {
      const int c = tid + step * kThreads;
      const int64_t row = src_g * a.n + n0 + c / 4, kb = (k0 + i * kTile) / 2 + c % 4 * 16;
      const uint8_t* src = a.w + (a.slabs ? slab_weight_offset(row, kb, a.k) : row * half_k + kb);
      packed[i][step] = __ldg(reinterpret_cast<const uint4*>(src));
    }
  int m[TPB];
#pragma unroll
  for (int i = 0; i < TPB; ++i) {
    m[i] = 0;
    if (tid < kTile) {
      const int64_t row = src_g * a.n + n0 + tid, chunk = (k0 + i * kTile) / kTile;
      const uint8_t* src = a.s + (a.slabs ? slab_scale_offset(row, chunk, a.k) : row * sk + chunk * 4);
      const uint32_t w = __ldg(reinterpret_cast<const uint32_t*>(src));
      words[i][tid] = w;
      m[i] = max(max(w & 0xFF, (w >> 8) & 0xFF), max((w >> 16) & 0xFF, w >> 24));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m[i] = max(m[i], __shfl_xor_sync(0xffffffffu, m[i], o));
    if (tid % 32 == 0) warp_max[tid / 32][i] = m[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < TPB; ++i) {
    m[i] = warp_max[0][i];
#pragma unroll
    for (int w = 1; w < kThreads / 32; ++w) m[i] = max(m[i], warp_max[w][i]);
#pragma unroll
    for (int step = 0; step < 2; ++step) {
      const int c = tid + step * kThreads, row = c / 4, blk = c % 4;
      const int byte = static_cast<int>((words[i][row] >> (8 * blk)) & 0xFF);
      uint32_t out[8];
      widen_block(packed[i][step], byte - m[i] + kHeadroom, out);
      uint4* dst = reinterpret_cast<uint4*>(a.q + (g * a.n + n0 + row) * a.k + k0 + i * kTile + blk * 32);
      dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
      dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
    }
    if (tid == 0) {
      const float sf = m[i] == 255 ? __uint_as_float(0x7FC00000u) : ldexpf(1.f, m[i] - 127 - kHeadroom);
      a.sf[(g * (a.n / kTile) + blockIdx.y) * (a.k / kTile) + blockIdx.x * TPB + i] = sf;
    }
  }
}

}  // namespace

cudaError_t launch_fp4_widen(const Fp4WidenArgs& a, cudaStream_t stream) {
  if (a.groups == 0) return cudaSuccess;
  const int64_t tiles_k = a.k / kTile;
  const bool four = tiles_k % 4 == 0;  // 4 tiles per block where K allows: more bytes in flight per thread
  const dim3 grid(static_cast<unsigned>(four ? tiles_k / 4 : tiles_k), static_cast<unsigned>(a.n / kTile),
                  static_cast<unsigned>(a.groups));
  if (four) {
    fp4_widen_kernel<4><<<grid, kThreads, 0, stream>>>(a);
  } else {
    fp4_widen_kernel<1><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace dsv4ffi
