// The query heads after wq_b (reference dsv4_jax.ops.q_heads): each head's weightless RMS norm in the reference's
// bf16 tensor arithmetic (square, mean, + eps, rsqrt and the product each rounded to bf16; the mean's sum in fp32),
// then RoPE of the last `rope` channels at the token's position (fp32, rounded to bf16). XLA ran it as three fusions per
// layer at decode (the squares' reduction, the RoPE slice and its concatenation).
//
// A warp per head of 512 (or 128, 256) channels: lane l holds chunks of 8 channels at 8 l, 8 l + 256, ... (16-byte
// loads), the squares' sum a butterfly (a fixed order, not XLA's: fp32 noise before the bf16 roundings).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp8_convert.cuh"
#include "kernels.h"

namespace dsv4ffi {
namespace {

constexpr int kQHeadsWarps = 8;  // heads per block

template <int D>
__global__ void __launch_bounds__(kQHeadsWarps * 32) q_heads_kernel(const QHeadsArgs a) {
  constexpr int kChunks = D / 256;  // 8-channel chunks per lane
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t head = int64_t(blockIdx.x) * kQHeadsWarps + warp;  // over rows x heads
  if (head >= a.rows * a.heads) return;
  const int64_t row = head / a.heads;
  const __nv_bfloat16* q = a.q + head * D;
  uint4 raw[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) raw[c] = *reinterpret_cast<const uint4*>(q + 256 * c + 8 * lane);
  float x[kChunks][8];
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw[c]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(p[i]);
      x[c][2 * i] = f.x, x[c][2 * i + 1] = f.y;
      ss += bf16_round(f.x * f.x) + bf16_round(f.y * f.y);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  const float ms = bf16_round(ss / float(D));
  const float r = bf16_round(rsqrtf(bf16_round(ms + a.eps)));
  const int nope = D - a.rope;
  const float pos = float(a.pos[row]);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int e0 = 256 * c + 8 * lane;
    float y[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) y[i] = bf16_round(x[c][i] * r);
    if (e0 >= nope) {  // a whole chunk of the RoPE tail (nope is a multiple of 8): pairs (2i, 2i + 1)
#pragma unroll
      for (int i = 0; i < 8; i += 2) {
        const float ang = pos * a.inv_freq[(e0 + i - nope) / 2];
        const float cs = cosf(ang), sn = sinf(ang);
        const float y0 = y[i] * cs - y[i + 1] * sn, y1 = y[i] * sn + y[i + 1] * cs;
        y[i] = y0, y[i + 1] = y1;
      }
    }
    uint4 out;
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = __floats2bfloat162_rn(y[2 * i], y[2 * i + 1]);
    *reinterpret_cast<uint4*>(a.out + head * D + e0) = out;
  }
}

}  // namespace

const char* q_heads_unsupported(int64_t d, int64_t rope) {
  if (d != 512 && d != 256) return "the head width must be 512 or 256";
  if (rope <= 0 || rope % 8 != 0 || rope > d) return "the RoPE dims must be a positive multiple of 8, at most the width";
  return nullptr;
}

cudaError_t launch_q_heads(const QHeadsArgs& a, cudaStream_t stream) {
  if (q_heads_unsupported(a.d, a.rope) != nullptr) return cudaErrorInvalidValue;
  const int64_t heads = a.rows * a.heads;
  if (heads == 0) return cudaSuccess;
  const unsigned blocks = unsigned((heads + kQHeadsWarps - 1) / kQHeadsWarps);
  if (a.d == 512) {
    q_heads_kernel<512><<<blocks, kQHeadsWarps * 32, 0, stream>>>(a);
  } else {
    q_heads_kernel<256><<<blocks, kQHeadsWarps * 32, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace dsv4ffi
