// The SM90 warpgroup MMA pieces our kernels share: the instruction guard, fences, and the shared-memory matrix
// descriptors (core matrices without swizzle; 128-byte-swizzled K-major rows).
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

// Descriptor of a K-major operand in 128-byte-swizzled rows (as TMA's 128-byte swizzle writes them: 16-byte piece c
// of row r at piece c ^ (r % 8), 1 KB atoms): 8-row groups 1 KB apart. A k-step inside the 128-byte row is the start
// address plus its byte offset.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem_byte_addr) {
  return static_cast<uint64_t>((smem_byte_addr >> 4) & 0x3FFFu) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (1ull << 62);
}

}  // namespace dsv4ffi
