// Host helpers of our kernels' launchers: the device's properties, a kernel's shared-memory limit and occupancy, each
// looked up once and cached (none is a stream operation: safe under CUDA-graph capture).
#include <cuda_runtime.h>

#include <array>
#include <map>
#include <mutex>
#include <utility>

#include "kernels.h"

namespace dsv4ffi {

namespace {
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

}  // namespace dsv4ffi
