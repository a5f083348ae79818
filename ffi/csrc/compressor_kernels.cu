// The compressor's decode step (our own kernels): one new token per row on top of the block state, the arithmetic
// of dsv4_jax.ops.compressor.compress_step with k = 1 (its reference) in two launches instead of ~10 XLA fusions.
//
//   1. pool (grid rows x Dc/32, 8 warps): a lane per entry channel, the warps over the slots. Slot s of the aligned
//      layout is state row s (s < the new token's slot), the new token's projections (its score plus ape), or
//      invalid (kv 0, score NEG); CSA pools the first Dc channels of rows 0..m-1 and the last Dc of rows m..2m-1.
//      Softmax over the slots as jax.nn.softmax computes it (max, exp(x - max), their sum, divide), then the weighted
//      sum; fp32 to the workspace. The same CTA writes the state after the step for the columns it covers.
//   2. finish (grid rows, Dc/2 threads, a channel pair each): bf16 round, RMSNorm (weight multiply in fp32 before the
//      cast), RoPE of the tail at the block's first position, then FP8 e4m3 simulation of the non-RoPE dims in
//      blocks of 64 (main) or the 128-point Hadamard and FP4 e2m1 simulation in blocks of 32 (indexer).
// Sums run in a fixed order that need not be XLA's: results agree to fp32 rounding before each bf16 rounding.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "fp8_convert.cuh"
#include "kernels.h"
#include "layer_index.cuh"

namespace dsv4ffi {
namespace {

constexpr int kPoolWarps = 8;
constexpr int kPoolLanes = 32;               // entry channels per pooling CTA
constexpr int kMaxSlotsPerWarp = 128 / kPoolWarps;  // HCA: 128 slots
constexpr float kNeg = -3.40282347e+38f;     // float32 min, the reference's NEG

struct Layout {  // where a row's step sits in its blocks
  int r, pre, new_slot;
  int64_t base, end, after;  // position of slot 0, start + n_new, first position of the state after the step
};

__device__ __forceinline__ Layout layout(const CompressorDecodeArgs& a, int64_t row) {
  const int m = a.ratio, coff = m == 4 ? 2 : 1;
  const int64_t start = a.start[row], end = start + a.n_new[row];
  Layout l;
  l.r = int(start % m);
  l.pre = (coff - 1) * m;
  l.new_slot = l.pre + l.r;
  l.base = start - l.r - l.pre;
  l.end = end;
  l.after = end - end % m - l.pre;
  return l;
}

__global__ void __launch_bounds__(kPoolWarps * 32) compressor_pool_kernel(const CompressorDecodeArgs a) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int m = a.ratio, coff = m == 4 ? 2 : 1, dc = a.dc, width = coff * dc, slots = coff * m;
  const int c = blockIdx.y * kPoolLanes + lane;
  const int64_t layer = device_layer(a.layer, a.layers), player = device_layer(a.param_layer, a.param_layers);
  const Layout l = layout(a, row);
  const float* kv_old = a.kv_state + (layer * a.rows + row) * slots * width;
  const float* sc_old = a.sc_state + (layer * a.rows + row) * slots * width;
  const float* ape = a.ape + player * m * width;
  const float* kv_new = a.kv_new + row * width;
  const float* sc_new = a.sc_new + row * width;

  // slot s of channel c: state row s, column c (CSA: c + Dc for the second block's rows)
  float kv[kMaxSlotsPerWarp], sc[kMaxSlotsPerWarp];
  float mx = kNeg;
#pragma unroll
  for (int i = 0; i < kMaxSlotsPerWarp; ++i) {
    const int s = warp + kPoolWarps * i;
    kv[i] = 0.f, sc[i] = kNeg;
    if (s >= slots) continue;
    const int col = (coff == 2 && s >= m) ? dc + c : c;
    const int64_t pos = l.base + s;
    if (pos < 0 || pos >= l.end || s > l.new_slot) continue;
    if (s < l.new_slot) {
      kv[i] = kv_old[int64_t(s) * width + col], sc[i] = sc_old[int64_t(s) * width + col];
    } else {
      kv[i] = kv_new[col], sc[i] = sc_new[col] + ape[l.r * width + col];
    }
    mx = fmaxf(mx, sc[i]);
  }
  __shared__ float red[kPoolWarps][kPoolLanes];
  red[warp][lane] = mx;
  __syncthreads();
  mx = red[0][lane];
#pragma unroll
  for (int w = 1; w < kPoolWarps; ++w) mx = fmaxf(mx, red[w][lane]);
  __syncthreads();
  float den = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxSlotsPerWarp; ++i) {
    if (warp + kPoolWarps * i >= slots) continue;
    sc[i] = expf(sc[i] - mx);  // from here on sc holds the unnormalised weights
    den += sc[i];
  }
  red[warp][lane] = den;
  __syncthreads();
  den = red[0][lane];
#pragma unroll
  for (int w = 1; w < kPoolWarps; ++w) den += red[w][lane];
  __syncthreads();
  float e = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxSlotsPerWarp; ++i) {
    if (warp + kPoolWarps * i >= slots) continue;
    e += kv[i] * __fdiv_rn(sc[i], den);
  }
  red[warp][lane] = e;
  __syncthreads();
  if (warp == 0) {
    e = red[0][lane];
#pragma unroll
    for (int w = 1; w < kPoolWarps; ++w) e += red[w][lane];
    a.pooled[row * dc + c] = e;
  }

  // The state after the step, columns c (and c + Dc for CSA): row j holds position after + j if it is below end,
  // i.e. the aligned slot after + j - base, else kv 0 / score NEG.
  float* kv_out = a.kv_out + row * slots * width;
  float* sc_out = a.sc_out + row * slots * width;
  for (int j = warp; j < slots; j += kPoolWarps) {
    const int64_t pos = l.after + j;
    const bool ok = pos >= 0 && pos < l.end;
    const int src = int(pos - l.base);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h == 1 && coff == 1) break;
      const int col = c + h * dc;
      float v = 0.f, s = kNeg;
      if (ok && src < l.new_slot) {
        v = kv_old[int64_t(src) * width + col], s = sc_old[int64_t(src) * width + col];
      } else if (ok) {  // the new token's slot
        v = kv_new[col], s = sc_new[col] + ape[l.r * width + col];
      }
      kv_out[int64_t(j) * width + col] = v;
      sc_out[int64_t(j) * width + col] = s;
    }
  }
}

// Round |v| <= 6 to the nearest e2m1 value, ties to even (0, 0.5, 1, 1.5, 2, 3, 4, 6; even codes win the ties).
__device__ __forceinline__ float e2m1_rne(float v) {
  const float x = fabsf(v);
  float q;
  if (x <= 0.25f) q = 0.f;
  else if (x < 0.75f) q = 0.5f;
  else if (x <= 1.25f) q = 1.f;
  else if (x < 1.75f) q = 1.5f;
  else if (x <= 2.5f) q = 2.f;
  else if (x < 3.5f) q = 3.f;
  else if (x <= 5.f) q = 4.f;
  else q = 6.f;
  return copysignf(q, v);
}

// The steps a row shares with the window KV row below, a channel pair (x0, x1) = (2t, 2t + 1) per thread of a
// block of kWarps warps. RMSNorm over the row: the squares summed in a fixed tree, x * rsqrt(mean + eps), the
// weight multiplied in fp32 before the cast (nn.rms_norm). Every thread of the block must call it (barrier).
template <int kWarps>
__device__ __forceinline__ void rms_norm_pair(float& x0, float& x1, const __nv_bfloat16* wn, int t, int dc, float eps,
                                              float* red) {
  const int lane = t & 31, warp = t >> 5;
  float ss = x0 * x0 + x1 * x1;
#pragma unroll
  for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  ss = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) ss += red[w];
  const float rs = rsqrtf(ss / float(dc) + eps);
  x0 = bf16_round(__fmul_rn(__bfloat162float(wn[2 * t]), __fmul_rn(x0, rs)));
  x1 = bf16_round(__fmul_rn(__bfloat162float(wn[2 * t + 1]), __fmul_rn(x1, rs)));
}

// RoPE of the pair at `pos` where it lies in the tail (channels >= nope): rotated by pos * inv_freq[i], bf16.
__device__ __forceinline__ void rope_pair(float& x0, float& x1, int t, int nope, int64_t pos, const float* inv_freq) {
  if (2 * t < nope) return;
  const float ang = float(pos) * inv_freq[(2 * t - nope) / 2];
  const float cs = cosf(ang), sn = sinf(ang);
  const float y0 = x0 * cs - x1 * sn, y1 = x0 * sn + x1 * cs;
  x0 = bf16_round(y0), x1 = bf16_round(y1);
}

// e4m3 bytes of x / s (clipped to +-448, satfinite), and their values times s rounded to bf16 (quant.fp8_sim).
__device__ __forceinline__ __nv_fp8x2_storage_t fp8_pair(float& x0, float& x1, float s) {
  const float q0 = fminf(fmaxf(__fdiv_rn(x0, s), -448.f), 448.f), q1 = fminf(fmaxf(__fdiv_rn(x1, s), -448.f), 448.f);
  const __nv_fp8x2_storage_t q = __nv_cvt_float2_to_fp8x2(make_float2(q0, q1), __NV_SATFINITE, __NV_E4M3);
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(q, __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  x0 = bf16_round(f.x * s), x1 = bf16_round(f.y * s);
  return q;
}

// The scale of an FP8 tile of 64 channels (one warp, a pair per lane): act_pow2_scale of the tile's amax.
__device__ __forceinline__ float fp8_tile_scale(float x0, float x1) {
  float amax = fmaxf(fabsf(x0), fabsf(x1));
#pragma unroll
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  return act_pow2_scale(amax);
}

template <int DC>
__global__ void __launch_bounds__(DC / 2) compressor_finish_kernel(const CompressorDecodeArgs a) {
  constexpr int kThreads = DC / 2, kWarps = kThreads / 32;
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x;
  const int64_t player = device_layer(a.param_layer, a.param_layers);
  const Layout l = layout(a, row);
  __shared__ float red[kWarps];
  __shared__ float hx[DC];

  float x0 = bf16_round(a.pooled[row * DC + 2 * t]), x1 = bf16_round(a.pooled[row * DC + 2 * t + 1]);
  rms_norm_pair<kWarps>(x0, x1, a.norm_w + player * DC, t, DC, a.eps, red);
  const int nope = DC - a.rope;
  rope_pair(x0, x1, t, nope, l.base + l.pre, a.inv_freq);  // at the block's first position

  if (a.rotate) {  // (x @ H_128) * 128^-0.5 in fp32 (Sylvester order: H[i][j] = (-1)^popc(i & j)), bf16, then FP4
    hx[2 * t] = x0, hx[2 * t + 1] = x1;
    __syncthreads();
    float h0 = 0.f, h1 = 0.f;
#pragma unroll 8
    for (int i = 0; i < DC; ++i) {
      const float v = hx[i];
      h0 += (__popc(i & (2 * t)) & 1) ? -v : v;
      h1 += (__popc(i & (2 * t + 1)) & 1) ? -v : v;
    }
    const float norm = 0x1.6a09e6p-4f;  // float32(128 ** -0.5)
    x0 = bf16_round(h0 * norm), x1 = bf16_round(h1 * norm);
    // FP4 blocks of 32 channels = 16 threads
    float amax = fmaxf(fabsf(x0), fabsf(x1));
#pragma unroll
    for (int o = 8; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float s = pow2_ceil(__fmul_rn(fmaxf(amax, 6.0f * 0x1p-126f), float(1.0 / 6.0)));
    x0 = bf16_round(e2m1_rne(fminf(fmaxf(__fdiv_rn(x0, s), -6.f), 6.f)) * s);
    x1 = bf16_round(e2m1_rne(fminf(fmaxf(__fdiv_rn(x1, s), -6.f), 6.f)) * s);
  } else if (2 * t < nope) {  // FP8 blocks of 64 channels = one warp
    fp8_pair(x0, x1, fp8_tile_scale(x0, x1));
  }
  __nv_bfloat162 out;
  out.x = __float2bfloat16_rn(x0), out.y = __float2bfloat16_rn(x1);
  reinterpret_cast<__nv_bfloat162*>(a.entry + row * DC)[t] = out;
}

// ---- The window KV row of a decode step: Attention.window_kv, then kv_format.pack_kv ---------------------------
// Block per row, a channel pair per thread: RMSNorm (kv_norm), RoPE of the tail at the token's position, FP8 e4m3
// simulation of the NoPE channels in tiles of 64 (a warp a tile) -> kv bf16 [rows, D]; then, with `packed`, the row
// in the packed layout: each tile's scale recomputed from its simulated values (pack_kv's act_quant: lossless, see
// kv_format) and its e4m3 bytes, the RoPE values as bf16, the scale bytes, zero padding. Five XLA fusions at decode
// (the norm's reduction, the amax of the simulation and of the packing, the RoPE and the packing concatenations).
template <int D>
__global__ void __launch_bounds__(D / 2) kv_row_kernel(const KvRowArgs a) {
  constexpr int kThreads = D / 2, kWarps = kThreads / 32;
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  __shared__ float red[kWarps];
  const __nv_bfloat162 in = reinterpret_cast<const __nv_bfloat162*>(a.kv_in + row * D)[t];
  float x0 = __low2float(in), x1 = __high2float(in);
  rms_norm_pair<kWarps>(x0, x1, a.norm_w + device_layer(a.layer, a.layers) * D, t, D, a.eps, red);
  const int nope = D - a.rope;
  rope_pair(x0, x1, t, nope, a.pos[row], a.inv_freq);
  const bool tile = 2 * t < nope;  // warp-uniform: nope is a multiple of 64
  if (tile) fp8_pair(x0, x1, fp8_tile_scale(x0, x1));
  __nv_bfloat162 out;
  out.x = __float2bfloat16_rn(x0), out.y = __float2bfloat16_rn(x1);
  reinterpret_cast<__nv_bfloat162*>(a.kv_out + row * D)[t] = out;
  if (a.packed == nullptr) return;
  uint8_t* p = a.packed + row * a.row_bytes;
  if (tile) {
    const float s = fp8_tile_scale(x0, x1);
    const __nv_fp8x2_storage_t q = fp8_pair(x0, x1, s);
    reinterpret_cast<__nv_fp8x2_storage_t*>(p)[t] = q;
    if (lane == 0) p[nope + 2 * a.rope + warp] = uint8_t((__float_as_uint(s) >> 23) & 0xFFu);  // UE8M0
  } else {
    reinterpret_cast<__nv_bfloat162*>(p + nope)[t - nope / 2] = out;
  }
  const int used = nope + 2 * a.rope + nope / 64;
  if (t < a.row_bytes - used) p[used + t] = 0;
}

}  // namespace

const char* compressor_decode_unsupported(int ratio, int64_t dc, int64_t rope, bool rotate) {
  if (ratio != 4 && ratio != 128) return "ratio must be 4 or 128";
  if (dc != 128 && dc != 512) return "the entry width must be 128 or 512";
  if (rotate && dc != 128) return "rotated (indexer) entries are 128 wide";
  if (rope <= 0 || rope % 64 != 0 || rope > dc) return "the RoPE dims must be a positive multiple of 64, at most Dc";
  return nullptr;
}

cudaError_t launch_compressor_decode(const CompressorDecodeArgs& a, cudaStream_t stream) {
  if (compressor_decode_unsupported(a.ratio, a.dc, a.rope, a.rotate) != nullptr) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  compressor_pool_kernel<<<dim3(unsigned(a.rows), unsigned(a.dc / kPoolLanes)), kPoolWarps * 32, 0, stream>>>(a);
  if (a.dc == 512) {
    compressor_finish_kernel<512><<<unsigned(a.rows), 256, 0, stream>>>(a);
  } else {
    compressor_finish_kernel<128><<<unsigned(a.rows), 64, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

const char* kv_row_unsupported(int64_t d, int64_t rope, int64_t row_bytes) {
  if (d != 512 && d != 128) return "the row width D must be 512 or 128";
  if (rope <= 0 || rope % 2 != 0 || rope > d || (d - rope) % 64 != 0)
    return "the RoPE dims must be even and leave the NoPE dims a multiple of 64";
  const int64_t used = (d - rope) + 2 * rope + (d - rope) / 64;
  if (row_bytes != 0 && (row_bytes < used || row_bytes - used > d / 2 || row_bytes % 2 != 0))
    return "the packed row must hold the NoPE bytes, the RoPE bf16s and the scale bytes, padded";
  return nullptr;
}

cudaError_t launch_kv_row(const KvRowArgs& a, cudaStream_t stream) {
  if (kv_row_unsupported(a.d, a.rope, a.packed ? a.row_bytes : 0) != nullptr) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  if (a.d == 512) {
    kv_row_kernel<512><<<unsigned(a.rows), 256, 0, stream>>>(a);
  } else {
    kv_row_kernel<128><<<unsigned(a.rows), 64, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace dsv4ffi
