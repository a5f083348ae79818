// One ahead-of-time instantiation of the SM90 FP8 block-scaled GEMM (1D2D: per-(row, 128 K) FP32 activation
// scales, per-(128 N x 128 K) FP32 weight scales, BF16 output) and its launch configuration.
#pragma once
#include <cstdint>

namespace dsv4ffi {

// kLayer: the m-grouped contiguous layout (a group index per row) over a layer stack, every row in one layer
// (dsv4_fp8_gemv_layer's gemm route).
enum GemmKind : int { kDense = 0, kContigPsum = 1, kMasked = 2, kLayer = 3 };

struct GemmEntry {
  int kind;
  uint32_t n, k, g;
  uint32_t block_m, block_n, stages, math_threads, tma_threads, swizzle_d, smem, num_sms;
  uint32_t multicast;  // 1, or 2: clusters of 2 CTAs share each B tile (TMA multicast)
  const char* name;
  const void* kernel;  // host stub of the __global__ template instance
};

extern const GemmEntry* const kGemmTable[];
extern const int kGemmTableSize;

}  // namespace dsv4ffi
