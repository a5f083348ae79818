// XLA FFI handlers of the routed experts' side: the MoE router and the MXFP4 GEMVs of decode. Conventions as in
// handlers.cc.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "handler_util.h"
#include "handlers.h"
#include "kernels.h"

namespace dsv4ffi {
namespace {

// ---- the MoE router ----------------------------------------------------------------------------------------------

// Bias-routed (table empty) or hash-routed (bias empty): bias f32 [(L,) E]; table int32 [(L,) V, k] with token_ids
// int32 [T]; `layer` [1] names the stack position (empty: no stack).
ffi::Error RouteImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::F32> bias,
                     ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> token_ids, ffi::Buffer<ffi::S32> layer,
                     ffi::ResultBuffer<ffi::F32> weights, ffi::ResultBuffer<ffi::S32> ids, int64_t k,
                     float route_scale) {
  const std::string op = "dsv4_route";
  if (logits.dimensions().size() != 2) return bad(op, "logits " + shape_str(logits) + " must be [T, E]");
  const int64_t t = dim(logits, 0), e = dim(logits, 1);
  if (e > kRouteMaxExperts || k < 1 || k > 32 || k > e)
    return bad(op, "E=" + std::to_string(e) + ", k=" + std::to_string(k) + ": the kernel takes E <= " +
                       std::to_string(kRouteMaxExperts) + " and 1 <= k <= min(E, 32)");
  const bool hashed = table.element_count() != 0;
  if (hashed == (bias.element_count() != 0)) return bad(op, "give the bias or the hash table, not both or neither");
  int64_t layers = 1, vocab = 0;
  if (hashed) {
    const auto d = table.dimensions();
    if ((d.size() != 2 && d.size() != 3) || d[d.size() - 1] != k)
      return bad(op, "hash table " + shape_str(table) + " must be [(layers,) vocab, k=" + std::to_string(k) + "]");
    layers = d.size() == 3 ? d[0] : 1, vocab = d[d.size() - 2];
    if (token_ids.element_count() != t) return bad(op, "token_ids " + shape_str(token_ids) + " must hold T ids");
  } else {
    if (dim(bias, -1) != e || bias.element_count() % e != 0)
      return bad(op, "bias " + shape_str(bias) + " must be [(layers,) E=" + std::to_string(e) + "]");
    layers = bias.element_count() / e;
  }
  if (layer.element_count() > 1 || (layers > 1 && layer.element_count() != 1))
    return bad(op, "a stack of " + std::to_string(layers) + " layers needs one layer index");
  if (weights->element_count() != t * k || ids->element_count() != t * k)
    return bad(op, "results must be [T, k] = [" + std::to_string(t) + ", " + std::to_string(k) + "]");
  RouteArgs a{logits.typed_data(),
              hashed ? nullptr : bias.typed_data(),
              hashed ? table.typed_data() : nullptr,
              hashed ? token_ids.typed_data() : nullptr,
              layer.element_count() ? layer.typed_data() : nullptr,
              weights->typed_data(),
              ids->typed_data(),
              t,
              e,
              layers,
              vocab,
              int(k),
              route_scale};
  return cuda_check(op, launch_route(a, stream));
}

// ---- MXFP4 GEMV (decode) -----------------------------------------------------------------------------------

constexpr int64_t kMaxGridY = 65535;  // one block row per output row

bool is_e8m0_bytes(const ffi::AnyBuffer& b) {
  return b.element_type() == ffi::DataType::U8 || b.element_type() == ffi::DataType::F8E8M0FNU;
}

// Validates an MXFP4 weight `w` uint8 [(E,) N, K/2] with its scales `s` (float8_e8m0fnu or uint8) [(E,) N, K/32];
// rank 3 (grouped) when `grouped`, else 2 or 3. Scales as uint32 [(E,) N, K/128] mark the slab layout (kernels.h,
// `quant.fp4_to_slabs`): *slabs is set, N must be a multiple of kFp4SlabRows.
ffi::Error check_fp4_weight(const std::string& op, const std::string& name, const ffi::AnyBuffer& w,
                            const ffi::AnyBuffer& s, bool grouped, int64_t* e, int64_t* n, int64_t* k, bool* slabs) {
  if (w.element_type() != ffi::DataType::U8)
    return bad(op, name + " must be uint8 (packed e2m1, low nibble = even element)");
  *slabs = s.element_type() == ffi::DataType::U32;
  if (!*slabs && !is_e8m0_bytes(s))
    return bad(op, name + " scales must be float8_e8m0fnu or uint8 bytes (or uint32 words: the slab layout)");
  const size_t nd = w.dimensions().size();
  if (nd != 3 && (grouped || nd != 2))
    return bad(op, name + " " + shape_str(w) + (grouped ? " is not [E, N, K/2]" : " is not [N, K/2] or [E, N, K/2]"));
  *e = nd == 3 ? dim(w, 0) : 1;
  *n = dim(w, -2), *k = 2 * dim(w, -1);
  if (*k == 0 || *k % 128 != 0) return bad(op, name + ": K=" + std::to_string(*k) + " is not a positive multiple of 128");
  const int64_t per_word = *slabs ? 128 : 32;
  if (s.dimensions().size() != nd || dim(s, -2) != *n || dim(s, -1) != *k / per_word || (nd == 3 && dim(s, 0) != *e))
    return bad(op, name + " scales " + shape_str(s) + " do not match the weight " + shape_str(w) + " (expected " +
                       (*slabs ? "uint32 [(E,) N, K/128] = K/128 " + std::to_string(*k / 128)
                               : "[(E,) N, K/32] = K/32 " + std::to_string(*k / 32)) + ")");
  if (*slabs && *n % kFp4SlabRows != 0)
    return bad(op, name + ": the slab layout needs N (" + std::to_string(*n) + ") a multiple of " +
                       std::to_string(kFp4SlabRows));
  if (!aligned16(w.untyped_data()) || (reinterpret_cast<uintptr_t>(s.untyped_data()) & 3u) != 0)
    return bad(op, name + " must be 16-byte aligned (scales 4-byte aligned)");
  return ffi::Error::Success();
}

ffi::Error check_rows(const std::string& op, const std::string& name, int64_t count, int64_t p) {
  if (count != p)
    return bad(op, name + " has " + std::to_string(count) + " entries for " + std::to_string(p) + " output rows");
  return ffi::Error::Success();
}

ffi::Error run_fp4(const std::string& op, Fp4GemvArgs& a, cudaStream_t stream) {
  if (a.out_rows > kMaxGridY)
    return bad(op, std::to_string(a.out_rows) + " output rows exceed the " + std::to_string(kMaxGridY) +
                       " this decode kernel takes (one block row per output row)");
  if (!aligned16(a.x)) return bad(op, "the activation must be 16-byte aligned");
  if (a.slabs && !fp4_reads_slabs(a.variant))
    return bad(op, "weights in the slab layout (uint32 scales, from dsv4_jax.prepare_params) are read by the wgb "
                   "kernel on SM90 only, and this launch resolves to another kernel (DSV4_FFI_FP4_VARIANT or the "
                   "device): pass the stored layout (prepare_params(..., expert_layout=\"stored\"))");
  const size_t smem = fp4_gemv_smem(a.w[1] != nullptr, a.k, a.max_share, a.variant);
  if (smem > 227 * 1024)
    return bad(op, "K=" + std::to_string(a.k) + " needs " + std::to_string(smem) +
                       " bytes of shared memory per block (more than the 227 KB an SM90 block can have)");
  return cuda_check(op, launch_fp4_gemv(a, stream));
}

int64_t share_cap(int64_t v) { return v < kFp4SegmentRows ? v : kFp4SegmentRows; }

// y = bf16(x[rows] W[groups]^T), x bf16 [R, K], W MXFP4; rows/groups optional (empty arrays).
template <int V>
ffi::Error Fp4GemvImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> rows,
                       ffi::Buffer<ffi::S32> groups, ffi::AnyBuffer w, ffi::AnyBuffer s,
                       ffi::ResultBuffer<ffi::BF16> y) {
  const std::string op = "dsv4_fp4_gemv";
  int64_t e, n, k;
  bool slabs;
  if (auto err = check_fp4_weight(op, "weight", w, s, false, &e, &n, &k, &slabs); err.failure()) return err;
  const bool grouped = w.dimensions().size() == 3;
  if (x.dimensions().size() != 2 || dim(x, 1) != k)
    return bad(op, "activation " + shape_str(x) + " is not [R, K] with K=" + std::to_string(k));
  const int64_t r = dim(x, 0);
  if (y->dimensions().size() != 2 || dim(*y, 1) != n)
    return bad(op, "output " + shape_str(*y) + " is not [P, N] with N=" + std::to_string(n));
  const int64_t p = dim(*y, 0);
  const bool mapped = rows.element_count() != 0;
  if (mapped) {
    if (auto err = check_rows(op, "rows", rows.element_count(), p); err.failure()) return err;
  } else if (p != r) {
    return bad(op, "without rows the output must have the R=" + std::to_string(r) + " activation rows, has " +
                       std::to_string(p));
  }
  if (grouped) {
    if (auto err = check_rows(op, "groups (one weight group per output row)", groups.element_count(), p);
        err.failure())
      return err;
  } else if (groups.element_count() != 0) {
    return bad(op, "groups given for a 2-D (ungrouped) weight");
  }
  Fp4GemvArgs a{x.untyped_data(), r, mapped ? rows.typed_data() : nullptr,
                grouped ? groups.typed_data() : nullptr,
                {static_cast<const uint8_t*>(w.untyped_data()), nullptr},
                {static_cast<const uint8_t*>(s.untyped_data()), nullptr}, e, y->untyped_data(), p, n, k,
                share_cap(grouped || mapped ? (r < p ? r : p) : p)};
  a.variant = V;
  a.slabs = slabs;
  return run_fp4(op, a, stream);
}

// The routed experts' gate and up projections of a decode step, fused with the clamped SwiGLU and the routing
// weight: h[p] = bf16(route_w[p] * silu(min(g, L)) * clip(u, -L, L)), g/u = f32(bf16(x[rows[p]] W1/W3[groups[p]]^T)).
template <int V>
ffi::Error Fp4MoeGateUpImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> rows,
                            ffi::Buffer<ffi::S32> groups, ffi::Buffer<ffi::F32> route_w, ffi::AnyBuffer w1,
                            ffi::AnyBuffer s1, ffi::AnyBuffer w3, ffi::AnyBuffer s3, ffi::ResultBuffer<ffi::BF16> h,
                            float limit) {
  const std::string op = "dsv4_fp4_moe_gate_up";
  int64_t e, n, k, e3, n3, k3;
  bool slabs, slabs3;
  if (auto err = check_fp4_weight(op, "w1", w1, s1, true, &e, &n, &k, &slabs); err.failure()) return err;
  if (auto err = check_fp4_weight(op, "w3", w3, s3, true, &e3, &n3, &k3, &slabs3); err.failure()) return err;
  if (e3 != e || n3 != n || k3 != k)
    return bad(op, "w1 " + shape_str(w1) + " and w3 " + shape_str(w3) + " differ in shape");
  if (slabs3 != slabs) return bad(op, "w1 and w3 differ in layout (one in slabs, the other as stored)");
  if (x.dimensions().size() != 2 || dim(x, 1) != k)
    return bad(op, "x " + shape_str(x) + " is not [T, K] with K=" + std::to_string(k));
  if (h->dimensions().size() != 2 || dim(*h, 1) != n)
    return bad(op, "output " + shape_str(*h) + " is not [P, I] with I=" + std::to_string(n));
  const int64_t p = dim(*h, 0), t = dim(x, 0);
  if (auto err = check_rows(op, "rows (the token of each pair)", rows.element_count(), p); err.failure()) return err;
  if (auto err = check_rows(op, "groups (the expert of each pair)", groups.element_count(), p); err.failure())
    return err;
  if (auto err = check_rows(op, "route_w (the weight of each pair)", route_w.element_count(), p); err.failure())
    return err;
  Fp4GemvArgs a{x.untyped_data(), t, rows.typed_data(), groups.typed_data(),
                {static_cast<const uint8_t*>(w1.untyped_data()), static_cast<const uint8_t*>(w3.untyped_data())},
                {static_cast<const uint8_t*>(s1.untyped_data()), static_cast<const uint8_t*>(s3.untyped_data())},
                e, h->untyped_data(), p, n, k, share_cap(t < p ? t : p), route_w.typed_data(), limit};
  a.variant = V;
  a.slabs = slabs;
  return run_fp4(op, a, stream);
}

// The routed experts' down projection of a decode step: y[p] = bf16(h[p] W2[groups[p]]^T). `tokens`: the step's
// token count (at most that many pairs share an expert; 0 = unknown), which only sizes the launch.
template <int V>
ffi::Error Fp4MoeDownImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> h, ffi::Buffer<ffi::S32> groups,
                          ffi::AnyBuffer w2, ffi::AnyBuffer s2, ffi::ResultBuffer<ffi::BF16> y, int64_t tokens) {
  const std::string op = "dsv4_fp4_moe_down";
  int64_t e, n, k;
  bool slabs;
  if (auto err = check_fp4_weight(op, "w2", w2, s2, true, &e, &n, &k, &slabs); err.failure()) return err;
  if (h.dimensions().size() != 2 || dim(h, 1) != k)
    return bad(op, "h " + shape_str(h) + " is not [P, I] with I=" + std::to_string(k));
  const int64_t p = dim(h, 0);
  if (y->dimensions().size() != 2 || dim(*y, 0) != p || dim(*y, 1) != n)
    return bad(op, "output " + shape_str(*y) + " is not [P, D] = [" + std::to_string(p) + ", " + std::to_string(n) + "]");
  if (auto err = check_rows(op, "groups (the expert of each pair)", groups.element_count(), p); err.failure())
    return err;
  if (tokens < 0) return bad(op, "tokens must be >= 0 (0: unknown)");
  Fp4GemvArgs a{h.untyped_data(), p, nullptr, groups.typed_data(),
                {static_cast<const uint8_t*>(w2.untyped_data()), nullptr},
                {static_cast<const uint8_t*>(s2.untyped_data()), nullptr}, e, y->untyped_data(), p, n, k,
                share_cap(tokens > 0 && tokens < p ? tokens : p)};
  a.variant = V;
  a.slabs = slabs;
  return run_fp4(op, a, stream);
}

// ---- MXFP4 -> FP8 blocks (the routed experts' prefill route) ---------------------------------------------------

// w uint8 [(L,) E, N, K/2], s e8m0 bytes [(L,) E, N, K/32]; `layer` [1] names the stack position (empty: no stack).
// Results: q e4m3 [E, N, K], sf f32 [E, N/128, K/128].
ffi::Error Fp4WidenImpl(cudaStream_t stream, ffi::AnyBuffer w, ffi::AnyBuffer s, ffi::Buffer<ffi::S32> layer,
                        ffi::Result<ffi::AnyBuffer> q, ffi::ResultBuffer<ffi::F32> sf) {
  const std::string op = "dsv4_fp4_widen";
  const size_t nd = w.dimensions().size();
  if (nd != 3 && nd != 4) return bad(op, "weight " + shape_str(w) + " is not [E, N, K/2] or a stack [L, E, N, K/2]");
  const int64_t layers = nd == 4 ? dim(w, 0) : 1, e = dim(w, -3), n = dim(w, -2), k = 2 * dim(w, -1);
  if (w.element_type() != ffi::DataType::U8) return bad(op, "weight must be uint8 (packed e2m1)");
  const bool slabs = s.element_type() == ffi::DataType::U32;  // the slab layout (kernels.h)
  if (!slabs && !is_e8m0_bytes(s))
    return bad(op, "scales must be float8_e8m0fnu or uint8 bytes (or uint32 words: the slab layout)");
  if (n % 128 || k % 128 || n == 0 || k == 0)
    return bad(op, "weight " + shape_str(w) + ": N and K must be positive multiples of 128");
  if (s.element_count() != layers * e * n * (k / (slabs ? 128 : 32)))
    return bad(op, "scales " + shape_str(s) + " do not match the weight " + shape_str(w) +
                       (slabs ? " (uint32 [..., N, K/128])" : " ([..., N, K/32])"));
  if (layer.element_count() > 1 || (nd == 4 && layer.element_count() != 1))
    return bad(op, "a layer stack needs one layer index (and a plain weight none)");
  if (!is_e4m3(*q) || q->element_count() != e * n * k) return bad(op, "q must be float8_e4m3fn [E, N, K]");
  if (sf->element_count() != e * (n / 128) * (k / 128)) return bad(op, "sf must be f32 [E, N/128, K/128]");
  if (!aligned16(w.untyped_data()) || (reinterpret_cast<uintptr_t>(s.untyped_data()) & 3u) != 0 ||
      !aligned16(q->untyped_data()))
    return bad(op, "weight and q must be 16-byte aligned, scales 4-byte aligned");
  if (e > 65535 || n / 128 > 65535) return bad(op, "more than 65535 experts or N/128 tiles");
  Fp4WidenArgs a{static_cast<const uint8_t*>(w.untyped_data()), static_cast<const uint8_t*>(s.untyped_data()),
                 layer.element_count() ? layer.typed_data() : nullptr, layers, e, n, k,
                 static_cast<uint8_t*>(q->untyped_data()), sf->typed_data(), slabs};
  return cuda_check(op, launch_fp4_widen(a, stream));
}

// ---- the MXFP4 experts at prefill sizes ----------------------------------------------------------------------------

// One projection (out_b null) or two of the same shape (gate and up: w_b, s_b, out_b) of the grouped route.
ffi::Error fp4_grouped(cudaStream_t stream, const std::string& op, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> sfa,
                       ffi::Buffer<ffi::S32> group_sizes, ffi::Buffer<ffi::S32> layer,
                       const ffi::AnyBuffer* w[2], const ffi::AnyBuffer* s[2],
                       ffi::Result<ffi::Buffer<ffi::BF16>>* out[2]) {
  if (!is_e4m3(q) || q.dimensions().size() != 2) return bad(op, "q " + shape_str(q) + " must be float8_e4m3fn [R, K]");
  const int64_t rows = dim(q, 0), k = dim(q, 1);
  const size_t nd = w[0]->dimensions().size();
  if (nd != 3 && nd != 4)
    return bad(op, "weight " + shape_str(*w[0]) + " is not [E, N, K/2] or a stack [L, E, N, K/2]");
  const int64_t layers = nd == 4 ? dim(*w[0], 0) : 1, e = dim(*w[0], -3), n = dim(*w[0], -2);
  const bool slabs = s[0]->element_type() == ffi::DataType::U32;  // the slab layout (kernels.h)
  for (int i = 0; i < 2 && w[i] != nullptr; ++i) {
    const std::string which = i ? "second " : "";
    if (w[i]->element_type() != ffi::DataType::U8) return bad(op, which + "weight must be uint8 (packed e2m1)");
    if (w[i]->dimensions().size() != nd || dim(*w[i], -3) != e || dim(*w[i], -2) != n || 2 * dim(*w[i], -1) != k ||
        (nd == 4 && dim(*w[i], 0) != layers))
      return bad(op, which + "weight " + shape_str(*w[i]) + " does not match q " + shape_str(q) +
                         " and the first weight " + shape_str(*w[0]));
    if ((s[i]->element_type() == ffi::DataType::U32) != slabs || (!slabs && !is_e8m0_bytes(*s[i])))
      return bad(op, which + "scales must be float8_e8m0fnu or uint8 bytes (or uint32 words: the slab layout), "
                             "as the first");
    if (s[i]->element_count() != layers * e * n * (k / (slabs ? 128 : 32)))
      return bad(op, which + "scales " + shape_str(*s[i]) + " do not match the weight " + shape_str(*w[i]));
    if (!aligned16(w[i]->untyped_data()) || (reinterpret_cast<uintptr_t>(s[i]->untyped_data()) & 3u) != 0)
      return bad(op, "weights must be 16-byte aligned, scales 4-byte aligned");
    if ((*out[i])->element_count() != rows * n) return bad(op, "out must be bf16 [R, N]");
    if (!aligned16((*out[i])->untyped_data())) return bad(op, "out must be 16-byte aligned");
  }
  if (n % 128 || k % 128 || n == 0 || k == 0)
    return bad(op, "weight " + shape_str(*w[0]) + ": N and K must be positive multiples of 128");
  const int64_t pitch = k ? sfa.element_count() / (k / 128) : 0;
  if (sfa.element_count() != (k / 128) * pitch || pitch < rows || pitch % 4)
    return bad(op, "sfa " + shape_str(sfa) + " must be f32 [1, K/128, P] with P >= R a multiple of 4 (act_quant_rows)");
  if (group_sizes.element_count() != e)
    return bad(op, "group_sizes " + shape_str(group_sizes) + " must have one count per expert (" +
                       std::to_string(e) + ")");
  if (layer.element_count() > 1 || (nd == 4 && layer.element_count() != 1))
    return bad(op, "a layer stack needs one layer index (and a plain weight none)");
  if (!aligned16(q.untyped_data())) return bad(op, "q must be 16-byte aligned");
  if (rows > 0x7FFFFFFF) return bad(op, "more than 2^31 rows");
  if (!fp4_grouped_fits(e))
    return bad(op, std::to_string(e) + " experts: the expert table does not fit in shared memory");
  Fp4GroupedArgs a{};
  a.q = static_cast<const uint8_t*>(q.untyped_data());
  a.sfa = sfa.typed_data(), a.sfa_pitch = pitch;
  a.group_sizes = group_sizes.typed_data(), a.experts = e;
  a.layer = layer.element_count() ? layer.typed_data() : nullptr, a.layers = layers;
  for (int i = 0; i < 2; ++i) {
    a.w[i] = w[i] ? static_cast<const uint8_t*>(w[i]->untyped_data()) : nullptr;
    a.s[i] = s[i] ? static_cast<const uint8_t*>(s[i]->untyped_data()) : nullptr;
    a.out[i] = w[i] ? (*out[i])->untyped_data() : nullptr;
  }
  a.rows = rows, a.n = n, a.k = k, a.slabs = slabs;
  return cuda_check(op, launch_fp4_grouped(a, stream));
}

ffi::Error Fp4GroupedImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> sfa,
                          ffi::Buffer<ffi::S32> group_sizes, ffi::AnyBuffer w, ffi::AnyBuffer s,
                          ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::Buffer<ffi::BF16>> out) {
  const ffi::AnyBuffer* ws[2] = {&w, nullptr};
  const ffi::AnyBuffer* ss[2] = {&s, nullptr};
  ffi::Result<ffi::Buffer<ffi::BF16>>* outs[2] = {&out, nullptr};
  return fp4_grouped(stream, "dsv4_fp4_grouped", q, sfa, group_sizes, layer, ws, ss, outs);
}

ffi::Error Fp4GroupedPairImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> sfa,
                              ffi::Buffer<ffi::S32> group_sizes, ffi::AnyBuffer w, ffi::AnyBuffer s,
                              ffi::AnyBuffer w_b, ffi::AnyBuffer s_b, ffi::Buffer<ffi::S32> layer,
                              ffi::Result<ffi::Buffer<ffi::BF16>> out, ffi::Result<ffi::Buffer<ffi::BF16>> out_b) {
  const ffi::AnyBuffer* ws[2] = {&w, &w_b};
  const ffi::AnyBuffer* ss[2] = {&s, &s_b};
  ffi::Result<ffi::Buffer<ffi::BF16>>* outs[2] = {&out, &out_b};
  return fp4_grouped(stream, "dsv4_fp4_grouped_pair", q, sfa, group_sizes, layer, ws, ss, outs);
}
}  // namespace
}  // namespace dsv4ffi

using dsv4ffi::Fp4GemvImpl;
using dsv4ffi::Fp4GroupedImpl;
using dsv4ffi::Fp4GroupedPairImpl;
using dsv4ffi::Fp4WidenImpl;
using dsv4ffi::Fp4MoeDownImpl;
using dsv4ffi::Fp4MoeGateUpImpl;
using dsv4ffi::RouteImpl;

// The MXFP4 handlers, each in five targets: the plain name launches the variant DSV4_FFI_FP4_VARIANT names at launch
// (default wgb); the _wg, _wg8, _wgb and _ring targets always launch that variant (A/B in one process: the choice is part of
// the program, so re-recorded command buffers cannot pick up a changed environment).
#define DSV4_FP4_GEMV_BIND                                \
  ffi::Ffi::Bind()                                        \
      .STREAM.Arg<ffi::Buffer<ffi::BF16>>()               \
      .Arg<ffi::Buffer<ffi::S32>>()                       \
      .Arg<ffi::Buffer<ffi::S32>>()                       \
      .Arg<ffi::AnyBuffer>()                              \
      .Arg<ffi::AnyBuffer>()                              \
      .Ret<ffi::Buffer<ffi::BF16>>()
#define DSV4_FP4_GATE_UP_BIND                             \
  ffi::Ffi::Bind()                                        \
      .STREAM.Arg<ffi::Buffer<ffi::BF16>>()               \
      .Arg<ffi::Buffer<ffi::S32>>()                       \
      .Arg<ffi::Buffer<ffi::S32>>()                       \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Arg<ffi::AnyBuffer>()                              \
      .Arg<ffi::AnyBuffer>()                              \
      .Arg<ffi::AnyBuffer>()                              \
      .Arg<ffi::AnyBuffer>()                              \
      .Ret<ffi::Buffer<ffi::BF16>>()                      \
      .Attr<float>("limit")
#define DSV4_FP4_DOWN_BIND                                \
  ffi::Ffi::Bind()                                        \
      .STREAM.Arg<ffi::Buffer<ffi::BF16>>()               \
      .Arg<ffi::Buffer<ffi::S32>>()                       \
      .Arg<ffi::AnyBuffer>()                              \
      .Arg<ffi::AnyBuffer>()                              \
      .Ret<ffi::Buffer<ffi::BF16>>()                      \
      .Attr<int64_t>("tokens")

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_gemv, Fp4GemvImpl<dsv4ffi::kFp4Default>, DSV4_FP4_GEMV_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_gemv_wg, Fp4GemvImpl<dsv4ffi::kFp4Wg>, DSV4_FP4_GEMV_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_gemv_wg8, Fp4GemvImpl<dsv4ffi::kFp4Wg8>, DSV4_FP4_GEMV_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_gemv_ring, Fp4GemvImpl<dsv4ffi::kFp4Ring>, DSV4_FP4_GEMV_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_gemv_wgb, Fp4GemvImpl<dsv4ffi::kFp4Wgb>, DSV4_FP4_GEMV_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_moe_gate_up, Fp4MoeGateUpImpl<dsv4ffi::kFp4Default>, DSV4_FP4_GATE_UP_BIND,
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_moe_gate_up_wg, Fp4MoeGateUpImpl<dsv4ffi::kFp4Wg>, DSV4_FP4_GATE_UP_BIND,
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_moe_gate_up_wg8, Fp4MoeGateUpImpl<dsv4ffi::kFp4Wg8>, DSV4_FP4_GATE_UP_BIND,
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_moe_gate_up_ring, Fp4MoeGateUpImpl<dsv4ffi::kFp4Ring>, DSV4_FP4_GATE_UP_BIND,
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_moe_gate_up_wgb, Fp4MoeGateUpImpl<dsv4ffi::kFp4Wgb>, DSV4_FP4_GATE_UP_BIND,
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_moe_down, Fp4MoeDownImpl<dsv4ffi::kFp4Default>, DSV4_FP4_DOWN_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_moe_down_wg, Fp4MoeDownImpl<dsv4ffi::kFp4Wg>, DSV4_FP4_DOWN_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_moe_down_wg8, Fp4MoeDownImpl<dsv4ffi::kFp4Wg8>, DSV4_FP4_DOWN_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_moe_down_ring, Fp4MoeDownImpl<dsv4ffi::kFp4Ring>, DSV4_FP4_DOWN_BIND,
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_moe_down_wgb, Fp4MoeDownImpl<dsv4ffi::kFp4Wgb>, DSV4_FP4_DOWN_BIND, DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_route, RouteImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<float>("route_scale"),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_widen, Fp4WidenImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>(),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_grouped, Fp4GroupedImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>(),
                              DSV4_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_fp4_grouped_pair, Fp4GroupedPairImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>(),
                              DSV4_TRAITS);
