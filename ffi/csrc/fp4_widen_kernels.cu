// MXFP4 weights -> the FP8 weight format of the block-scaled GEMMs (the routed experts' prefill route; the reference
// is `dsv4_jax.quant.fp4_to_fp8_blocks`): per 128x128 tile, with m the largest UE8M0 scale byte of its 128 rows x 4
// blocks of 32,
//
//   q[g, n, k] = e4m3_rn(v[g, n, k] * 2^(s[g, n, k / 32] - m + 6))    sf[g, n / 128, k / 128] = 2^(m - 133)
//
// (v the e2m1 value; sf NaN when m = 255). v * 2^t is built as the f32 with exponent field e + t (no multiply), and
// for t >= -8 it is exact in e4m3; lower, cvt.rn rounds it (to 0 below 2^-10), as the reference's convert does.
// One block of 256 threads per tile: each thread loads two 16-byte weight chunks (one 32-block each) and, for 128 of
// them, a row's scale word; a block max; then the conversion.
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

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

__global__ void __launch_bounds__(kThreads) fp4_widen_kernel(const Fp4WidenArgs a) {
  __shared__ uint32_t words[kTile];  // row r's four scale bytes of this tile
  __shared__ int warp_max[kThreads / 32];
  const int tid = threadIdx.x;
  const int64_t g = blockIdx.z;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTile, k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t src_g = device_layer(a.layer, a.layers) * a.groups + g;
  const int64_t half_k = a.k / 2, sk = a.k / 32;
  // The weight loads first: they do not wait for the tile's largest scale.
  uint4 packed[2];
#pragma unroll
  for (int step = 0; step < 2; ++step) {
    const int c = tid + step * kThreads;  // 128 rows x 4 blocks of 16 packed bytes: two per thread
    const uint8_t* src = a.w + (src_g * a.n + n0 + c / 4) * half_k + k0 / 2 + c % 4 * 16;
    packed[step] = __ldg(reinterpret_cast<const uint4*>(src));
  }
  int m = 0;
  if (tid < kTile) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(a.s + (src_g * a.n + n0 + tid) * sk + k0 / 32);
    words[tid] = w;
    m = max(max(w & 0xFF, (w >> 8) & 0xFF), max((w >> 16) & 0xFF, w >> 24));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (tid % 32 == 0) warp_max[tid / 32] = m;
  __syncthreads();
  m = warp_max[0];
#pragma unroll
  for (int i = 1; i < kThreads / 32; ++i) m = max(m, warp_max[i]);

#pragma unroll
  for (int step = 0; step < 2; ++step) {
    const int c = tid + step * kThreads, row = c / 4, blk = c % 4;
    const int byte = static_cast<int>((words[row] >> (8 * blk)) & 0xFF);
    const int t = max(byte - m + kHeadroom, -30);  // below 2^-30 every value rounds to 0 in e4m3 either way
    const uint32_t in[4] = {packed[step].x, packed[step].y, packed[step].z, packed[step].w};
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // 4 packed bytes = 8 elements (element 2i = low nibble of byte i) -> 8 e4m3 bytes
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t b = (in[j] >> (8 * i)) & 0xFF;
        const uint32_t pair = __nv_cvt_float2_to_fp8x2(
            make_float2(e2m1_times_pow2(b & 15u, t), e2m1_times_pow2(b >> 4, t)), __NV_SATFINITE, __NV_E4M3);
        if (i < 2) {
          lo |= pair << (16 * i);
        } else {
          hi |= pair << (16 * (i - 2));
        }
      }
      out[2 * j] = lo, out[2 * j + 1] = hi;
    }
    uint4* dst = reinterpret_cast<uint4*>(a.q + (g * a.n + n0 + row) * a.k + k0 + blk * 32);
    dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
    dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
  }
  if (tid == 0) {
    const float sf = m == 255 ? __uint_as_float(0x7FC00000u) : ldexpf(1.f, m - 127 - kHeadroom);
    a.sf[(g * (a.n / kTile) + blockIdx.y) * (a.k / kTile) + blockIdx.x] = sf;
  }
}

}  // namespace

cudaError_t launch_fp4_widen(const Fp4WidenArgs& a, cudaStream_t stream) {
  if (a.groups == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(a.k / kTile), static_cast<unsigned>(a.n / kTile),
                  static_cast<unsigned>(a.groups));
  fp4_widen_kernel<<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace dsv4ffi
