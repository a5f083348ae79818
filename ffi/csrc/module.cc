// Python module of the dsv4_jax FFI extension: hands the FFI handler capsules and the AOT instantiation table to
// Python. Registration with XLA happens in dsv4_jax.kernels.ffi_ops (jax.ffi.register_ffi_target, platform CUDA).
#include <nanobind/nanobind.h>

#include "gemm_entry.h"
#include "kernels.h"
#include "handlers.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

#ifndef DSV4_DEEPGEMM_VERSION
#define DSV4_DEEPGEMM_VERSION "unknown"
#endif
#ifndef DSV4_CUDA_ARCHS
#define DSV4_CUDA_ARCHS "unknown"
#endif

NB_MODULE(_ffi, m) {
  m.def("registrations", [] {
    nb::dict d;
#define DSV4_REG(name) d[#name] = nb::capsule(reinterpret_cast<void*>(&name));
    DSV4_FFI_HANDLERS(DSV4_REG)
#undef DSV4_REG
    return d;
  }, "Handler name -> PyCapsule of its XLA_FFI_DEFINE_HANDLER_SYMBOL function (typed FFI, api_version 1).");
  m.def("instantiations", [] {
    static const char* kinds[] = {"dense", "contig", "masked", "layer"};
    nb::list out;
    for (int i = 0; i < dsv4ffi::kGemmTableSize; ++i) {
      const auto* e = dsv4ffi::kGemmTable[i];
      nb::dict d;
      d["name"] = e->name;
      d["kind"] = kinds[e->kind];
      d["n"] = e->n, d["k"] = e->k, d["g"] = e->g;
      d["block_m"] = e->block_m, d["block_n"] = e->block_n, d["stages"] = e->stages;
      d["math_threads"] = e->math_threads, d["smem"] = e->smem, d["num_sms"] = e->num_sms;
      d["multicast"] = e->multicast;
      out.append(d);
    }
    return out;
  }, "The AOT-compiled GEMM instantiations and their launch configurations.");
  m.attr("gemv_max_m") = dsv4ffi::kGemvMaxM;
  m.def("gemv_ksplit", &dsv4ffi::gemv_ksplit,
        "K split of the GEMV launch for (out_rows, tokens_per_block, n, k, num_sms, mma).");
  m.def("gemv_uses_mma", &dsv4ffi::gemv_uses_mma, "Whether the GEMV runs on tensor cores (DSV4_FFI_GEMV != 'cuda').");
  m.attr("fp4_segment_rows") = dsv4ffi::kFp4SegmentRows;
  m.def("fp4_ksplit", &dsv4ffi::fp4_ksplit,
        "K split of the MXFP4 GEMV launch for K (DSV4_FFI_FP4_KSPLIT overrides).");
  m.def("fp4_uses_bit_conversion", &dsv4ffi::fp4_uses_bit_conversion,
        "Whether the ring variant of the MXFP4 GEMV converts e2m1 -> e4m3 by bit placement (DSV4_FFI_FP4_CVT=bits).");
  m.def("fp4_variant", [] {
    const int v = dsv4ffi::fp4_resolve_variant(dsv4ffi::kFp4Default);
    return v == dsv4ffi::kFp4Ring ? "ring" : v == dsv4ffi::kFp4Wg8 ? "wg8" : v == dsv4ffi::kFp4Wgb ? "wgb" : "wg";
  }, "The MXFP4 kernels the dsv4_fp4_* targets without a suffix launch now (DSV4_FFI_FP4_VARIANT; default wgb).");
  m.attr("fp4_variants") = nb::make_tuple("wg", "wg8", "wgb", "ring");
  m.attr("deepgemm_source") = DSV4_DEEPGEMM_VERSION;
  m.attr("cuda_archs") = DSV4_CUDA_ARCHS;
  m.attr("xla_ffi_api_version") = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
}
