// Developer tool, not part of the extension build: instruction throughput per SM (warps/SM resident, independent
// chains), warp instructions per clock per SM. nvcc -O3 -arch=sm_90a ffi/csrc/pipes_bench.cu -o /tmp/pipes
// (H200: PRMT/LOP3/SHF/IMAD ~2, F2FP.F16.E4M3 ~1, HMMA.16816 ~0.67; the e4m3 mma.sync is F2FP + HMMA).
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>

constexpr int kIters = 4096;

#define KERNEL(NAME, BODY)                                                                     \
  __global__ void NAME(uint32_t* out, long long* cyc, uint32_t seed) {                        \
    uint32_t r[8];                                                                             \
    for (int i = 0; i < 8; ++i) r[i] = seed * (threadIdx.x + 1) * (i + 7);                     \
    float f[16];                                                                               \
    for (int i = 0; i < 16; ++i) f[i] = 0.f;                                                   \
    __syncthreads();                                                                           \
    long long t0 = clock64();                                                                  \
    for (int it = 0; it < kIters; ++it) {                                                      \
      BODY                                                                                     \
    }                                                                                          \
    __syncthreads();                                                                           \
    long long t1 = clock64();                                                                  \
    uint32_t acc = 0;                                                                          \
    for (int i = 0; i < 8; ++i) acc ^= r[i];                                                   \
    for (int i = 0; i < 16; ++i) acc ^= __float_as_uint(f[i]);                                 \
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;                                          \
    if (threadIdx.x == 0) cyc[blockIdx.x] = t1 - t0;                                           \
  }

// 8 ops per iteration each
KERNEL(k_prmt, for (int i = 0; i < 8; ++i) asm volatile("prmt.b32 %0, %0, %1, %0;" : "+r"(r[i]) : "r"(r[(i + 1) & 7]));)
KERNEL(k_lop3, for (int i = 0; i < 8; ++i) asm volatile("lop3.b32 %0, %0, %1, 0x77777777, 0x6a;" : "+r"(r[i]) : "r"(r[(i + 1) & 7]));)
KERNEL(k_shf, for (int i = 0; i < 8; ++i) asm volatile("shf.r.wrap.b32 %0, %0, %1, 3;" : "+r"(r[i]) : "r"(r[(i + 1) & 7]));)
KERNEL(k_imad, for (int i = 0; i < 8; ++i) asm volatile("mad.lo.u32 %0, %0, %1, 0x3c383000;" : "+r"(r[i]) : "r"(r[(i + 1) & 7]));)
KERNEL(k_f2fp, for (int i = 0; i < 8; ++i) { uint32_t d; asm volatile("{.reg .b16 l; mov.b32 {l, _}, %1; cvt.rn.f16x2.e4m3x2 %0, l;}" : "=r"(d) : "r"(r[i])); r[i] ^= d; })
KERNEL(k_hfma2, for (int i = 0; i < 8; ++i) asm volatile("fma.rn.f16x2 %0, %0, %1, %0;" : "+r"(r[i]) : "r"(r[(i + 1) & 7]));)
KERNEL(k_ffma, for (int i = 0; i < 8; ++i) asm volatile("fma.rn.f32 %0, %0, %1, %0;" : "+f"(f[i]) : "f"(f[i + 8]));)
// 4 independent mma chains per iteration (4 mma)
KERNEL(k_hmma, for (int c = 0; c < 4; ++c) asm volatile(
    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
    : "+f"(f[4 * c]), "+f"(f[4 * c + 1]), "+f"(f[4 * c + 2]), "+f"(f[4 * c + 3])
    : "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]), "r"(r[4]), "r"(r[5]));)
KERNEL(k_mma8, for (int c = 0; c < 4; ++c) asm volatile(
    "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
    : "+f"(f[4 * c]), "+f"(f[4 * c + 1]), "+f"(f[4 * c + 2]), "+f"(f[4 * c + 3])
    : "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]), "r"(r[4]), "r"(r[5]));)
KERNEL(k_imma, for (int c = 0; c < 4; ++c) asm volatile(
    "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
    : "+r"(*(int*)&f[4 * c]), "+r"(*(int*)&f[4 * c + 1]), "+r"(*(int*)&f[4 * c + 2]), "+r"(*(int*)&f[4 * c + 3])
    : "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]), "r"(r[4]), "r"(r[5]));)

template <typename K>
void run(const char* name, K kernel, int ops_per_iter, int warps) {
  uint32_t* out; long long* cyc;
  cudaMalloc(&out, 132 * 1024 * 4); cudaMalloc(&cyc, 132 * 8);
  kernel<<<132, warps * 32>>>(out, cyc, 3);
  kernel<<<132, warps * 32>>>(out, cyc, 5);
  cudaDeviceSynchronize();
  long long h[132]; cudaMemcpy(h, cyc, sizeof(h), cudaMemcpyDeviceToHost);
  double c = 0; for (int i = 0; i < 132; ++i) c += h[i]; c /= 132;
  printf("%-8s warps/SM %2d: %.3f warp-instr per clock per SM\n", name, warps, double(warps) * kIters * ops_per_iter / c);
  cudaFree(out); cudaFree(cyc);
}

int main() {
  for (int w : {16, 32}) {
    run("prmt", k_prmt, 8, w); run("lop3", k_lop3, 8, w); run("shf", k_shf, 8, w); run("imad", k_imad, 8, w);
    run("f2fp", k_f2fp, 8, w); run("hfma2", k_hfma2, 8, w); run("ffma", k_ffma, 8, w);
    run("hmma16", k_hmma, 4, w); run("mma8emu", k_mma8, 4, w); run("imma32", k_imma, 4, w);
  }
  printf("err: %s\n", cudaGetErrorString(cudaGetLastError()));
}
