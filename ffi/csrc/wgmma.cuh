// The SM90 warpgroup MMA pieces our kernels share (wgmma with the A operand in registers, B in shared memory without
// swizzle): the instruction guard, fences, and the shared-memory matrix descriptor.
#pragma once
#include <cstdint>

#include "cp_async.cuh"  // smem_addr

namespace dsv4ffi {

// wgmma exists on sm_90a only: other targets (an sm_100a build) get traps, and the launchers never pick these
// kernels there.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSV4_WGMMA(...) asm volatile(__VA_ARGS__)
#else
#define DSV4_WGMMA(...) __trap()
#endif

__device__ __forceinline__ void wgmma_fence() { DSV4_WGMMA("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { DSV4_WGMMA("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { DSV4_WGMMA("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from moving reads or writes of an accumulator register across the asynchronous wgmma.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Descriptor of a K-major operand in shared memory without swizzle, made of 8-row x 16-byte core matrices: `lbo`
// bytes between core matrices adjacent in K, `sbo` bytes between those adjacent in M/N (PTX ISA, "matrix descriptor").
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_byte_addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((smem_byte_addr >> 4) & 0x3FFFu) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}

}  // namespace dsv4ffi
