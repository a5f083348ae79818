// The lightning indexer's top-k selection (our own kernel; reference `dsv4_jax.ops.indexer_topk`): per row r of
// scores f32 [rows, n], the k largest among the row's first n_vis[r] entries (the visible compressed entries; the
// others count as -inf), in jax.lax.top_k's order: scores descending in IEEE total order (+NaN > +inf > ... > +0 >
// -0 > -inf > -NaN), equal scores by ascending index; picks past n_vis come out as -1.
//
// One block per row, a radix select on order-preserving 32-bit keys: byte by byte from the top, a histogram of the
// candidates' next byte finds the bucket holding the k-th largest key; the bytes below 16 are skipped when every key's
// low half follows from its high half (scores holding bf16 values: the indexer's), since the candidates left then share
// one key. The selection is every key above the threshold plus the lowest-index keys equal to it (warps rank those in
// index order over contiguous segments: no atomics decide which), then a bitonic sort of the k (key, ~index) pairs
// orders them. The row sits in shared memory when it fits (one global read), otherwise every pass reads it from L2.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>

#include "kernels.h"

namespace dsv4ffi {
namespace {

constexpr int kThreads = 512;
constexpr int kWarpsT = kThreads / 32;
constexpr uint32_t kNegInfKey = 0x007FFFFFu;  // the key of -inf (a masked entry)

// Order-preserving key: unsigned comparison of keys = IEEE total order of the floats.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Whether a key's low 16 bits follow from its high 16 (the key of a bf16 value, +-inf or -inf's mask key).
__device__ __forceinline__ bool low_half_implied(uint32_t key) {
  return (key & 0xFFFFu) == ((key & 0x80000000u) ? 0u : 0xFFFFu);
}

struct TopkParams {
  const float* scores;
  const int32_t* n_vis;
  int32_t* out;
  int n, k, p;  // p: k rounded up to a power of two (the sort's size)
};

template <bool SMEM>
__global__ void __launch_bounds__(kThreads) topk_kernel(const TopkParams prm) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint64_t* cand = reinterpret_cast<uint64_t*>(smem);          // [p] (key << 32 | ~index), 0 = padding
  uint32_t* keys = reinterpret_cast<uint32_t*>(cand + prm.p);  // [n] when SMEM
  __shared__ uint32_t hist[256];
  __shared__ uint32_t warp_cnt[kWarpsT];
  __shared__ uint32_t sh_bin, sh_above, sh_in, sh_gt;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n = prm.n, k = prm.k;
  const float* row = prm.scores + static_cast<int64_t>(blockIdx.x) * n;
  const int nv = min(max(prm.n_vis[blockIdx.x], 0), n);
  auto key_at = [&](int j) -> uint32_t {
    if constexpr (SMEM) {
      return keys[j];
    } else {
      return j < nv ? order_key(row[j]) : kNegInfKey;
    }
  };

  for (int i = tid; i < prm.p; i += kThreads) cand[i] = 0ull;
  if (tid == 0) sh_gt = 0u;

  // ---- radix select: (prefix, mask) = the threshold's known bytes; `remaining` of its candidates still to take ----
  uint32_t prefix = 0u, mask = 0u;
  int remaining = k;
  bool implied_all = false;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) hist[i] = 0u;
    __syncthreads();
    bool implied = true;
    for (int base = 0; base < n; base += kThreads) {  // the same trip count in every lane (match_any below)
      const int j = base + tid;
      uint32_t bin = 256u;
      if (j < n) {
        uint32_t key;
        if (shift == 24) {  // the first pass reads the row (and keeps it, when it fits)
          key = j < nv ? order_key(row[j]) : kNegInfKey;
          if constexpr (SMEM) keys[j] = key;
          implied &= low_half_implied(key);
        } else {
          key = key_at(j);
        }
        if ((key & mask) == prefix) bin = (key >> shift) & 0xFFu;
      }
      // lanes with the same bin add once (the top bytes of real scores fall in a few bins: no 32-way conflicts)
      const unsigned same = __match_any_sync(0xffffffffu, bin);
      if (bin < 256u && lane == __ffs(same) - 1) atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(same)));
    }
    if (shift == 24) {
      implied_all = __syncthreads_and(implied);
    } else {
      __syncthreads();
    }
    if (warp == 0) {  // the bucket of the remaining-th largest: lane l holds bins 255 - 8l down to 248 - 8l
      uint32_t c[8], sum = 0u;
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += (c[i] = hist[255 - 8 * lane - i]);
      uint32_t incl = sum;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint32_t v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
      }
      const uint32_t rem = static_cast<uint32_t>(remaining);
      uint32_t acc = incl - sum;
      if (acc < rem && rem <= incl) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (acc + c[i] >= rem) {
            sh_bin = 255u - 8u * lane - i, sh_above = acc, sh_in = c[i];
            break;
          }
          acc += c[i];
        }
      }
    }
    __syncthreads();
    prefix |= sh_bin << shift;
    mask |= 0xFFu << shift;
    remaining -= static_cast<int>(sh_above);
    if (static_cast<int>(sh_in) == remaining) break;  // the whole bucket is taken: no tie to break
    if (shift == 16 && implied_all) break;             // the candidates left share one key
  }

  // ---- the selection: keys above the threshold (any slot of the first k - remaining), then the `remaining`
  // lowest-index keys equal to it, ranked in index order by warps over contiguous segments -----------------------
  const int seg = ((n + kWarpsT - 1) / kWarpsT + 31) / 32 * 32;
  const int lo = min(warp * seg, n), hi = min(lo + seg, n);
  const int n_gt = k - remaining;
  uint32_t eq_count = 0u;
  for (int base = lo; base < hi; base += 32) {
    const int j = base + lane;
    const uint32_t key = j < hi ? key_at(j) : 0u;
    const uint32_t m = key & mask;
    const bool gt = j < hi && m > prefix, eq = j < hi && m == prefix;
    if (gt) cand[atomicAdd(&sh_gt, 1u)] = (static_cast<uint64_t>(key) << 32) | ~static_cast<uint32_t>(j);
    eq_count += __popc(__ballot_sync(0xffffffffu, eq));
  }
  if (lane == 0) warp_cnt[warp] = eq_count;
  __syncthreads();
  uint32_t rank0 = 0u;
  for (int w = 0; w < warp; ++w) rank0 += warp_cnt[w];
  const uint32_t lt_mask = (1u << lane) - 1u;
  for (int base = lo; base < hi && rank0 < static_cast<uint32_t>(remaining); base += 32) {
    const int j = base + lane;
    const uint32_t key = j < hi ? key_at(j) : 0u;
    const bool eq = j < hi && (key & mask) == prefix;
    const uint32_t eqm = __ballot_sync(0xffffffffu, eq);
    const uint32_t rank = rank0 + __popc(eqm & lt_mask);
    if (eq && rank < static_cast<uint32_t>(remaining))
      cand[n_gt + rank] = (static_cast<uint64_t>(key) << 32) | ~static_cast<uint32_t>(j);
    rank0 += __popc(eqm);
  }
  __syncthreads();

  // ---- bitonic sort of the p pairs, descending: keys descending, then indices ascending (~index descending) -------
  for (int size = 2; size <= prm.p; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int i = tid; i < prm.p / 2; i += kThreads) {
        const int a = 2 * i - (i & (stride - 1)), b = a + stride;
        const uint64_t va = cand[a], vb = cand[b];
        if ((va < vb) == ((a & size) == 0)) cand[a] = vb, cand[b] = va;
      }
      __syncthreads();
    }
  }
  int32_t* out = prm.out + static_cast<int64_t>(blockIdx.x) * k;
  for (int i = tid; i < k; i += kThreads) {
    const int j = static_cast<int>(~static_cast<uint32_t>(cand[i]));
    out[i] = j < nv ? j : -1;
  }
}

// Raises a kernel's dynamic shared-memory limit once per (kernel, device) to what the device allows; returns it (-1
// with the CUDA error in *err).
int smem_limit(const void* kernel, cudaError_t* err) {
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

// The longest row kept in shared memory: DSV4_FFI_TOPK_SMEM_MAX (0: never; an A/B knob, read at every launch).
int smem_rows_limit() {
  if (const char* v = std::getenv("DSV4_FFI_TOPK_SMEM_MAX")) return std::atoi(v);
  return 1 << 30;
}

}  // namespace

const char* indexer_topk_unsupported(int64_t n, int64_t k) {
  if (k < 1 || k > n) return "k must be in [1, n]";
  if (k > kTopkMaxK) return "k above the kernel's 2048";
  if (n >= (int64_t{1} << 31) - kThreads) return "rows too long (n >= 2^31)";
  return nullptr;
}

cudaError_t launch_indexer_topk(const IndexerTopkArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  int p = 1;
  while (p < a.k) p <<= 1;
  if (p < 2) p = 2;
  TopkParams prm{a.scores, a.n_vis, a.out, static_cast<int>(a.n), static_cast<int>(a.k), p};
  const size_t cand_bytes = static_cast<size_t>(p) * 8;
  const size_t row_bytes = static_cast<size_t>(a.n) * 4;
  cudaError_t err = cudaSuccess;
  const int limit = smem_limit(reinterpret_cast<const void*>(topk_kernel<true>), &err);
  if (limit < 0) return err;
  const bool in_smem = a.n <= smem_rows_limit() && cand_bytes + row_bytes <= static_cast<size_t>(limit);
  const dim3 grid(static_cast<unsigned>(a.rows));
  if (in_smem) {
    topk_kernel<true><<<grid, kThreads, cand_bytes + row_bytes, stream>>>(prm);
  } else {
    if (smem_limit(reinterpret_cast<const void*>(topk_kernel<false>), &err) < 0) return err;
    topk_kernel<false><<<grid, kThreads, cand_bytes, stream>>>(prm);
  }
  return cudaGetLastError();
}

}  // namespace dsv4ffi
