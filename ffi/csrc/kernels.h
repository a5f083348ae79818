// Host entry points of the CUDA kernels of the dsv4_jax FFI extension (no XLA types here).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <string>

#include "gemm_entry.h"

namespace dsv4ffi {

// Per-token 1x128 power-of-two FP8 quantization of bf16 rows (bit-identical to dsv4_jax.quant.act_quant).
//   x [rows_in, k] bf16; src [rows_out] int32 or null: output row r reads input row src[r], and is skipped (left
//   unwritten) when src[r] < 0; null means src[r] = r.
//   q [rows_out, k] e4m3; sfa [groups, k/128, sf_pitch] f32 with row r in group r / rows_per_group at column
//   r % rows_per_group (the MN-major, TMA-aligned activation-scale layout of the SM90 GEMM).
//   wgmma_order: each 32-block of q stored as the MXFP4 prefill kernel's B operand takes it (fp4_grouped_kernels.cu):
//   element 8i + 4h + j at byte 16h + 4i + j (i < 4, h < 2, j < 4); the values and scales are the same.
// The rows' group map of a layer GEMM (a layer of a stack read in place by an m-grouped contiguous GEMM), written by
// the quantisation launch (no launch of its own): map[r] = l for r < rows, -1 for the padding rows up to padded (a
// block's validity is its first row's group), l = the device's layer index clamped to [0, layers).
struct LayerRowGroups {
  const int32_t* layer = nullptr;
  int64_t layers = 0;
  int32_t* map = nullptr;  // [padded]; null: none written
  int32_t rows = 0;
  int32_t padded = 0;
};
cudaError_t launch_quant_rows(const void* x, const int32_t* src, void* q, float* sfa, int64_t rows_out, int64_t k,
                              int64_t rows_per_group, int64_t sf_pitch, cudaStream_t stream, bool wgmma_order = false,
                              const LayerRowGroups& groups = LayerRowGroups{});

// h = bf16(w[r] * silu(min(g, L)) * clip(u, -L, L)) (L = limit, no clamp if limit <= 0), then as launch_quant_rows.
// Rows with valid[r] < 0 are skipped (valid may be null: all rows).
cudaError_t launch_swiglu_quant(const void* g, const void* u, const float* w, const int32_t* valid, void* q,
                                float* sfa, int64_t rows, int64_t k, int64_t rows_per_group, int64_t sf_pitch,
                                float limit, cudaStream_t stream, bool wgmma_order = false);

// mHC split of one connection's mixes, n*n lanes per row: mix [rows, (2+n)*n], scale [3], base [(2+n)*n] f32 ->
// pre [rows, n] = sigmoid(mix[:n]*scale0 + base) + eps, post [rows, n] = 2 sigmoid(...), comb [rows, n, n] = Sinkhorn
// (row softmax + eps, columns, then iters-1 rounds of rows and columns, eps in every denominator).
bool hc_supported_streams(int n);  // n in {1, 2, 4} (a row's n*n lanes within one warp)
cudaError_t launch_hc_split_sinkhorn(const float* mix, const float* scale, const float* base, float* pre, float* post,
                                     float* comb, int64_t rows, int n, int iters, float eps, cudaStream_t stream);

// The lightning indexer's scores against packed MXFP4 keys (indexer_kernels.cu): for query rows q bf16 [rows, H, 128]
// (row r of batch row r / (rows / batch)) with head weights w bf16 [rows, H] and keys uint8 [layers, batch, n, 68]
// (64 B of e2m1 pairs, low nibble first, then 4 UE8M0 bytes; the layer read from `layer`, [1] int32 on the device,
// clamped; null: 0): out f32 [rows, n] = bf16(sum_h bf16(relu(bf16(q[h] . K[j])) * w[h])). H a multiple of 16 with
// indexer_staged_rows(H, 1) >= 1 (H <= 144); q 16-byte and keys 4-byte aligned.
// Variants: mma (mma.sync m16n8k16, any H) and wgmma (wgmma m64n64k16: H = 64, one query row per batch row, SM90);
// kIndexerAuto launches what DSV4_FFI_INDEXER names (default wgmma), mma where wgmma does not fit.
constexpr int kIndexerAuto = -1, kIndexerMma = 0, kIndexerWgmma = 1;
struct IndexerScoresArgs {
  const void* q;
  const void* w;
  const uint8_t* keys;
  const int32_t* layer;
  float* out;
  int64_t rows, heads, layers, batch, n;
  int variant = kIndexerAuto;
};
cudaError_t launch_indexer_scores(const IndexerScoresArgs& a, cudaStream_t stream);
// Whether the wgmma variant takes these sizes on this device.
bool indexer_wgmma_fits(int64_t heads, int64_t rows, int64_t batch);
// Query rows one block stages at a time (0: H too large for the kernel's shared memory).
int indexer_staged_rows(int64_t heads, int64_t t);

// The indexer's top-k (topk_kernels.cu; reference dsv4_jax.ops.indexer_topk): per row r of scores f32 [rows, n], the
// k largest of its first n_vis[r] entries (n_vis int32 [rows], clamped to [0, n]; the rest count as -inf) in
// jax.lax.top_k's order (IEEE total order descending, -0 as +0, ties by ascending index) -> out int32 [rows, k],
// picks at or past n_vis[r] as -1. One launch.
constexpr int64_t kTopkMaxK = 2048;
struct IndexerTopkArgs {
  const float* scores;
  const int32_t* n_vis;
  int32_t* out;
  int64_t rows, n, k;
};
// Why the kernel cannot take these sizes, or null (1 <= k <= min(n, 2048), n < 2^31 - 512).
const char* indexer_topk_unsupported(int64_t n, int64_t k);
cudaError_t launch_indexer_topk(const IndexerTopkArgs& a, cudaStream_t stream);

// The compressor's decode step (compressor_kernels.cu; reference dsv4_jax.ops.compressor.compress_step, k = 1): one
// new token per row with projections kv_new / sc_new f32 [rows, C] (C = coff Dc, coff 2 for ratio 4 else 1; the score
// without ape) on top of the block state kv_state / sc_state f32 [layers, rows, coff m, C] (the layer read from
// `layer`, [1] int32 on the device, clamped; null: 0), ape f32 [param_layers, m, C], norm_w bf16 [param_layers, Dc]
// (read at `param_layer`, likewise), inv_freq f32 [rope/2], start / n_new int32 [rows] -> entry bf16 [rows, Dc] (RMSNorm, RoPE, FP8 or Hadamard + FP4 simulated),
// kv_out / sc_out f32 [rows, coff m, C] (the state after the step); pooled f32 [rows, Dc] workspace. Two launches.
struct CompressorDecodeArgs {
  const float* kv_new;
  const float* sc_new;
  const float* kv_state;
  const float* sc_state;
  const float* ape;
  const __nv_bfloat16* norm_w;
  const float* inv_freq;
  const int32_t* start;
  const int32_t* n_new;
  const int32_t* layer;
  const int32_t* param_layer;
  __nv_bfloat16* entry;
  float* kv_out;
  float* sc_out;
  float* pooled;
  int64_t rows, layers, param_layers;
  int ratio, dc, rope;
  bool rotate;
  float eps;
};
// Why the kernel cannot take these sizes, or null: ratio 4 or 128, Dc 512 or 128 (128 when rotated), RoPE dims a
// positive multiple of 64, at most Dc.
const char* compressor_decode_unsupported(int ratio, int64_t dc, int64_t rope, bool rotate);
cudaError_t launch_compressor_decode(const CompressorDecodeArgs& a, cudaStream_t stream);

// The window KV row of a decode step (compressor_kernels.cu; reference dsv4_jax.ops.kv_row): kv_in bf16 [rows, d]
// (wkv's output) -> kv_out bf16 [rows, d] = RMSNorm (norm_w bf16 [layers, d] read at `layer`, [1] on the device,
// clamped; null: 0), RoPE of the last `rope` channels at pos int32 [rows] (inv_freq f32 [rope/2]), FP8 e4m3
// simulation of the first d - rope in tiles of 64; with `packed`, also that row in kv_format's packed layout, uint8
// [rows, row_bytes]. d 512 or 128.
struct KvRowArgs {
  const __nv_bfloat16* kv_in;
  const __nv_bfloat16* norm_w;
  const int32_t* layer;
  const int32_t* pos;
  const float* inv_freq;
  __nv_bfloat16* kv_out;
  uint8_t* packed;
  int64_t rows, layers, d, rope, row_bytes;
  float eps;
};
// Why the kernel cannot take these sizes (row_bytes 0: no packed output), or null.
const char* kv_row_unsupported(int64_t d, int64_t rope, int64_t row_bytes);
cudaError_t launch_kv_row(const KvRowArgs& a, cudaStream_t stream);

// The query heads after wq_b (q_heads_kernels.cu; reference dsv4_jax.ops.q_heads): q bf16 [rows, heads, d] -> out
// bf16 [rows, heads, d]: each head's weightless RMS norm in bf16 tensor arithmetic, then RoPE of the last `rope`
// channels at pos int32 [rows] (inv_freq f32 [rope/2]). d 512 or 256, rope a multiple of 8.
struct QHeadsArgs {
  const __nv_bfloat16* q;
  const int32_t* pos;
  const float* inv_freq;
  __nv_bfloat16* out;
  int64_t rows, heads, d, rope;
  float eps;
};
const char* q_heads_unsupported(int64_t d, int64_t rope);
cudaError_t launch_q_heads(const QHeadsArgs& a, cudaStream_t stream);

// The MoE router (router_kernels.cu; reference dsv4_jax.ops.router.route), one warp per token: logits f32 [tokens,
// experts] -> weights f32 [tokens, k] and ids int32 [tokens, k]. Experts are the top k of sqrt(softplus(logits)) +
// bias (bias f32 [layers, experts]; ties to the lower id) or, with `table` set, the token's row of the hash table
// (int32 [layers, vocab, k], token_ids int32 [tokens]); the layer read from `layer` ([1] on the device, clamped; null:
// 0). Weights: the chosen scores over their sum, times route_scale.
constexpr int kRouteMaxExperts = 512;
struct RouteArgs {
  const float* logits;
  const float* bias;
  const int32_t* table;
  const int32_t* token_ids;
  const int32_t* layer;
  float* weights;
  int32_t* ids;
  int64_t tokens, experts, layers, vocab;
  int k;
  float route_scale;
};
cudaError_t launch_route(const RouteArgs& a, cudaStream_t stream);

// mHC hc_pre in two launches (the reference's RMS, mix dot, split and stream collapse are ~6): x [rows, n, d] bf16;
// fn [layers, (2+n)n, n d], scale [layers, 3], base [layers, (2+n)n] f32 read at layer `layer` ([1] on the device, or
// null: 0) -> out [rows, d] bf16 = bf16(sum_j pre_j x_j), post [rows, n], comb [rows, n, n] f32; part
// [rows, hc_pre_chunks(n, d), (2+n)n + 1] f32 workspace. d even, n in {1, 2, 4}. With norm_w (bf16 [norm_layers, d],
// read at `layer` where norm_layers > 1; d <= hc_pre_norm_max_d()) out is the RMSNorm of that x instead:
// bf16(w * (x * rsqrt(mean(x^2) + x_norm_eps))).
struct HcPreArgs {
  const __nv_bfloat16* x;
  const float* fn;
  const float* scale;
  const float* base;
  const int32_t* layer;
  __nv_bfloat16* out;
  float* post;
  float* comb;
  float* part;
  int64_t rows, d;
  int n, iters;
  float eps, norm_eps;
  const __nv_bfloat16* norm_w = nullptr;
  int64_t norm_layers = 0;
  float x_norm_eps = 0.f;
};
int64_t hc_pre_chunks(int64_t n, int64_t d);
int64_t hc_pre_norm_max_d();
cudaError_t launch_hc_pre(const HcPreArgs& a, cudaStream_t stream);

// y [m, n] = bf16(x . bf16(W * s)) for the grouped `wo_a` at decode sizes (m <= dequant_gemv_max_m): x [m, groups, k]
// bf16, weight row r of group r / rows_per_group; W e4m3 [layers, n, k] with f32 block scales [layers, ceil(n/128),
// k/128], the layer read from `layer` ([1] int32 on the device; null: 0). k % 128 == 0, 16-byte aligned buffers.
constexpr int kDequantGemvMaxM = 32;     // the tensor-core kernel (rows_per_group % 16 == 0)
constexpr int kDequantGemvCudaMaxM = 8;  // the CUDA-core kernel (other groupings, or DSV4_FFI_DEQUANT_GEMV=cuda)
bool dequant_gemv_uses_mma();
int64_t dequant_gemv_max_m(int64_t rows_per_group);
struct DequantGemvArgs {
  const void* x;
  const void* w;
  const float* s;
  const int32_t* layer;
  void* out;
  int64_t m, n, k, rows_per_group, groups;
};
cudaError_t launch_dequant_bf16_gemv(const DequantGemvArgs& a, cudaStream_t stream);

// Sparse-MLA decode (sparse_mla_kernels.cu): one query per batch row, `heads` heads (a multiple of 16), head dim 512
// (448 NoPE + 64 RoPE), over the KV rows each row's index list names, read from packed 584-byte FP8 rows
// (dsv4_jax.kv_format). Index r of row b names: the window ring row r (r < window), the compressed entry r - window of
// layer `layer` (r < window + cap), the extra row r - window - cap (this step's completed entries), else a zero row;
// -1 is no key. Softmax with the attention sink in the denominator; split-KV over `splits` runs of 64-key tiles
// (workspaces part_o [batch, splits, heads, 512] f32 and part_ml [batch, splits, heads, 2] f32, any splits >= 1: the
// caller picks it), then a combine. Heads a multiple of 64 run a block of 16 warps per 64 heads (each tile's rows
// read and widened once, the next tile's in flight; DSV4_FFI_SPARSE_DECODE=16 forces the 16-head kernel).
constexpr int kSparseMlaDim = 512, kSparseMlaNope = 448, kSparseMlaRowBytes = 584;
// Query row b reads the sources of batch row b / q_per_src: decode has one query per batch row (q_per_src 1), a
// prefill or extend step the k queries of a row (q_per_src k, query rows b-major).
struct SparseMlaDecodeArgs {
  const void* q;                 // bf16 [batch, heads, 512]
  const unsigned char* ring;     // [batch / q_per_src, window, 584]
  const unsigned char* entries;  // [layers, batch / q_per_src, cap, 584] or null (cap 0)
  const int32_t* layer;          // [1] on the device, or null (layer 0)
  const unsigned char* extra;    // [batch / q_per_src, n_extra, 584] or null
  const int32_t* idx;            // [batch, n_idx]
  const float* sink;             // [heads]
  float* part_o;
  float* part_ml;
  void* out;                     // bf16 [batch, heads, 512]
  int64_t batch, heads, window, cap, n_extra, n_idx;
  int splits;
  float scale;
  int64_t q_per_src = 1;
  int64_t row0 = 0;  // the launch's first query row (the grid's z covers at most 65,535 rows per launch)
};
cudaError_t launch_sparse_mla_decode(const SparseMlaDecodeArgs& a, cudaStream_t stream);
// The wgmma kernel alone (sparse_mla_wgmma_kernels.cu; sm_90a, heads a multiple of 64; 2 or 4 warpgroups a block) on
// query rows [row0, row0 + rows): launch_sparse_mla_decode picks it and runs the combine.
cudaError_t launch_sparse_mla_decode_wgmma(const SparseMlaDecodeArgs& a, unsigned rows, int warpgroups,
                                           cudaStream_t stream);

// UE8M0 bytes -> FP32 2^(b-127) (0 -> 2^-127, 255 -> NaN).
cudaError_t launch_e8m0_to_f32(const uint8_t* s, float* out, int64_t count, cudaStream_t stream);

struct GemmArgs {
  const void* a;        // e4m3, rows a_rows x k (masked: groups * m_per_group rows)
  const float* sfa;     // f32 [sf_groups, k/128, sf_pitch]
  const void* b;        // e4m3 [g, n, k]
  const float* sfb;     // f32 [g, ceil(n/128), k/128]
  void* d;              // bf16 rows a_rows x n
  const int32_t* layout;  // psum [g] (contig) / masked_m [g] (masked) / a group per row [shape_m] (layer) / null
  uint64_t a_rows;      // rows of A and D
  uint32_t shape_m;     // dense: M; contig: a_rows; masked: rows per group; layer: the rows padded to BLOCK_M
  uint64_t sf_pitch;    // inner extent of the scale tensor (>= rows per group, multiple of 4)
  uint32_t sf_groups;   // 1, or g for masked
  uint32_t b_groups = 0;  // layers of B the descriptor covers (a layer GEMM's real L); 0: the instantiation's g
};

// Small-M FP8 GEMM for decode (gemv_kernels.cu; tensor-core mma by default): d[r, :] = a[row(r)] x b[group(r)]^T
// with 1x128 activation and 128x128 weight scales, bf16 out. row(r) = rows_map ? rows_map[r] : r; group(r) = group_map ? group_map[r / TB] : 0
// (TB = tokens_per_block: 1, 2, 4 or 8 output rows share one pass over the weights; 16 or 32 on the wide kernel:
// e4m3 rows, no rows map, one projection). Invalid rows -> zeros.
constexpr int64_t kGemvMaxM = 8;  // dense fp8_linear uses the GEMV up to this many rows
// Rows dsv4_fp8_gemv_layer takes: beyond kGemvMaxM, passes of 16 or 32 rows (quantised once; or of 8, the fused
// kernel) over the layer's weights, segments whose group is the layer, so a stacked weight is never sliced out
// (DeepGEMM would need the slice copied out of the stack).
constexpr int64_t kGemvLayerMaxM = 64;
// The layer GEMMs (dsv4_fp8_gemv_layer's "gemm" route): kLayer instantiations (gen_instantiations.py) with BLOCK_M
// kLayerGemmBlockM, i.e. one row block for up to kGemvLayerMaxM rows.
constexpr uint32_t kLayerGemmBlockM = 64;
struct GemvArgs {
  const void* a;          // e4m3 [a_rows, k]
  int64_t a_rows;
  const float* sfa;       // scale of (row, kb) at sfa[row * sfa_row_stride + kb * sfa_kb_stride]
  int64_t sfa_row_stride, sfa_kb_stride;
  const void* b;          // e4m3 [groups, n, k]
  const float* sfb;       // f32 [groups, ceil(n/128), k/128]
  int64_t groups;
  const int32_t* rows_map;   // [out_rows] or null
  const int32_t* group_map;  // [ceil(out_rows / TB)] or null
  void* d;                // bf16 [out_rows, n]
  int64_t out_rows, n, k;
  int tokens_per_block;
  // Optional second projection of the same activation rows, groups and K (the gate/up pair of an expert MLP, or two
  // layer weights read by one input, in one launch): d2 [out_rows, n2] = a x b2^T with scales sfb2. Null: one
  // projection. n2 = 0: N rows as the first.
  const void* b2 = nullptr;
  const float* sfb2 = nullptr;
  void* d2 = nullptr;
  int64_t n2 = 0;
  // Fused activation quantisation (the dense fp8_linear at decode: one launch instead of launch_quant_rows + GEMV):
  // set, the kernel reads bf16 rows x_bf16 [a_rows, k] and quantises them per 1x128 itself, bit-identically to
  // launch_quant_rows; `a` and `sfa` are not read. If q_out is set it also writes the quantised rows once, as
  // launch_quant_rows would: q_out e4m3 [a_rows, k], the scale of (row, kb) at sfa_out[row * sfa_row_stride + kb *
  // sfa_kb_stride]. Always the tensor-core kernel (DSV4_FFI_GEMV=cuda has no fused variant).
  const void* x_bf16 = nullptr;
  void* q_out = nullptr;
  float* sfa_out = nullptr;
};
cudaError_t launch_gemv(const GemvArgs& p, cudaStream_t stream);
// Whether the dense fp8_linear at M <= kGemvMaxM fuses its activation quantisation into the GEMV (default), or
// launches it separately first (DSV4_FFI_GEMV_QUANT=separate, or DSV4_FFI_GEMV=cuda); read at every launch.
bool gemv_fuses_quant();
// K split across a block's warps for this problem (exposed for the tests of the launch heuristic); mma: the
// tensor-core variant (16 weight rows per warp) rather than the CUDA-core loop (4 rows per warp).
int gemv_ksplit(int64_t out_rows, int tokens_per_block, int64_t n, int64_t k, int num_sms, bool mma);
// Whether launch_gemv takes the tensor-core variant (default) or the CUDA-core loop (DSV4_FFI_GEMV=cuda).
bool gemv_uses_mma();

// MXFP4 GEMV for decode (fp4_gemv_kernels.cu): packed e2m1 weights [groups, n, k/2] (low nibble = even element)
// with UE8M0 scale bytes [groups, n, k/32]; bf16 activations quantized to e4m3 per 1x128 inside the kernel
// (bit-identical to quant.act_quant); bf16 out. Output row r reads activation row rows_map ? rows_map[r] : r and
// weight group group_map ? group_map[r] : 0; a negative or out-of-range row or group gives a zero row. Consecutive
// rows with the same group share one pass over the weights, up to kFp4SegmentRows rows (only 1 when max_share <= 1).
// With w[1] set (the fused gate/up pair of an expert MLP): out[r] = bf16(route_w[r] * silu(min(g, L)) *
// clip(u, -L, L)), g = f32(bf16(x W0^T)), u = f32(bf16(x W1^T)), L = limit (no clamp if limit <= 0).
constexpr int kFp4SegmentRows = 8;
// The implementations (fp4_gemv_kernels.cu: ring and the dispatch; fp4_wg_kernels.cu; fp4_wgb_kernels.cu): kFp4Wgb
// (default: per-warp cp.async rings, one FP8 wgmma k32 step per 32-wide weight block from zero, its partial scaled
// in fp32: the reference's numerics except the FP8 tensor core's 13-bit-mantissa sum of a block's 32 exact
// products), kFp4Wg (wgmma with the e2m1 weights widened to f16 in
// registers, pre-scaled per (row, 128-chunk), fp32 accumulation; exact-path fallback per 32-wide block), kFp4Wg8
// (the same on FP8 wgmma, pre-scaled: ~1e-3 off; opt-in), kFp4Ring (the first design: per-warp cp.async ring +
// ldmatrix, one emulated e4m3 mma per 32-wide block: exact up to summation order).
// kFp4Default: DSV4_FFI_FP4_VARIANT=wg|wg8|wgb|ring, read at launch, wgb if unset; non-SM90 devices run ring.
enum Fp4Variant : int { kFp4Default = 0, kFp4Ring = 2, kFp4Wg = 3, kFp4Wg8 = 4, kFp4Wgb = 5 };
struct Fp4GemvArgs {
  const void* x;  // bf16 [x_rows, k]
  int64_t x_rows;
  const int32_t* rows_map;   // [out_rows] or null
  const int32_t* group_map;  // [out_rows] or null
  const uint8_t* w[2];       // packed e2m1 [groups, n, k/2]; w[1] null: one projection
  const uint8_t* s[2];       // UE8M0 bytes [groups, n, k/32]
  int64_t groups;
  void* out;  // bf16 [out_rows, n]
  int64_t out_rows, n, k;
  int64_t max_share;  // most rows that can share a weight pass (e.g. the token count); only sizes the launch
  const float* route_w = nullptr;  // fused: [out_rows]
  float limit = 0.f;
  int variant = 0;  // Fp4Variant: which kernels (kFp4Default: DSV4_FFI_FP4_VARIANT, else wgb)
  bool slabs = false;  // w and s in the slab layout (kFp4SlabRows below); read by the wgb kernels only
};
// The slab layout of MXFP4 expert weights (`quant.fp4_to_slabs`, made once at load by `prepare_params`): per group,
// slabs of kFp4SlabRows rows, and in each slab one 1 KB piece per 128-wide K chunk (its 16 rows x 64 packed bytes);
// the scales as 32-bit words (the 4 UE8M0 bytes of a row's chunk, byte j = 32-block j) in the same order, 64 bytes a
// piece. A warp's chunk of 16 rows is then one contiguous kilobyte instead of 16 pieces of 64 bytes 2 KB apart: the
// gate/up launch measured 11-15% faster on it (BENCHMARKS.md). Needs n % 16 == 0 and k % 128 == 0.
constexpr int kFp4SlabRows = 16;
cudaError_t launch_fp4_gemv(const Fp4GemvArgs& a, cudaStream_t stream);
// Shared memory one launch needs (the handlers refuse what the device cannot hold, e.g. a very large K).
size_t fp4_gemv_smem(bool fused, int64_t k, int64_t max_share, int variant);
// The Fp4Variant a request resolves to (kFp4Default: DSV4_FFI_FP4_VARIANT, kFp4Ring if unset).
int fp4_resolve_variant(int requested);
// Whether a launch of `variant` on this device reads the slab layout (the wgb kernel on SM90).
bool fp4_reads_slabs(int variant);
// The wgb variant alone (fp4_wgb_kernels.cu; launch_fp4_gemv calls it for kFp4Wgb on SM90): launch and shared memory.
cudaError_t launch_fp4_wgb(const Fp4GemvArgs& a, cudaStream_t stream);
size_t fp4_wgb_smem(bool fused, int64_t k);
// The wg (f16 = true) and wg8 variants (fp4_wg_kernels.cu).
cudaError_t launch_fp4_wg(const Fp4GemvArgs& a, bool f16, cudaStream_t stream);
size_t fp4_wg_smem(bool fused, bool f16, int64_t k, int64_t max_share);
// Rows per weight pass the launch is built for (1 or kFp4SegmentRows) given max_share.
int fp4_tokens_per_pass(int64_t max_share);
// K split across a block's 8 warps (DSV4_FFI_FP4_KSPLIT=1|2|4|8 overrides).
int fp4_ksplit(int64_t k);
// DSV4_FFI_FP4_CVT: 1 = bits (e2m1 -> e4m3 by bit placement), 0 = lut (the prmt table), -1 = unset (each variant's
// default: ring the table, wgb bit placement).
int fp4_cvt_request();
// Whether the ring variant converts by bit placement (DSV4_FFI_FP4_CVT=bits) instead of the table (default); the wg
// variants have their own widening.
bool fp4_uses_bit_conversion();

// MXFP4 -> FP8 128x128 blocks (fp4_widen_kernels.cu; the reference is quant.fp4_to_fp8_blocks): packed e2m1
// [layers * groups, n, k/2] with UE8M0 bytes [layers * groups, n, k/32] (layer `layer` of the stack, or the only one)
// -> e4m3 q [groups, n, k] and f32 tile scales sf [groups, n/128, k/128]. n, k multiples of 128.
struct Fp4WidenArgs {
  const uint8_t* w;
  const uint8_t* s;
  const int32_t* layer;  // [1] on the device, or null (no stack)
  int64_t layers, groups, n, k;
  uint8_t* q;
  float* sf;
  bool slabs = false;  // w and s in the slab layout (kFp4SlabRows)
};
cudaError_t launch_fp4_widen(const Fp4WidenArgs& a, cudaStream_t stream);

// MXFP4 routed experts at prefill sizes, one launch per projection or for two of one K and N (gate and up)
// (fp4_grouped_kernels.cu): rows of q sorted by expert (group_sizes [experts]: expert e's rows follow e - 1's from
// row 0; rows past them get zeros), each row times its expert's weight of layer `layer`, bf16 out [rows, n].
struct Fp4GroupedArgs {
  const uint8_t* q;            // e4m3 [rows, k], each 32-block in the wgmma order (act_quant's wgmma_order)
  const float* sfa;            // f32 [k / 128, sfa_pitch]: the rows' 1x128 scales
  int64_t sfa_pitch;
  const int32_t* group_sizes;  // [experts] on the device
  int64_t experts;
  const int32_t* layer;        // [1] on the device, or null (no stack)
  int64_t layers;
  const uint8_t* w[2];         // packed e2m1 [layers, experts, n, k/2] (or the slab layout); w[1] null: one output
  const uint8_t* s[2];         // UE8M0 bytes [layers, experts, n, k/32] (the slab layout: uint32 words)
  void* out[2];
  int64_t rows, n, k;
  bool slabs = false;
};
// Whether the launch for `experts` experts fits the device's shared memory (the expert table grows with them; the
// handler names the refusal).
bool fp4_grouped_fits(int64_t experts);
cudaError_t launch_fp4_grouped(const Fp4GroupedArgs& a, cudaStream_t stream);

// Finds the instantiation for (kind, n, k, g, block_m); null if none.
const GemmEntry* find_gemm(int kind, uint32_t n, uint32_t k, uint32_t g, uint32_t block_m);
// Validates the device (SM90, SM count) and launches on `stream`. Returns "" or an error message.
std::string launch_gemm(const GemmEntry& e, const GemmArgs& a, cudaStream_t stream);
// Launch helpers (launch_util.cu), each cached per device / kernel and not a stream operation:
// compute capability and SM count of the current device;
void device_info(int* major, int* minor, int* sms);
// raises a kernel's dynamic shared-memory limit to what the device allows and returns it (-1, the error in *err);
int dynamic_smem_limit(const void* kernel, cudaError_t* err);
// blocks of a kernel resident per SM at `threads` and `smem` bytes of dynamic shared memory (at least 1).
int resident_blocks(const void* kernel, int threads, size_t smem);
// A TMA descriptor of a 2-D row-major tensor [outer, inner] with `outer_stride` bytes between rows, read in boxes
// [box_outer, box_inner] (swizzle: 0, 32, 64 or 128 bytes). Returns "" or what failed, naming `what`.
std::string make_tma_2d(CUtensorMap* m, CUtensorMapDataType dt, const void* base, uint64_t inner, uint64_t outer,
                        uint64_t outer_stride, uint32_t box_inner, uint32_t box_outer, uint32_t swizzle,
                        const char* what);

}  // namespace dsv4ffi
