// Host side of the SM90 FP8 GEMMs: instantiation lookup, device checks, TMA descriptors, launch on XLA's stream.
// Our own code; the kernel templates it launches come from the pinned sgl-deep-gemm==0.2.5 headers.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "kernels.h"

namespace dsv4ffi {
namespace {

}  // namespace

bool tma_multicast_enabled() {
  // Opt-in (DSV4_FFI_TMA_MULTICAST=1): measured mixed on H100 (BENCHMARKS.md), and a tiny-config forward hung with
  // it. Read on every lookup (not cached) so that tests and benchmarks can compare both variants in one process.
  const char* v = std::getenv("DSV4_FFI_TMA_MULTICAST");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

const GemmEntry* find_gemm(int kind, uint32_t n, uint32_t k, uint32_t g, uint32_t block_m) {
  const GemmEntry* plain = nullptr;
  const GemmEntry* shared_b = nullptr;
  for (int i = 0; i < kGemmTableSize; ++i) {
    const GemmEntry* e = kGemmTable[i];
    if (e->kind == kind && e->n == n && e->k == k && e->g == g && e->block_m == block_m)
      (e->multicast > 1 ? shared_b : plain) = e;
  }
  return shared_b != nullptr && tma_multicast_enabled() ? shared_b : plain;
}

std::string launch_gemm(const GemmEntry& e, const GemmArgs& a, cudaStream_t stream) {
  int major, minor, sms;
  device_info(&major, &minor, &sms);
  if (major != 9)
    return "the FP8 GEMM kernels are built for SM90 (sm_90a) only; this device is sm_" + std::to_string(major) +
           std::to_string(minor) + " (Blackwell kernels are not built in this version)";
  if (e.num_sms % e.multicast != 0) return std::string("instantiation ") + e.name + ": SM count not a multiple of the cluster";
  if (static_cast<uint32_t>(sms) != e.num_sms)
    return std::string("instantiation ") + e.name + " assumes " + std::to_string(e.num_sms) +
           " SMs but the device has " + std::to_string(sms) + "; rebuild with gen_instantiations.py --num-sms " +
           std::to_string(sms);
  // Raise the dynamic shared-memory limit once per (kernel, device); not a stream operation, capture-safe.
  {
    static std::mutex mu;
    static std::set<std::pair<const void*, int>> done;
    int dev = 0;
    cudaGetDevice(&dev);
    std::lock_guard<std::mutex> lock(mu);
    if (done.insert({e.kernel, dev}).second) {
      if (cudaFuncSetAttribute(e.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(e.smem)) != cudaSuccess) {
        done.erase({e.kernel, dev});
        return std::string("cudaFuncSetAttribute failed for ") + e.name + ": " + cudaGetErrorString(cudaGetLastError());
      }
    }
  }
  CUtensorMap ta, tb, td, tsfa;
  std::string err;
  const uint32_t swz_d = e.swizzle_d;
  const uint32_t d_box_n = swz_d == 0 ? e.block_n : swz_d / 2;
  if (!(err = make_tma_2d(&ta, CU_TENSOR_MAP_DATA_TYPE_UINT8, a.a, e.k, a.a_rows, e.k, 128, e.block_m, 128, "A"))
           .empty())
    return err;
  const uint64_t b_groups = a.b_groups != 0 ? a.b_groups : e.g;
  if (!(err = make_tma_2d(&tb, CU_TENSOR_MAP_DATA_TYPE_UINT8, a.b, e.k, uint64_t(e.n) * b_groups, e.k, 128, e.block_n,
                          128, "B")).empty())
    return err;
  if (!(err = make_tma_2d(&td, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, a.d, e.n, a.a_rows, uint64_t(e.n) * 2, d_box_n,
                          e.block_m, swz_d, "D")).empty())
    return err;
  if (!(err = make_tma_2d(&tsfa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, a.sfa, a.sf_pitch, uint64_t(e.k / 128) * a.sf_groups,
                          a.sf_pitch * 4, e.block_m, 1, 0, "SFA")).empty())
    return err;
  float* sfb = const_cast<float*>(a.sfb);
  int* layout = const_cast<int*>(reinterpret_cast<const int*>(a.layout));
  uint32_t m = a.shape_m, n = e.n, k = e.k;
  void* args[] = {&sfb, &layout, &m, &n, &k, &ta, &tb, &td, &tsfa};
  cudaLaunchConfig_t cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.gridDim = dim3(e.num_sms);
  cfg.blockDim = dim3(e.tma_threads + e.math_threads);
  cfg.dynamicSmemBytes = e.smem;
  cfg.stream = stream;
  cudaLaunchAttribute cluster[1];
  if (e.multicast > 1) {
    cluster[0].id = cudaLaunchAttributeClusterDimension;
    cluster[0].val.clusterDim.x = e.multicast;
    cluster[0].val.clusterDim.y = 1;
    cluster[0].val.clusterDim.z = 1;
    cfg.attrs = cluster;
    cfg.numAttrs = 1;
  }
  if (cudaLaunchKernelExC(&cfg, e.kernel, args) != cudaSuccess)
    return std::string("launch of ") + e.name + " failed: " + cudaGetErrorString(cudaGetLastError());
  return "";
}

}  // namespace dsv4ffi
