// Streaming GEMV (DSV4_FFI_GEMV=stream): the tensor-core step of gemv_mma.cuh fed from a shared-memory ring that
// one producer warp fills with bulk asynchronous copies (cp.async.bulk, completion on an mbarrier).
//
// Why: at one token a decode GEMV is a pure weight stream, and the register-fed mma kernel (gemv_kernels.cu) is
// limited by how it is launched, not by its loop: its 384 short-lived blocks (T = 1, 6 experts, N=2048 K=4096) fill
// 1.45 waves, so the last 0.45 wave runs at half the bytes in flight, and it holds 72% of copy bandwidth under ncu.
// Here the grid is persistent (one block per SM, each owning a contiguous, balanced range of 16-row tiles), and the
// producer keeps up to ~200 KB per SM in flight without a register per byte.
//
// Work unit: 16 weight rows of one segment (TB output rows sharing one expert), over all of K, in chunks of up to 16
// K blocks (2 KB per row). A ring stage holds one chunk: the 16 weight rows and the segment's TB activation rows,
// each row padded by 64 bytes so that rows g and g+1 fall in different halves of a 128-byte bank line (the 16-byte
// reads of a quarter-warp then never collide). Each of the 8 consumer warps takes whole K blocks of the chunk and
// applies their scales; the 8 partial C fragments of a unit are summed through shared memory by one warp.
// Numerics: the same products, power-of-two scales and FP32 adds as the mma kernel; only the summation order differs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "gemv_mma.cuh"
#include "kernels.h"

namespace dsv4ffi {
namespace {

constexpr int kConsumerWarps = 8;
constexpr int kThreads = (kConsumerWarps + 1) * 32;
constexpr int kMaxStages = 8;
constexpr int kMaxKbPerChunk = 16;
constexpr int kRowPad = 64;
constexpr int kRingBudget = 200 * 1024;  // dynamic shared memory for the ring (227 KB per block on SM90)

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

struct StreamPlan {
  int kb_per_chunk;  // K blocks per ring stage (divides K / 128)
  int pitch;         // bytes per staged row
  int stage_bytes;
  int stages;
};

template <int TB>
StreamPlan stream_plan(int64_t k, int ring_budget) {
  const int64_t kblocks = k / 128;
  StreamPlan s{};
  s.kb_per_chunk = kMaxKbPerChunk;
  while (kblocks % s.kb_per_chunk != 0) s.kb_per_chunk /= 2;
  s.pitch = s.kb_per_chunk * 128 + kRowPad;
  s.stage_bytes = (kMmaRows + TB) * s.pitch;
  s.stages = ring_budget / s.stage_bytes < kMaxStages ? ring_budget / s.stage_bytes : kMaxStages;
  if (s.stages < 2) s.stages = 2;
  return s;
}

// Segment of a unit and the validity of its expert; act_row(t) as in the mma kernel (-1: no valid activation row).
struct UnitRef {
  int64_t seg, n0, g;
  bool group_ok;
};
__device__ __forceinline__ UnitRef unit_ref(const GemvArgs& p, int64_t u, int64_t tiles_per_seg) {
  UnitRef r;
  r.seg = u / tiles_per_seg;
  r.n0 = (u % tiles_per_seg) * kMmaRows;
  r.g = p.group_map != nullptr ? p.group_map[r.seg] : 0;
  r.group_ok = r.g >= 0 && r.g < p.groups;
  if (!r.group_ok) r.g = 0;
  return r;
}
template <int TB>
__device__ __forceinline__ int64_t act_row(const GemvArgs& p, const UnitRef& u, int t) {
  const int64_t r = u.seg * TB + t;
  if (t >= TB || r >= p.out_rows || !u.group_ok) return -1;
  const int64_t src = p.rows_map != nullptr ? p.rows_map[r] : r;
  return src >= 0 && src < p.a_rows ? src : -1;
}

template <int TB>
__global__ void __launch_bounds__(kThreads, 1) gemv_stream_kernel(const GemvArgs p, const StreamPlan plan,
                                                                  int64_t units, int64_t tiles_per_seg) {
  extern __shared__ __align__(128) uint8_t ring[];
  __shared__ __align__(8) uint64_t full[kMaxStages], empty[kMaxStages];
  __shared__ float red[2][kConsumerWarps][4][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t kblocks = p.k / 128, nblocks = (p.n + 127) / 128;
  const int chunks = static_cast<int>(kblocks / plan.kb_per_chunk);
  const uint32_t chunk_bytes = plan.kb_per_chunk * 128;
  const int64_t u_begin = units * blockIdx.x / gridDim.x, u_end = units * (blockIdx.x + 1) / gridDim.x;
  const auto* a = static_cast<const uint8_t*>(p.a);
  const auto* b = static_cast<const uint8_t*>(p.b);

  if (threadIdx.x == 0) {
    for (int s = 0; s < plan.stages; ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], kConsumerWarps);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kConsumerWarps) {
    // Producer: lanes 0-15 copy the unit's weight rows, lanes 16.. its activation rows; lane 0 arms the barrier
    // with the byte count of the rows that exist (absent rows are left stale: their outputs are never stored).
    int it = 0;
    for (int64_t u = u_begin; u < u_end; ++u) {
      const UnitRef ur = unit_ref(p, u, tiles_per_seg);
      const uint8_t* src = nullptr;
      if (lane < kMmaRows) {
        const int64_t row = ur.n0 + lane;
        if (ur.group_ok && row < p.n) src = b + (ur.g * p.n + row) * p.k;
      } else if (lane < kMmaRows + TB) {
        const int64_t ar = act_row<TB>(p, ur, lane - kMmaRows);
        if (ar >= 0) src = a + ar * p.k;
      }
      const uint32_t rows = __popc(__ballot_sync(0xffffffffu, src != nullptr));
      for (int c = 0; c < chunks; ++c, ++it) {
        const int s = it % plan.stages;
        mbar_wait(&empty[s], ((it / plan.stages) & 1) ^ 1);
        if (lane == 0) mbar_arrive_expect_tx(&full[s], rows * chunk_bytes);
        __syncwarp();
        if (src != nullptr)
          bulk_copy_g2s(ring + s * plan.stage_bytes + lane * plan.pitch, src + c * chunk_bytes, chunk_bytes,
                        &full[s]);
      }
    }
    return;
  }

  const int gq = lane / 4, q = lane % 4;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  int it = 0;
  for (int64_t u = u_begin; u < u_end; ++u) {
    const UnitRef ur = unit_ref(p, u, tiles_per_seg);
    const int64_t c_row0 = act_row<TB>(p, ur, 2 * q), c_row1 = act_row<TB>(p, ur, 2 * q + 1);
    const float* sfa0 = c_row0 >= 0 ? p.sfa + c_row0 * p.sfa_row_stride : nullptr;
    const float* sfa1 = c_row1 >= 0 ? p.sfa + c_row1 * p.sfa_row_stride : nullptr;
    const float* sfb_row = p.sfb + (ur.g * nblocks + (ur.n0 < p.n ? ur.n0 : 0) / 128) * kblocks;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int c = 0; c < chunks; ++c, ++it) {
      const int s = it % plan.stages;
      mbar_wait(&full[s], (it / plan.stages) & 1);
      const uint8_t* st = ring + s * plan.stage_bytes;
      for (int j = warp; j < plan.kb_per_chunk; j += kConsumerWarps) {
        float blk[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int off = j * 128 + h * 64 + q * 16;
          const uint4 wl = *reinterpret_cast<const uint4*>(st + gq * plan.pitch + off);
          const uint4 wh = *reinterpret_cast<const uint4*>(st + (gq + 8) * plan.pitch + off);
          const uint4 xv = gq < TB ? *reinterpret_cast<const uint4*>(st + (kMmaRows + gq) * plan.pitch + off) : zero;
          mma_step64(wl, wh, xv, blk);
        }
        const int64_t kb = static_cast<int64_t>(c) * plan.kb_per_chunk + j;
        const float sb = sfb_row[kb];
        const float s0 = sfa0 ? sfa0[kb * p.sfa_kb_stride] * sb : 0.f;
        const float s1 = sfa1 ? sfa1[kb * p.sfa_kb_stride] * sb : 0.f;
        add_scaled(blk, s0, s1, acc);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);
    }
    // Sum the 8 warps' fragments; red is double-buffered by unit parity, so one barrier per unit suffices (a warp
    // reaches unit u + 1's barrier only after its share of unit u is done).
    float(*slot)[4][32] = red[u & 1];
#pragma unroll
    for (int i = 0; i < 4; ++i) slot[warp][i][lane] = acc[i];
    asm volatile("bar.sync 1, %0;" ::"n"(kConsumerWarps * 32) : "memory");
    if (warp == static_cast<int>(u % kConsumerWarps)) {
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[i] = 0.f;
        for (int w = 0; w < kConsumerWarps; ++w) v[i] += slot[w][i][lane];
      }
      store_c_fragment<TB>(v, lane, ur.seg, ur.n0, c_row0 >= 0, c_row1 >= 0, static_cast<__nv_bfloat16*>(p.d),
                           p.out_rows, p.n);
    }
  }
}

template <int TB>
cudaError_t launch_stream_tb(const GemvArgs& p, int num_sms, cudaStream_t stream) {
  int ring = kRingBudget;
  if (const char* v = std::getenv("DSV4_FFI_GEMV_RING_KB")) {  // benchmarking knob: a smaller ring
    const int kb = std::atoi(v);
    if (kb >= 16 && kb * 1024 < kRingBudget) ring = kb * 1024;
  }
  const StreamPlan plan = stream_plan<TB>(p.k, ring);
  const int64_t tiles_per_seg = (p.n + kMmaRows - 1) / kMmaRows;
  const int64_t units = (p.out_rows + TB - 1) / TB * tiles_per_seg;
  const int64_t grid = units < num_sms ? units : num_sms;
  const int smem = plan.stages * plan.stage_bytes;
  // Opt in to more than 48 KB of dynamic shared memory once per instantiation (not a stream operation: safe while
  // XLA records a command buffer).
  static const cudaError_t attr =
      cudaFuncSetAttribute(gemv_stream_kernel<TB>, cudaFuncAttributeMaxDynamicSharedMemorySize, kRingBudget);
  if (attr != cudaSuccess) return attr;
  gemv_stream_kernel<TB><<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p, plan, units, tiles_per_seg);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemv_stream(const GemvArgs& p, int num_sms, cudaStream_t stream) {
  switch (p.tokens_per_block) {
    case 1: return launch_stream_tb<1>(p, num_sms, stream);
    case 2: return launch_stream_tb<2>(p, num_sms, stream);
    case 4: return launch_stream_tb<4>(p, num_sms, stream);
    case 8: return launch_stream_tb<8>(p, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dsv4ffi
