// XLA FFI handlers of the attention-side kernels: mHC (the split of the mixes, the whole hc_pre), sparse-MLA decode
// over the packed FP8 cache, the lightning indexer's scores, the compressor's decode step. Conventions as in
// handlers.cc.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "handler_util.h"
#include "handlers.h"
#include "kernels.h"

namespace dsv4ffi {
namespace {

// ---- mHC ---------------------------------------------------------------------------------------------------------

ffi::Error HcSplitSinkhornImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> mix, ffi::Buffer<ffi::F32> scale,
                               ffi::Buffer<ffi::F32> base, ffi::ResultBuffer<ffi::F32> pre,
                               ffi::ResultBuffer<ffi::F32> post, ffi::ResultBuffer<ffi::F32> comb, int64_t n,
                               int64_t iters, float eps) {
  const std::string op = "dsv4_hc_split_sinkhorn";
  if (!hc_supported_streams(int(n))) return bad(op, "n=" + std::to_string(n) + " streams: the kernel has 1, 2, 4");
  const int64_t m = (2 + n) * n;
  if (mix.dimensions().size() < 1 || dim(mix, -1) != m)
    return bad(op, "mix " + shape_str(mix) + " must end in (2+n)*n = " + std::to_string(m));
  if (scale.element_count() != 3) return bad(op, "scale " + shape_str(scale) + " must hold 3 values");
  if (base.element_count() != m) return bad(op, "base " + shape_str(base) + " must hold (2+n)*n values");
  const int64_t rows = mix.element_count() / m;
  if (pre->element_count() != rows * n || post->element_count() != rows * n || comb->element_count() != rows * n * n)
    return bad(op, "results must be [rows, n], [rows, n], [rows, n, n] for " + std::to_string(rows) + " rows");
  if (iters < 1) return bad(op, "iters must be >= 1");
  return cuda_check(op, launch_hc_split_sinkhorn(mix.typed_data(), scale.typed_data(), base.typed_data(),
                                                 pre->typed_data(), post->typed_data(), comb->typed_data(), rows,
                                                 int(n), int(iters), eps, stream));
}

ffi::Error HcPreImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::F32> fn,
                     ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> base, ffi::Buffer<ffi::S32> layer,
                     ffi::Buffer<ffi::BF16> norm_w, ffi::ResultBuffer<ffi::BF16> out, ffi::ResultBuffer<ffi::F32> post,
                     ffi::ResultBuffer<ffi::F32> comb, ffi::ResultBuffer<ffi::F32> part, int64_t n, int64_t iters,
                     float eps, float norm_eps, float x_norm_eps) {
  const std::string op = "dsv4_hc_pre";
  if (!hc_supported_streams(int(n))) return bad(op, "n=" + std::to_string(n) + " streams: the kernel has 1, 2, 4");
  if (x.dimensions().size() < 2 || dim(x, -2) != n)
    return bad(op, "x " + shape_str(x) + " must be [..., n, d] with n=" + std::to_string(n));
  const int64_t d = dim(x, -1), m = (2 + n) * n, rows = x.element_count() / (n * d);
  if (d % 2 != 0) return bad(op, "d=" + std::to_string(d) + " must be even");
  const int64_t layers = fn.dimensions().size() == 3 ? dim(fn, 0) : 1;
  if (fn.element_count() != layers * m * n * d)
    return bad(op, "fn " + shape_str(fn) + " must be [(layers,) (2+n)n, n d]");
  if (scale.element_count() != layers * 3 || base.element_count() != layers * m)
    return bad(op, "scale " + shape_str(scale) + " / base " + shape_str(base) + " must be [(layers,) 3] / "
                       "[(layers,) (2+n)n] like fn " + shape_str(fn));
  if (layer.element_count() > 1) return bad(op, "layer must hold at most one index");
  if (layers > 1 && layer.element_count() != 1) return bad(op, "a layer stack needs the layer index");
  if (out->element_count() != rows * d || post->element_count() != rows * n || comb->element_count() != rows * n * n)
    return bad(op, "results must be [rows, d], [rows, n], [rows, n, n] for " + std::to_string(rows) + " rows");
  if (part->element_count() != rows * hc_pre_chunks(n, d) * (m + 1))
    return bad(op, "workspace " + shape_str(*part) + " must be [rows, " + std::to_string(hc_pre_chunks(n, d)) + ", " +
                       std::to_string(m + 1) + "]");
  if (iters < 1) return bad(op, "iters must be >= 1");
  // norm_w: empty (x as collapsed), or the sublayer's RMSNorm weight [d] / a stack [layers, d] read at `layer`
  const int64_t norm_layers = norm_w.element_count() / (d > 0 ? d : 1);
  if (norm_w.element_count() != 0) {
    if (norm_w.element_count() != norm_layers * d || (norm_layers != 1 && norm_layers != layers))
      return bad(op, "norm_w " + shape_str(norm_w) + " must be [d] or [layers, d] like fn " + shape_str(fn));
    if (d > hc_pre_norm_max_d())
      return bad(op, "d=" + std::to_string(d) + " with norm_w: the normed form takes d <= " +
                         std::to_string(hc_pre_norm_max_d()));
  }
  HcPreArgs a{reinterpret_cast<const __nv_bfloat16*>(x.untyped_data()),
              fn.typed_data(),
              scale.typed_data(),
              base.typed_data(),
              layer.element_count() ? layer.typed_data() : nullptr,
              reinterpret_cast<__nv_bfloat16*>(out->untyped_data()),
              post->typed_data(),
              comb->typed_data(),
              part->typed_data(),
              rows,
              d,
              int(n),
              int(iters),
              eps,
              norm_eps};
  if (norm_w.element_count() != 0) {
    a.norm_w = reinterpret_cast<const __nv_bfloat16*>(norm_w.untyped_data());
    a.norm_layers = norm_layers;
    a.x_norm_eps = x_norm_eps;
  }
  return cuda_check(op, launch_hc_pre(a, stream));
}

// ---- sparse-MLA decode ---------------------------------------------------------------------------------------------

// Packed KV rows [..., rows, 584] (or an empty buffer: none) -> (rows per batch row, leading layers); false if the
// shape does not fit `batch`.
bool kv_rows(const ffi::Buffer<ffi::U8>& x, int64_t batch, int rank_max, int64_t* rows, int64_t* layers) {
  const auto d = x.dimensions();
  *rows = 0, *layers = 1;
  if (x.element_count() == 0) return true;
  if (d.size() < 3 || int(d.size()) > rank_max || d[d.size() - 1] != kSparseMlaRowBytes || d[d.size() - 3] != batch)
    return false;
  *rows = d[d.size() - 2];
  *layers = d.size() == 4 ? d[0] : 1;
  return true;
}

ffi::Error SparseMlaDecodeImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::U8> ring,
                               ffi::Buffer<ffi::U8> entries, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::U8> extra,
                               ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> sink, ffi::ResultBuffer<ffi::BF16> out,
                               ffi::ResultBuffer<ffi::F32> part_o, ffi::ResultBuffer<ffi::F32> part_ml, float scale) {
  const std::string op = "dsv4_sparse_mla_decode";
  const std::string row = std::to_string(kSparseMlaRowBytes);
  if (q.dimensions().size() != 3 || dim(q, 2) != kSparseMlaDim)
    return bad(op, "q " + shape_str(q) + " must be [batch, heads, " + std::to_string(kSparseMlaDim) + "]");
  const int64_t batch = dim(q, 0), heads = dim(q, 1);
  if (heads % 16 != 0) return bad(op, "heads=" + std::to_string(heads) + " is not a multiple of 16");
  // The sources' batch (the ring's): each of its rows serves q_per_src consecutive query rows.
  const int64_t src_batch = ring.dimensions().size() == 3 ? dim(ring, 0) : 0;
  if (src_batch < 1 || batch % src_batch != 0)
    return bad(op, "ring " + shape_str(ring) + " must be [sources, window, " + row + "] packed KV rows, with q's " +
                       std::to_string(batch) + " rows a multiple of its sources");
  int64_t window, cap, n_extra, layers, unused;
  if (!kv_rows(ring, src_batch, 3, &window, &unused))
    return bad(op, "ring " + shape_str(ring) + " must be [sources, window, " + row + "] packed KV rows");
  if (!kv_rows(entries, src_batch, 4, &cap, &layers))
    return bad(op, "entries " + shape_str(entries) + " must be [(layers,) sources, cap, " + row + "] or empty");
  if (!kv_rows(extra, src_batch, 3, &n_extra, &unused))
    return bad(op, "extra " + shape_str(extra) + " must be [sources, n, " + row + "] or empty");
  if (layer.element_count() > 1) return bad(op, "layer must hold at most one index");
  if (entries.dimensions().size() == 4 && layer.element_count() != 1)
    return bad(op, "a stack of entries needs the layer index");
  if (idx.dimensions().size() != 2 || dim(idx, 0) != batch)
    return bad(op, "idx " + shape_str(idx) + " must be [batch, n] for batch " + std::to_string(batch));
  if (sink.element_count() != heads) return bad(op, "sink " + shape_str(sink) + " must hold one value per head");
  if (out->element_count() != q.element_count()) return bad(op, "out " + shape_str(*out) + " must be q's shape");
  const int64_t per_split = heads * kSparseMlaDim;
  const int64_t splits = batch ? part_o->element_count() / (batch * per_split) : 1;
  if (splits < 1 || part_o->element_count() != batch * splits * per_split ||
      part_ml->element_count() != batch * splits * heads * 2)
    return bad(op, "workspaces " + shape_str(*part_o) + ", " + shape_str(*part_ml) +
                       " must be [batch, splits, heads, 512] and [batch, splits, heads, 2]");
  SparseMlaDecodeArgs a{q.untyped_data(),
                        ring.typed_data(),
                        entries.element_count() ? entries.typed_data() : nullptr,
                        layer.element_count() ? layer.typed_data() : nullptr,
                        extra.element_count() ? extra.typed_data() : nullptr,
                        idx.typed_data(),
                        sink.typed_data(),
                        part_o->typed_data(),
                        part_ml->typed_data(),
                        out->untyped_data(),
                        batch,
                        heads,
                        window,
                        cap,
                        n_extra,
                        dim(idx, 1),
                        int(splits),
                        scale,
                        batch / src_batch};
  (void)layers;
  return cuda_check(op, launch_sparse_mla_decode(a, stream));
}

// ---- lightning indexer -----------------------------------------------------------------------------------------

template <int V>
ffi::Error IndexerScoresImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> w,
                             ffi::Buffer<ffi::U8> keys, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out) {
  const std::string op =
      std::string("dsv4_indexer_scores") + (V == kIndexerMma ? "_mma" : V == kIndexerWgmma ? "_wgmma" : "");
  if (q.dimensions().size() != 3) return bad(op, "q " + shape_str(q) + " must be [rows, heads, 128]");
  const int64_t rows = dim(q, 0), heads = dim(q, 1);
  if (dim(q, 2) != 128) return bad(op, "q " + shape_str(q) + ": the kernel takes head_dim 128 only");
  if (heads < 16 || heads % 16 != 0)
    return bad(op, "q " + shape_str(q) + ": the number of heads must be a positive multiple of 16 (one mma tile)");
  if (w.dimensions().size() != 2 || dim(w, 0) != rows || dim(w, 1) != heads)
    return bad(op, "w " + shape_str(w) + " must be [rows, heads] = [" + std::to_string(rows) + "," +
                       std::to_string(heads) + "]");
  if (keys.dimensions().size() != 4 || dim(keys, 3) != 68)
    return bad(op, "keys " + shape_str(keys) + " must be packed MXFP4 indexer keys [layers, batch, n, 68]");
  const int64_t layers = dim(keys, 0), batch = dim(keys, 1), n = dim(keys, 2);
  if (layers < 1) return bad(op, "keys " + shape_str(keys) + " hold no layer");
  if (batch < 1 || rows % batch != 0)
    return bad(op, "q has " + std::to_string(rows) + " rows, not a multiple of the keys' batch " +
                       std::to_string(batch));
  if (indexer_staged_rows(heads, rows / batch) < 1)
    return bad(op, std::to_string(heads) + " heads do not fit the kernel's shared memory (at most 144)");
  if (layer.element_count() > 1) return bad(op, "layer must hold at most one index");
  if (layers > 1 && layer.element_count() != 1) return bad(op, "a stack of " + std::to_string(layers) +
                                                                   " layers needs the layer index");
  if (out->dimensions().size() != 2 || dim(*out, 0) != rows || dim(*out, 1) != n)
    return bad(op, "out " + shape_str(*out) + " must be [rows, n] = [" + std::to_string(rows) + "," +
                       std::to_string(n) + "]");
  if (!aligned16(q.untyped_data()) || (reinterpret_cast<uintptr_t>(keys.untyped_data()) & 3u) != 0)
    return bad(op, "q must be 16-byte and keys 4-byte aligned");
  if (V == kIndexerWgmma && !indexer_wgmma_fits(heads, rows, batch))
    return bad(op, "the wgmma variant takes 64 heads and one query row per batch row on an SM90 device (q " +
                       shape_str(q) + ", keys " + shape_str(keys) + ")");
  IndexerScoresArgs a{q.untyped_data(), w.untyped_data(), keys.typed_data(),
                      layer.element_count() ? layer.typed_data() : nullptr, out->typed_data(), rows, heads, layers,
                      batch, n, V};
  return cuda_check(op, launch_indexer_scores(a, stream));
}

ffi::Error IndexerTopkImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> scores, ffi::Buffer<ffi::S32> n_vis,
                           ffi::ResultBuffer<ffi::S32> out, int64_t k) {
  const std::string op = "dsv4_indexer_topk";
  if (scores.dimensions().size() != 2) return bad(op, "scores " + shape_str(scores) + " must be [rows, n]");
  const int64_t rows = dim(scores, 0), n = dim(scores, 1);
  if (const char* why = indexer_topk_unsupported(n, k))
    return bad(op, "k = " + std::to_string(k) + " of n = " + std::to_string(n) + " entries: " + why);
  if (n_vis.dimensions().size() != 1 || dim(n_vis, 0) != rows)
    return bad(op, "n_vis " + shape_str(n_vis) + " must be [rows] = [" + std::to_string(rows) + "]");
  if (out->dimensions().size() != 2 || dim(*out, 0) != rows || dim(*out, 1) != k)
    return bad(op, "out " + shape_str(*out) + " must be [rows, k] = [" + std::to_string(rows) + "," +
                       std::to_string(k) + "]");
  if (rows > 0x7FFFFFFF) return bad(op, std::to_string(rows) + " rows exceed the launch grid");
  IndexerTopkArgs a{scores.typed_data(), n_vis.typed_data(), out->typed_data(), rows, n, k};
  return cuda_check(op, launch_indexer_topk(a, stream));
}

// ---- the compressor's decode step ----------------------------------------------------------------------------------

ffi::Error CompressorDecodeImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> kv_new, ffi::Buffer<ffi::F32> sc_new,
                                ffi::Buffer<ffi::F32> kv_state, ffi::Buffer<ffi::F32> sc_state,
                                ffi::Buffer<ffi::F32> ape, ffi::Buffer<ffi::BF16> norm_w,
                                ffi::Buffer<ffi::F32> inv_freq, ffi::Buffer<ffi::S32> start,
                                ffi::Buffer<ffi::S32> n_new, ffi::Buffer<ffi::S32> layer,
                                ffi::Buffer<ffi::S32> param_layer, ffi::ResultBuffer<ffi::BF16> entry, ffi::ResultBuffer<ffi::F32> kv_out,
                                ffi::ResultBuffer<ffi::F32> sc_out, ffi::ResultBuffer<ffi::F32> pooled, int64_t ratio,
                                int64_t rotate, float eps) {
  const std::string op = "dsv4_compressor_decode";
  const int64_t dc = dim(norm_w, -1), rope = 2 * inv_freq.element_count();
  if (const char* why = compressor_decode_unsupported(int(ratio), dc, rope, rotate != 0)) return bad(op, why);
  const int64_t coff = ratio == 4 ? 2 : 1, width = coff * dc, slots = coff * ratio;
  if (kv_new.dimensions().size() != 2 || dim(kv_new, 1) != width || sc_new.dimensions() != kv_new.dimensions())
    return bad(op, "kv_new " + shape_str(kv_new) + " / sc_new " + shape_str(sc_new) + " must both be [rows, " +
                       std::to_string(width) + "]");
  const int64_t rows = dim(kv_new, 0);
  const auto sd = kv_state.dimensions();
  const int64_t layers = sd.size() == 4 ? sd[0] : 1;
  if ((sd.size() != 3 && sd.size() != 4) || dim(kv_state, -3) != rows || dim(kv_state, -2) != slots ||
      dim(kv_state, -1) != width || sc_state.dimensions() != sd)
    return bad(op, "kv_state " + shape_str(kv_state) + " / sc_state " + shape_str(sc_state) +
                       " must both be [(layers,) " + std::to_string(rows) + ", " + std::to_string(slots) + ", " + std::to_string(width) + "]");
  const int64_t param_layers = norm_w.dimensions().size() == 2 ? dim(norm_w, 0) : 1;
  if (ape.element_count() != param_layers * ratio * width || dim(ape, -1) != width)
    return bad(op, "ape " + shape_str(ape) + " must be [(layers,) " + std::to_string(ratio) + ", " +
                       std::to_string(width) + "] with norm_w's layers " + shape_str(norm_w));
  if (start.element_count() != rows || n_new.element_count() != rows)
    return bad(op, "start " + shape_str(start) + " / n_new " + shape_str(n_new) + " must hold one value per row");
  if (layer.element_count() > 1 || param_layer.element_count() > 1)
    return bad(op, "layer / param_layer must hold at most one index");
  if (layers > 1 && layer.element_count() != 1) return bad(op, "a stack of states needs the layer index");
  if (param_layers > 1 && param_layer.element_count() != 1)
    return bad(op, "a stack of parameters needs the param_layer index");
  if (entry->element_count() != rows * dc || pooled->element_count() != rows * dc ||
      kv_out->element_count() != rows * slots * width || sc_out->element_count() != rows * slots * width)
    return bad(op, "results must be [rows, Dc], [rows, coff m, C] x 2 and the [rows, Dc] workspace");
  CompressorDecodeArgs a{kv_new.typed_data(),
                         sc_new.typed_data(),
                         kv_state.typed_data(),
                         sc_state.typed_data(),
                         ape.typed_data(),
                         reinterpret_cast<const __nv_bfloat16*>(norm_w.untyped_data()),
                         inv_freq.typed_data(),
                         start.typed_data(),
                         n_new.typed_data(),
                         layer.element_count() ? layer.typed_data() : nullptr,
                         param_layer.element_count() ? param_layer.typed_data() : nullptr,
                         reinterpret_cast<__nv_bfloat16*>(entry->untyped_data()),
                         kv_out->typed_data(),
                         sc_out->typed_data(),
                         pooled->typed_data(),
                         rows,
                         layers,
                         param_layers,
                         int(ratio),
                         int(dc),
                         int(rope),
                         rotate != 0,
                         eps};
  return cuda_check(op, launch_compressor_decode(a, stream));
}

ffi::Error KvRowImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> kv_in, ffi::Buffer<ffi::BF16> norm_w,
                     ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::F32> inv_freq,
                     ffi::ResultBuffer<ffi::BF16> kv_out, ffi::ResultBuffer<ffi::U8> packed, float eps) {
  const std::string op = "dsv4_kv_row";
  if (kv_in.dimensions().size() < 1) return bad(op, "kv_in " + shape_str(kv_in) + " must be [..., D]");
  const int64_t d = dim(kv_in, -1), rows = d > 0 ? kv_in.element_count() / d : 0, rope = 2 * inv_freq.element_count();
  const int64_t row_bytes = packed->element_count() ? dim(*packed, -1) : 0;
  if (const char* why = kv_row_unsupported(d, rope, row_bytes)) return bad(op, why);
  const int64_t layers = norm_w.dimensions().size() == 2 ? dim(norm_w, 0) : 1;
  if (norm_w.dimensions().size() < 1 || dim(norm_w, -1) != d || norm_w.element_count() != layers * d)
    return bad(op, "norm_w " + shape_str(norm_w) + " must be [(layers,) " + std::to_string(d) + "] like kv_in " +
                       shape_str(kv_in));
  if (layer.element_count() > 1) return bad(op, "layer must hold at most one index");
  if (layers > 1 && layer.element_count() != 1) return bad(op, "a stack of norm weights needs the layer index");
  if (pos.element_count() != rows) return bad(op, "pos " + shape_str(pos) + " must hold one position per row");
  if (kv_out->element_count() != rows * d || (row_bytes && packed->element_count() != rows * row_bytes))
    return bad(op, "results must be kv [rows, D] and packed [rows, row bytes] (or empty) for " +
                       std::to_string(rows) + " rows");
  KvRowArgs a{reinterpret_cast<const __nv_bfloat16*>(kv_in.untyped_data()),
              reinterpret_cast<const __nv_bfloat16*>(norm_w.untyped_data()),
              layer.element_count() ? layer.typed_data() : nullptr,
              pos.typed_data(),
              inv_freq.typed_data(),
              reinterpret_cast<__nv_bfloat16*>(kv_out->untyped_data()),
              row_bytes ? packed->typed_data() : nullptr,
              rows,
              layers,
              d,
              rope,
              row_bytes,
              eps};
  return cuda_check(op, launch_kv_row(a, stream));
}

ffi::Error QHeadsImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::S32> pos,
                      ffi::Buffer<ffi::F32> inv_freq, ffi::ResultBuffer<ffi::BF16> out, float eps) {
  const std::string op = "dsv4_q_heads";
  if (q.dimensions().size() != 3) return bad(op, "q " + shape_str(q) + " must be [rows, heads, d]");
  const int64_t rows = dim(q, 0), heads = dim(q, 1), d = dim(q, 2), rope = 2 * inv_freq.element_count();
  if (const char* why = q_heads_unsupported(d, rope)) return bad(op, why);
  if (pos.element_count() != rows) return bad(op, "pos " + shape_str(pos) + " must hold one position per row");
  if (out->element_count() != q.element_count()) return bad(op, "the result must be shaped like q " + shape_str(q));
  QHeadsArgs a{reinterpret_cast<const __nv_bfloat16*>(q.untyped_data()),
               pos.typed_data(),
               inv_freq.typed_data(),
               reinterpret_cast<__nv_bfloat16*>(out->untyped_data()),
               rows,
               heads,
               d,
               rope,
               eps};
  return cuda_check(op, launch_q_heads(a, stream));
}

}  // namespace
}  // namespace dsv4ffi

using dsv4ffi::CompressorDecodeImpl;
using dsv4ffi::HcPreImpl;
using dsv4ffi::HcSplitSinkhornImpl;
using dsv4ffi::IndexerScoresImpl;
using dsv4ffi::IndexerTopkImpl;
using dsv4ffi::KvRowImpl;
using dsv4ffi::QHeadsImpl;
using dsv4ffi::SparseMlaDecodeImpl;

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_hc_split_sinkhorn, HcSplitSinkhornImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("iters")
                                  .Attr<float>("eps"),
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_hc_pre, HcPreImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("iters")
                                  .Attr<float>("eps")
                                  .Attr<float>("norm_eps")
                                  .Attr<float>("x_norm_eps"),
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_sparse_mla_decode, SparseMlaDecodeImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"),
                              DSV4_TRAITS);
// The indexer's scores in three targets: the plain name launches the variant DSV4_FFI_INDEXER names at launch
// (default wgmma where it fits, else mma); _mma and _wgmma always launch that variant (A/B in one process; wgmma
// refuses sizes it does not take).
#define DSV4_INDEXER_SCORES_BIND                    \
  ffi::Ffi::Bind()                                  \
      .STREAM.Arg<ffi::Buffer<ffi::BF16>>()         \
      .Arg<ffi::Buffer<ffi::BF16>>()                \
      .Arg<ffi::Buffer<ffi::U8>>()                  \
      .Arg<ffi::Buffer<ffi::S32>>()                 \
      .Ret<ffi::Buffer<ffi::F32>>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_indexer_scores, IndexerScoresImpl<dsv4ffi::kIndexerAuto>, DSV4_INDEXER_SCORES_BIND,
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_indexer_scores_mma, IndexerScoresImpl<dsv4ffi::kIndexerMma>,
                              DSV4_INDEXER_SCORES_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_indexer_scores_wgmma, IndexerScoresImpl<dsv4ffi::kIndexerWgmma>,
                              DSV4_INDEXER_SCORES_BIND, DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_indexer_topk, IndexerTopkImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"),
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_compressor_decode, CompressorDecodeImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ratio")
                                  .Attr<int64_t>("rotate")
                                  .Attr<float>("eps"),
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_kv_row, KvRowImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<float>("eps"),
                              DSV4_TRAITS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(dsv4_q_heads, QHeadsImpl,
                              ffi::Ffi::Bind()
                                  .STREAM.Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<float>("eps"),
                              DSV4_TRAITS);
