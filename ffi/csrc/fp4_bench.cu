// Developer tool, not part of the extension build. Standalone timing of the MXFP4 decode kernels (no JAX): Flash
// shapes (E=256, D=4096, I=2048, top-6), pairs sorted by expert, R different routings per CUDA graph (XLA's command
// buffers replay graphs too), the variants (wg, wg8, wgb, ring; wgbS: wgb on the slab layout of kernels.h)
// interleaved; the bytes read are the packed weights + scales of the experts hit (+ activations). Also compares the
// variants' outputs with ring's (wg: summation order only; wg8: its 13-bit FP8 accumulator) and wgbS's with wgb's
// (must be bit-identical). span >= 12 exercises the wg variants' exact per-block path.
//   nvcc -std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a -I ffi/csrc ffi/csrc/fp4_bench.cu \
//        ffi/csrc/fp4_gemv_kernels.cu ffi/csrc/fp4_wg_kernels.cu ffi/csrc/fp4_wgb_kernels.cu ffi/csrc/launch_util.cu \
//        -o /tmp/fp4_bench
//   [FP4_BENCH_T=1,2,4,8] [FP4_BENCH_SLABS_IN_PLACE=1] /tmp/fp4_bench [span [time|cmp|once [E D I]]]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"

using namespace dsv4ffi;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

__global__ void fill_bytes(uint8_t* p, size_t n, uint32_t seed, int lo, int span) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed ^ uint32_t(i >> 32) * 40503u;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
    p[i] = span ? uint8_t(lo + h % span) : uint8_t(h);
  }
}
// The slab layout of kernels.h (quant.fp4_to_slabs) of weights [rows, k/2] and scales [rows, k/32].
__global__ void to_slabs(const uint8_t* w, const uint8_t* s, uint8_t* ws, uint8_t* ss, size_t rows, int64_t k) {
  const size_t half = k / 2, nw = rows * half;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < nw; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / half, kb = i % half;
    ws[((r / 16) * (k / 128) + kb / 64) * 1024 + (r % 16) * 64 + kb % 64] = w[i];
    if (kb % 16 == 0) {  // the 32-block of these 16 bytes: scale byte kb / 16 of the row
      const size_t blk = kb / 16;
      ss[(((r / 16) * (k / 128) + blk / 4) * 16 + r % 16) * 4 + blk % 4] = s[r * (k / 32) + blk];
    }
  }
}

__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    uint32_t h2 = h * 3266489917u; h2 ^= h2 >> 16;
    const float u1 = (h & 0xFFFFFF) / 16777216.f + 1e-7f, u2 = (h2 & 0xFFFFFF) / 16777216.f;
    p[i] = __float2bfloat16(scale * sqrtf(-2.f * logf(u1)) * cosf(6.2831853f * u2));
  }
}

int main(int argc, char** argv) {
  // fp4bench [span [mode [E D I]]]: mode time (default) | cmp (only the agreement of the variants) | once (ncu)
  const int span = argc > 1 ? atoi(argv[1]) : 8;  // scale bytes 117 .. 117 + span - 1 (the benchmark's: 8)
  const std::string mode = argc > 2 ? argv[2] : "time";
  const bool once = mode == "once", cmp_only = mode == "cmp";
  const int E = argc > 5 ? atoi(argv[3]) : 256, D = argc > 5 ? atoi(argv[4]) : 4096, I = argc > 5 ? atoi(argv[5]) : 2048;
  const int TOPK = std::min(6, E), R = cmp_only ? 4 : 32;
  constexpr int NV = 5;
  const char* vname[NV] = {"wg  ", "wg8 ", "wgb ", "wgbS", "ring"};
  const int vid[NV] = {kFp4Wg, kFp4Wg8, kFp4Wgb, kFp4Wgb, kFp4Ring};
  const bool vslab[NV] = {false, false, false, true, false};
  constexpr int kRef = NV - 1;  // ring: the others are compared with it
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  uint8_t *w1, *w3, *w2, *s1, *s3, *s2;
  const size_t wn = size_t(E) * I * D / 2, sn = size_t(E) * I * D / 32;
  CK(cudaMalloc(&w1, wn)); CK(cudaMalloc(&w3, wn)); CK(cudaMalloc(&w2, wn));
  CK(cudaMalloc(&s1, sn)); CK(cudaMalloc(&s3, sn)); CK(cudaMalloc(&s2, sn));
  fill_bytes<<<4096, 256>>>(w1, wn, 1, 0, 0); fill_bytes<<<4096, 256>>>(w3, wn, 2, 0, 0);
  fill_bytes<<<4096, 256>>>(w2, wn, 3, 0, 0);
  fill_bytes<<<4096, 256>>>(s1, sn, 4, 117, span); fill_bytes<<<4096, 256>>>(s3, sn, 5, 117, span);
  fill_bytes<<<4096, 256>>>(s2, sn, 6, 117, span);
  uint8_t *w1s, *w3s, *w2s, *s1s, *s3s, *s2s;  // the slab layout of the same weights
  CK(cudaMalloc(&w1s, wn)); CK(cudaMalloc(&w3s, wn)); CK(cudaMalloc(&w2s, wn));
  CK(cudaMalloc(&s1s, sn)); CK(cudaMalloc(&s3s, sn)); CK(cudaMalloc(&s2s, sn));
  to_slabs<<<4096, 256>>>(w1, s1, w1s, s1s, size_t(E) * I, D); to_slabs<<<4096, 256>>>(w3, s3, w3s, s3s, size_t(E) * I, D);
  to_slabs<<<4096, 256>>>(w2, s2, w2s, s2s, size_t(E) * D, I);
  if (std::getenv("FP4_BENCH_SLABS_IN_PLACE") != nullptr) {  // wgbS reads the stored buffers as slabs: timing only
    w1s = w1, w3s = w3, w2s = w2, s1s = s1, s3s = s3, s2s = s2;  // (its outputs then differ from wgb's)
    printf("FP4_BENCH_SLABS_IN_PLACE: wgbS reads wgb's buffers as if in slabs\n");
  }
  // copy ceiling: 2 GiB D2D (read + write)
  void *ca, *cb; const size_t cn = size_t(1) << 30;
  CK(cudaMalloc(&ca, cn)); CK(cudaMalloc(&cb, cn));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  float best = 1e9;
  for (int i = 0; i < 5; ++i) {
    CK(cudaEventRecord(e0)); CK(cudaMemcpyAsync(cb, ca, cn, cudaMemcpyDeviceToDevice)); CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); best = std::min(best, ms);
  }
  const double bw = 2.0 * cn / (best * 1e-3);
  CK(cudaFree(ca)); CK(cudaFree(cb));
  printf("SMs %d, copy ceiling %.2f TB/s, scale-byte span %d, E %d D %d I %d\n", sms, bw / 1e12, span, E, D, I);

  std::mt19937 rng(14);
  cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  std::vector<int> tokens = {1, 2, 4, 8};  // FP4_BENCH_T=1,8,32: other token counts (32: a batch-32 decode step)
  if (const char* v = std::getenv("FP4_BENCH_T")) {
    tokens.clear();
    for (std::string t = v; !t.empty();) {
      const size_t c = t.find(',');
      tokens.push_back(std::atoi(t.substr(0, c).c_str()));
      t = c == std::string::npos ? "" : t.substr(c + 1);
    }
  }
  for (int T : tokens) {
    if (once && T != 1 && T != 8) continue;
    const int P = T * TOPK;
    std::vector<int32_t> rows_h(size_t(R) * P), grp_h(size_t(R) * P);
    std::vector<float> rw_h(size_t(R) * P);
    double active = 0;
    for (int r = 0; r < R; ++r) {
      std::vector<std::pair<int, int>> pr;
      for (int t = 0; t < T; ++t) {
        std::vector<int> ex(E); std::iota(ex.begin(), ex.end(), 0); std::shuffle(ex.begin(), ex.end(), rng);
        if (t == 0 && r == 1) ex[0] = -1;  // an invalid pair: zero rows
        for (int j = 0; j < TOPK; ++j) pr.push_back({ex[j], t});
      }
      std::stable_sort(pr.begin(), pr.end(), [](auto& a, auto& b) { return a.first < b.first; });
      int distinct = 0;
      for (int i = 0; i < P; ++i) {
        grp_h[size_t(r) * P + i] = pr[i].first, rows_h[size_t(r) * P + i] = pr[i].second;
        rw_h[size_t(r) * P + i] = 0.05f + 0.9f * (rng() % 1000) / 1000.f;
        distinct += i == 0 || pr[i].first != pr[i - 1].first;
      }
      active += distinct;
    }
    active /= R;
    int32_t *rows, *grp; float* rw; __nv_bfloat16 *x, *h[NV], *y[NV];
    CK(cudaMalloc(&rows, rows_h.size() * 4)); CK(cudaMalloc(&grp, grp_h.size() * 4)); CK(cudaMalloc(&rw, rw_h.size() * 4));
    CK(cudaMemcpy(rows, rows_h.data(), rows_h.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(grp, grp_h.data(), grp_h.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(rw, rw_h.data(), rw_h.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&x, size_t(R) * T * D * 2));
    fill_bf16<<<1024, 256>>>(x, size_t(R) * T * D, 77 + T, 32.f / 64.f);
    for (int v = 0; v < NV; ++v) {
      CK(cudaMalloc(&h[v], size_t(R) * P * I * 2)); CK(cudaMalloc(&y[v], size_t(R) * P * D * 2));
      CK(cudaMemset(h[v], 0xFF, size_t(R) * P * I * 2)); CK(cudaMemset(y[v], 0xFF, size_t(R) * P * D * 2));
    }
    auto gate_up = [&](int v, int r) {
      Fp4GemvArgs a{x + size_t(r) * T * D, T, rows + size_t(r) * P, grp + size_t(r) * P,
                    {vslab[v] ? w1s : w1, vslab[v] ? w3s : w3}, {vslab[v] ? s1s : s1, vslab[v] ? s3s : s3}, E,
                    h[v] + size_t(r) * P * I, P, I, D, std::min(T, 8), rw + size_t(r) * P, 10.f};
      a.variant = vid[v];
      a.slabs = vslab[v];
      CK(launch_fp4_gemv(a, st));
    };
    auto down = [&](int v, int r) {
      Fp4GemvArgs a{h[v] + size_t(r) * P * I, P, nullptr, grp + size_t(r) * P, {vslab[v] ? w2s : w2, nullptr},
                    {vslab[v] ? s2s : s2, nullptr}, E, y[v] + size_t(r) * P * D, P, D, I, std::min(T, 8)};
      a.variant = vid[v];
      a.slabs = vslab[v];
      CK(launch_fp4_gemv(a, st));
    };
    if (once) {
      for (int v = 0; v < NV; ++v) gate_up(v, 0), down(v, 0);
      CK(cudaStreamSynchronize(st));
      continue;
    }
    const double per_expert = 3.0 * (double(I) * D / 2 + double(I) * D / 32);
    const char* names[3] = {"gate/up + down", "  gate/up alone", "  down alone"};
    const double bytes[3] = {active * per_expert + T * D * 2 + P * I * 2, active * per_expert * 2 / 3 + T * D * 2,
                             active * per_expert / 3 + P * I * 2};
    cudaGraphExec_t ge[NV][3];
    for (int v = 0; v < NV; ++v)
      for (int m = 0; m < 3; ++m) {
        cudaGraph_t g;
        CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        for (int r = 0; r < R; ++r) {
          if (m != 2) gate_up(v, r);
          if (m != 1) down(v, r);
        }
        CK(cudaStreamEndCapture(st, &g)); CK(cudaGraphInstantiate(&ge[v][m], g, 0)); CK(cudaGraphDestroy(g));
      }
    std::vector<float> ts[NV][3];
    for (int rep = 0; rep < (cmp_only ? 0 : 7); ++rep)
      for (int m = 0; m < 3; ++m)
        for (int v = 0; v < NV; ++v) {
          CK(cudaGraphLaunch(ge[v][m], st));  // warm
          CK(cudaEventRecord(e0, st));
          for (int k = 0; k < 4; ++k) CK(cudaGraphLaunch(ge[v][m], st));
          CK(cudaEventRecord(e1, st)); CK(cudaEventSynchronize(e1));
          float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); ts[v][m].push_back(ms * 1e3f / (4 * R));
        }
    for (int m = 0; m < 3 && !cmp_only; ++m)
      for (int v = 0; v < NV; ++v) {
        auto t = ts[v][m]; std::sort(t.begin(), t.end());
        printf("T=%d active %.1f %-16s [%s] median %7.1f us (min %7.1f)  %5.1f%% of copy BW\n", T, active, names[m],
               vname[v], t[t.size() / 2], t[0], 100.0 * bytes[m] / (t[t.size() / 2] * 1e-6) / bw);
      }
    // agreement of the variants with ring (h and y of a full graph run; each y from its own h)
    for (int v = 0; v < NV; ++v) CK(cudaGraphLaunch(ge[v][0], st));
    CK(cudaStreamSynchronize(st));
    auto fetch = [&](__nv_bfloat16* d, size_t n) {
      std::vector<__nv_bfloat16> o(n); CK(cudaMemcpy(o.data(), d, n * 2, cudaMemcpyDeviceToHost)); return o; };
    auto cmp = [&](const std::vector<__nv_bfloat16>& a, const std::vector<__nv_bfloat16>& b, const char* what, int v,
                   const char* ref) {
      double num = 0, den = 0; size_t same = 0, bad = 0, zero_rows_bad = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        const double u = __bfloat162float(a[i]), w = __bfloat162float(b[i]);
        if (!std::isfinite(u) || !std::isfinite(w)) { ++bad; continue; }
        num += (u - w) * (u - w), den += w * w; same += u == w;
      }
      printf("    T=%d %s %s vs %s: rel-RMS %.2e, bit-identical %.4f, non-finite %zu, rms %.3e\n", T, what, vname[v], ref,
             std::sqrt(num / std::max(den, 1e-300)), double(same) / a.size(), bad, std::sqrt(den / a.size()));
      (void)zero_rows_bad;
    };
    const auto hr = fetch(h[kRef], size_t(R) * P * I), yr = fetch(y[kRef], size_t(R) * P * D);
    for (int v = 0; v < kRef; ++v) {
      cmp(fetch(h[v], hr.size()), hr, "h", v, "ring");
      cmp(fetch(y[v], yr.size()), yr, "y", v, "ring");
    }
    cmp(fetch(h[3], hr.size()), fetch(h[2], hr.size()), "h", 3, "wgb (must be 1.0000 identical)");
    cmp(fetch(y[3], yr.size()), fetch(y[2], yr.size()), "y", 3, "wgb (must be 1.0000 identical)");
    for (int v = 0; v < NV; ++v) { for (int m = 0; m < 3; ++m) cudaGraphExecDestroy(ge[v][m]); cudaFree(h[v]); cudaFree(y[v]); }
    cudaFree(rows); cudaFree(grp); cudaFree(rw); cudaFree(x);
  }
  printf("done: %s\n", cudaGetErrorString(cudaGetLastError()));
}
