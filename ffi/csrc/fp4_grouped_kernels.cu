// MXFP4 routed experts at prefill sizes in one pass per projection (the grouped route of kernels/moe_fp4.py): rows
// sorted by expert (group_sizes: expert e's rows follow expert e-1's from row 0), each row's expert's MXFP4 weight
// (one layer of a stack on the device, or the slab layout: the decode kernels' operands as stored), bf16 out:
//
//   out[r, n] = sum over 128-wide K chunks c of  sa[r, c] * sum_{k in c} qa[r, k] * W[e(r), n, k]
//
// qa, sa: the rows quantized to FP8 per 1x128 (act_quant, in the wgmma K order below). No FP8 copy of the weights
// is made: the widening happens in shared memory, so a layer's experts are read once per 128-row token tile.
//
// Layout: "swap AB". A tile is 128 weight rows (two warpgroups, one wgmma M of 64 each) x 128 rows of one expert (the
// wgmma N; a tile's rows past the expert's are computed on whatever follows and not stored), so an expert's rows are
// padded to 128 columns, not to a row tile of a grouped GEMM. Per 128-wide K chunk: the weight bytes and scale words
// reach shared memory by cp.async (rows at a conflict-free pitch, as the wgb decode kernel stages them), each warp
// widens its 16 rows (ldmatrix, a prmt table) into its warpgroup's e4m3 A tile, and the activation chunk (the B
// operand) comes by TMA in the 128-byte swizzle, its bytes as stored: act_quant's wgmma order puts element 8q + 4h +
// j of a 32-block at byte 16h + 4q + j, the order the widening writes the weights in. Blocks are persistent (one per
// SM) and stream their tiles' chunks through a kGStages-deep ring across tile boundaries; the next chunk is widened
// while the wgmma of this one runs. (Measured in BENCHMARKS.md: the loop still waits on each step in turn, not on
// bytes; a warp-specialized producer/consumer split is what it lacks.)
//
// Numerics (BUILD.md, "MXFP4 experts at prefill"): each row's 32-block scales are folded into the widening, relative
// to the largest scale byte m the row has shown so far in the tile: q = e4m3(v * 2^(s - m + 6)), exact for s - m + 6
// >= -5 (a row spanning at most 11 binades; below that e4m3 rounding, the f32 route of fp4_widen's slow path), and a
// chunk's 4 k32 steps accumulate on the tensor core (FP8 accumulation inside 128 of K, as DeepGEMM's FP8 GEMMs and the
// FP8 linears) before the fp32 promotion by the activation scale; when m grows the row's accumulator is rescaled by
// the exact power of two. Out = acc * 2^(m - 133), rounded to bf16 once.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp4_gemv_common.cuh"
#include "layer_index.cuh"
#include "mbarrier.cuh"

namespace dsv4ffi {
namespace {

constexpr int kGThreads = 256;
constexpr int kGRows = 128;                        // weight rows per tile (2 warpgroups x wgmma M = 64)
constexpr int kGTok = 128;                         // expert rows per tile (the wgmma N)
constexpr int kGStages = 5;                        // chunks in the ring
constexpr int kGPitch = 80;                        // bytes per staged weight row (64 + 16): ldmatrix without conflicts
constexpr int kGStepB = kGTok * 32;                // B bytes of one k32 step
// A stage: the activation chunk first (TMA, 128-byte swizzle: 128 rows x 128 bytes, 1024-byte aligned), the weight
// rows (cp.async, pitch kGPitch), their scale words, the activation rows' scales.
constexpr int kGOffB = 0;
constexpr int kGOffA = kGOffB + 4 * kGStepB;
constexpr int kGOffAw = kGOffA + kGRows * kGPitch;
constexpr int kGOffBs = kGOffAw + kGRows * 4;
constexpr int kGStage = kGOffBs + kGTok * 4;
constexpr int kGABytes = kGRows * 128;             // the widened (e4m3) weights of one chunk: wgmma's A
constexpr int kGOutPitch = kGRows + 8;             // bf16 per staged output row
constexpr int kGOutBytes = kGTok * kGOutPitch * 2;
static_assert(kGStage % 1024 == 0 && kGABytes % 1024 == 0, "stage alignment (the swizzled TMA tile: 1024 bytes)");

size_t grouped_smem_bytes(int64_t experts) {
  return 1024 + static_cast<size_t>(kGStages) * kGStage + 2 * kGABytes + 64 + kGOutBytes +
         static_cast<size_t>(experts + 1) * 8;
}

// 2^e exactly (e <= 127; 0 below 2^-149).
__device__ __forceinline__ float pow2i(int e) {
  if (e >= -126) return __uint_as_float(static_cast<uint32_t>(e + 127) << 23);
  return e >= -149 ? __uint_as_float(1u << (e + 149)) : 0.f;
}

__device__ __forceinline__ uint32_t e4m3x4(float a, float b, float c, float d) {
  return static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3)) |
         (static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3)) << 16);
}

// The e4m3 bytes of the e2m1 magnitudes 0, 0.5, 1, 1.5 (t0) and 2, 3, 4, 6 (t1) times 2^t, t <= 6. For t >= -5 every
// nonzero product is a normal e4m3 whose exponent field is the plain value's plus t: one add per word (the bytes stay
// in 0x08..0x7C, so no byte borrows or carries into the next; byte 0, the zero, is left alone). Lower t: by cvt.
__device__ __forceinline__ void fold_table(int t, uint32_t& t0, uint32_t& t1) {
  if (t >= -5) {
    t0 = 0x3C383000u + static_cast<uint32_t>(t) * 0x08080800u;
    t1 = 0x4C484440u + static_cast<uint32_t>(t) * 0x08080808u;
    return;
  }
  const float f = pow2i(t < -60 ? -60 : t);  // below 2^-60 every product rounds to 0 in e4m3 either way
  t0 = e4m3x4(0.f, 0.5f * f, f, 1.5f * f);
  t1 = e4m3x4(2.f * f, 3.f * f, 4.f * f, 6.f * f);
}

// The largest of the four UE8M0 bytes of w, 255 (NaN) left out; -1 if all four are 255.
__device__ __forceinline__ int scale_max(uint32_t w) {
  int m = -1;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int b = static_cast<int>((w >> (8 * i)) & 0xFFu);
    m = b != 255 && b > m ? b : m;
  }
  return m;
}

// d (+)= A . B over one k32 step with 128 columns, both operands in shared memory (descriptors).
__device__ __forceinline__ void wgmma_ss_m64n128k32(float* d, uint64_t a_desc, uint64_t b_desc, int accumulate) {
  DSV4_WGMMA(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a_desc), "l"(b_desc), "r"(accumulate));
}


// One tile of the block's stream: expert rows [r0, r0 + valid) against weight rows [n0, n0 + 128) of output `which`.
struct GTile {
  int32_t r0, valid, which, n0;
  int64_t wrow0;  // the tile's first weight row over the whole stack: ((layer * E + e) * N + n0)
};

struct GCtx {
  const int32_t* tt_start;   // [E + 1]: each expert's first tile of 128 rows, in expert order
  const int32_t* row_start;  // [E + 1]: each expert's first row
  int64_t experts, n, ntn, nw, layer, rows;

  __device__ GTile tile(int64_t t) const {
    const int64_t per = nw * ntn;
    const int32_t tt = static_cast<int32_t>(t / per);
    const int64_t rem = t % per;
    int lo = 0, hi = static_cast<int>(experts);  // the expert whose tiles hold tt: the last e with tt_start[e] <= tt
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (tt_start[mid] <= tt) lo = mid; else hi = mid;
    }
    GTile g;
    g.r0 = row_start[lo] + (tt - tt_start[lo]) * kGTok;
    const int64_t end = row_start[lo + 1] < rows ? row_start[lo + 1] : rows;  // (group sizes past R: not read)
    const int64_t left = end - g.r0;
    g.valid = static_cast<int32_t>(left < 0 ? 0 : (left < kGTok ? left : kGTok));
    g.which = static_cast<int32_t>(rem / ntn);
    g.n0 = static_cast<int32_t>((rem % ntn) * kGRows);
    g.wrow0 = (layer * experts + lo) * n + g.n0;
    return g;
  }
};

// The block's copy stream: chunk after chunk of its tiles into the ring (every thread: two 16-byte weight pieces, a
// scale word for threads < 128, an activation scale for the tile's rows; thread 0: the activation chunk's TMA). The
// sources are set once per tile and move by one chunk per copy: no 64-bit division on the way.
struct GLoader {
  const uint8_t* w[2];  // this thread's two weight pieces of the current chunk
  const uint8_t* s;     // its scale word (threads < 128)
  const float* bs;      // its row's scale (threads < valid), or null
  int32_t r0;           // the tile's first row (the activation chunk's TMA box)
  int chunk, nch, stage;

  __device__ void start(const Fp4GroupedArgs& a, const GTile& T, int tid) {
    const int64_t k = a.k, half_k = k / 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int p = tid + kGThreads * i, row = p >> 2, part = p & 3;
      const int64_t wr = T.wrow0 + row;
      w[i] = a.w[T.which] + (a.slabs ? slab_weight_offset(wr, part * 16, k) : wr * half_k + part * 16);
    }
    const int64_t wr = T.wrow0 + (tid & (kGRows - 1));
    s = a.s[T.which] + (a.slabs ? slab_scale_offset(wr, 0, k) : wr * (k / 32));
    bs = tid < T.valid ? a.sfa + T.r0 + tid : nullptr;
    r0 = T.r0;
    chunk = 0;
  }

  __device__ void copy(const Fp4GroupedArgs& a, uint8_t* ring, uint32_t bars, const CUtensorMap* tmap_b, int tid) {
    const uint32_t st = smem_addr(ring + stage * kGStage);
    if (tid == 0) {  // the activation chunk: 128 rows from r0 (rows past the tile's: not stored; past R: zeros)
      mbar_expect_tx(bars + stage * 8, 4 * kGStepB);
      tma_load_2d(st + kGOffB, tmap_b, chunk * 128, r0, bars + stage * 8);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int p = tid + kGThreads * i;
      cp_async16_l2line(st + kGOffA + (p >> 2) * kGPitch + (p & 3) * 16, w[i]);
      w[i] += a.slabs ? kFp4SlabRows * 64 : 64;
    }
    if (tid < kGRows) cp_async4(st + kGOffAw + tid * 4, s);
    s += a.slabs ? kFp4SlabRows * 4 : 4;
    if (bs != nullptr) {
      cp_async4(st + kGOffBs + tid * 4, bs);
      bs += a.sfa_pitch;
    }
    stage = stage == kGStages - 1 ? 0 : stage + 1;
    ++chunk;
  }
};

// This warp's 16 rows of a staged chunk widened to e4m3 into its warpgroup's A tile (a_wg: 4 k32 steps of 64 rows x
// 32 bytes in 8 x 16-byte core matrices, the K order of the activation's wgmma order), each 32-block's scale folded in
// relative to m_w, the rows' largest scale byte so far in the tile (updated here first).
__device__ __forceinline__ void widen_chunk(const uint8_t* stage, int row_base, int ww, int lane, int m_w[2],
                                            uint8_t* a_wg) {
  const int mi = lane / 8, rr = lane % 8, gq = lane / 4, q = lane % 4;
  const uint32_t at = smem_addr(stage + kGOffA) + (row_base + 8 * (mi % 2) + rr) * kGPitch + (mi / 2) * 16;
  uint32_t v[2][4];  // v[mm][2 m' + h]: row 8h + g, block 2 mm + m'
  ldmatrix_x4(at, v[0]);
  ldmatrix_x4(at + 32, v[1]);
  const uint32_t* sw = reinterpret_cast<const uint32_t*>(stage + kGOffAw);
  const uint32_t words[2] = {sw[row_base + gq], sw[row_base + gq + 8]};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = scale_max(words[h]);
    m_w[h] = m > m_w[h] ? m : m_w[h];
  }
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int b = static_cast<int>((words[h] >> (8 * m)) & 0xFFu);
      uint32_t t0 = 0x7F7F7F7Fu, t1 = 0x7F7F7F7Fu;  // scale byte 255: NaN, as the reference's 2^128
      if (b != 255) fold_table(b - m_w[h] + 6, t0, t1);
      uint32_t lo, hi;
      e2m1x8_to_e4m3_tab(v[m / 2][2 * (m % 2) + h], t0, t1, lo, hi);
      uint8_t* core = a_wg + m * 2048 + (ww * 2 + h) * 256 + gq * 16 + 4 * q;
      *reinterpret_cast<uint32_t*>(core) = lo;
      *reinterpret_cast<uint32_t*>(core + 128) = hi;
    }
}

// One chunk of this warpgroup's tile: 4 k32 steps on the tensor cores, d starting from zero. (Always 128 columns:
// an N = 64 variant writing d too makes ptxas serialize the wgmmas for lack of registers.)
__device__ __forceinline__ void mma_chunk(float (&d)[64], uint32_t a_addr, uint32_t b_addr) {
  wgmma_fence();
#pragma unroll
  for (int m = 0; m < 4; ++m)
    wgmma_ss_m64n128k32(d, wgmma_desc(a_addr + m * 2048, 128, 256), wgmma_desc_sw128(b_addr + m * 32), m);
  wgmma_commit();
}

// acc (in units of 2^(m_acc - 133) per row) += d * the columns' activation scales, d in units of m_item.
template <int N>
__device__ __forceinline__ void promote(float (&acc)[64], const float (&d)[64], const float* bs, int q,
                                        const int m_item[2], int m_acc[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (m_item[h] > m_acc[h]) {  // the row met a larger scale: its sums so far in the new unit (exact)
      const float f = pow2i(m_acc[h] - m_item[h]);
#pragma unroll
      for (int j = 0; j < N / 8; ++j) acc[4 * j + 2 * h] *= f, acc[4 * j + 2 * h + 1] *= f;
      m_acc[h] = m_item[h];
    }
  }
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
    const float2 s = *reinterpret_cast<const float2*>(bs + 8 * j + 2 * q);
    acc[4 * j] = fmaf(d[4 * j], s.x, acc[4 * j]);
    acc[4 * j + 1] = fmaf(d[4 * j + 1], s.y, acc[4 * j + 1]);
    acc[4 * j + 2] = fmaf(d[4 * j + 2], s.x, acc[4 * j + 2]);
    acc[4 * j + 3] = fmaf(d[4 * j + 3], s.y, acc[4 * j + 3]);
  }
}

// The tile's bf16 outputs through shared memory (transposed: a row of out per expert row), then 16-byte stores.
template <int N>
__device__ __forceinline__ void store_out_tile(const Fp4GroupedArgs& a, const GTile& T, const float (&acc)[64],
                                           const int m_acc[2], __nv_bfloat16* stg, int row_base, int lane, int tid) {
  const int gq = lane / 4, q = lane % 4;
  const float rs[2] = {pow2i(m_acc[0] - 133), pow2i(m_acc[1] - 133)};
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        stg[(8 * j + 2 * q + c) * kGOutPitch + row_base + gq + 8 * h] =
            __float2bfloat16_rn(acc[4 * j + 2 * h + c] * rs[h]);
  __syncthreads();
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(a.out[T.which]);
  for (int i = tid; i < T.valid * 16; i += kGThreads) {
    const int col = i / 16, part = i % 16;
    *reinterpret_cast<uint4*>(out + (T.r0 + col) * a.n + T.n0 + part * 8) =
        *reinterpret_cast<const uint4*>(stg + col * kGOutPitch + part * 8);
  }
}

__global__ void __launch_bounds__(kGThreads, 1)
    fp4_grouped_kernel(const Fp4GroupedArgs a, const __grid_constant__ CUtensorMap tmap_b) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* ring = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // the swizzled tiles: 1024-aligned
  uint8_t* abuf = ring + kGStages * kGStage;  // two A tiles: the chunk in the tensor cores, the next one
  const uint32_t bars = smem_addr(abuf + 2 * kGABytes);  // one mbarrier per stage: its activation chunk landed
  __nv_bfloat16* stg = reinterpret_cast<__nv_bfloat16*>(abuf + 2 * kGABytes + 64);
  int32_t* tt_start = reinterpret_cast<int32_t*>(abuf + 2 * kGABytes + 64 + kGOutBytes);
  int32_t* row_start = tt_start + a.experts + 1;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, q = lane % 4;
  const int row_base = (warp / 4) * 64 + (warp % 4) * 16;  // this warp's 16 weight rows in the tile
  const int64_t experts = a.experts, nch = a.k / 128;

  if (tid == 0) {
    for (int i = 0; i < kGStages; ++i) mbar_init(bars + i * 8, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
  }
  if (warp == 0) {  // each expert's first tile and first row: prefix sums, 32 experts a step
    int32_t run_t = 0, run_r = 0;
    for (int64_t e0 = 0; e0 < experts; e0 += 32) {
      const int64_t e = e0 + lane;
      int32_t c = e < experts ? a.group_sizes[e] : 0;
      c = c > 0 ? c : 0;
      const int32_t t = (c + kGTok - 1) / kGTok;
      int32_t st = t, sr = c;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int32_t vt = __shfl_up_sync(0xffffffffu, st, off), vr = __shfl_up_sync(0xffffffffu, sr, off);
        if (lane >= off) st += vt, sr += vr;
      }
      if (e < experts) tt_start[e] = run_t + st - t, row_start[e] = run_r + sr - c;
      run_t += __shfl_sync(0xffffffffu, st, 31);
      run_r += __shfl_sync(0xffffffffu, sr, 31);
    }
    if (lane == 0) tt_start[experts] = run_t, row_start[experts] = run_r;
  }
  __syncthreads();
  const GCtx ctx{tt_start, row_start, experts, a.n, a.n / kGRows, a.w[1] != nullptr ? 2 : 1,
                 device_layer(a.layer, a.layers), a.rows};
  const int64_t tiles = static_cast<int64_t>(tt_start[experts]) * ctx.nw * ctx.ntn, grid = gridDim.x;
  const int64_t mine = blockIdx.x < tiles ? (tiles - 1 - blockIdx.x) / grid + 1 : 0;
  const int64_t total = mine * nch;  // items: (tile, chunk) in stream order

  GTile pf{};
  GLoader ld{};
  ld.nch = static_cast<int>(nch), ld.chunk = ld.nch;
  int32_t pf_tile = blockIdx.x, pf_left = static_cast<int32_t>(total);
  auto issue = [&]() {  // the next item into its stage; an empty group past the end keeps the wait counts uniform
    if (pf_left > 0) {
      if (ld.chunk == ld.nch) {
        pf = ctx.tile(pf_tile);
        pf_tile += grid;
        ld.start(a, pf, tid);
      }
      ld.copy(a, ring, bars, &tmap_b, tid);
      --pf_left;
    }
    cp_async_commit();
  };
#pragma unroll 1
  for (int s = 0; s < kGStages - 1; ++s) issue();

  if (total > 0) {
    const int wg = warp / 4, ww = warp % 4;
    float acc[64], d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f, d[i] = 0.f;
    int m_w[2] = {-1024, -1024}, m_cur[2], m_nxt[2] = {0, 0}, m_acc[2] = {-1024, -1024};
    GTile cur = ctx.tile(blockIdx.x);
    int32_t cur_tile = blockIdx.x;
    cp_async_wait<kGStages - 2>();
    __syncthreads();
    widen_chunk(ring, row_base, ww, lane, m_w, abuf + wg * (kGABytes / 2));
    DSV4_WGMMA("fence.proxy.async.shared::cta;\n" ::: "memory");  // the A tile, visible to wgmma's async proxy
    m_cur[0] = m_w[0], m_cur[1] = m_w[1];
    int c = 0, st = 0;  // item i's chunk and stage
    uint32_t phase = 0;  // the parity item i's stage barrier completes with

    // Item i: the barrier (item i + 1's copies landed, item i's A tile written, item i - 1's stage free), the ring's
    // next copies, item i's wgmma (A tile i % 2), the widening of item i + 1 into the other A tile while the tensor
    // cores run, then the promotion (and the tile's store after its last chunk).
#pragma unroll 1
    for (int32_t i = 0; i < static_cast<int32_t>(total); ++i) {
      const int par = static_cast<int>(i & 1);
      cp_async_wait<kGStages - 3>();
      __syncthreads();
      issue();
      const uint8_t* stage = ring + st * kGStage;
      const bool narrow = cur.valid <= 64;
      const uint32_t a_addr = smem_addr(abuf + par * kGABytes + wg * (kGABytes / 2));
      mbar_wait(bars + st * 8, phase);  // its activation chunk
      mma_chunk(d, a_addr, smem_addr(stage + kGOffB));
      const int st_next = st == kGStages - 1 ? 0 : st + 1;
      if (i + 1 < total) {
        if (c == nch - 1) m_w[0] = m_w[1] = -1024;  // the next item starts a tile: new rows
        uint8_t* a_next = abuf + (par ^ 1) * kGABytes + wg * (kGABytes / 2);
        widen_chunk(ring + st_next * kGStage, row_base, ww, lane, m_w, a_next);
        DSV4_WGMMA("fence.proxy.async.shared::cta;\n" ::: "memory");
        m_nxt[0] = m_w[0], m_nxt[1] = m_w[1];
      }
      wgmma_wait0();
#pragma unroll
      for (int j = 0; j < 64; ++j) reg_fence(d[j]);
      const float* bs = reinterpret_cast<const float*>(stage + kGOffBs);
      if (narrow) {
        promote<64>(acc, d, bs, q, m_cur, m_acc);
      } else {
        promote<128>(acc, d, bs, q, m_cur, m_acc);
      }
      if (c == nch - 1) {
        if (narrow) {
          store_out_tile<64>(a, cur, acc, m_acc, stg, row_base, lane, tid);
        } else {
          store_out_tile<128>(a, cur, acc, m_acc, stg, row_base, lane, tid);
        }
#pragma unroll
        for (int j = 0; j < 64; ++j) acc[j] = 0.f;
        m_acc[0] = m_acc[1] = -1024;
        c = 0;
        cur_tile += grid;
        if (i + 1 < total) cur = ctx.tile(cur_tile);
      } else {
        ++c;
      }
      phase ^= st_next == 0 ? 1u : 0u;
      st = st_next;
      m_cur[0] = m_nxt[0], m_cur[1] = m_nxt[1];
    }
  }
  cp_async_wait<0>();

  // Rows past the experts' (expert -1: padding, or experts elsewhere): zeros.
  const int64_t first = row_start[experts] > 0 ? row_start[experts] : 0;
  if (first < a.rows) {
    const int64_t count = (a.rows - first) * (a.n / 8);
    for (int o = 0; o < static_cast<int>(ctx.nw); ++o) {
      uint4* out = reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(a.out[o]) + first * a.n);
      for (int64_t i = blockIdx.x * static_cast<int64_t>(kGThreads) + tid; i < count; i += grid * kGThreads)
        out[i] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

}  // namespace

bool fp4_grouped_fits(int64_t experts) {
  cudaError_t err = cudaSuccess;
  const int limit = dynamic_smem_limit(reinterpret_cast<const void*>(fp4_grouped_kernel), &err);
  return limit >= 0 && grouped_smem_bytes(experts) <= static_cast<size_t>(limit);
}

cudaError_t launch_fp4_grouped(const Fp4GroupedArgs& a, cudaStream_t stream) {
  if (a.n % kGRows != 0 || a.k % 128 != 0 || (a.slabs && a.n % kFp4SlabRows != 0)) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.n == 0) return cudaSuccess;
  const size_t smem = grouped_smem_bytes(a.experts);
  cudaError_t err = cudaSuccess;
  const int limit = dynamic_smem_limit(reinterpret_cast<const void*>(fp4_grouped_kernel), &err);
  if (limit < 0) return err;
  if (smem > static_cast<size_t>(limit)) return cudaErrorInvalidValue;  // the handler checks fp4_grouped_fits first
  // The activation rows in boxes of 128 rows x one 128-byte chunk, 128-byte swizzle (wgmma's K-major SW128 tile).
  CUtensorMap tmap_b;
  if (!make_tma_2d(&tmap_b, CU_TENSOR_MAP_DATA_TYPE_UINT8, a.q, a.k, a.rows, a.k, 128, kGTok, 128, "q").empty())
    return cudaErrorInvalidValue;
  int major = 0, sms = 0;
  device_info(&major, &major, &sms);
  fp4_grouped_kernel<<<sms, kGThreads, smem, stream>>>(a, tmap_b);
  return cudaGetLastError();
}

}  // namespace dsv4ffi
