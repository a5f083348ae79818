// What every XLA FFI handler file of the extension shares: shape helpers, the error constructors, the binding macros.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Every handler is declared command-buffer compatible and takes XLA's CUDA stream first.
#define DSV4_TRAITS {ffi::Traits::kCmdBufferCompatible}
#define STREAM Ctx<ffi::PlatformStream<cudaStream_t>>()

namespace dsv4ffi {

template <typename B>
inline int64_t dim(const B& b, int i) {
  auto d = b.dimensions();
  return d[i < 0 ? d.size() + i : i];
}

template <typename B>
inline std::string shape_str(const B& b) {
  std::string s = "[";
  auto d = b.dimensions();
  for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + std::to_string(d[i]);
  return s + "]";
}

inline ffi::Error bad(const std::string& op, const std::string& msg) { return ffi::Error::InvalidArgument(op + ": " + msg); }

inline ffi::Error cuda_check(const std::string& op, cudaError_t e) {
  if (e == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(op + ": CUDA error " + cudaGetErrorString(e));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline bool is_e4m3(const ffi::AnyBuffer& b) { return b.element_type() == ffi::DataType::F8E4M3FN; }

}  // namespace dsv4ffi
