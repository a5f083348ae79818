// The FFI handler symbols exported by handlers.cc, attention_handlers.cc and moe_handlers.cc.
#pragma once
#include "xla/ffi/api/c_api.h"

#define DSV4_FFI_HANDLERS(X) \
  X(dsv4_act_quant)          \
  X(dsv4_swiglu_quant)       \
  X(dsv4_e8m0_to_f32)        \
  X(dsv4_route)              \
  X(dsv4_hc_split_sinkhorn)  \
  X(dsv4_hc_pre)             \
  X(dsv4_sparse_mla_decode)  \
  X(dsv4_indexer_scores)     \
  X(dsv4_indexer_scores_mma) \
  X(dsv4_indexer_scores_wgmma) \
  X(dsv4_indexer_topk)       \
  X(dsv4_compressor_decode)  \
  X(dsv4_kv_row)             \
  X(dsv4_q_heads)            \
  X(dsv4_dequant_bf16_gemv)  \
  X(dsv4_fp8_gemm)           \
  X(dsv4_fp8_linear)         \
  X(dsv4_fp8_linear_fused)   \
  X(dsv4_fp8_linear_separate) \
  X(dsv4_fp8_gemm_contig)    \
  X(dsv4_fp8_gemm_masked)    \
  X(dsv4_fp8_gemv)           \
  X(dsv4_fp8_gemv_pair)      \
  X(dsv4_fp8_gemv_layer)     \
  X(dsv4_fp8_gemv_layer_pair) \
  X(dsv4_fp4_gemv)           \
  X(dsv4_fp4_gemv_wg)        \
  X(dsv4_fp4_gemv_wg8)       \
  X(dsv4_fp4_gemv_ring)      \
  X(dsv4_fp4_gemv_wgb)       \
  X(dsv4_fp4_moe_gate_up)    \
  X(dsv4_fp4_moe_gate_up_wg) \
  X(dsv4_fp4_moe_gate_up_wg8) \
  X(dsv4_fp4_moe_gate_up_ring) \
  X(dsv4_fp4_moe_gate_up_wgb) \
  X(dsv4_fp4_moe_down)       \
  X(dsv4_fp4_moe_down_wg)    \
  X(dsv4_fp4_moe_down_wg8)   \
  X(dsv4_fp4_moe_down_ring)   \
  X(dsv4_fp4_moe_down_wgb)    \
  X(dsv4_fp4_widen)          \
  X(dsv4_fp4_grouped)        \
  X(dsv4_fp4_grouped_pair)

#define DSV4_DECLARE(name) extern "C" XLA_FFI_Error* name(XLA_FFI_CallFrame* call_frame);
DSV4_FFI_HANDLERS(DSV4_DECLARE)
#undef DSV4_DECLARE
