"""The ops of DeepSeek-V4 that have (or may have) a kernel, each a pure-JAX reference twin registered with its kernel
and kill switch in `registry`; plus the reference-only linears.

    from dsv4_jax import ops
    y = ops.fp8_linear(x, w, s, opts=opts)      # reference or kernel, decided by opts.backend (registry)
"""

from dsv4_jax.ops.attention import sparse_attention, sparse_decode, sparse_prefill
from dsv4_jax.ops.compressor import compress_step, compressor_decode
from dsv4_jax.ops.experts import moe_experts, swiglu
from dsv4_jax.ops.indexer import indexer_scores, indexer_topk
from dsv4_jax.ops.kv_row import kv_row
from dsv4_jax.ops.linear import (
    bf16_linear,
    blockwise_gemm,
    f32_linear,
    fp4_linear,
    fp8_linear,
    fp8_linear_pair,
    grouped_dequant_linear,
    sum_in_order,
)
from dsv4_jax.ops.mhc import hc_pre, hc_split_mixes
from dsv4_jax.ops.q_heads import q_heads
from dsv4_jax.ops.registry import KernelUnavailable, record
from dsv4_jax.ops.router import route_experts
from dsv4_jax.options import Opts

__all__ = [
    "KernelUnavailable",
    "Opts",
    "bf16_linear",
    "blockwise_gemm",
    "compress_step",
    "compressor_decode",
    "f32_linear",
    "fp4_linear",
    "fp8_linear",
    "fp8_linear_pair",
    "grouped_dequant_linear",
    "hc_pre",
    "hc_split_mixes",
    "kv_row",
    "q_heads",
    "indexer_scores",
    "indexer_topk",
    "moe_experts",
    "record",
    "route_experts",
    "sparse_attention",
    "sparse_decode",
    "sparse_prefill",
    "sum_in_order",
    "swiglu",
]
