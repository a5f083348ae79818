// The stack position a kernel reads: the layer index XLA passes on the device ([1] int32, or null for an unstacked
// operand: 0), clamped to the stack as XLA clamps a dynamic index.
#pragma once
#include <cstdint>

namespace dsv4ffi {

static __device__ __forceinline__ int64_t device_layer(const int32_t* layer, int64_t layers) {
  if (layer == nullptr) return 0;
  const int64_t l = *layer;
  return l < 0 ? 0 : (l >= layers ? layers - 1 : l);
}

}  // namespace dsv4ffi
