// mHC: the split of one connection's mixes into pre / post weights and the Sinkhorn-normalised comb matrix, one
// lane per matrix element. The reference (`dsv4_jax.ops.mhc.split_mixes`) is a loop of tiny reductions that XLA runs as
// ~80 launches per connection at decode; here it is one launch, the n x n matrix held in registers.
#include <cuda_bf16.h>
#include <cooperative_groups.h>
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
// here, XLA's choice there): fp32 reduction-order noise. All 32 lanes of the warp must call it (shuffles); `m` is the
// token's mixes; returns the lane's comb element and sets pre / post for lanes l < N.
template <int N>
__device__ __forceinline__ float split_lane(const float* m, const float* __restrict__ scale,
                                            const float* __restrict__ base, int l, int iters, float eps, float* pre,
                                            float* post) {
  constexpr int L = N * N;
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
  if (l < N) {
    *pre = sigmoid_ref(m[l] * scale[0] + base[l]) + eps;
    *post = 2.0f * sigmoid_ref(m[N + l] * scale[1] + base[N + l]);
  }
  return c;
}

template <int N>
__global__ void hc_split_sinkhorn_kernel(const float* __restrict__ mix, const float* __restrict__ scale,
                                         const float* __restrict__ base, float* __restrict__ pre,
                                         float* __restrict__ post, float* __restrict__ comb, int64_t rows, int iters,
                                         float eps) {
  constexpr int L = N * N, M = (2 + N) * N;
  const int lane = threadIdx.x & 31, l = lane % L;
  const int64_t r = ((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5) * (32 / L) + lane / L;
  const bool live = r < rows;
  float p = 0.f, q = 0.f;
  const float c = split_lane<N>(mix + (live ? r : rows - 1) * M, scale, base, l, iters, eps, &p, &q);
  if (!live) return;  // every lane took part in the shuffles
  comb[r * L + l] = c;
  if (l < N) pre[r * N + l] = p, post[r * N + l] = q;
}

// ---- hc_pre: the whole collapse of the streams in two launches ---------------------------------------------------
// mix = (X . fn^T) * rsqrt(mean(X^2) + norm_eps) over the n*d values of a token, the split, x = bf16(sum_j pre_j X_j),
// optionally followed by the sublayer's RMSNorm of x (attn_norm / ffn_norm: a.norm_w).
// 1. hc_pre_partial_kernel: block (chunk c of 512 values, a group of 8 rows): each thread keeps its 2 values of every
//    fn row in registers and, per row, the block sums x . fn[m] over its chunk (and x . x): part[row][c][M + 1].
// 2. hc_pre_finish_kernel (or hc_pre_finish_norm_kernel with the norm): the row's sums and split, the collapse.
constexpr int kHcChunk = 512, kHcThreads = 256, kHcRowsPerBlock = 8;

template <int N>
__global__ void __launch_bounds__(kHcThreads) hc_pre_partial_kernel(const HcPreArgs a) {
  constexpr int M = (2 + N) * N;
  const int64_t k = int64_t(N) * a.d, c = blockIdx.x, e = c * kHcChunk + 2 * threadIdx.x;
  const int64_t layer = a.layer ? a.layer[0] : 0;
  const float* fn = a.fn + layer * M * k;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ float red[kHcThreads / 32][M + 1];
  float2 w[M];
#pragma unroll
  for (int m = 0; m < M; ++m) w[m] = e < k ? *reinterpret_cast<const float2*>(fn + m * k + e) : make_float2(0.f, 0.f);
  const int64_t r1 = (blockIdx.y + 1) * int64_t(kHcRowsPerBlock) < a.rows ? (blockIdx.y + 1) * int64_t(kHcRowsPerBlock)
                                                                           : a.rows;
  for (int64_t r = blockIdx.y * int64_t(kHcRowsPerBlock); r < r1; ++r) {
    float2 x = make_float2(0.f, 0.f);
    if (e < k) x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(a.x + r * k + e));
    float acc[M + 1];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = x.x * w[m].x + x.y * w[m].y;
    acc[M] = x.x * x.x + x.y * x.y;
#pragma unroll
    for (int m = 0; m <= M; ++m) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(kFull, acc[m], o);
    }
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m <= M; ++m) red[warp][m] = acc[m];
    }
    __syncthreads();
    if (threadIdx.x <= M) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kHcThreads / 32; ++i) s += red[i][threadIdx.x];
      a.part[(r * gridDim.x + c) * (M + 1) + threadIdx.x] = s;
    }
    __syncthreads();
  }
}

// The row's M + 1 sums from the chunks' partials (warp w the sums w, w + W, ...; each in a fixed tree, so every block
// of the row gets the same mixes; all the loads in flight at once: summed by warp 0 alone, one sum after the other,
// this was 13.5 us a call on an H200), then warp 0 splits them (split_lane) into pre_s; block y == 0 of the row also
// writes post and comb. Ends with a barrier.
template <int N, int kThreads>
__device__ __forceinline__ void hc_row_split(const HcPreArgs& a, int64_t r, int chunks, int64_t layer, float* mix,
                                             float* pre_s) {
  constexpr int M = (2 + N) * N, L = N * N, kWarps = kThreads / 32, kSumsPerWarp = (M + 1 + kWarps - 1) / kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k = int64_t(N) * a.d;
  const float* part = a.part + r * chunks * (M + 1);
  float s[kSumsPerWarp];
#pragma unroll
  for (int i = 0; i < kSumsPerWarp; ++i) {  // the loads of all this warp's sums before any of their reductions
    const int m = warp + kWarps * i;
    s[i] = 0.f;
    if (m <= M)
      for (int c = lane; c < chunks; c += 32) s[i] += part[c * (M + 1) + m];
  }
#pragma unroll
  for (int i = 0; i < kSumsPerWarp; ++i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s[i] += __shfl_xor_sync(kFull, s[i], o);
    if (lane == 0 && warp + kWarps * i <= M) mix[warp + kWarps * i] = s[i];
  }
  __syncthreads();
  if (warp == 0) {
    const float rs = rsqrtf(mix[M] / float(k) + a.norm_eps);
    __syncwarp();
    if (lane < M) mix[lane] *= rs;
    __syncwarp();
    float p = 0.f, q = 0.f;
    const float c = split_lane<N>(mix, a.scale + layer * 3, a.base + layer * M, lane % L, a.iters, a.eps, &p, &q);
    if (lane < N) pre_s[lane] = p;
    if (blockIdx.y == 0 && lane < L) {
      a.comb[r * L + lane] = c;
      if (lane < N) a.post[r * N + lane] = q;
    }
  }
  __syncthreads();
}

// Values e, e + 1 of each of the row's N streams (row at x + base; zeros past d), and their collapse with the pre
// weights, sum_j pre_j x_j in fp32 in stream order.
template <int N>
__device__ __forceinline__ void stream_pairs(const HcPreArgs& a, int64_t base, int64_t e, float2* v) {
#pragma unroll
  for (int j = 0; j < N; ++j)
    v[j] = e < a.d ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(a.x + base + j * a.d + e))
                   : make_float2(0.f, 0.f);
}

template <int N>
__device__ __forceinline__ float2 collapse(const float* pre_s, const float2* v) {
  float2 acc = make_float2(0.f, 0.f);
#pragma unroll
  for (int j = 0; j < N; ++j) acc.x += pre_s[j] * v[j].x, acc.y += pre_s[j] * v[j].y;
  return acc;
}

// 2. (without the norm) block (one row, 512 output values): the row's split, then all threads collapse their 2 values
//    of each stream.
template <int N>
__global__ void __launch_bounds__(kHcThreads) hc_pre_finish_kernel(const HcPreArgs a, int chunks) {
  constexpr int M = (2 + N) * N;
  const int64_t r = blockIdx.x, k = int64_t(N) * a.d;
  const int64_t layer = a.layer ? a.layer[0] : 0;
  __shared__ float mix[M + 1];
  __shared__ float pre_s[N];
  // this thread's 2 values of each stream, read before the mixes are known (their latency overlaps the sums')
  const int64_t e = blockIdx.y * int64_t(kHcChunk) + 2 * threadIdx.x;
  float2 v[N];
  stream_pairs<N>(a, r * k, e, v);
  hc_row_split<N, kHcThreads>(a, r, chunks, layer, mix, pre_s);
  if (e >= a.d) return;
  const float2 acc = collapse<N>(pre_s, v);
  *reinterpret_cast<__nv_bfloat162*>(a.out + r * a.d + e) = __floats2bfloat162_rn(acc.x, acc.y);
}

// 2'. (with the sublayer's RMSNorm, a.norm_w set) a cluster of blocks per row (block y of the cluster: 1024 output
//    values, a pair per thread): the row's split, the collapse rounded to bf16 (the reference's x), then RMSNorm over
//    the row: each block sums its squares (fixed tree) and writes that sum into every block's shared memory
//    (distributed shared memory, slot = its rank), one cluster barrier, then each block adds the slots in rank order
//    (every block the same total): x * rsqrt(mean + eps), the weight multiplied in fp32 before the cast
//    (nn.rms_norm). The norm's two XLA fusions per sublayer become part of this launch; the row stays spread over
//    several SMs (one block for the whole row was 8.5 us a call on an H200, 2.4 more than without the norm; the
//    blocks reading one another's sums, two barriers after the work, 7.7). Pushing the sums leaves one barrier after
//    the work: the other (the peers have started, so their shared memory may be written) is armed at the kernel's
//    start and waited for only before the push.
constexpr int kHcNormThreads = 512, kHcNormMaxBlocks = 8;  // 8: the portable cluster size
constexpr int kHcNormValues = 2 * kHcNormThreads;          // per block

template <int N>
__global__ void __launch_bounds__(kHcNormThreads) hc_pre_finish_norm_kernel(const HcPreArgs a, int chunks) {
  constexpr int M = (2 + N) * N, kWarps = kHcNormThreads / 32;
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");  // (waited for before the push)
  const int64_t r = blockIdx.x, k = int64_t(N) * a.d;
  const int64_t layer = a.layer ? a.layer[0] : 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ float mix[M + 1];
  __shared__ float pre_s[N];
  __shared__ float red[kWarps];
  __shared__ float sums[kHcNormMaxBlocks];  // slot j: block j's sum of squares
  const int64_t e = blockIdx.y * int64_t(kHcNormValues) + 2 * threadIdx.x;
  float2 v[N];
  stream_pairs<N>(a, r * k, e, v);
  hc_row_split<N, kHcNormThreads>(a, r, chunks, layer, mix, pre_s);
  const float2 acc = collapse<N>(pre_s, v);  // pairs past d: zeros, which add nothing to the squares
  const float2 x = __bfloat1622float2(__floats2bfloat162_rn(acc.x, acc.y));
  float ss = x.x * x.x + x.y * x.y;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(kFull, ss, o);
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  const unsigned blocks = cluster.num_blocks(), rank = cluster.block_rank();
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");  // every peer has started
  if (threadIdx.x < blocks) {  // thread j pushes this block's sum to block j (each the same sum, in warp order)
    float b = red[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) b += red[w];
    *cluster.map_shared_rank(&sums[rank], threadIdx.x) = b;
  }
  cluster.sync();  // release / acquire: every block's pushes visible in every block
  ss = 0.f;
  for (unsigned j = 0; j < blocks; ++j) ss += sums[j];
  if (e >= a.d) return;
  const float rs = rsqrtf(ss / float(a.d) + a.x_norm_eps);
  const __nv_bfloat16* wn = a.norm_w + (a.norm_layers > 1 ? layer : 0) * a.d;
  const float2 w = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(wn + e));
  *reinterpret_cast<__nv_bfloat162*>(a.out + r * a.d + e) =
      __floats2bfloat162_rn(__fmul_rn(w.x, __fmul_rn(x.x, rs)), __fmul_rn(w.y, __fmul_rn(x.y, rs)));
}

template <int N>
cudaError_t launch_hc_pre_n(const HcPreArgs& a, cudaStream_t stream) {
  const int64_t k = int64_t(N) * a.d, chunks = (k + kHcChunk - 1) / kHcChunk;
  const dim3 g1(unsigned(chunks), unsigned((a.rows + kHcRowsPerBlock - 1) / kHcRowsPerBlock));
  hc_pre_partial_kernel<N><<<g1, kHcThreads, 0, stream>>>(a);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (a.norm_w != nullptr) {  // a cluster of blocks per row
    const unsigned blocks = unsigned((a.d + kHcNormValues - 1) / kHcNormValues);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(a.rows), blocks);
    cfg.blockDim = dim3(kHcNormThreads);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1, attr[0].val.clusterDim.y = blocks, attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr, cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, hc_pre_finish_norm_kernel<N>, a, int(chunks));
  } else {
    const dim3 g2(unsigned(a.rows), unsigned((a.d + kHcChunk - 1) / kHcChunk));
    hc_pre_finish_kernel<N><<<g2, kHcThreads, 0, stream>>>(a, int(chunks));
  }
  return cudaGetLastError();
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

int64_t hc_pre_chunks(int64_t n, int64_t d) { return (n * d + kHcChunk - 1) / kHcChunk; }

int64_t hc_pre_norm_max_d() { return int64_t(kHcNormValues) * kHcNormMaxBlocks; }

cudaError_t launch_hc_pre(const HcPreArgs& a, cudaStream_t stream) {
  if (a.norm_w != nullptr && a.d > hc_pre_norm_max_d()) return cudaErrorInvalidValue;  // (the handler checks)
  if (a.rows == 0) return cudaSuccess;
  switch (a.n) {
    case 1: return launch_hc_pre_n<1>(a, stream);
    case 2: return launch_hc_pre_n<2>(a, stream);
    case 4: return launch_hc_pre_n<4>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

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
