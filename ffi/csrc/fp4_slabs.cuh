// Byte offsets in the slab layout of MXFP4 expert weights (kernels.h, kFp4SlabRows; `quant.fp4_to_slabs`), shared
// by the decode kernels and the prefill widening.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace dsv4ffi {

// Packed byte kb of weight row `row` (counted over all groups: g * n + r), for a weight of K = k.
__device__ __forceinline__ int64_t slab_weight_offset(int64_t row, int64_t kb, int64_t k) {
  return ((row / kFp4SlabRows) * (k / 128) + kb / 64) * (kFp4SlabRows * 64) + (row % kFp4SlabRows) * 64 + kb % 64;
}

// The scale word (4 UE8M0 bytes) of row `row`'s 128-wide K chunk c.
__device__ __forceinline__ int64_t slab_scale_offset(int64_t row, int64_t c, int64_t k) {
  return (((row / kFp4SlabRows) * (k / 128) + c) * kFp4SlabRows + row % kFp4SlabRows) * 4;
}

}  // namespace dsv4ffi
