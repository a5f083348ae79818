// Asynchronous global -> shared copies (cp.async, sm_80 and later) and the shared-memory address they take: what the
// kernels that stream rows through shared memory (the MXFP4 GEMVs, sparse-MLA decode, the wgmma kernels) share.
#pragma once
#include <cstdint>

namespace dsv4ffi {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 4 and 8 bytes through L1 (.ca: the only caching those sizes allow), 16 bytes around it (.cg).
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

// The same with the L2 fetching the whole 128-byte line: a warp reads 64 bytes of each of its rows per chunk, the
// next 64 one chunk later; one DRAM access for both (measured: the wgb kernel 4-9% faster).
__device__ __forceinline__ void cp_async16_l2line(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Commits what is pending and waits for all of it.
__device__ __forceinline__ void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait<0>();
}

}  // namespace dsv4ffi
