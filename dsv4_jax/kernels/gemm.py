"""The kernel side of `dsv4_jax.ops.fp8_linear`: our FP8 GEMV with the activation quantisation inside it (M <= 8 rows)
or our quantisation + DeepGEMM's SM90 GEMM.

A weight that is one layer of a stack (`LayerSlice`, inside the layer scan) goes to the GEMV as the whole stack with
the layer as its weight group, so no step copies it; the DeepGEMM GEMMs (M > 8: prefill, large batches) take the
layer's slice, which XLA materialises (a copy of the weight per call; acceptable where thousands of rows amortise it).
Between the two, a stacked layer's M <= 64 rows go to the layer op instead (`ffi_ops.fp8_gemv_layer`): no slice copy.
Its rows are quantised once, then beyond 16 rows DeepGEMM's m-grouped contiguous GEMM reads the layer in place (the
extension's layer GEMMs: every row's group is `layer`), else our GEMV takes one pass of 16 rows over the
weights. At 32 rows on an H200 the in-place GEMM took 6.5-21.2 us per Flash shape where the GEMV took 11.6-38.5
(BENCHMARKS.md, seventeenth session). Where the layer GEMM is not instantiated the GEMV takes up to 32 rows
(`LAYER_GEMV_DEFAULT_M`: six Flash layers at batch 32, then in passes of 8 rows, 12.34 ms per decode step against
12.70 / 12.72 ms with DeepGEMM on the slices). `DSV4_FFI_LAYER_GEMV_MAX_M` (8 to 64, read at trace time) moves the
bound; 8 turns the layer op off beyond the fused GEMV.

Two weights of a layer that one input feeds (`fp8_linear_pair`) share one launch of the layer GEMV (and one
quantisation of the rows beyond 8; `ffi_ops.fp8_gemv_layer_pair`): at batch 1 the small ones cost a launch's latency,
not their bytes.
`DSV4_FFI_GEMV_PAIR=separate` (read at trace time) launches them one by one.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import LayerSlice, materialize, stacks_and_index

__all__ = ["fp8_linear", "fp8_linear_pair", "fp8_linear_unsupported"]

LAYER_GEMV_DEFAULT_M = 32  # without the layer GEMM; measured: see the module doc


def _fused_quant() -> bool:
    """Whether a stacked layer's GEMV quantises its activations itself (one launch; default) or after a separate
    quantisation launch: `DSV4_FFI_GEMV_QUANT=separate` (or the CUDA-core GEMV, `DSV4_FFI_GEMV=cuda`), read when the
    program is traced, as the A/B knob of the dense `fp8_linear`'s own fused path."""
    return os.environ.get("DSV4_FFI_GEMV_QUANT") != "separate" and os.environ.get("DSV4_FFI_GEMV") != "cuda"


def _layer_gemv_max_m(w: LayerSlice) -> int:
    """Rows up to which a stacked layer's weight goes to the layer op (`DSV4_FFI_LAYER_GEMV_MAX_M`; default
    GEMV_LAYER_MAX_M where its layer GEMM is instantiated, else `LAYER_GEMV_DEFAULT_M`), clamped to [GEMV_MAX_M,
    GEMV_LAYER_MAX_M]."""
    v = os.environ.get("DSV4_FFI_LAYER_GEMV_MAX_M")
    if v and v.isdigit():
        m = int(v)
    elif ffi_ops.layer_gemm_instantiated(*w.shape):
        m = ffi_ops.GEMV_LAYER_MAX_M
    else:
        m = LAYER_GEMV_DEFAULT_M
    return min(max(m, ffi_ops.GEMV_MAX_M), ffi_ops.GEMV_LAYER_MAX_M)


def _to_layer_gemv(w, m: int) -> bool:
    """Whether `m` rows against `w` go to the layer op (a stacked weight, up to `_layer_gemv_max_m` rows)."""
    return isinstance(w, LayerSlice) and _fused_quant() and m <= _layer_gemv_max_m(w)


def fp8_linear_unsupported(x, w, s) -> str | None:
    """Why the kernel cannot compute `fp8_linear(x, w, s)` (None: it can)."""
    k = x.shape[-1]
    n = w.shape[-2]
    m = 1
    for d in x.shape[:-1]:
        m *= d
    if k % 128:
        return f"K={k} is not a multiple of 128"
    if m <= ffi_ops.GEMV_MAX_M or _to_layer_gemv(w, m):
        return None  # the GEMV takes any N
    if not ffi_ops.instantiated("dense", n, k, 1, ffi_ops.dense_block_m(m)):
        return f"no AOT GEMM instantiation for N={n} K={k} (add the shape to ffi/gen/gen_instantiations.py)"
    return None


def fp8_linear(x: jax.Array, w, s) -> jax.Array:
    """bf16 `[..., K]` x e4m3 `[N, K]` (UE8M0 or f32 block scales) -> bf16 `[..., N]`, quant_sim numerics."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    stack_s = (s.stack if isinstance(s, LayerSlice) else s[None]) if isinstance(w, LayerSlice) else None
    if _to_layer_gemv(w, x2.shape[0]):
        return ffi_ops.fp8_gemv_layer(x2, w.stack, stack_s, w.index).reshape(*lead, w.shape[0])
    if stack_s is not None and x2.shape[0] <= ffi_ops.GEMV_MAX_M:
        q, sfa = ffi_ops.act_quant_rows(x2)
        groups = jnp.full((x2.shape[0],), w.index, jnp.int32)
        y = ffi_ops.fp8_gemv(q, sfa, w.stack, stack_s, groups=groups)
        return y.reshape(*lead, w.shape[0])
    return ffi_ops.fp8_linear(x, materialize(w), materialize(s))


def _pairs_share_a_launch() -> bool:
    """Whether `fp8_linear_pair` reads both weights in one launch (default) or launches them one by one
    (`DSV4_FFI_GEMV_PAIR=separate`: the A/B knob, read when the program is traced)."""
    return os.environ.get("DSV4_FFI_GEMV_PAIR") != "separate"


def fp8_linear_pair(x: jax.Array, w1, s1, w2, s2) -> tuple[jax.Array, jax.Array]:
    """`(fp8_linear(x, w1, s1), fp8_linear(x, w2, s2))`, in one launch where both weights are layers of stacks at one
    index and both would take the layer GEMV (bit-identical to its two launches)."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    stacks, layer = stacks_and_index(w1, s1, w2, s2)
    if layer is not None and _to_layer_gemv(w1, x2.shape[0]) and _pairs_share_a_launch():
        y1, y2 = ffi_ops.fp8_gemv_layer_pair(x2, *stacks, layer)
        return y1.reshape(*lead, w1.shape[0]), y2.reshape(*lead, w2.shape[0])
    return fp8_linear(x, w1, s1), fp8_linear(x, w2, s2)
