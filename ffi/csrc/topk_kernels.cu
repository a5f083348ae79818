// The lightning indexer's top-k selection (our own kernel; reference `dsv4_jax.ops.indexer_topk`): per row r of
// scores f32 [rows, n], the k largest among the row's first n_vis[r] entries (the visible compressed entries; the
// others count as -inf), in jax.lax.top_k's order: scores descending in IEEE total order (+NaN > +inf > ... > 0 >
// -inf > -NaN; -0 counts as +0), equal scores by ascending index; picks past n_vis come out as -1.
//
// One block per row, a radix select on order-preserving 32-bit keys: digit by digit from the top, a histogram of the
// candidates' next digit finds the bucket holding the k-th largest key; the bits below 16 are skipped when every key's
// low half follows from its high half (scores holding bf16 values: the indexer's), since the candidates left then share
// one key. The histograms add with plain shared-memory atomics (the first digit is 11 bits wide so that few lanes of a
// warp share a counter); warp-aggregating them with __match_any_sync was slower. The selection is every key above the threshold plus the lowest-index keys equal to it (warps rank those in
// index order over contiguous segments: no atomics decide which), then a bitonic sort of the k (key, ~index) pairs
// orders them (shuffles within warps, shared memory across). The row sits in shared memory when it fits (one global read), otherwise every pass reads it from L2.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "kernels.h"

namespace dsv4ffi {
namespace {

constexpr int kThreads = 512;
constexpr int kWarpsT = kThreads / 32;
constexpr uint32_t kNegInfKey = 0x007FFFFFu;  // the key of -inf (a masked entry)

// Order-preserving key: unsigned comparison of keys = IEEE total order of the floats, with -0 taken as +0 (XLA's
// GPU top_k ranks the two zeros as equal, its CPU top_k does not: the op fixes one answer, ties by index).
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  u = u == 0x80000000u ? 0u : u;
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

// 16-byte loads in flight per thread in a pass: every load of a pass is independent, and a loop that waited for each
// one (a DRAM or L2 round trip per element) was what the first version spent its time on.
constexpr int kBatch = 4;

template <bool SMEM>
__global__ void __launch_bounds__(kThreads, 2) topk_kernel(const TopkParams prm) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint64_t* cand = reinterpret_cast<uint64_t*>(smem);          // [p] (key << 32 | ~index), 0 = padding
  uint32_t* keys = reinterpret_cast<uint32_t*>(cand + prm.p);  // [n] when SMEM
  __shared__ uint32_t hist[2048];
  __shared__ uint32_t warp_cnt[kWarpsT];
  __shared__ uint32_t sh_bin, sh_above, sh_in, sh_gt;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n = prm.n, k = prm.k;
  const float* row = prm.scores + static_cast<int64_t>(blockIdx.x) * n;
  const int nv = min(max(prm.n_vis[blockIdx.x], 0), n);
  const bool vec = n % 4 == 0;  // rows of a multiple of 4 floats start 16-byte aligned
  auto masked_key = [&](int j, float f) -> uint32_t { return j < nv ? order_key(f) : kNegInfKey; };
  // The keys of elements 4i .. 4i + 3 (0 past n).
  auto load4 = [&](int i) -> uint4 {
    const int j = 4 * i;
    if constexpr (SMEM) {
      if (j + 3 < n) return reinterpret_cast<const uint4*>(keys)[i];
      return make_uint4(keys[j], j + 1 < n ? keys[j + 1] : 0u, j + 2 < n ? keys[j + 2] : 0u, 0u);
    } else {
      if (vec && j + 3 < n) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(row) + i);
        return make_uint4(masked_key(j, v.x), masked_key(j + 1, v.y), masked_key(j + 2, v.z), masked_key(j + 3, v.w));
      }
      uint32_t kk[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) kk[c] = j + c < n ? masked_key(j + c, __ldg(row + j + c)) : 0u;
      return make_uint4(kk[0], kk[1], kk[2], kk[3]);
    }
  };

  for (int i = tid; i < prm.p; i += kThreads) cand[i] = 0ull;
  if (tid == 0) sh_gt = 0u;

  // ---- the row's keys (kept in shared memory when it fits), and whether every low half follows from its high half
  bool implied = true;
  if constexpr (SMEM) {
    const int n4 = vec ? n / 4 : 0;
    for (int b4 = 0; b4 < n4; b4 += kThreads * kBatch) {
      float4 v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = b4 + u * kThreads + tid;
        if (i < n4) v[u] = __ldg(reinterpret_cast<const float4*>(row) + i);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = b4 + u * kThreads + tid;
        if (i >= n4) continue;
        const int j = 4 * i;
        const uint4 kk = make_uint4(masked_key(j, v[u].x), masked_key(j + 1, v[u].y), masked_key(j + 2, v[u].z),
                                    masked_key(j + 3, v[u].w));
        implied &= low_half_implied(kk.x) & low_half_implied(kk.y) & low_half_implied(kk.z) & low_half_implied(kk.w);
        reinterpret_cast<uint4*>(keys)[i] = kk;
      }
    }
    for (int j = 4 * n4 + tid; j < n; j += kThreads) {
      keys[j] = masked_key(j, __ldg(row + j));
      implied &= low_half_implied(keys[j]);
    }
  }

  // ---- radix select: (prefix, mask) = the threshold's known bits; `remaining` of its candidates still to take.
  // Digits of 11, 5, 8 and 8 bits from the top: the first (sign, exponent, two mantissa bits) spreads real scores over
  // many bins, so few lanes of a warp add to one counter at once; after the second the 16 high bits are known ------
  uint32_t prefix = 0u, mask = 0u;
  int remaining = k;
  bool implied_all = false;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = pass == 0 ? 21 : pass == 1 ? 16 : pass == 2 ? 8 : 0;
    const int nbins = pass == 0 ? 2048 : pass == 1 ? 32 : 256;
    for (int i = tid; i < nbins; i += kThreads) hist[i] = 0u;
    if (pass == 0 && SMEM) {
      implied_all = __syncthreads_and(implied);  // also: the keys are in shared memory
    } else {
      __syncthreads();
    }
    const int nq = (n + 3) / 4;
    for (int b = 0; b < nq; b += kThreads * kBatch) {
      uint4 kq[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = b + u * kThreads + tid;
        kq[u] = i < nq ? load4(i) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const uint32_t kk[4] = {kq[u].x, kq[u].y, kq[u].z, kq[u].w};
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (4 * (b + u * kThreads + tid) + c >= n) continue;
          if (!SMEM && pass == 0) implied &= low_half_implied(kk[c]);
          if ((kk[c] & mask) == prefix) atomicAdd(&hist[(kk[c] >> shift) & (nbins - 1)], 1u);
        }
      }
    }
    if (pass == 0 && !SMEM) {
      implied_all = __syncthreads_and(implied);
    } else {
      __syncthreads();
    }
    if (warp == 0) {  // the bucket of the remaining-th largest: lane l holds nbins / 32 bins, the highest at lane 0
      const int per = nbins / 32, top = nbins - 1 - per * lane;
      uint32_t sum = 0u;
#pragma unroll 8
      for (int i = 0; i < per; ++i) sum += hist[top - i];
      uint32_t incl = sum;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint32_t v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
      }
      const uint32_t rem = static_cast<uint32_t>(remaining);
      uint32_t acc = incl - sum;
      if (acc < rem && rem <= incl) {
#pragma unroll 8
        for (int i = 0; i < per; ++i) {
          const uint32_t c = hist[top - i];
          if (acc + c >= rem) {
            sh_bin = static_cast<uint32_t>(top - i), sh_above = acc, sh_in = c;
            break;
          }
          acc += c;
        }
      }
    }
    __syncthreads();
    prefix |= sh_bin << shift;
    mask |= static_cast<uint32_t>(nbins - 1) << shift;
    remaining -= static_cast<int>(sh_above);
    if (static_cast<int>(sh_in) == remaining) break;  // the whole bucket is taken: no tie to break
    if (pass == 1 && implied_all) break;              // the candidates left share one key
  }

  // ---- the selection: keys above the threshold (any slot of the first k - remaining), then the `remaining`
  // lowest-index keys equal to it, ranked in index order by warps over contiguous segments -----------------------
  // A warp step covers 128 consecutive elements, lane l the four at 4l (one 16-byte load).
  const int seg = ((n + kWarpsT - 1) / kWarpsT + 127) / 128 * 128;
  const int lo = min(warp * seg, n), hi = min(lo + seg, n);
  const int n_gt = k - remaining;
  constexpr int kSteps = 2;  // warp steps of loads in flight
  auto load_steps = [&](int base, uint4 (&kq)[kSteps]) {
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int j = base + 128 * u + 4 * lane;
      kq[u] = j < hi ? load4(j / 4) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  uint32_t eq_count = 0u;
  for (int base = lo; base < hi; base += 128 * kSteps) {
    uint4 kq[kSteps];
    load_steps(base, kq);
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const uint32_t kk[4] = {kq[u].x, kq[u].y, kq[u].z, kq[u].w};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int j = base + 128 * u + 4 * lane + c;
        const uint32_t m = kk[c] & mask;
        if (j < hi && m > prefix)
          cand[atomicAdd(&sh_gt, 1u)] = (static_cast<uint64_t>(kk[c]) << 32) | ~static_cast<uint32_t>(j);
        eq_count += j < hi && m == prefix;
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) eq_count += __shfl_xor_sync(0xffffffffu, eq_count, off);
  if (lane == 0) warp_cnt[warp] = eq_count;
  __syncthreads();
  uint32_t rank0 = 0u;
  for (int w = 0; w < warp; ++w) rank0 += warp_cnt[w];
  for (int base = lo; base < hi && rank0 < static_cast<uint32_t>(remaining); base += 128 * kSteps) {
    uint4 kq[kSteps];
    load_steps(base, kq);
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const uint32_t kk[4] = {kq[u].x, kq[u].y, kq[u].z, kq[u].w};
      bool eq[4];
      uint32_t cnt = 0u;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        eq[c] = base + 128 * u + 4 * lane + c < hi && (kk[c] & mask) == prefix;
        cnt += eq[c];
      }
      uint32_t incl = cnt;  // lanes in index order: an inclusive scan of their counts
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint32_t v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
      }
      uint32_t rank = rank0 + incl - cnt;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (eq[c]) {
          if (rank < static_cast<uint32_t>(remaining)) {
            const uint32_t j = static_cast<uint32_t>(base + 128 * u + 4 * lane + c);
            cand[n_gt + rank] = (static_cast<uint64_t>(kk[c]) << 32) | ~j;
          }
          ++rank;
        }
      }
      rank0 += __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();

  // ---- bitonic sort of the p pairs, descending: keys descending, then indices ascending (~index descending).
  // Element e sits in register slot e / kThreads of thread e % kThreads: the stages of stride < 32 pair lanes of one
  // warp (shuffles, no barrier); the few of larger stride go through shared memory ---------------------------------
  constexpr int kSlots = static_cast<int>(kTopkMaxK) / kThreads;
  const int slots = (prm.p + kThreads - 1) / kThreads;
  uint64_t v[kSlots];
  bool in_regs = false;
  for (int size = 2; size <= prm.p; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      if (stride >= 32) {
        if (in_regs) {
#pragma unroll
          for (int sl = 0; sl < kSlots; ++sl)
            if (sl < slots && sl * kThreads + tid < prm.p) cand[sl * kThreads + tid] = v[sl];
          __syncthreads();
          in_regs = false;
        }
        for (int i = tid; i < prm.p / 2; i += kThreads) {
          const int a = 2 * i - (i & (stride - 1)), b = a + stride;
          const uint64_t va = cand[a], vb = cand[b];
          if ((va < vb) == ((a & size) == 0)) cand[a] = vb, cand[b] = va;
        }
        __syncthreads();
        continue;
      }
      if (!in_regs) {
#pragma unroll
        for (int sl = 0; sl < kSlots; ++sl) {
          const int e = sl * kThreads + tid;
          v[sl] = sl < slots && e < prm.p ? cand[e] : 0ull;
        }
        in_regs = true;
      }
#pragma unroll
      for (int sl = 0; sl < kSlots; ++sl) {
        if (sl >= slots) break;  // uniform: every lane of the block has the same slots
        const int e = sl * kThreads + tid;
        const uint64_t other = __shfl_xor_sync(0xffffffffu, v[sl], stride);
        const bool keep_max = ((e & stride) == 0) == ((e & size) == 0);
        v[sl] = keep_max ? (v[sl] > other ? v[sl] : other) : (v[sl] < other ? v[sl] : other);
      }
    }
  }
  if (in_regs) {
#pragma unroll
    for (int sl = 0; sl < kSlots; ++sl)
      if (sl < slots && sl * kThreads + tid < prm.p) cand[sl * kThreads + tid] = v[sl];
  }
  __syncthreads();
  int32_t* out = prm.out + static_cast<int64_t>(blockIdx.x) * k;
  for (int i = tid; i < k; i += kThreads) {
    const int j = static_cast<int>(~static_cast<uint32_t>(cand[i]));
    out[i] = j < nv ? j : -1;
  }
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
  const int limit = dynamic_smem_limit(reinterpret_cast<const void*>(topk_kernel<true>), &err);
  if (limit < 0) return err;
  const bool in_smem = a.n <= smem_rows_limit() && cand_bytes + row_bytes <= static_cast<size_t>(limit);
  const dim3 grid(static_cast<unsigned>(a.rows));
  if (in_smem) {
    topk_kernel<true><<<grid, kThreads, cand_bytes + row_bytes, stream>>>(prm);
  } else {
    if (dynamic_smem_limit(reinterpret_cast<const void*>(topk_kernel<false>), &err) < 0) return err;
    topk_kernel<false><<<grid, kThreads, cand_bytes, stream>>>(prm);
  }
  return cudaGetLastError();
}

}  // namespace dsv4ffi
