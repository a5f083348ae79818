// MXFP4 routed experts at prefill sizes in one pass per projection (the grouped route of kernels/moe_fp4.py): rows
// sorted by expert (group_sizes: expert e's rows follow expert e-1's from row 0), each row's expert's MXFP4 weight
// (one layer of a stack on the device, or the slab layout: the decode kernels' operands as stored), bf16 out:
//
//   out[r, n] = sum over 128-wide K chunks c of  sa[r, c] * sum_{k in c} qa[r, k] * W[e(r), n, k]
//
// qa, sa: the rows quantized to FP8 per 1x128 (act_quant, in the wgmma K order below). No FP8 copy of the weights
// is made: the widening happens in registers, so a layer's experts are read once per 128-row token tile.
//
// Layout: "swap AB". A tile is 128 weight rows (two warpgroups, one wgmma M of 64 each) x up to 128 rows of one expert
// (the wgmma N; a tile with at most 64 rows left runs N = 64), so an expert's rows are padded to 64 or 128 columns,
// not to a row tile of a grouped GEMM. The weights are the A operand in registers: a warp's 16 rows of a chunk reach
// shared memory by cp.async (as the wgb decode kernel stages them), ldmatrix hands lane (g, q) bytes 4q..4q+3 of each
// 16-byte block, and a prmt table widens them to e4m3; the activation tile is the B operand (K-major core matrices, no
// swizzle), copied as stored: act_quant's wgmma order puts element 8q + 4h + j of a 32-block at byte 16h + 4q + j,
// the order the A fragments take the weights in. Blocks are persistent (one per SM), stream their tiles' chunks through
// a kGStages-deep cp.async ring across tile boundaries, and widen the next chunk while the wgmma of this one runs.
//
// Numerics (BUILD.md, "MXFP4 experts at prefill"): each row's 32-block scales are folded into the widening, relative
// to the largest scale byte m the row has shown so far in the tile: q = e4m3(v * 2^(s - m + 6)), exact for s - m + 6
// >= -5 (a row spanning at most 11 binades; below that e4m3 rounding, the f32 route of fp4_widen's slow path), and a
// chunk's 4 k32 steps accumulate on the tensor core (FP8 accumulation inside 128 of K, as DeepGEMM's FP8 GEMMs and the
// FP8 linears) before the fp32 promotion by the activation scale; when m grows the row's accumulator is rescaled by
// the exact power of two. Out = acc * 2^(m - 133), rounded to bf16 once.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp4_gemv_common.cuh"
#include "layer_index.cuh"

namespace dsv4ffi {
namespace {

constexpr int kGThreads = 256;
constexpr int kGRows = 128;                        // weight rows per tile (2 warpgroups x wgmma M = 64)
constexpr int kGTok = 128;                         // expert rows per tile (the wgmma N)
constexpr int kGStages = 5;                        // chunks in the ring
constexpr int kGPitch = 80;                        // bytes per staged weight row (64 + 16): ldmatrix without conflicts
constexpr int kGStepB = kGTok * 32;                // B bytes of one k32 step
constexpr int kGOffAw = kGRows * kGPitch;          // the rows' scale words
constexpr int kGOffB = kGOffAw + kGRows * 4;       // the activation chunk: 4 k32 steps
constexpr int kGOffBs = kGOffB + 4 * kGStepB;      // the activation rows' scales of the chunk
constexpr int kGStage = kGOffBs + kGTok * 4;
constexpr int kGOutPitch = kGRows + 8;             // bf16 per staged output row
constexpr int kGOutBytes = kGTok * kGOutPitch * 2;
static_assert(kGOffB % 128 == 0 && kGStage % 128 == 0, "stage alignment");

size_t grouped_smem_bytes(int64_t experts) {
  return static_cast<size_t>(kGStages) * kGStage + kGOutBytes + static_cast<size_t>(experts + 1) * 8;
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

// d (+)= A . B over one k32 step with 64 columns: A = the lane's 4 registers (e4m3), B through the descriptor.
__device__ __forceinline__ void wgmma_m64n64k32(float* d, const uint32_t a[4], uint64_t desc, int accumulate) {
  DSV4_WGMMA(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

// d (+)= A . B over one k32 step with 128 columns: A = the lane's 4 registers (e4m3), B through the descriptor.
__device__ __forceinline__ void wgmma_m64n128k32(float* d, const uint32_t a[4], uint64_t desc, int accumulate) {
  DSV4_WGMMA(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
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

// The copies of chunk c of tile T into a stage (every thread: two 16-byte weight pieces, a scale word for threads <
// 128, four 16-byte activation pieces and one activation scale for the tile's rows).
__device__ __forceinline__ void load_chunk(const Fp4GroupedArgs& a, const GTile& T, int c, uint8_t* stage, int tid) {
  const uint32_t st = smem_addr(stage);
  const uint8_t* w = a.w[T.which];
  const int64_t k = a.k;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int p = tid + kGThreads * i, row = p >> 2, part = p & 3;
    const int64_t wr = T.wrow0 + row, kb = static_cast<int64_t>(c) * 64 + part * 16;
    cp_async16_l2line(st + row * kGPitch + part * 16, w + (a.slabs ? slab_weight_offset(wr, kb, k) : wr * (k / 2) + kb));
  }
  if (tid < kGRows) {
    const int64_t wr = T.wrow0 + tid;
    cp_async4(st + kGOffAw + tid * 4, a.s[T.which] + (a.slabs ? slab_scale_offset(wr, c, k) : wr * (k / 32) + c * 4));
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // step i of the chunk; two threads per row: one 32-byte sector each
    const int h = tid & 1, row = tid >> 1;
    if (row < T.valid)
      cp_async16(st + kGOffB + i * kGStepB + (row >> 3) * 256 + h * 128 + (row & 7) * 16,
                 a.q + (T.r0 + row) * k + c * 128 + i * 32 + h * 16);
  }
  if (tid < T.valid) cp_async4(st + kGOffBs + tid * 4, a.sfa + c * a.sfa_pitch + T.r0 + tid);
}

// This warp's A fragments of a staged chunk (rows row_base + g, + 8), each 32-block's scale folded in relative to
// m_w, the rows' largest scale byte so far in the tile (updated here first).
__device__ __forceinline__ void widen_chunk(const uint8_t* stage, int row_base, int lane, int m_w[2],
                                            uint32_t (&a)[4][4]) {
  const int mi = lane / 8, rr = lane % 8, gq = lane / 4;
  const uint32_t at = smem_addr(stage) + (row_base + 8 * (mi % 2) + rr) * kGPitch + (mi / 2) * 16;
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
      e2m1x8_to_e4m3_tab(v[m / 2][2 * (m % 2) + h], t0, t1, a[m][h], a[m][h + 2]);
    }
}

template <int N>
__device__ __forceinline__ void mma_chunk(float (&d)[64], const uint32_t (&a)[4][4], uint32_t b_addr) {
  wgmma_fence();
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const uint64_t desc = wgmma_desc(b_addr + m * kGStepB, 128, 256);
    if constexpr (N == 64) {
      wgmma_m64n64k32(d, a[m], desc, m);
    } else {
      wgmma_m64n128k32(d, a[m], desc, m);
    }
  }
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
        stg[(8 * j + 2 * q + c) * kGOutPitch + row_base + gq + 8 * h] = __float2bfloat16_rn(acc[4 * j + 2 * h + c] * rs[h]);
  __syncthreads();
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(a.out[T.which]);
  for (int i = tid; i < T.valid * 16; i += kGThreads) {
    const int col = i / 16, part = i % 16;
    *reinterpret_cast<uint4*>(out + (T.r0 + col) * a.n + T.n0 + part * 8) =
        *reinterpret_cast<const uint4*>(stg + col * kGOutPitch + part * 8);
  }
}

__global__ void __launch_bounds__(kGThreads, 1) fp4_grouped_kernel(const Fp4GroupedArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* ring = smem;
  __nv_bfloat16* stg = reinterpret_cast<__nv_bfloat16*>(smem + kGStages * kGStage);
  int32_t* tt_start = reinterpret_cast<int32_t*>(smem + kGStages * kGStage + kGOutBytes);
  int32_t* row_start = tt_start + a.experts + 1;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, q = lane % 4;
  const int row_base = (warp / 4) * 64 + (warp % 4) * 16;  // this warp's 16 weight rows in the tile
  const int64_t experts = a.experts, nch = a.k / 128;

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
  int64_t pf_j = 0;
  auto issue = [&]() {  // item pf_j into its stage; an empty group past the end keeps the wait counts uniform
    if (pf_j < total) {
      const int64_t c = pf_j % nch;
      if (c == 0) pf = ctx.tile(blockIdx.x + (pf_j / nch) * grid);
      load_chunk(a, pf, static_cast<int>(c), ring + (pf_j % kGStages) * kGStage, tid);
    }
    cp_async_commit();
    ++pf_j;
  };
#pragma unroll 1
  for (int s = 0; s < kGStages - 1; ++s) issue();

  if (total > 0) {
    float acc[64], d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f, d[i] = 0.f;
    uint32_t frag[2][4][4];
    int m_w[2] = {-1024, -1024}, m_of[2][2], m_acc[2] = {-1024, -1024};
    GTile cur = ctx.tile(blockIdx.x);
    cp_async_wait<kGStages - 2>();
    __syncthreads();
    widen_chunk(ring, row_base, lane, m_w, frag[0]);
    m_of[0][0] = m_w[0], m_of[0][1] = m_w[1];

    // Item i: its wgmma on frag[i % 2] (widened during item i - 1), the ring's next copies, the widening of item i + 1
    // into the other buffer while the tensor cores run, then the promotion (and the tile's store after its last chunk).
    auto step = [&](int64_t i, uint32_t (&use)[4][4], uint32_t (&fill)[4][4], const int (&m_use)[2], int (&m_fill)[2]) {
      const int c = static_cast<int>(i % nch);
      if (c == 0 && i > 0) cur = ctx.tile(blockIdx.x + (i / nch) * grid);
      const uint8_t* st = ring + (i % kGStages) * kGStage;
      const bool narrow = cur.valid <= 64;
      if (narrow) {
        mma_chunk<64>(d, use, smem_addr(st + kGOffB));
      } else {
        mma_chunk<128>(d, use, smem_addr(st + kGOffB));
      }
      cp_async_wait<kGStages - 3>();  // item i + 1 landed (this thread's copies) ...
      __syncthreads();                // ... everyone's, and every thread is done with item i - 1's stage
      issue();
      if (i + 1 < total) {
        if ((i + 1) % nch == 0) m_w[0] = m_w[1] = -1024;  // a new tile: new rows
        widen_chunk(ring + ((i + 1) % kGStages) * kGStage, row_base, lane, m_w, fill);
        m_fill[0] = m_w[0], m_fill[1] = m_w[1];
      }
      wgmma_wait0();
#pragma unroll
      for (int j = 0; j < 64; ++j) reg_fence(d[j]);
      const float* bs = reinterpret_cast<const float*>(st + kGOffBs);
      if (narrow) {
        promote<64>(acc, d, bs, q, m_use, m_acc);
      } else {
        promote<128>(acc, d, bs, q, m_use, m_acc);
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
      }
    };
#pragma unroll 1
    for (int64_t i = 0; i < total; i += 2) {
      step(i, frag[0], frag[1], m_of[0], m_of[1]);
      if (i + 1 < total) step(i + 1, frag[1], frag[0], m_of[1], m_of[0]);
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

size_t fp4_grouped_smem(int64_t experts) { return grouped_smem_bytes(experts); }

cudaError_t launch_fp4_grouped(const Fp4GroupedArgs& a, cudaStream_t stream) {
  if (a.n % kGRows != 0 || a.k % 128 != 0 || (a.slabs && a.n % kFp4SlabRows != 0)) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.n == 0) return cudaSuccess;
  const size_t smem = grouped_smem_bytes(a.experts);
  cudaError_t err = cudaSuccess;
  const int limit = dynamic_smem_limit(reinterpret_cast<const void*>(fp4_grouped_kernel), &err);
  if (limit < 0) return err;
  if (smem > static_cast<size_t>(limit)) return cudaErrorInvalidValue;  // the handler checks fp4_grouped_smem first
  int major = 0, sms = 0;
  device_info(&major, &major, &sms);
  fp4_grouped_kernel<<<sms, kGThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace dsv4ffi
