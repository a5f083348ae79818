"""The kernel side of `dsv4_jax.ops.grouped_dequant_linear` (attention's grouped `wo_a`).

Up to 32 token rows (decode; 8 where a group is not whole 16-row tiles): our GEMV, bf16 activations times the FP8
weight dequantised to bf16 in registers; a weight that is one layer of a stack (`LayerSlice`) goes to it as the whole
stack and the layer index (no copy).
More rows (prefill, large batches): the reference's own arithmetic (dequantise, bf16 einsum with fp32 accumulation),
which XLA runs as a tensor-core GEMM, the right tool at those sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import quant
from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import LayerSlice, materialize
from dsv4_jax.rounding import to_bf16

__all__ = ["grouped_dequant_linear", "grouped_dequant_linear_unsupported"]


def grouped_dequant_linear_unsupported(x, w, s) -> str | None:
    """Why the kernel cannot compute `grouped_dequant_linear(x, w, s)` (None: it can)."""
    *_, g, i = x.shape
    if i % 128 or w.shape[-2] % g:
        return f"shapes x {tuple(x.shape)}, w {tuple(w.shape)}: need I % 128 == 0 and G dividing the rows"
    return None


def grouped_dequant_linear(x: jax.Array, w, s) -> jax.Array:
    """bf16 `[..., G, I]` x e4m3 `[G * R, I]` (or a `LayerSlice` of a stack) -> bf16 `[..., G, R]`."""
    *lead, g, i = x.shape
    x3 = x.reshape(-1, g, i)
    if x3.shape[0] > ffi_ops.dequant_gemv_max_m(w.shape[-2] // g):
        wv = to_bf16(quant.dequant_fp8_weight(materialize(w), materialize(s))).reshape(g, -1, i)
        return to_bf16(jnp.einsum("...gi,gri->...gr", x, wv, preferred_element_type=jnp.float32))
    if isinstance(w, LayerSlice):
        y = ffi_ops.dequant_bf16_gemv(x3, w.stack, s.stack if isinstance(s, LayerSlice) else s[None], w.index)
    else:
        y = ffi_ops.dequant_bf16_gemv(x3, w, s)
    return y.reshape(*lead, g, -1)
