// XLA FFI handlers of the dsv4_jax extension: activation quantization, `wo_a`, the FP8 GEMMs and GEMVs
// (attention_handlers.cc: mHC, sparse-MLA decode, the indexer, the compressor; moe_handlers.cc: the router and the
// MXFP4 GEMVs). Every handler takes XLA's CUDA stream, never synchronises, keeps any workspace as an explicit result,
// validates shapes with clear messages and is marked command-buffer compatible.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "handler_util.h"
#include "handlers.h"
#include "kernels.h"

namespace dsv4ffi {
namespace {

// ---- activation quantization -----------------------------------------------------------------------------------

ffi::Error check_quant_out(const std::string& op, int64_t rows_out, int64_t k, int64_t groups,
                           const ffi::ResultBuffer<ffi::F32>& sfa, int64_t* pitch) {
  if (k % 128 != 0) return bad(op, "K=" + std::to_string(k) + " is not a multiple of 128");
  if (groups < 1 || rows_out % groups != 0)
    return bad(op, "rows " + std::to_string(rows_out) + " do not split into " + std::to_string(groups) + " groups");
  const int64_t per = rows_out / groups, kb = k / 128;
  if (kb == 0 || sfa->element_count() % (groups * kb) != 0)
    return bad(op, "scale result " + shape_str(*sfa) + " is not [groups, K/128, pitch]");
  *pitch = sfa->element_count() / (groups * kb);
  if (*pitch < per || *pitch % 4 != 0)
    return bad(op, "scale pitch " + std::to_string(*pitch) + " must be >= rows per group (" + std::to_string(per) +
                       ") and a multiple of 4");
  return ffi::Error::Success();
}

ffi::Error ActQuantImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> src,
                        ffi::Result<ffi::AnyBuffer> q, ffi::ResultBuffer<ffi::F32> sfa, int64_t groups,
                        int64_t order) {
  const std::string op = "dsv4_act_quant";
  if (order != 0 && order != 1) return bad(op, "order must be 0 (as stored) or 1 (the wgmma order)");
  if (!is_e4m3(*q)) return bad(op, "q must be float8_e4m3fn");
  if (x.dimensions().size() < 1 || q->dimensions().size() < 1) return bad(op, "inputs must have rank >= 1");
  const int64_t k = dim(x, -1);
  if (dim(*q, -1) != k) return bad(op, "q " + shape_str(*q) + " and x " + shape_str(x) + " differ in K");
  const int64_t rows_in = k ? x.element_count() / k : 0, rows_out = k ? q->element_count() / k : 0;
  const bool gather = src.element_count() > 0;
  if (gather && src.element_count() != rows_out)
    return bad(op, "src has " + std::to_string(src.element_count()) + " entries for " + std::to_string(rows_out) +
                       " output rows");
  if (!gather && rows_in != rows_out) return bad(op, "rows_in != rows_out without a src map");
  int64_t pitch;
  if (auto e = check_quant_out(op, rows_out, k, groups, sfa, &pitch); e.failure()) return e;
  if (!aligned16(x.untyped_data()) || !aligned16(q->untyped_data())) return bad(op, "buffers must be 16-byte aligned");
  return cuda_check(op, launch_quant_rows(x.untyped_data(), gather ? src.typed_data() : nullptr, q->untyped_data(),
                                          sfa->typed_data(), rows_out, k, rows_out / groups, pitch, stream,
                                          order == 1));
}

ffi::Error SwigluQuantImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> g, ffi::Buffer<ffi::BF16> u,
                           ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> valid, ffi::Result<ffi::AnyBuffer> q,
                           ffi::ResultBuffer<ffi::F32> sfa, float limit, int64_t groups, int64_t order) {
  const std::string op = "dsv4_swiglu_quant";
  if (order != 0 && order != 1) return bad(op, "order must be 0 (as stored) or 1 (the wgmma order)");
  if (!is_e4m3(*q)) return bad(op, "q must be float8_e4m3fn");
  const int64_t k = dim(g, -1);
  const int64_t rows = k ? g.element_count() / k : 0;
  if (u.element_count() != g.element_count() || dim(u, -1) != k) return bad(op, "g and u shapes differ");
  if (q->element_count() != g.element_count()) return bad(op, "q must have the shape of g");
  if (w.element_count() != rows) return bad(op, "w must have one weight per row");
  if (valid.element_count() != 0 && valid.element_count() != rows) return bad(op, "valid must have one entry per row");
  int64_t pitch;
  if (auto e = check_quant_out(op, rows, k, groups, sfa, &pitch); e.failure()) return e;
  return cuda_check(op, launch_swiglu_quant(g.untyped_data(), u.untyped_data(), w.typed_data(),
                                            valid.element_count() ? valid.typed_data() : nullptr, q->untyped_data(),
                                            sfa->typed_data(), rows, k, rows / groups, pitch, limit, stream,
                                            order == 1));
}

ffi::Error E8m0ToF32Impl(cudaStream_t stream, ffi::Buffer<ffi::U8> s, ffi::ResultBuffer<ffi::F32> out) {
  if (s.element_count() != out->element_count()) return bad("dsv4_e8m0_to_f32", "input and output sizes differ");
  return cuda_check("dsv4_e8m0_to_f32",
                    launch_e8m0_to_f32(s.typed_data(), out->typed_data(), s.element_count(), stream));
}

// ---- wo_a: bf16 x an FP8 weight dequantised to bf16 ------------------------------------------------------------

ffi::Error DequantGemvImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> s,
                           ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::BF16> out) {
  const std::string op = "dsv4_dequant_bf16_gemv";
  if (!is_e4m3(w)) return bad(op, "w must be float8_e4m3fn");
  if (x.dimensions().size() != 3) return bad(op, "x " + shape_str(x) + " must be [m, groups, k]");
  const auto wd = w.dimensions();
  if (wd.size() != 2 && wd.size() != 3) return bad(op, "w " + shape_str(w) + " must be [n, k] or [layers, n, k]");
  const int64_t m = dim(x, 0), groups = dim(x, 1), k = dim(x, 2), n = dim(w, -2), layers = wd.size() == 3 ? wd[0] : 1;
  if (dim(w, -1) != k) return bad(op, "w " + shape_str(w) + " and x " + shape_str(x) + " differ in k");
  if (k % 128 != 0) return bad(op, "k=" + std::to_string(k) + " is not a multiple of 128");
  if (groups < 1 || n % groups != 0) return bad(op, std::to_string(n) + " rows do not split into " +
                                                     std::to_string(groups) + " groups");
  if (const int64_t most = dequant_gemv_max_m(n / groups); m < 1 || m > most)
    return bad(op, "m=" + std::to_string(m) + " rows: the kernel takes 1.." + std::to_string(most) + " here (" +
                       std::to_string(n / groups) + " rows per group)");
  if (s.element_count() != layers * ((n + 127) / 128) * (k / 128))
    return bad(op, "scales " + shape_str(s) + " are not [(layers,) ceil(n/128), k/128]");
  if (layer.element_count() > 1) return bad(op, "layer must hold at most one index");
  if (wd.size() == 3 && layer.element_count() != 1) return bad(op, "a layer stack needs the layer index");
  if (out->element_count() != m * n) return bad(op, "out " + shape_str(*out) + " is not [m, n]");
  if (!aligned16(x.untyped_data()) || !aligned16(w.untyped_data())) return bad(op, "buffers must be 16-byte aligned");
  DequantGemvArgs a{x.untyped_data(), w.untyped_data(), s.typed_data(),
                    layer.element_count() ? layer.typed_data() : nullptr, out->untyped_data(), m, n, k, n / groups,
                    groups};
  return cuda_check(op, launch_dequant_bf16_gemv(a, stream));
}

// ---- GEMMs -----------------------------------------------------------------------------------------------------

std::string missing(int kind, int64_t n, int64_t k, int64_t g, int64_t bm) {
  static const char* names[] = {"dense", "contig", "masked", "layer"};
  return std::string("no AOT instantiation for ") + names[kind] + " N=" + std::to_string(n) + " K=" +
         std::to_string(k) + " G=" + std::to_string(g) + " BLOCK_M=" + std::to_string(bm) +
         "; add the shape to ffi/gen/gen_instantiations.py (or a preset) and rebuild the extension (BUILD.md)";
}

ffi::Error run_gemm(const std::string& op, int kind, int64_t n, int64_t k, int64_t g, int64_t bm, GemmArgs& a,
                    cudaStream_t stream) {
  const GemmEntry* e = find_gemm(kind, uint32_t(n), uint32_t(k), uint32_t(g), uint32_t(bm));
  if (e == nullptr) return bad(op, missing(kind, n, k, g, bm));
  if (!aligned16(a.a) || !aligned16(a.b) || !aligned16(a.d) || !aligned16(a.sfa))
    return bad(op, "TMA needs 16-byte aligned buffers");
  if (a.a_rows == 0) return ffi::Error::Success();
  std::string err = launch_gemm(*e, a, stream);
  if (!err.empty()) return ffi::Error::Internal(op + ": " + err);
  return ffi::Error::Success();
}

ffi::Error check_b(const std::string& op, const ffi::AnyBuffer& b, const ffi::Buffer<ffi::F32>& sfb,
                   int64_t g, int64_t* n, int64_t* k) {
  if (!is_e4m3(b)) return bad(op, "weight must be float8_e4m3fn");
  const auto nd = b.dimensions().size();
  if (nd != (g == 0 ? 2u : 3u)) return bad(op, "weight " + shape_str(b) + " has the wrong rank");
  *n = dim(b, -2), *k = dim(b, -1);
  if (*k % 128 != 0) return bad(op, "K=" + std::to_string(*k) + " is not a multiple of 128");
  if (*n % 8 != 0) return bad(op, "N=" + std::to_string(*n) + " is not a multiple of 8");
  const int64_t gg = g == 0 ? 1 : g;
  if (sfb.element_count() != gg * ((*n + 127) / 128) * (*k / 128))
    return bad(op, "weight scales " + shape_str(sfb) + " are not f32 [G, ceil(N/128), K/128] for weight " + shape_str(b));
  return ffi::Error::Success();
}

int64_t dense_block_m(int64_t m) { return m <= 64 ? 64 : 128; }

int gemv_tokens_per_block(int64_t rows) {
  int tb = 1;
  while (tb < rows && tb < kGemvMaxM) tb *= 2;
  return tb;
}

ffi::Error Fp8GemmImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> sfa,
                       ffi::AnyBuffer b, ffi::Buffer<ffi::F32> sfb, ffi::ResultBuffer<ffi::BF16> d) {
  const std::string op = "dsv4_fp8_gemm";
  if (!is_e4m3(a)) return bad(op, "activation must be float8_e4m3fn");
  int64_t n, k;
  if (auto e = check_b(op, b, sfb, 0, &n, &k); e.failure()) return e;
  if (dim(a, -1) != k) return bad(op, "activation " + shape_str(a) + " and weight " + shape_str(b) + " differ in K");
  const int64_t m = a.element_count() / k;
  if (d->element_count() != m * n) return bad(op, "output " + shape_str(*d) + " is not [M, N]");
  const int64_t pitch = sfa.element_count() / (k / 128);
  if (pitch < m || pitch % 4 != 0 || sfa.element_count() % (k / 128) != 0)
    return bad(op, "activation scales " + shape_str(sfa) + " are not [K/128, align(M, 4)]");
  GemmArgs ga{a.untyped_data(), sfa.typed_data(), b.untyped_data(), sfb.typed_data(), d->untyped_data(), nullptr,
              uint64_t(m), uint32_t(m), uint64_t(pitch), 1};
  return run_gemm(op, kDense, n, k, 1, dense_block_m(m), ga, stream);
}

// How the dense FP8 linear quantises its activations at M <= kGemvMaxM (the dsv4_fp8_linear targets): kQuantAuto
// (the plain target) asks gemv_fuses_quant() at launch (fused unless DSV4_FFI_GEMV_QUANT=separate or
// DSV4_FFI_GEMV=cuda); the _fused and _separate targets fix the choice in the program (A/B in one process: re-recorded
// command buffers cannot pick up a changed environment). Larger M always quantises in its own launch.
enum LinearQuant : int { kQuantAuto = 0, kQuantFused = 1, kQuantSeparate = 2 };

// q and sfa are results in every mode: act_quant(x) in the GEMM's layout (the fused GEMV writes them too).
template <int Q>
ffi::Error Fp8LinearImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer b,
                         ffi::Buffer<ffi::F32> sfb, ffi::ResultBuffer<ffi::BF16> d, ffi::Result<ffi::AnyBuffer> q,
                         ffi::ResultBuffer<ffi::F32> sfa) {
  const std::string op = "dsv4_fp8_linear";
  if (!is_e4m3(*q)) return bad(op, "workspace q must be float8_e4m3fn");
  int64_t n, k;
  if (auto e = check_b(op, b, sfb, 0, &n, &k); e.failure()) return e;
  if (dim(x, -1) != k) return bad(op, "input " + shape_str(x) + " and weight " + shape_str(b) + " differ in K");
  const int64_t m = x.element_count() / k;
  if (d->element_count() != m * n) return bad(op, "output " + shape_str(*d) + " is not [M, N]");
  if (q->element_count() != m * k) return bad(op, "workspace q " + shape_str(*q) + " is not [M, K]");
  int64_t pitch;
  if (auto e = check_quant_out(op, m, k, 1, sfa, &pitch); e.failure()) return e;
  const bool small = m <= kGemvMaxM;  // decode sizes: the GEMV streams the weights faster
  if (!small && find_gemm(kDense, uint32_t(n), uint32_t(k), 1, uint32_t(dense_block_m(m))) == nullptr)
    return bad(op, missing(kDense, n, k, 1, dense_block_m(m)));
  if (m == 0) return ffi::Error::Success();
  if (small && (Q == kQuantFused || (Q == kQuantAuto && gemv_fuses_quant()))) {  // one launch
    if (!aligned16(b.untyped_data()) || !aligned16(x.untyped_data()) || !aligned16(q->untyped_data()))
      return bad(op, "input, weight and workspace q must be 16-byte aligned");
    GemvArgs gv{nullptr, m, nullptr, 1, pitch, b.untyped_data(), sfb.typed_data(), 1, nullptr,
                nullptr, d->untyped_data(), m, n, k, gemv_tokens_per_block(m)};
    gv.x_bf16 = x.untyped_data(), gv.q_out = q->untyped_data(), gv.sfa_out = sfa->typed_data();
    return cuda_check(op, launch_gemv(gv, stream));
  }
  if (auto err = cuda_check(op, launch_quant_rows(x.untyped_data(), nullptr, q->untyped_data(), sfa->typed_data(), m,
                                                  k, m, pitch, stream));
      err.failure())
    return err;
  if (small) {
    if (!aligned16(b.untyped_data())) return bad(op, "weight must be 16-byte aligned");
    GemvArgs gv{q->untyped_data(), m, sfa->typed_data(), 1, pitch, b.untyped_data(), sfb.typed_data(), 1, nullptr,
                nullptr, d->untyped_data(), m, n, k, gemv_tokens_per_block(m)};
    return cuda_check(op, launch_gemv(gv, stream));
  }
  GemmArgs ga{q->untyped_data(), sfa->typed_data(), b.untyped_data(), sfb.typed_data(), d->untyped_data(), nullptr,
              uint64_t(m), uint32_t(m), uint64_t(pitch), 1};
  return run_gemm(op, kDense, n, k, 1, dense_block_m(m), ga, stream);
}

ffi::Error GemmContigImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> sfa,
                          ffi::AnyBuffer b, ffi::Buffer<ffi::F32> sfb, ffi::Buffer<ffi::S32> psum,
                          ffi::ResultBuffer<ffi::BF16> d, int64_t block_m) {
  const std::string op = "dsv4_fp8_gemm_contig";
  if (!is_e4m3(a)) return bad(op, "activation must be float8_e4m3fn");
  const int64_t g = b.dimensions().size() == 3 ? dim(b, 0) : -1;
  if (g <= 0) return bad(op, "weight " + shape_str(b) + " is not [G, N, K]");
  int64_t n, k;
  if (auto e = check_b(op, b, sfb, g, &n, &k); e.failure()) return e;
  if (a.dimensions().size() != 2 || dim(a, 1) != k) return bad(op, "activation " + shape_str(a) + " is not [M, K]");
  const int64_t mp = dim(a, 0);
  if (mp % block_m != 0) return bad(op, "rows " + std::to_string(mp) + " are not a multiple of BLOCK_M " + std::to_string(block_m));
  if (psum.element_count() != g) return bad(op, "psum must have G entries");
  if (d->element_count() != mp * n) return bad(op, "output " + shape_str(*d) + " is not [M, N]");
  if (sfa.element_count() != (k / 128) * mp) return bad(op, "activation scales " + shape_str(sfa) + " are not [K/128, M]");
  GemmArgs ga{a.untyped_data(), sfa.typed_data(), b.untyped_data(), sfb.typed_data(), d->untyped_data(),
              psum.typed_data(), uint64_t(mp), uint32_t(mp), uint64_t(mp), 1};
  return run_gemm(op, kContigPsum, n, k, g, block_m, ga, stream);
}

ffi::Error GemmMaskedImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> sfa,
                          ffi::AnyBuffer b, ffi::Buffer<ffi::F32> sfb, ffi::Buffer<ffi::S32> masked_m,
                          ffi::ResultBuffer<ffi::BF16> d, int64_t block_m) {
  const std::string op = "dsv4_fp8_gemm_masked";
  if (!is_e4m3(a)) return bad(op, "activation must be float8_e4m3fn");
  const int64_t g = b.dimensions().size() == 3 ? dim(b, 0) : -1;
  if (g <= 0) return bad(op, "weight " + shape_str(b) + " is not [G, N, K]");
  int64_t n, k;
  if (auto e = check_b(op, b, sfb, g, &n, &k); e.failure()) return e;
  if (a.dimensions().size() != 3 || dim(a, 0) != g || dim(a, 2) != k)
    return bad(op, "activation " + shape_str(a) + " is not [G, M_max, K]");
  const int64_t mm = dim(a, 1);
  if (mm % block_m != 0) return bad(op, "M_max " + std::to_string(mm) + " is not a multiple of BLOCK_M " + std::to_string(block_m));
  if (masked_m.element_count() != g) return bad(op, "masked_m must have G entries");
  if (d->element_count() != g * mm * n) return bad(op, "output " + shape_str(*d) + " is not [G, M_max, N]");
  if (sfa.element_count() != g * (k / 128) * mm) return bad(op, "activation scales " + shape_str(sfa) + " are not [G, K/128, M_max]");
  GemmArgs ga{a.untyped_data(), sfa.typed_data(), b.untyped_data(), sfb.typed_data(), d->untyped_data(),
              masked_m.typed_data(), uint64_t(g * mm), uint32_t(mm), uint64_t(mm), uint32_t(g)};
  return run_gemm(op, kMasked, n, k, g, block_m, ga, stream);
}


// Validates one GEMV projection and fills `ga` (shared by the single and the gate/up pair handlers).
ffi::Error gemv_args(const std::string& op, const ffi::AnyBuffer& a, const ffi::Buffer<ffi::F32>& sfa,
                     const ffi::AnyBuffer& b, const ffi::Buffer<ffi::F32>& sfb, const ffi::Buffer<ffi::S32>& rows_map,
                     const ffi::Buffer<ffi::S32>& group_map, ffi::Result<ffi::Buffer<ffi::BF16>>& d, GemvArgs* ga) {
  if (!is_e4m3(a)) return bad(op, "activation must be float8_e4m3fn");
  const bool grouped = b.dimensions().size() == 3;
  const int64_t g = grouped ? dim(b, 0) : 0;
  int64_t n, k;
  if (auto e = check_b(op, b, sfb, g, &n, &k); e.failure()) return e;
  if (a.dimensions().size() != 2 || dim(a, 1) != k) return bad(op, "activation " + shape_str(a) + " is not [R, K]");
  const int64_t r = dim(a, 0);
  if (d->dimensions().size() != 2 || dim(*d, 1) != n)
    return bad(op, "output " + shape_str(*d) + " is not [P, N] with N=" + std::to_string(n));
  const int64_t p = dim(*d, 0);
  if (rows_map.element_count() != 0 && rows_map.element_count() != p)
    return bad(op, "rows_map has " + std::to_string(rows_map.element_count()) + " entries for " + std::to_string(p) +
                       " output rows");
  if (!rows_map.element_count() && p != r) return bad(op, "without rows_map the output must have the R input rows");
  if (grouped && group_map.element_count() != p)
    return bad(op, "group_map must have one expert per output row (" + std::to_string(p) + "), has " +
                       std::to_string(group_map.element_count()));
  if (!grouped && group_map.element_count() != 0) return bad(op, "group_map given for a 2-D (ungrouped) weight");
  const int64_t kb = k / 128;
  if (sfa.element_count() % kb != 0 || sfa.element_count() / kb < r)
    return bad(op, "activation scales " + shape_str(sfa) + " are not [K/128, pitch >= R]");
  if (!aligned16(a.untyped_data()) || !aligned16(b.untyped_data())) return bad(op, "buffers must be 16-byte aligned");
  *ga = GemvArgs{a.untyped_data(), r, sfa.typed_data(), 1, int64_t(sfa.element_count()) / kb, b.untyped_data(),
                 sfb.typed_data(), grouped ? g : 1, rows_map.element_count() ? rows_map.typed_data() : nullptr,
                 grouped ? group_map.typed_data() : nullptr, d->untyped_data(), p, n, k,
                 grouped ? 1 : gemv_tokens_per_block(p)};
  return ffi::Error::Success();
}

// One layer of a stacked dense FP8 weight at decode sizes: every row against layer `layer` of the stack, read on the
// device. Two routes, chosen by the caller through the workspace (ffi_ops.fp8_gemv_layer):
//   * q empty (R <= 8 rows, or DSV4_FFI_GEMV_LAYER=passes): one launch, the bf16 rows quantised inside the GEMV (as
//     the dense fp8_linear's fused path); rows beyond 8 form segments of 8, one pass over the weights each;
//   * q [R, K] e4m3 and sfa [K/128, >= R] (9..64 rows): the rows quantised once into the workspace, then the wide
//     GEMV: segments of 16 or 32 rows, one pass each (at most two passes);
//   * the same and groups [kLayerGemmBlockM] int32 (the "gemm" route, 9..64 rows): the rows quantised once (the
//     launch also writes the rows' group map: `layer` for every row, -1 for the padding to the 64-row block), then
//     DeepGEMM's m-grouped contiguous GEMM per weight, which reads the layer of the stack in place (the
//     layer_*_g1_bm64 instantiations; any number of layers).
//     Why: at 32 rows the wide GEMV holds one block of 234 registers per SM and streams 15-35% of copy bandwidth;
//     the GEMM 27-58% on the same shapes (BENCHMARKS.md, seventeenth session). Its numerics are the dense FP8 GEMM's
//     (fp8_linear beyond 8 rows), not the GEMV's.
// `layer` holds the index once per segment (once on the gemm route): it is the group map. With b2
// (dsv4_fp8_gemv_layer_pair) a second stack of the same layer count and K, any N, is applied to the same rows in the
// same launch (the rows quantised once; two GEMM launches on the gemm route): each output bit-identical to its own
// call.
ffi::Error gemv_layer(const std::string& op, cudaStream_t stream, ffi::Buffer<ffi::BF16>& x, ffi::AnyBuffer& b,
                      ffi::Buffer<ffi::F32>& sfb, ffi::AnyBuffer* b2, ffi::Buffer<ffi::F32>* sfb2,
                      ffi::Buffer<ffi::S32>& layer, ffi::ResultBuffer<ffi::BF16>& d, ffi::ResultBuffer<ffi::BF16>* d2,
                      ffi::Result<ffi::AnyBuffer>& q, ffi::ResultBuffer<ffi::F32>& sfa,
                      ffi::ResultBuffer<ffi::S32>& groups) {
  if (b.dimensions().size() != 3) return bad(op, "weight " + shape_str(b) + " is not a layer stack [L, N, K]");
  int64_t n, k, n2 = 0;
  if (auto e = check_b(op, b, sfb, dim(b, 0), &n, &k); e.failure()) return e;
  if (b2 != nullptr) {
    if (b2->dimensions().size() != 3 || dim(*b2, 0) != dim(b, 0))
      return bad(op, "weights " + shape_str(b) + " and " + shape_str(*b2) + " are not layer stacks of one L");
    int64_t k2;
    if (auto e = check_b(op, *b2, *sfb2, dim(*b2, 0), &n2, &k2); e.failure()) return e;
    if (k2 != k) return bad(op, "the weights differ in K: " + shape_str(b) + " vs " + shape_str(*b2));
  }
  if (x.dimensions().size() != 2 || dim(x, 1) != k) return bad(op, "activation " + shape_str(x) + " is not [R, K]");
  const int64_t r = dim(x, 0);
  if (r > kGemvLayerMaxM) return bad(op, std::to_string(r) + " rows: at most " + std::to_string(kGemvLayerMaxM));
  const bool wide = q->element_count() != 0, gemm = groups->element_count() != 0;
  if (gemm && (!wide || groups->element_count() != kLayerGemmBlockM))
    return bad(op, "the gemm route takes the workspace q and groups [" + std::to_string(kLayerGemmBlockM) + "] int32");
  int64_t pitch = 0;
  if (wide) {
    if (r <= kGemvMaxM) return bad(op, "the quantised route takes more than " + std::to_string(kGemvMaxM) + " rows");
    if (!is_e4m3(*q) || q->element_count() != r * k)
      return bad(op, "workspace q " + shape_str(*q) + " is not float8_e4m3fn [R, K] (or empty)");
    if (auto e = check_quant_out(op, r, k, 1, sfa, &pitch); e.failure()) return e;
  }
  const int64_t tb = gemm ? r : wide ? (r <= 16 ? 16 : 32) : gemv_tokens_per_block(r), segs = (r + tb - 1) / tb;
  if (layer.element_count() != segs)
    return bad(op, "layer must hold the layer index once per segment of " + std::to_string(tb) + " rows (" +
                       std::to_string(segs) + "), has " + std::to_string(layer.element_count()));
  if (d->element_count() != r * n || (d2 != nullptr && (*d2)->element_count() != r * n2))
    return bad(op, "output " + shape_str(*d) + (d2 != nullptr ? " / " + shape_str(**d2) : "") + " is not [R, N]");
  if (!aligned16(x.untyped_data()) || !aligned16(b.untyped_data()) ||
      (b2 != nullptr && !aligned16(b2->untyped_data())) || (wide && !aligned16(q->untyped_data())))
    return bad(op, "buffers must be 16-byte aligned");
  GemvArgs ga{nullptr, r, nullptr, 1, 1, b.untyped_data(), sfb.typed_data(), dim(b, 0), nullptr, layer.typed_data(),
              d->untyped_data(), r, n, k, int(tb)};
  if (b2 != nullptr) ga.b2 = b2->untyped_data(), ga.sfb2 = sfb2->typed_data(), ga.d2 = (*d2)->untyped_data();
  ga.n2 = n2;
  if (!wide) {
    ga.x_bf16 = x.untyped_data();
    return cuda_check(op, launch_gemv(ga, stream));
  }
  if (gemm) {  // both instantiations there before anything is launched
    if (find_gemm(kLayer, uint32_t(n), uint32_t(k), 1, kLayerGemmBlockM) == nullptr)
      return bad(op, missing(kLayer, n, k, 1, kLayerGemmBlockM));
    if (b2 != nullptr && find_gemm(kLayer, uint32_t(n2), uint32_t(k), 1, kLayerGemmBlockM) == nullptr)
      return bad(op, missing(kLayer, n2, k, 1, kLayerGemmBlockM));
  }
  LayerRowGroups lg;
  if (gemm) lg = LayerRowGroups{layer.typed_data(), dim(b, 0), groups->typed_data(), int32_t(r), kLayerGemmBlockM};
  if (auto e = cuda_check(op, launch_quant_rows(x.untyped_data(), nullptr, q->untyped_data(), sfa->typed_data(), r, k,
                                                r, pitch, stream, false, lg));
      e.failure())
    return e;
  if (gemm) {  // A and D described with the r rows (TMA zero-fills the block's rows past them and drops their stores)
    GemmArgs a1{q->untyped_data(), sfa->typed_data(), b.untyped_data(), sfb.typed_data(), d->untyped_data(),
                groups->typed_data(), uint64_t(r), kLayerGemmBlockM, uint64_t(pitch), 1, uint32_t(dim(b, 0))};
    if (auto e = run_gemm(op, kLayer, n, k, 1, kLayerGemmBlockM, a1, stream); e.failure() || !b2) return e;
    GemmArgs a2 = a1;
    a2.b = b2->untyped_data(), a2.sfb = sfb2->typed_data(), a2.d = (*d2)->untyped_data();
    return run_gemm(op, kLayer, n2, k, 1, kLayerGemmBlockM, a2, stream);
  }
  ga.a = q->untyped_data(), ga.sfa = sfa->typed_data(), ga.sfa_kb_stride = pitch;
  return cuda_check(op, launch_gemv(ga, stream));
}

ffi::Error GemvLayerImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer b, ffi::Buffer<ffi::F32> sfb,
                         ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::BF16> d, ffi::Result<ffi::AnyBuffer> q,
                         ffi::ResultBuffer<ffi::F32> sfa, ffi::ResultBuffer<ffi::S32> groups) {
  return gemv_layer("dsv4_fp8_gemv_layer", stream, x, b, sfb, nullptr, nullptr, layer, d, nullptr, q, sfa, groups);
}

// Two layer stacks one input feeds, in one launch (wq_a and wkv, wq_b and the indexer's wq_b, the shared expert's w1
// and w3: at batch 1 the small ones cost a launch's latency each, not their bytes); the routes of
// dsv4_fp8_gemv_layer.
ffi::Error GemvLayerPairImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer b1,
                             ffi::Buffer<ffi::F32> sfb1, ffi::AnyBuffer b2, ffi::Buffer<ffi::F32> sfb2,
                             ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::BF16> d1,
                             ffi::ResultBuffer<ffi::BF16> d2, ffi::Result<ffi::AnyBuffer> q,
                             ffi::ResultBuffer<ffi::F32> sfa, ffi::ResultBuffer<ffi::S32> groups) {
  return gemv_layer("dsv4_fp8_gemv_layer_pair", stream, x, b1, sfb1, &b2, &sfb2, layer, d1, &d2, q, sfa, groups);
}

ffi::Error GemvImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> sfa, ffi::AnyBuffer b,
                    ffi::Buffer<ffi::F32> sfb, ffi::Buffer<ffi::S32> rows_map, ffi::Buffer<ffi::S32> group_map,
                    ffi::ResultBuffer<ffi::BF16> d) {
  const std::string op = "dsv4_fp8_gemv";
  GemvArgs ga;
  if (auto e = gemv_args(op, a, sfa, b, sfb, rows_map, group_map, d, &ga); e.failure()) return e;
  return cuda_check(op, launch_gemv(ga, stream));
}

// Two projections of the same activation rows in one launch (an expert MLP's gate and up weights): d1 = a x b1^T,
// d3 = a x b3^T, each exactly what dsv4_fp8_gemv computes for it.
ffi::Error GemvPairImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> sfa, ffi::AnyBuffer b1,
                        ffi::Buffer<ffi::F32> sfb1, ffi::AnyBuffer b3, ffi::Buffer<ffi::F32> sfb3,
                        ffi::Buffer<ffi::S32> rows_map, ffi::Buffer<ffi::S32> group_map,
                        ffi::ResultBuffer<ffi::BF16> d1, ffi::ResultBuffer<ffi::BF16> d3) {
  const std::string op = "dsv4_fp8_gemv_pair";
  if (shape_str(b1) != shape_str(b3) || shape_str(sfb1) != shape_str(sfb3))
    return bad(op, "the two weights differ in shape: " + shape_str(b1) + " / " + shape_str(sfb1) + " vs " +
                       shape_str(b3) + " / " + shape_str(sfb3));
  GemvArgs ga, ga3;
  if (auto e = gemv_args(op, a, sfa, b1, sfb1, rows_map, group_map, d1, &ga); e.failure()) return e;
  if (auto e = gemv_args(op, a, sfa, b3, sfb3, rows_map, group_map, d3, &ga3); e.failure()) return e;
  ga.b2 = ga3.b, ga.sfb2 = ga3.sfb, ga.d2 = ga3.d;
  return cuda_check(op, launch_gemv(ga, stream));
}

}  // namespace
}  // namespace dsv4ffi

using dsv4ffi::ActQuantImpl;
using dsv4ffi::DequantGemvImpl;
using dsv4ffi::E8m0ToF32Impl;
using dsv4ffi::Fp8GemmImpl;
using dsv4ffi::GemmContigImpl;
using dsv4ffi::GemmMaskedImpl;
using dsv4ffi::GemvImpl;
using dsv4ffi::GemvLayerPairImpl;
using dsv4ffi::GemvLayerImpl;
using dsv4ffi::GemvPairImpl;
using dsv4ffi::SwigluQuantImpl;

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_act_quant, ActQuantImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("order"),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_swiglu_quant, SwigluQuantImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("limit")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("order"),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_dequant_bf16_gemv, DequantGemvImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>(),
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_e8m0_to_f32, E8m0ToF32Impl,
                              ffi::Ffi::Bind().STREAM.Arg<ffi::Buffer<ffi::U8>>().Ret<ffi::Buffer<ffi::F32>>(),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp8_gemm, Fp8GemmImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>(),
                              DSV4_TRAITS);

// dsv4_fp8_linear quantises as LinearQuant says: plain target at launch, _fused / _separate fixed (A/B).
#define DSV4_FP8_LINEAR_BIND                              \
  ffi::Ffi::Bind()                                        \
      .STREAM.Arg<ffi::Buffer<ffi::BF16>>()               \
      .Arg<ffi::AnyBuffer>()                              \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Ret<ffi::Buffer<ffi::BF16>>()                      \
      .Ret<ffi::AnyBuffer>()                              \
      .Ret<ffi::Buffer<ffi::F32>>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp8_linear, dsv4ffi::Fp8LinearImpl<dsv4ffi::kQuantAuto>, DSV4_FP8_LINEAR_BIND,
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp8_linear_fused, dsv4ffi::Fp8LinearImpl<dsv4ffi::kQuantFused>,
                              DSV4_FP8_LINEAR_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp8_linear_separate, dsv4ffi::Fp8LinearImpl<dsv4ffi::kQuantSeparate>,
                              DSV4_FP8_LINEAR_BIND, DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp8_gemm_contig, GemmContigImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("block_m"),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp8_gemm_masked, GemmMaskedImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("block_m"),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp8_gemv, GemvImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>(),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp8_gemv_layer, GemvLayerImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>(),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp8_gemv_layer_pair, GemvLayerPairImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>(),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp8_gemv_pair, GemvPairImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>(),
                              DSV4_TRAITS);
