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

// Four 8 x 8 b16 matrices from shared memory (lanes 8i..8i+7 give matrix i's row addresses): lane l receives word
// l % 4 of row l / 4 of matrix i in r[i]. With 16-byte e4m3 rows: a wgmma A fragment's four registers.
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t r[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d (+)= A . B for one k32 step: A = the lane's 4 registers, B through the shared-memory descriptor (8 columns).
__device__ __forceinline__ void wgmma_m64n8k32(float d[4], const uint32_t a[4], uint64_t desc, int accumulate) {
  DSV4_WGMMA(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

// Shared-memory descriptor of a K-major 8 x 32 B tile made of two 128-byte core matrices 128 bytes apart (both the
// leading and the stride byte offset are set to 128: with 8 columns only the K direction has a second core matrix).
__device__ __forceinline__ uint64_t wg_desc(uint32_t smem_byte_addr) { return wgmma_desc(smem_byte_addr, 128, 128); }

}  // namespace dsv4ffi
