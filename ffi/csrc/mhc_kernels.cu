// mHC: the split of one connection's mixes into pre / post weights and the Sinkhorn-normalised comb matrix, one
// thread per token. The reference (`dsv4_jax.ops.mhc.split_mixes`) is a loop of tiny reductions that XLA runs as
// ~80 launches per connection at decode; here it is one launch, the n x n matrix held in registers.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace dsv4ffi {
namespace {

__device__ __forceinline__ float sigmoid_ref(float x) { return 1.0f / (1.0f + expf(-x)); }

// Same operations, in the same order per element, as the reference: the sums run in index order (the reference's
// reductions over n = 4 values may add in another order: fp32 reduction-order noise).
template <int N>
__global__ void hc_split_sinkhorn_kernel(const float* __restrict__ mix, const float* __restrict__ scale,
                                         const float* __restrict__ base, float* __restrict__ pre,
                                         float* __restrict__ post, float* __restrict__ comb, int64_t rows, int iters,
                                         float eps) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  constexpr int M = (2 + N) * N;
  const float* m = mix + r * M;
  const float s0 = scale[0], s1 = scale[1], s2 = scale[2];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    pre[r * N + j] = sigmoid_ref(m[j] * s0 + base[j]) + eps;
    post[r * N + j] = 2.0f * sigmoid_ref(m[N + j] * s1 + base[N + j]);
  }
  float c[N][N];
#pragma unroll
  for (int j = 0; j < N; ++j) {  // row softmax (max-subtracted), + eps
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      c[j][k] = m[2 * N + j * N + k] * s2 + base[2 * N + j * N + k];
      mx = fmaxf(mx, c[j][k]);
    }
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      c[j][k] = expf(c[j][k] - mx);
      sum += c[j][k];
    }
#pragma unroll
    for (int k = 0; k < N; ++k) c[j][k] = c[j][k] / sum + eps;
  }
  auto columns = [&]() {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < N; ++j) sum += c[j][k];
      const float d = sum + eps;
#pragma unroll
      for (int j = 0; j < N; ++j) c[j][k] = c[j][k] / d;
    }
  };
  columns();
  for (int it = 1; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < N; ++k) sum += c[j][k];
      const float d = sum + eps;
#pragma unroll
      for (int k = 0; k < N; ++k) c[j][k] = c[j][k] / d;
    }
    columns();
  }
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int k = 0; k < N; ++k) comb[r * N * N + j * N + k] = c[j][k];
}

template <int N>
cudaError_t launch_n(const float* mix, const float* scale, const float* base, float* pre, float* post, float* comb,
                     int64_t rows, int iters, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int threads = 128;
  const int64_t blocks = (rows + threads - 1) / threads;
  hc_split_sinkhorn_kernel<N><<<dim3(unsigned(blocks)), threads, 0, stream>>>(mix, scale, base, pre, post, comb,
                                                                             rows, iters, eps);
  return cudaGetLastError();
}

}  // namespace

bool hc_supported_streams(int n) { return n == 1 || n == 2 || n == 4 || n == 8; }

cudaError_t launch_hc_split_sinkhorn(const float* mix, const float* scale, const float* base, float* pre, float* post,
                                     float* comb, int64_t rows, int n, int iters, float eps, cudaStream_t stream) {
  switch (n) {
    case 1: return launch_n<1>(mix, scale, base, pre, post, comb, rows, iters, eps, stream);
    case 2: return launch_n<2>(mix, scale, base, pre, post, comb, rows, iters, eps, stream);
    case 4: return launch_n<4>(mix, scale, base, pre, post, comb, rows, iters, eps, stream);
    case 8: return launch_n<8>(mix, scale, base, pre, post, comb, rows, iters, eps, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dsv4ffi
