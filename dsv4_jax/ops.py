"""The GEMMs of DeepSeek-V4, by weight format, with the official numerics; the switch point for kernels.

Every function here has a pure-JAX reference implementation. `Opts.backend` selects, per op, between the reference
and an FFI kernel (see `dsv4_jax.kernels`); the reference is always available and is what CPU runs.

Reference numerics of an FP8/FP4 linear (spec §2.2): the activation is quantized per token to FP8 in 1x128 blocks
with power-of-two scales; the GEMM accumulates fp32 partial sums per K block (128 for FP8 weights, 32 for FP4
weights), scales each by `s_act * s_w` and adds them in K order; the result is rounded to bf16 once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv4_jax import quant
from dsv4_jax.rounding import to_bf16

__all__ = ["Opts", "fp8_linear", "fp4_linear", "expert_linear", "bf16_linear", "f32_linear"]


@dataclasses.dataclass(frozen=True)
class Opts:
    """Static switches of a forward pass (hashable: part of the jit cache key).

    quant_sim: simulate the official in-forward quantization (activation FP8 before every FP8/FP4 GEMM, FP8 KV and
      FP4 indexer fake-quant). Off gives the exact-arithmetic model that e.g. HF transformers implements.
    backend: "reference" (pure JAX), "ffi" (kernels, error if unavailable) or "auto" (kernels where available).
    """

    quant_sim: bool = True
    backend: str = "reference"

    def __post_init__(self):
        if self.backend not in ("reference", "ffi", "auto"):
            raise ValueError(f"backend={self.backend!r}; expected 'reference', 'ffi' or 'auto'")


def _kernel(op: str, opts: Opts):
    """The FFI implementation of `op` if the backend selects one, else None."""
    if opts.backend == "reference":
        return None
    from dsv4_jax import kernels

    return kernels.select(op, opts.backend)


def _blockwise_gemm(xq, sx, wv, sw, kblock: int) -> jax.Array:
    """sum_b (xq_b @ wv_b.T) * sx_b[:, None] * sw_b[None, :], blocks of `kblock` along K summed in K order.

    xq: f32 `[M, K]` (FP8 values), sx: f32 `[M, K/kblock]`; wv: f32 `[N, K]` (unscaled values), sw: f32 `[N, K/kblock]`.
    """
    m, k = xq.shape
    n = wv.shape[0]
    nb = k // kblock
    xs = xq.reshape(m, nb, kblock).transpose(1, 0, 2)
    ws = wv.reshape(n, nb, kblock).transpose(1, 0, 2)

    def step(acc, blk):
        xb, wb, sxb, swb = blk
        part = jnp.dot(xb, wb.T, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
        return acc + part * (sxb[:, None] * swb[None, :]), None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32), (xs, ws, sx.T, sw.T))
    return acc


def _flatten(x):
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def fp8_linear(x: jax.Array, w: jax.Array, s: jax.Array, opts: Opts) -> jax.Array:
    """`y = x @ W.T` for an FP8 block-scaled weight.

    Args:
      x: `[..., K]` bf16.  w: `[N, K]` float8_e4m3fn.  s: `[ceil(N/128), ceil(K/128)]` float8_e8m0fnu.
    Returns:
      `[..., N]` bf16.
    """
    if (kern := _kernel("fp8_gemm", opts)) is not None and opts.quant_sim:
        return kern(x, w, s)
    x2, lead = _flatten(x)
    n, k = w.shape
    if not opts.quant_sim:
        y = jnp.dot(x2.astype(jnp.float32), quant.dequant_fp8_weight(w, s).T, precision="highest")
        return to_bf16(y).reshape(*lead, n)
    xq, sx = quant.act_quant(x2, 128)
    sw = jnp.repeat(quant.e8m0_to_f32(s), 128, axis=0)[:n]
    y = _blockwise_gemm(quant.e4m3_to_f32(xq), sx, quant.e4m3_to_f32(w), sw, 128)
    return to_bf16(y).reshape(*lead, n)


def fp4_linear(x: jax.Array, w: jax.Array, s: jax.Array, opts: Opts) -> jax.Array:
    """`y = x @ W.T` for an MXFP4 weight (packed e2m1 `[N, K/2]` uint8, e8m0 scales `[N, K/32]`); `[..., N]` bf16."""
    x2, lead = _flatten(x)
    n = w.shape[0]
    if not opts.quant_sim:
        y = jnp.dot(x2.astype(jnp.float32), quant.dequant_fp4_weight(w, s).T, precision="highest")
        return to_bf16(y).reshape(*lead, n)
    xq, sx = quant.act_quant(x2, 128)
    sx32 = jnp.repeat(sx, 4, axis=-1)  # one activation scale per 128 = four 32-wide weight blocks
    y = _blockwise_gemm(quant.e4m3_to_f32(xq), sx32, quant.unpack_fp4(w), quant.e8m0_to_f32(s), 32)
    return to_bf16(y).reshape(*lead, n)


def expert_linear(x: jax.Array, w: jax.Array, s: jax.Array, opts: Opts) -> jax.Array:
    """A routed expert's linear: MXFP4 if `w` is packed uint8, FP8 (128x128 scales) if it is float8_e4m3fn."""
    if w.dtype == jnp.uint8:
        return fp4_linear(x, w, s, opts)
    return fp8_linear(x, w, s, opts)


def bf16_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """bf16 weight: fp32 accumulation, bf16 output (torch `F.linear` on bf16)."""
    y = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32).T, precision="highest")
    return to_bf16(y)


def f32_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """fp32 linear of the fp32 copy of a (bf16-stored) weight: compressor, MoE gate, lm_head."""
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32).T, precision="highest")
