// Host helpers of our kernels' launchers: the device's properties, a kernel's shared-memory limit and occupancy, each
// looked up once and cached (none is a stream operation: safe under CUDA-graph capture).
#include <cuda.h>
#include <cuda_runtime.h>

#include <array>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "kernels.h"

namespace dsv4ffi {

namespace {
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_fn() {
  static EncodeTiledFn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<EncodeTiledFn>(p);
  }();
  return fn;
}

CUtensorMapSwizzle swizzle_of(uint32_t bytes) {
  switch (bytes) {
    case 128: return CU_TENSOR_MAP_SWIZZLE_128B;
    case 64: return CU_TENSOR_MAP_SWIZZLE_64B;
    case 32: return CU_TENSOR_MAP_SWIZZLE_32B;
    default: return CU_TENSOR_MAP_SWIZZLE_NONE;
  }
}

struct DevInfo {
  int major = -1, minor = -1, sms = -1;
};
}  // namespace

void device_info(int* major, int* minor, int* sms) {
  static std::array<DevInfo, 64> cache;
  static std::mutex mu;
  int dev = 0;
  cudaGetDevice(&dev);
  std::lock_guard<std::mutex> lock(mu);
  DevInfo& d = cache[dev % 64];
  if (d.major < 0) {
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev);
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
  }
  *major = d.major, *minor = d.minor, *sms = d.sms;
}

int dynamic_smem_limit(const void* kernel, cudaError_t* err) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> limits;
  int dev = 0;
  cudaGetDevice(&dev);
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = limits.find({kernel, dev}); it != limits.end()) return it->second;
  int optin = 0;
  cudaFuncAttributes attr{};
  if ((*err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess ||
      (*err = cudaFuncGetAttributes(&attr, kernel)) != cudaSuccess)
    return -1;
  const int limit = optin - static_cast<int>(attr.sharedSizeBytes);
  if ((*err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit)) != cudaSuccess)
    return -1;
  limits[{kernel, dev}] = limit;
  return limit;
}

int resident_blocks(const void* kernel, int threads, size_t smem) {
  static std::mutex mu;
  static std::map<std::pair<const void*, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache.find({kernel, smem}); it != cache.end()) return it->second;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) != cudaSuccess || n < 1) n = 1;
  cache[{kernel, smem}] = n;
  return n;
}

// A 2-D row-major tensor [outer, inner] with `outer_stride` bytes between rows, read in boxes [box_outer, box_inner].
std::string make_tma_2d(CUtensorMap* m, CUtensorMapDataType dt, const void* base, uint64_t inner, uint64_t outer,
                    uint64_t outer_stride, uint32_t box_inner, uint32_t box_outer, uint32_t swizzle,
                    const char* what) {
  auto fn = encode_fn();
  if (fn == nullptr) return "cuTensorMapEncodeTiled is unavailable (driver too old?)";
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {outer_stride};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult r = fn(m, dt, 2, const_cast<void*>(base), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        swizzle_of(swizzle), CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return std::string("cuTensorMapEncodeTiled failed for ") + what + " (CUresult " + std::to_string(int(r)) +
           "; base " + std::to_string(reinterpret_cast<uintptr_t>(base)) + ", dims " + std::to_string(inner) + "x" +
           std::to_string(outer) + ", stride " + std::to_string(outer_stride) + ")";
  return "";
}


}  // namespace dsv4ffi
