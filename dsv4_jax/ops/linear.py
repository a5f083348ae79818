"""The linear layers of DeepSeek-V4 by weight format, with the official numerics (spec §2.2).

Reference numerics of an FP8/FP4 linear: the activation is quantized per token to FP8 in 1x128 blocks with
power-of-two scales; the GEMM accumulates fp32 partial sums per K block (128 for FP8 weights, 32 for FP4 weights),
scales each by `s_act * s_w` and adds them in K order; the result is rounded to bf16 once. `quant_sim=False` is the
exact-arithmetic model: fp32 product of the dequantized operands, rounded to bf16.

Weights may be `LayerSlice`s (one layer of a stacked parameter, `dsv4_jax.layer_view`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import quant
from dsv4_jax.layer_view import materialize
from dsv4_jax.ops import registry
from dsv4_jax.rounding import to_bf16

__all__ = ["fp8_linear", "fp8_linear_pair", "fp4_linear", "bf16_linear", "f32_linear", "grouped_dequant_linear",
           "blockwise_gemm", "sum_in_order"]  # fmt: skip

F32 = jnp.float32


def blockwise_gemm(xq, sx, wv, sw, kblock: int) -> jax.Array:
    """`sum_b (xq_b @ wv_b.T) * sx_b[:, None] * sw_b[None, :]`, blocks of `kblock` along K summed in K order.

    xq: f32 `[M, K]` (FP8 values), sx: f32 `[M, K/kblock]`; wv: f32 `[N, K]` (unscaled values), sw: f32 `[N, K/kblock]`.
    """
    m, k = xq.shape
    n = wv.shape[0]
    nb = k // kblock
    xs = xq.reshape(m, nb, kblock).transpose(1, 0, 2)
    ws = wv.reshape(n, nb, kblock).transpose(1, 0, 2)

    def step(acc, blk):
        xb, wb, sxb, swb = blk
        part = jnp.dot(xb, wb.T, preferred_element_type=F32, precision=jax.lax.Precision.HIGHEST)
        return acc + part * (sxb[:, None] * swb[None, :]), None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n), F32), (xs, ws, sx.T, sw.T))
    return acc


def sum_in_order(parts: jax.Array) -> jax.Array:
    """`((0 + p[..., 0]) + p[..., 1]) + ...` over the last axis, strictly in index order (K order): the same
    additions as the `blockwise_gemm` scan. `jnp.sum` leaves the order to XLA (a tree on GPU)."""
    acc = parts[..., 0]
    for b in range(1, parts.shape[-1]):
        acc = acc + parts[..., b]
    return acc


def _flatten(x):
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def _fp8_linear_reference(x, w, s, *, quant_sim: bool) -> jax.Array:
    """`y = x @ W.T` for an FP8 block-scaled weight.

    Args:
      x: `[..., K]` bf16.  w: `[N, K]` float8_e4m3fn.  s: `[ceil(N/128), ceil(K/128)]` float8_e8m0fnu (or the f32
        powers of two `dsv4_jax.prepare_params` decodes them to).
    Returns:
      `[..., N]` bf16.
    """
    w, s = materialize(w), materialize(s)
    x2, lead = _flatten(x)
    n, k = w.shape
    if not quant_sim:
        y = jnp.dot(x2.astype(F32), quant.dequant_fp8_weight(w, s).T, precision="highest")
        return to_bf16(y).reshape(*lead, n)
    xq, sx = quant.act_quant(x2, 128)
    sw = jnp.repeat(quant.e8m0_to_f32(s), 128, axis=0)[:n]
    y = blockwise_gemm(quant.e4m3_to_f32(xq), sx, quant.e4m3_to_f32(w), sw, 128)
    return to_bf16(y).reshape(*lead, n)


def _fp8_linear_supports(x, w, s, *, quant_sim: bool) -> str | None:
    if not quant_sim:
        return "the kernels implement the quant_sim numerics only"
    from dsv4_jax.kernels import gemm

    return gemm.fp8_linear_unsupported(x, w, s)


fp8_linear = registry.register(
    "fp8_linear", _fp8_linear_reference, kernel="dsv4_jax.kernels.gemm:fp8_linear", supports=_fp8_linear_supports
)


def _fp8_linear_pair_reference(x, w1, s1, w2, s2, *, quant_sim: bool) -> tuple[jax.Array, jax.Array]:
    """`(fp8_linear(x, w1, s1), fp8_linear(x, w2, s2))`: two FP8 weights one input feeds (wq_a and wkv; wq_b and the
    indexer's wq_b; the shared expert's w1 and w3). One op so that a kernel can read both in one launch."""
    return (_fp8_linear_reference(x, w1, s1, quant_sim=quant_sim),
            _fp8_linear_reference(x, w2, s2, quant_sim=quant_sim))  # fmt: skip


def _fp8_linear_pair_supports(x, w1, s1, w2, s2, *, quant_sim: bool) -> str | None:
    first = _fp8_linear_supports(x, w1, s1, quant_sim=quant_sim)
    return first or _fp8_linear_supports(x, w2, s2, quant_sim=quant_sim)


fp8_linear_pair = registry.register(
    "fp8_linear_pair",
    _fp8_linear_pair_reference,
    kernel="dsv4_jax.kernels.gemm:fp8_linear_pair",
    supports=_fp8_linear_pair_supports,
)


def _grouped_dequant_linear_reference(x, w, s, *, quant_sim: bool = True) -> jax.Array:
    """The grouped low-rank output projection `wo_a` as the reference runs it: the FP8 weight dequantised to bf16
    (f32 `e4m3 * scale`, rounded), a bf16 einsum with fp32 accumulation, bf16 out (no FP8 activation quantisation,
    so `quant_sim` changes nothing).

    Args:
      x: `[..., G, I]` bf16 (G groups).  w: `[G * R, I]` float8_e4m3fn, rows `g*R .. (g+1)*R - 1` of group g.
        s: its block scales `[G * R / 128, I / 128]` (e8m0 or f32).
    Returns:
      `[..., G, R]` bf16.
    """
    del quant_sim
    g, i = x.shape[-2:]
    wv = to_bf16(quant.dequant_fp8_weight(materialize(w), materialize(s))).reshape(g, -1, i)
    # bf16 x bf16 products are exact in fp32: the reference's fp32 einsum, on the tensor cores.
    return to_bf16(jnp.einsum("...gi,gri->...gr", x, wv, preferred_element_type=F32))


def _grouped_dequant_linear_supports(x, w, s, *, quant_sim: bool = True) -> str | None:
    from dsv4_jax.kernels import dequant

    return dequant.grouped_dequant_linear_unsupported(x, w, s)


grouped_dequant_linear = registry.register(
    "grouped_dequant_linear",
    _grouped_dequant_linear_reference,
    kernel="dsv4_jax.kernels.dequant:grouped_dequant_linear",
    supports=_grouped_dequant_linear_supports,
)


def fp4_linear(x: jax.Array, w, s, *, quant_sim: bool = True) -> jax.Array:
    """`y = x @ W.T` for an MXFP4 weight (packed e2m1 `[N, K/2]` uint8, e8m0 scales `[N, K/32]`); `[..., N]` bf16.
    Reference only: the routed experts, the one MXFP4 user, run through `dsv4_jax.ops.moe_experts`."""
    w, s = materialize(w), materialize(s)
    x2, lead = _flatten(x)
    n = w.shape[0]
    if not quant_sim:
        y = jnp.dot(x2.astype(F32), quant.dequant_fp4_weight(w, s).T, precision="highest")
        return to_bf16(y).reshape(*lead, n)
    xq, sx = quant.act_quant(x2, 128)
    sx32 = jnp.repeat(sx, 4, axis=-1)  # one activation scale per 128 = four 32-wide weight blocks
    y = blockwise_gemm(quant.e4m3_to_f32(xq), sx32, quant.unpack_fp4(w), quant.e8m0_to_f32(s), 32)
    return to_bf16(y).reshape(*lead, n)


def bf16_linear(x: jax.Array, w) -> jax.Array:
    """bf16 weight: fp32 accumulation, bf16 output (torch `F.linear` on bf16)."""
    y = jnp.dot(x.astype(F32), materialize(w).astype(F32).T, precision="highest")
    return to_bf16(y)


def f32_linear(x: jax.Array, w) -> jax.Array:
    """The reference's fp32 linear of a bf16-stored weight (compressor, MoE gate, lm_head) -> f32.

    When `x` holds bf16 values (bf16 dtype), the operands stay bf16 with fp32 accumulation: bf16 x bf16 products are
    exact in fp32, so this is the same arithmetic as the fp32 product of the upcast operands (up to summation order),
    and it runs on the tensor cores instead of as an fp32 "highest" dot."""
    w = materialize(w)
    if x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16:
        return jnp.dot(x, w.T, preferred_element_type=F32)
    return jnp.dot(x.astype(F32), w.astype(F32).T, precision="highest")
