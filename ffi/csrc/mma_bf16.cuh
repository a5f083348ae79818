// The bf16 tensor-core step shared by the attention-side kernels (sparse_mla_kernels.cu, indexer_kernels.cu).
#pragma once
#include <cstdint>

namespace dsv4ffi {

// c += a (16x16 bf16, row-major) x b (16x8 bf16, column-major: b0 = k 0..7, b1 = k 8..15), fp32 accumulation.
// Fragments as the PTX ISA lays them out for m16n8k16: lane (g = lane/4, q = lane%4) holds a rows g and g+8 at
// k = 2q, 2q+1 and 2q+8, 2q+9; b column g at the same k; c rows g and g+8, columns 2q and 2q+1.
__device__ __forceinline__ void mma_bf16_16x8x16(const uint32_t a[4], uint32_t b0, uint32_t b1, float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace dsv4ffi
