// The MoE router (our own kernel): the scores sqrt(softplus(logits)), the experts (top-k of scores + bias, ties to the
// lower expert id as lax.top_k, or the hash table's row of the token) and the weights (the chosen scores over their
// sum, times route_scale), one warp per token: the arithmetic of dsv4_jax.ops.router.route, one launch where XLA runs
// an elementwise fusion, a top-k and a gather + normalisation.
//
// Expert e lives in lane e % 32, register e / 32. Top-k: k rounds of a warp arg-max over (value, -id) pairs; the
// winner's lane marks it taken. The weights are recomputed by the lanes that hold the k results from the logits of
// their expert (the same operations, so the same bits) and summed in result order, as a k-wide row reduction.
#include <cstdint>

#include "kernels.h"
#include "layer_index.cuh"

namespace dsv4ffi {
namespace {

constexpr int kRouteWarps = 4;  // tokens per block
constexpr int kMaxPerLane = kRouteMaxExperts / 32;

__device__ __forceinline__ float score_of(float x) {
  const float sp = x > 20.f ? x : log1pf(expf(fminf(x, 20.f)));  // torch's softplus, threshold 20
  return sqrtf(sp);
}

__global__ void __launch_bounds__(kRouteWarps * 32) route_kernel(const RouteArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
  if (t >= a.tokens) return;
  const float* logits = a.logits + t * a.experts;
  const int64_t layer = device_layer(a.layer, a.layers);
  int chosen = -1;  // lanes 0..k-1: the expert of result `lane`
  if (a.table != nullptr) {
    int64_t tok = a.token_ids[t];
    tok = tok < 0 ? 0 : (tok >= a.vocab ? a.vocab - 1 : tok);  // clamped, as XLA's gather clamps the reference's
    if (lane < a.k) chosen = a.table[(layer * a.vocab + tok) * a.k + lane];
  } else {
    const float* bias = a.bias + layer * a.experts;
    float v[kMaxPerLane];
    uint32_t taken = 0;  // bit j: register j's expert is chosen
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j) {
      const int e = lane + 32 * j;
      v[j] = e < a.experts ? score_of(logits[e]) + bias[e] : 0.f;
      if (e >= a.experts) taken |= 1u << j;
    }
    for (int r = 0; r < a.k; ++r) {
      float best = 0.f;
      int best_e = -1;
#pragma unroll
      for (int j = 0; j < kMaxPerLane; ++j) {
        if (taken & (1u << j)) continue;
        if (best_e < 0 || v[j] > best) best = v[j], best_e = lane + 32 * j;  // ascending ids: ties keep the lower
      }
#pragma unroll
      for (int o = 16; o; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
        const bool better = oe >= 0 && (best_e < 0 || ob > best || (ob == best && oe < best_e));
        if (better) best = ob, best_e = oe;
      }
      if (lane == r) chosen = best_e;
      if (best_e >= 0 && (best_e & 31) == lane) taken |= 1u << (best_e >> 5);
    }
  }
  const float s = lane < a.k && chosen >= 0 && chosen < a.experts ? score_of(logits[chosen]) : 0.f;
  float sum = 0.f;
  for (int i = 0; i < a.k; ++i) sum += __shfl_sync(0xffffffffu, s, i);
  if (lane < a.k) {
    a.weights[t * a.k + lane] = __fmul_rn(__fdiv_rn(s, sum), a.route_scale);
    a.ids[t * a.k + lane] = chosen;
  }
}

}  // namespace

cudaError_t launch_route(const RouteArgs& a, cudaStream_t stream) {
  if (a.experts > kRouteMaxExperts || a.k < 1 || a.k > 32 || a.k > a.experts) return cudaErrorInvalidValue;
  if (a.tokens == 0) return cudaSuccess;
  const unsigned blocks = unsigned((a.tokens + kRouteWarps - 1) / kRouteWarps);
  route_kernel<<<blocks, kRouteWarps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace dsv4ffi
