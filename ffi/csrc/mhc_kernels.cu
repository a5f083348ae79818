// mHC: the split of one connection's mixes into pre / post weights and the Sinkhorn-normalised comb matrix, one
// lane per matrix element. The reference (`dsv4_jax.ops.mhc.split_mixes`) is a loop of tiny reductions that XLA runs as
// ~80 launches per connection at decode; here it is one launch, the n x n matrix held in registers.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace dsv4ffi {
namespace {

__device__ __forceinline__ float sigmoid_ref(float x) { return 1.0f / (1.0f + expf(-x)); }

constexpr unsigned kFull = 0xffffffffu;

// One lane per element of a token's n x n matrix (lane l: row j = l / n, column k = l % n), 32 / n^2 tokens per warp:
// a row's or a column's sum is a butterfly of shuffles. The same operations per element as the reference (softmax
// with the max subtracted, divisions, eps in every denominator); only the order of the n-term sums differs (a tree
// here, XLA's choice there): fp32 reduction-order noise.
template <int N>
__global__ void hc_split_sinkhorn_kernel(const float* __restrict__ mix, const float* __restrict__ scale,
                                         const float* __restrict__ base, float* __restrict__ pre,
                                         float* __restrict__ post, float* __restrict__ comb, int64_t rows, int iters,
                                         float eps) {
  constexpr int L = N * N, M = (2 + N) * N;
  const int lane = threadIdx.x & 31, l = lane % L;
  const int64_t r = ((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5) * (32 / L) + lane / L;
  const bool live = r < rows;
  const float* m = mix + (live ? r : rows - 1) * M;  // every lane takes part in the shuffles
  auto row_sum = [](float v) {
#pragma unroll
    for (int o = 1; o < N; o <<= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
  };
  auto col_sum = [](float v) {
#pragma unroll
    for (int o = N; o < L; o <<= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
  };
  float c = m[2 * N + l] * scale[2] + base[2 * N + l];
  float mx = c;
#pragma unroll
  for (int o = 1; o < N; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, o));
  c = expf(c - mx);
  c = c / row_sum(c) + eps;  // row softmax, + eps
  c = c / (col_sum(c) + eps);
  for (int it = 1; it < iters; ++it) {
    c = c / (row_sum(c) + eps);
    c = c / (col_sum(c) + eps);
  }
  if (!live) return;
  comb[r * L + l] = c;
  if (l < N) {
    pre[r * N + l] = sigmoid_ref(m[l] * scale[0] + base[l]) + eps;
    post[r * N + l] = 2.0f * sigmoid_ref(m[N + l] * scale[1] + base[N + l]);
  }
}

template <int N>
cudaError_t launch_n(const float* mix, const float* scale, const float* base, float* pre, float* post, float* comb,
                     int64_t rows, int iters, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int threads = 128, rows_per_block = threads / 32 * (32 / (N * N));
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  hc_split_sinkhorn_kernel<N><<<dim3(unsigned(blocks)), threads, 0, stream>>>(mix, scale, base, pre, post, comb,
                                                                             rows, iters, eps);
  return cudaGetLastError();
}

}  // namespace

bool hc_supported_streams(int n) { return n == 1 || n == 2 || n == 4; }

cudaError_t launch_hc_split_sinkhorn(const float* mix, const float* scale, const float* base, float* pre, float* post,
                                     float* comb, int64_t rows, int n, int iters, float eps, cudaStream_t stream) {
  switch (n) {
    case 1: return launch_n<1>(mix, scale, base, pre, post, comb, rows, iters, eps, stream);
    case 2: return launch_n<2>(mix, scale, base, pre, post, comb, rows, iters, eps, stream);
    case 4: return launch_n<4>(mix, scale, base, pre, post, comb, rows, iters, eps, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dsv4ffi
