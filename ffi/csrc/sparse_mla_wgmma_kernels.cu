// Sparse-MLA decode of DeepSeek-V4 on Hopper's warpgroup MMA (sm_90a): the contract, inputs and numerics of
// sparse_mla_kernels.cu (its header comment), heads a multiple of 64. Why another kernel: the mma.sync one reloads Q
// and K fragments from shared memory in every warp (~0.7 MB a 64-key tile) where wgmma reads each operand once per
// warpgroup. Measured on an H200 that alone gained ~10%; most of a tile's ~6-10 us went to instruction issue (the
// widening's per-item index arithmetic and branches), which the version here cut (BENCHMARKS.md, fifteenth session).
//
// A block is two warpgroups (or four: DSV4_FFI_SPARSE_DECODE=wgmma4, twice the warps to hide latency with, half
// the accumulators each) on one query row, 64 heads and a run of 64-key tiles (split-KV as before). Shared memory
// holds Q (64 heads x 512 dims), the widened tile K = V (64 keys x 512 dims) and P (64 heads x 64 keys), all bf16 in
// the 128-byte-swizzled layout wgmma reads: each 64-dim slice of Q or K is an 8 KB block of 64 rows of 128 bytes, the
// 16-byte piece c of row r stored at piece c ^ (r % 8). Per tile:
//   1. (every thread) the raw rows widened to bf16 into K; the next tile's raw rows requested (a bulk copy of 576
//      bytes and a cp.async of 8 per row, by 64 threads);
//   2. warpgroup w: S_w = Q K[32w .. 32w + 31]^T (wgmma m64n32k16, A and B K-major, 32 steps over the 512 dims;
//      four warpgroups: 16 keys each, m64n16k16);
//   3. the online softmax: each warpgroup's row maxima over its 32 keys exchanged through shared memory, then
//      p = exp(z - m) rounded to bf16 into P (the unrounded p summed into the warpgroup's denominator);
//   4. warpgroup w: O_w = alpha O_w + P V[:, 256w .. 256w + 255] (wgmma m64n256k16, P K-major, V read MN-major from
//      the same K tile; four warpgroups: 128 dims each, m64n128k16).
// The raw rows' copy and the widening take fixed pieces per thread (no division per item): ncu showed the kernel
// bound by instruction issue (8 warps per SM) with the widening 60% of its instructions.
// Numerics: the mma.sync kernel's products and roundings; the fp32 order of a score's 512-term sum and of the
// denominator (two warpgroup partials added at the end) differ.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "mbarrier.cuh"
#include "sparse_mla_common.cuh"
#include "wgmma.cuh"

namespace dsv4ffi {
namespace {

using namespace sparse_mla;

constexpr int kHeadsW = 64;              // heads per block: one wgmma M
constexpr int kBlockBytes = 64 * 128;    // one 64-dim slice of 64 rows (8 KB, a multiple of the 1 KB swizzle atom)
constexpr int kSlices = kD / 64;         // 8
constexpr int kQAt = 0;
constexpr int kKAt = kQAt + kSlices * kBlockBytes;
constexpr int kPAt = kKAt + kSlices * kBlockBytes;
// Raw rows: two buffers of 64 rows 592 bytes apart, each row's 584 bytes at offset 0 or 8 (the parity of its source
// address mod 16: the bulk copy's 576 bytes are 16-byte aligned on both sides), then one row of zeros.
constexpr int kRawPitch = 592;
constexpr int kRawAt = kPAt + kBlockBytes;
constexpr int kZeroAt = kRawAt + 2 * kKeys * kRawPitch;
constexpr int kSrcAt = kZeroAt + kRawPitch;             // const unsigned char* [2][64]
constexpr int kRowAt = kSrcAt + 2 * kKeys * 8;          // uint32 [2][64]: each raw row's offset in shared memory
constexpr int kBarAt = kRowAt + 2 * kKeys * 4;          // uint64 [2]: the bulk copies of each raw buffer landed
constexpr int kValidAt = kBarAt + 2 * 8;                // int [2][64]
constexpr int kLiveAt = kValidAt + 2 * kKeys * 4;       // int [2][2]: per buffer and warp, whether a key is >= 0
constexpr int kRedAt = kLiveAt + 2 * 2 * 4;            // float [4][64]: per warpgroup, row maxima (then denominators)
constexpr int kRowsAt = kRedAt + 4 * kHeadsW * 4;      // RowSources of the block's query row
constexpr int kSmemUsed = kRowsAt + 64;
constexpr int kSmemBytesW = kSmemUsed + 1024;           // the dynamic base aligned up to the 1 KB swizzle atom
static_assert(kNope / 8 == 56 && kKeys == 64 && kRowBytes == 576 + 8, "widen_tile's split; a row: 576 + 8 bytes");
static_assert(kRawAt % 16 == 0 && kZeroAt % 16 == 0 && kSrcAt % 8 == 0 && kBarAt % 8 == 0 && kRowsAt % 8 == 0 &&
                  sizeof(RowSources) <= 64 && kSmemBytesW <= 227 * 1024,
              "shared memory layout");

// Byte offset of 16-byte piece c of row r in a swizzled 128-byte-row block.
__device__ __forceinline__ uint32_t sw128(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// Descriptor of an MN-major operand (B = V: rows are K, the 128-byte rows hold 64 consecutive N): 64-wide N blocks
// `lbo` bytes apart, 8-row K groups 1 KB apart (PTX ISA "matrix descriptor"; cute's canonical GMMA MN layouts).
__device__ __forceinline__ uint64_t desc_mn(uint32_t addr, uint32_t lbo) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFFu) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

// A descriptor moved on by `at16` 16-byte units: a 32-bit add on its low word (the address field, below 2^14 for any
// shared-memory address, takes the sum without a carry).
__device__ __forceinline__ uint64_t desc_add(uint64_t d, uint32_t at16) {
  return (d & 0xFFFFFFFF00000000ull) | static_cast<uint32_t>(static_cast<uint32_t>(d) + at16);
}

__device__ __forceinline__ void fence_async_smem() { DSV4_WGMMA("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d[8] (+)= A B: m64n16k16 bf16, A and B K-major.
__device__ __forceinline__ void wgmma_m64n16k16(float* d, uint64_t a, uint64_t b, int accumulate) {
  DSV4_WGMMA(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7"
      "}, %8, %9, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(a), "l"(b), "r"(accumulate));
}

// d[16] (+)= A B: m64n32k16 bf16, A and B K-major.
__device__ __forceinline__ void wgmma_m64n32k16(float* d, uint64_t a, uint64_t b, int accumulate) {
  DSV4_WGMMA(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(a), "l"(b), "r"(accumulate));
}

// d[64] (+)= A B: m64n128k16 bf16, A K-major, B MN-major (transposed).
__device__ __forceinline__ void wgmma_m64n128k16_bt(float* d, uint64_t a, uint64_t b, int accumulate) {
  DSV4_WGMMA(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

// d[128] (+)= A B: m64n256k16 bf16, A K-major, B MN-major (transposed).
__device__ __forceinline__ void wgmma_m64n256k16_bt(float* d, uint64_t a, uint64_t b, int accumulate) {
  DSV4_WGMMA(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]),
        "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),
        "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]),
        "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]),
        "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),
        "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]),
        "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]),
        "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]),
        "+f"(d[126]), "+f"(d[127])
      : "l"(a), "l"(b), "r"(accumulate));
}

// Helpers for the 256- and 512-thread forms (NWG = 2 or 4 warpgroups): the wgmma shapes each takes.
template <int NWG>
struct Shape {
  static constexpr int kThreads = 128 * NWG;
  static constexpr int kKeysPerWg = kKeys / NWG;  // S columns per warpgroup: 32 or 16
  static constexpr int kDimsPerWg = kD / NWG;     // O columns per warpgroup: 256 or 128
  static constexpr int kSRegs = kKeysPerWg / 2;
  static constexpr int kORegs = kDimsPerWg / 2;
  __device__ static void s_step(float* d, uint64_t a, uint64_t b, int acc) {
    if constexpr (NWG == 2) wgmma_m64n32k16(d, a, b, acc); else wgmma_m64n16k16(d, a, b, acc);
  }
  __device__ static void pv_step(float* d, uint64_t a, uint64_t b) {
    if constexpr (NWG == 2) wgmma_m64n256k16_bt(d, a, b, 1); else wgmma_m64n128k16_bt(d, a, b, 1);
  }
};

// The raw tile widened into K's swizzled slices. The first 7/8 of the threads take NoPE piece tid % 56 (8 e4m3 values
// x their 64-value tile's scale) of rows tid / 56 + R i, the last 1/8 RoPE piece tid % 8 (8 bf16 values, copied) of
// rows + R i (R = rows a pass: NT / 64): each thread's piece, scale byte, slice and swizzle phase fixed across its
// rows, so the loop is loads, conversions and one store (the first version, a piece index divided per item and three
// branches, was 60% of the kernel's instructions: ncu, BENCHMARKS.md).
template <int NT>
__device__ __forceinline__ void widen_tile(const unsigned char* smem, const uint32_t* rows, unsigned char* k_s,
                                           int tid) {
  constexpr int kNopeThreads = NT / 8 * 7, kPass = NT / 64, kIters = kKeys / kPass;
  constexpr int kBatch = NT == 256 ? 4 : 2;  // rows whose loads are issued together (512 threads: registers)
  static_assert(kNopeThreads == 56 * kPass && kIters % kBatch == 0, "a pass covers kPass whole rows");
  if (tid < kNopeThreads) {
    const int p = tid % 56, r0 = tid / 56;
    unsigned char* dst = k_s + (p / 8) * kBlockBytes + r0 * 128;
    const int c = p % 8;
    for (int i0 = 0; i0 < kIters; i0 += kBatch) {  // a batch of rows' loads issued before any is used
      uint2 v[kBatch];
      uint32_t sb[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const unsigned char* row = smem + rows[r0 + (i0 + u) * kPass];
        v[u] = *reinterpret_cast<const uint2*>(row + p * 8);
        sb[u] = row[kScaleAt + p / 8];
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = i0 + u;
        const float sc = e8m0_to_f32(sb[u]);
        float f[8];
        e4m3x8_to_f32(v[u], f);
        const uint4 out = make_uint4(pack_bf16x2(f[0] * sc, f[1] * sc), pack_bf16x2(f[2] * sc, f[3] * sc),
                                     pack_bf16x2(f[4] * sc, f[5] * sc), pack_bf16x2(f[6] * sc, f[7] * sc));
        *reinterpret_cast<uint4*>(dst + i * kPass * 128 + ((c ^ ((r0 + kPass * i) & 7)) << 4)) = out;
      }
    }
  } else {
    const int p = (tid - kNopeThreads) % 8, r0 = (tid - kNopeThreads) / 8;
    unsigned char* dst = k_s + (kSlices - 1) * kBlockBytes + r0 * 128;
#pragma unroll 4
    for (int i = 0; i < kIters; ++i) {
      const uint2* v = reinterpret_cast<const uint2*>(smem + rows[r0 + i * kPass] + kNope + p * 16);
      const uint2 lo = v[0], hi = v[1];
      const int at = i * kPass * 128 + ((p ^ ((r0 + kPass * i) & 7)) << 4);
      *reinterpret_cast<uint4*>(dst + at) = make_uint4(lo.x, lo.y, hi.x, hi.y);
    }
  }
}

template <int NWG>
__global__ void __launch_bounds__(128 * NWG, 1) sparse_mla_decode_wgmma_kernel(const SparseMlaDecodeArgs a) {
  using Sh = Shape<NWG>;
  constexpr int NT = Sh::kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const uint32_t q_at = smem_addr(smem + kQAt), k_at = smem_addr(smem + kKAt), p_at = smem_addr(smem + kPAt);
  unsigned char* k_s = smem + kKAt;
  unsigned char* p_s = smem + kPAt;
  const uint32_t raw_at = smem_addr(smem + kRawAt), bar_at = smem_addr(smem + kBarAt);
  uint32_t* row_s = reinterpret_cast<uint32_t*>(smem + kRowAt);
  const unsigned char** src_s = reinterpret_cast<const unsigned char**>(smem + kSrcAt);
  int* valid_s = reinterpret_cast<int*>(smem + kValidAt);
  int* live_s = reinterpret_cast<int*>(smem + kLiveAt);
  float* red_s = reinterpret_cast<float*>(smem + kRedAt);

  const int split = blockIdx.x, h0 = blockIdx.y * kHeadsW;
  const int64_t b = a.row0 + blockIdx.z;  // the query row
  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, g = lane / 4, q = lane % 4;
  const int r_lo = 16 * ((tid % 128) / 32) + g, r_hi = r_lo + 8;  // the thread's two heads (rows of S, P and O)
  const int wg_u = __shfl_sync(0xffffffffu, wg, 0);  // the same, seen as warp-uniform: descriptors in uniform registers
  const auto [t0, t1] = split_tiles(a, split);

  // The row sources live in shared memory: in registers they cost 12 a thread across the loop (the four-warpgroup
  // form has 128).
  RowSources* rows_s = reinterpret_cast<RowSources*>(smem + kRowsAt);
  if (tid == 0) {
    *rows_s = row_sources(a, b);
    mbar_init(bar_at, kKeys);  // a raw buffer's barrier: threads 0..63 arrive once per fill, each with its row's bytes
    mbar_init(bar_at + 8, kKeys);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if (tid < kRawPitch / 16)
    reinterpret_cast<uint4*>(smem + kZeroAt)[tid] = make_uint4(0, 0, 0, 0);  // the row of a key without a source
  __syncthreads();
  const int32_t* idx = a.idx + b * a.n_idx;
  auto idx_of = [&](int64_t t) -> int32_t {  // key tid of tile t (threads < 64); -1 past the run or the list
    const int64_t col = t * kKeys + tid;
    return tid < kKeys && t < t1 && col < a.n_idx ? idx[col] : -1;
  };
  auto sources = [&](int32_t r, int buf) {
    if (tid < kKeys) {  // (warps 0 and 1, whole)
      src_s[buf * kKeys + tid] = (*rows_s)(r);
      valid_s[buf * kKeys + tid] = r >= 0;  // an index >= 0 is a key even where it names no row
      const unsigned any = __ballot_sync(0xffffffffu, r >= 0);
      if (lane == 0) live_s[buf * 2 + tid / 32] = any != 0u;
    }
  };
  // A tile without a key (every index -1: the padding of a top-k over fewer visible entries, or of an HCA list sized
  // for the cache's capacity) changes nothing (its probabilities are 0 and its rescale 1, or 0 on zeros): it is
  // neither copied nor computed.
  auto live = [&](int buf) { return (live_s[buf * 2] | live_s[buf * 2 + 1]) != 0; };
  // Tile t + 1's raw rows into buffer `buf` (threads 0..63, one row each): 576 of its bytes by a bulk copy that lands
  // on the buffer's barrier, the other 8 by cp.async; a row without a source reads the zero row instead (it widens
  // to a zero key and value: a -1 entry's P is 0, and 0 x garbage could be NaN).
  auto request = [&](int buf) {
    if (tid < kKeys && live(buf)) {
      const unsigned char* src = src_s[buf * kKeys + tid];
      const uint32_t row = kRawAt + (buf * kKeys + tid) * kRawPitch, bar = bar_at + buf * 8;
      if (src != nullptr) {
        const uint32_t off = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(src)) & 8u;  // rows are 8-aligned
        const uint32_t dst = raw_at + (row - kRawAt) + off;
        row_s[buf * kKeys + tid] = row + off;
        fence_async_smem();  // this buffer's generic reads (two tiles ago) before the async proxy rewrites it
        mbar_expect_tx(bar, 576);
        if (off == 0) {
          bulk_load(dst, src, 576, bar);
          cp_async8(dst + 576, src + 576);
        } else {
          cp_async8(dst, src);
          bulk_load(dst + 8, src + 8, 576, bar);
        }
      } else {
        row_s[buf * kKeys + tid] = kZeroAt;
        mbar_expect_tx(bar, 0);
      }
    }
    cp_async_commit();
  };
  uint32_t fills = 0;  // bit b: the parity of raw buffer b's next fill

  // Q of the block's 64 heads into its swizzled slices, the first tile's rows with it; two tiles' sources known.
  {
    const unsigned char* qg = static_cast<const unsigned char*>(a.q) + (b * a.heads + h0) * kD * 2;
    for (int c = tid; c < kHeadsW * (kD / 8); c += NT) {
      const int h = c / (kD / 8), piece = c % (kD / 8);
      cp_async16(q_at + (piece / 8) * kBlockBytes + sw128(h, piece % 8), qg + (h * kD + piece * 8) * 2);
    }
  }
  sources(idx_of(t0), 0);
  sources(idx_of(t0 + 1), 1);
  int32_t idx_next = idx_of(t0 + 2);
  __syncthreads();
  if (t0 < t1) request(0);

  float o[Sh::kORegs];
#pragma unroll
  for (int i = 0; i < Sh::kORegs; ++i) o[i] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, den_lo = 0.f, den_hi = 0.f;
  int buf = 0;
  for (int64_t t = t0; t < t1; ++t, buf ^= 1) {
    const bool keys = live(buf);  // (written two barriers ago at least; rewritten below only after every read)
    cp_async_wait<0>();
    if (keys) {
      mbar_wait(bar_at + buf * 8, (fills >> buf) & 1u);
      fills ^= 1u << buf;
    }
    __syncthreads();  // tile t's raw rows (and Q) landed; the previous tile's PV done in every warpgroup
    if (t + 1 < t1) request(buf ^ 1);
    if (!keys) {
      if (t + 2 < t1) sources(idx_next, buf);
      idx_next = idx_of(t + 3);
      continue;
    }
    widen_tile<NT>(smem, row_s + buf * kKeys, k_s, tid);  // 1.
    fence_async_smem();
    __syncthreads();
    // 2. S_w over the warpgroup's keys
    float s[Sh::kSRegs];
#pragma unroll
    for (int i = 0; i < Sh::kSRegs; ++i) s[i] = 0.f;
    // The descriptors are made per tile from bases the compiler cannot see through: hoisted out of the tile loop, the
    // 64 of them took 128 registers (spilled in the four-warpgroup form).
    // Each step's descriptor is the tile's base moved on by the step's offset: an add a step, not the ~10
    // instructions of a descriptor made from its address (ncu).
    uint32_t qa = q_at, ka = k_at + wg_u * Sh::kKeysPerWg * 128;
    asm volatile("" : "+r"(qa), "+r"(ka));
    const uint64_t dq = wgmma_desc_sw128(qa), dk = wgmma_desc_sw128(ka);
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < kD / 16; ++step) {
      const uint32_t at16 = ((step / 4) * kBlockBytes + (step % 4) * 32) >> 4;
      Sh::s_step(s, desc_add(dq, at16), desc_add(dk, at16), step);
    }
    wgmma_commit();
    wgmma_wait0();
#pragma unroll
    for (int i = 0; i < Sh::kSRegs; ++i) reg_fence(s[i]);
    // 3. online softmax: s[4j + e] is head r_lo (e < 2) or r_hi, key kKeysPerWg wg + 8j + 2q + e % 2
    const int* valid = valid_s + buf * kKeys + Sh::kKeysPerWg * wg;
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int j = 0; j < Sh::kKeysPerWg / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = valid[8 * j + 2 * q + e] != 0;
        s[4 * j + e] = ok ? s[4 * j + e] * a.scale : -INFINITY;
        s[4 * j + 2 + e] = ok ? s[4 * j + 2 + e] * a.scale : -INFINITY;
        mx_lo = fmaxf(mx_lo, s[4 * j + e]);
        mx_hi = fmaxf(mx_hi, s[4 * j + 2 + e]);
      }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    if (q == 0) red_s[wg * kHeadsW + r_lo] = mx_lo, red_s[wg * kHeadsW + r_hi] = mx_hi;
    __syncthreads();
    float mn_lo = m_lo, mn_hi = m_hi;
#pragma unroll
    for (int w = 0; w < NWG; ++w) {
      mn_lo = fmaxf(mn_lo, red_s[w * kHeadsW + r_lo]);
      mn_hi = fmaxf(mn_hi, red_s[w * kHeadsW + r_hi]);
    }
    const float ms_lo = isfinite(mn_lo) ? mn_lo : 0.f, ms_hi = isfinite(mn_hi) ? mn_hi : 0.f;
    const float al_lo = expf(m_lo - ms_lo), al_hi = expf(m_hi - ms_hi);
    m_lo = mn_lo, m_hi = mn_hi;
    float ps_lo = 0.f, ps_hi = 0.f;
#pragma unroll
    for (int j = 0; j < Sh::kKeysPerWg / 8; ++j) {
      const float p0 = expf(s[4 * j] - ms_lo), p1 = expf(s[4 * j + 1] - ms_lo);
      const float p2 = expf(s[4 * j + 2] - ms_hi), p3 = expf(s[4 * j + 3] - ms_hi);
      ps_lo += p0 + p1, ps_hi += p2 + p3;
      const int piece = Sh::kKeysPerWg / 8 * wg + j;  // keys kKeysPerWg wg + 8j .. + 7: a 16-byte piece of P's row
      *reinterpret_cast<uint32_t*>(p_s + sw128(r_lo, piece) + 4 * q) = pack_bf16x2(p0, p1);
      *reinterpret_cast<uint32_t*>(p_s + sw128(r_hi, piece) + 4 * q) = pack_bf16x2(p2, p3);
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      ps_lo += __shfl_xor_sync(0xffffffffu, ps_lo, off);
      ps_hi += __shfl_xor_sync(0xffffffffu, ps_hi, off);
    }
    den_lo = den_lo * al_lo + ps_lo, den_hi = den_hi * al_hi + ps_hi;
    if (!__all_sync(0xffffffffu, al_lo == 1.f && al_hi == 1.f)) {  // (once the maxima settle, mostly skipped)
#pragma unroll
      for (int j = 0; j < Sh::kORegs / 4; ++j) {
        o[4 * j] *= al_lo, o[4 * j + 1] *= al_lo;
        o[4 * j + 2] *= al_hi, o[4 * j + 3] *= al_hi;
      }
    }
    fence_async_smem();
    __syncthreads();  // P whole; red_s and this tile's valid_s read
    if (t + 2 < t1) sources(idx_next, buf);  // tile t + 2 takes this buffer (its raw rows are requested at t + 1)
    idx_next = idx_of(t + 3);
    // 4. O_w = alpha O_w + P V over the warpgroup's dims (slices kDimsPerWg / 64 wg ..)
    uint32_t pa = p_at, va = k_at + (Sh::kDimsPerWg / 64) * wg_u * kBlockBytes;
    asm volatile("" : "+r"(pa), "+r"(va));
    const uint64_t dp = wgmma_desc_sw128(pa), dv = desc_mn(va, kBlockBytes);
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < kKeys / 16; ++step)  // keys 16 step .. + 15: P's bytes 32 step.., V's rows 16 step..
      Sh::pv_step(o, desc_add(dp, step * 2), desc_add(dv, step * 128));
    wgmma_commit();
    wgmma_wait0();
#pragma unroll
    for (int i = 0; i < Sh::kORegs; ++i) reg_fence(o[i]);
  }
  cp_async_wait_all();  // (a split without tiles left Q's copies uncommitted)

  // The split's unnormalised output and (running max, denominator) per head: o[4j + e] is head r_lo (e < 2) or
  // r_hi, dim kDimsPerWg wg + 8j + 2q + e % 2.
  float* po = a.part_o + ((b * a.splits + split) * a.heads + h0) * kD + Sh::kDimsPerWg * wg + 2 * q;
#pragma unroll
  for (int j = 0; j < Sh::kORegs / 4; ++j) {
    *reinterpret_cast<float2*>(po + r_lo * kD + 8 * j) = make_float2(o[4 * j], o[4 * j + 1]);
    *reinterpret_cast<float2*>(po + r_hi * kD + 8 * j) = make_float2(o[4 * j + 2], o[4 * j + 3]);
  }
  __syncthreads();  // red_s's maxima read
  if (q == 0) red_s[wg * kHeadsW + r_lo] = den_lo, red_s[wg * kHeadsW + r_hi] = den_hi;
  __syncthreads();
  // (running max, denominator): the max from the head's owner in warpgroup 0 (every warpgroup holds the same), the
  // denominator the warpgroups' partial sums added
  float* ml = a.part_ml + ((b * a.splits + split) * a.heads + h0) * 2;
  if (wg == 0 && q == 0) ml[2 * r_lo] = m_lo, ml[2 * r_hi] = m_hi;
  if (tid < kHeadsW) {
    float den = 0.f;
#pragma unroll
    for (int w = 0; w < NWG; ++w) den += red_s[w * kHeadsW + tid];
    ml[2 * tid + 1] = den;
  }
}

template <int NWG>
cudaError_t launch_wgmma(const SparseMlaDecodeArgs& c, unsigned rows, cudaStream_t stream) {
  auto* kernel = sparse_mla_decode_wgmma_kernel<NWG>;
  cudaError_t err = cudaSuccess;
  const int limit = dynamic_smem_limit(reinterpret_cast<const void*>(kernel), &err);  // (opted in, per device)
  if (limit < 0) return err;
  if (kSmemBytesW > limit) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(c.splits), static_cast<unsigned>(c.heads / kHeadsW), rows);
  kernel<<<grid, 128 * NWG, kSmemBytesW, stream>>>(c);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sparse_mla_decode_wgmma(const SparseMlaDecodeArgs& c, unsigned rows, int warpgroups,
                                           cudaStream_t stream) {
  return warpgroups == 4 ? launch_wgmma<4>(c, rows, stream) : launch_wgmma<2>(c, rows, stream);
}

}  // namespace dsv4ffi
