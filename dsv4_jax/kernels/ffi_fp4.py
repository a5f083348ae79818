"""JAX wrappers of the MXFP4 routed experts' CUDA kernels (the released expert format: packed e2m1 + UE8M0 per 32):
the decode GEMVs (`fp4_gemv`, `fp4_moe_gate_up`, `fp4_moe_down`), the prefill widening (`fp4_widen`) and the one-pass
prefill kernel (`fp4_grouped`). Part of `ffi_ops` (which re-exports them and lists their targets in `HANDLERS`); the
shared helpers come from there."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kernels.ffi_ops import BF16, E4M3, F32, _layer_operand

# ---- MXFP4 GEMV (decode: routed experts as released) -----------------------------------------------------------

# Most output rows (pairs) that share one pass over an expert's weights (the extension's `fp4_segment_rows`).
FP4_SEGMENT_ROWS = 8
# The MXFP4 kernel variants (`variant=` of the fp4 wrappers; None: DSV4_FFI_FP4_VARIANT at launch, default "wgb"):
# "wgb" (the fastest: one FP8 wgmma k32 step per 32-wide weight block, from zero, its partial scaled in fp32; the
# reference's numerics except that the FP8 tensor core sums a block's 32 exact products with a 13-bit mantissa: ~4e-4
# rel-RMS in h against "ring", ~97% of h bit-identical), "wg" wgmma on f16 operands (e2m1 widened and pre-scaled in
# registers, fp32 accumulation: the reference's numerics up to summation order), "ring" the first design (per-warp
# cp.async ring + ldmatrix, one mma per 32-wide block; the same numerics), "wg8" wgmma on FP8 operands, pre-scaled per
# 128-wide chunk (its FP8 accumulator sums four blocks: ~1e-3 off; opt-in, for measurements).
FP4_VARIANTS = ("wg", "wg8", "wgb", "ring")


def _sfx(variant: str | None) -> str:
    """The FFI target suffix of an MXFP4 kernel variant ("" for None: the variant is chosen at launch)."""
    if variant is None:
        return ""
    if variant not in FP4_VARIANTS:
        raise ValueError(f"MXFP4 kernel variant {variant!r} is not one of {FP4_VARIANTS}")
    return "_" + variant


def _e8m0_bytes(name: str, s: jax.Array) -> jax.Array:
    if s.dtype not in (jnp.uint8, jnp.float8_e8m0fnu):
        raise TypeError(f"{name}: MXFP4 scales must be float8_e8m0fnu or their uint8 bytes, got {s.dtype}")
    return s


def _scale_operand(name: str, s: jax.Array) -> jax.Array:
    """MXFP4 scales as the handlers take them: uint32 words of the slab layout (`quant.fp4_to_slabs`) as they are,
    else e8m0 bytes (checked)."""
    return s if s.dtype == jnp.uint32 else _e8m0_bytes(name, s)


def _fp4_weight(name: str, w: jax.Array, s: jax.Array, grouped: bool) -> jax.Array:
    """The scales to pass with an MXFP4 weight: e8m0 bytes `[(E,) N, K/32]`, or uint32 words `[(E,) N, K/128]` for
    the slab layout (`quant.fp4_to_slabs`; read by the wgb kernel on SM90, which the handler checks)."""
    if w.dtype != jnp.uint8:
        raise TypeError(f"{name}: the MXFP4 weight must be uint8 (packed e2m1), got {w.dtype}")
    per = 128 if s.dtype == jnp.uint32 else 32
    if w.ndim not in ((3,) if grouped else (2, 3)) or s.shape != (*w.shape[:-1], w.shape[-1] * 2 // per):
        want = "uint32 [(E,) N, K/128] (slabs)" if per == 128 else "[(E,) N, K/32]"
        raise ValueError(f"{name}: weight {w.shape} / scales {s.shape} are not [(E,) N, K/2] / {want}")
    return _scale_operand(name, s)


def _i32(v) -> jax.Array:
    return jnp.asarray(v).astype(jnp.int32)


def fp4_gemv(x: jax.Array, w: jax.Array, s: jax.Array, *, rows=None, groups=None, variant=None) -> jax.Array:
    """MXFP4 linear at decode sizes, one launch: `y[p] = bf16(act_quant(x[rows[p]]) . dequant(w[groups[p]]))` with
    the official numerics of `ops.fp4_linear` (FP8 e4m3 activations per 1x128 block with power-of-two scales, each
    32-wide K block's fp32 partial times `s_act * s_w` added in K order).

    `x` bf16 `[R, K]` (K a multiple of 128); `w` uint8 `[N, K/2]` or `[E, N, K/2]` (packed e2m1, low nibble = even
    element) with scales `s` float8_e8m0fnu (or uint8 bytes) `[(E,) N, K/32]`. `rows` int32 `[P]`: activation row
    of output row p (default p, then P = R); `groups` int32 `[P]`: expert of output row p (required for 3-D `w`).
    A negative or out-of-range row or group gives a zero output row. Consecutive output rows with the same group
    share one weight pass (up to `FP4_SEGMENT_ROWS`): sort rows by expert to get that. `variant`: one of
    `FP4_VARIANTS` (None: DSV4_FFI_FP4_VARIANT at launch, default "wgb"). Returns bf16 `[P, N]`."""
    s = _fp4_weight("fp4_gemv", w, s, grouped=False)
    if w.ndim == 3 and groups is None:
        raise ValueError("fp4_gemv: a grouped weight [E, N, K/2] needs `groups` (the expert of every output row)")
    p = x.shape[0] if rows is None and groups is None else (rows if rows is not None else groups).shape[0]
    empty = jnp.zeros((0,), jnp.int32)
    rows = empty if rows is None else _i32(rows)
    groups = empty if groups is None else _i32(groups)
    return jax.ffi.ffi_call("dsv4_fp4_gemv" + _sfx(variant), jax.ShapeDtypeStruct((p, w.shape[-2]), BF16))(
        x.astype(BF16), rows, groups, w, s
    )


def fp4_moe_gate_up(x, rows, groups, route_w, w1, s1, w3, s3, limit: float, *, variant=None) -> jax.Array:
    """Gate and up projections of the MXFP4 routed experts for a decode step, fused with the clamped SwiGLU and the
    routing weight, in one launch (both weights read once):

        h[p] = bf16(route_w[p] * silu(min(g, L)) * clip(u, -L, L)),
        g = f32(bf16(fp4_linear(x[rows[p]], w1[e], s1[e]))), u = the same with w3, s3; e = groups[p]

    exactly the reference's rounding points (`moe.Experts`: each linear's output rounded to bf16, SwiGLU in fp32,
    times the weight, one bf16 rounding); L = `limit` (0: no clamp). The FP8 activation quantization of x happens
    inside the kernel.

    `x` bf16 `[T, K]` token rows; `rows`, `groups` int32 `[P]`: token and expert of each (token, expert) pair;
    `route_w` f32 `[P]`; `w1`, `w3` uint8 `[E, I, K/2]` with scales float8_e8m0fnu (or uint8) `[E, I, K/32]`, or
    both in the slab layout (uint32 scales `[E, I, K/128]`, `quant.fp4_to_slabs`: the wgb kernel on SM90 only).
    A pair with an expert < 0 or >= E (or a token out of range) gets a zero row. Pairs sorted by expert share a
    weight pass (up to `FP4_SEGMENT_ROWS` of them). `variant`: as for `fp4_gemv`. Returns bf16 `[P, I]`."""
    s1 = _fp4_weight("fp4_moe_gate_up", w1, s1, grouped=True)
    s3 = _fp4_weight("fp4_moe_gate_up", w3, s3, grouped=True)
    if w1.shape != w3.shape:
        raise ValueError(f"fp4_moe_gate_up: w1 {w1.shape} and w3 {w3.shape} differ")
    p = groups.shape[0]
    return jax.ffi.ffi_call("dsv4_fp4_moe_gate_up" + _sfx(variant), jax.ShapeDtypeStruct((p, w1.shape[1]), BF16))(
        x.astype(BF16), _i32(rows), _i32(groups), route_w.astype(F32), w1, s1, w3, s3, limit=np.float32(limit)
    )


def fp4_moe_down(h, groups, w2, s2, *, tokens: int | None = None, variant=None) -> jax.Array:
    """Down projection of the MXFP4 routed experts for a decode step, one launch: `y[p] = bf16(fp4_linear(h[p],
    w2[e], s2[e]))`, e = groups[p] (h quantized to FP8 per 1x128 inside the kernel, as `quant.act_quant` would).

    `h` bf16 `[P, I]` (the output of `fp4_moe_gate_up`); `groups` int32 `[P]`; `w2` uint8 `[E, D, I/2]` with scales
    float8_e8m0fnu (or uint8) `[E, D, I/32]`. An expert < 0 or >= E gives a zero row. `tokens`: the step's token
    count if known (at most that many pairs share an expert: it only sizes the launch; 1 picks the one-token
    kernel). `variant`: as for `fp4_gemv`. Returns bf16 `[P, D]`."""
    s2 = _fp4_weight("fp4_moe_down", w2, s2, grouped=True)
    p = h.shape[0]
    return jax.ffi.ffi_call("dsv4_fp4_moe_down" + _sfx(variant), jax.ShapeDtypeStruct((p, w2.shape[1]), BF16))(
        h.astype(BF16), _i32(groups), w2, s2, tokens=np.int64(tokens or 0)
    )


def fp4_widen(w: jax.Array, s: jax.Array, layer=None) -> tuple[jax.Array, jax.Array]:
    """Our kernel of `quant.fp4_to_fp8_blocks`: MXFP4 experts `w` uint8 `[E, N, K/2]` with scales `[E, N, K/32]` ->
    (e4m3 `[E, N, K]`, f32 tile scales `[E, N/128, K/128]`), bit for bit. With `layer` (an int32 scalar, on the
    device) `w` and `s` are a layer stack `[L, E, ...]` whose layer `layer` is read in place (no slice copied out).
    Weights in the slab layout (uint32 scales `[E, N, K/128]`, `quant.fp4_to_slabs`) give the same result."""
    stacked = layer is not None
    if w.dtype != jnp.uint8 or w.ndim != (4 if stacked else 3):
        want = "[L, E, N, K/2] (with a layer index)" if stacked else "[E, N, K/2]"
        raise ValueError(f"fp4_widen: weight {w.dtype}{list(w.shape)} is not uint8 {want}")
    per = 128 if s.dtype == jnp.uint32 else 32  # uint32 words: the slab layout (`quant.fp4_to_slabs`)
    if s.shape != (*w.shape[:-1], w.shape[-1] * 2 // per):
        want = "uint32 [..., N, K/128]" if per == 128 else "[..., N, K/32]"
        raise ValueError(f"fp4_widen: scales {s.shape} do not match the weight {w.shape} ({want})")
    *_, e, n, half_k = w.shape
    k = 2 * half_k
    if n % 128 or k % 128:
        raise ValueError(f"fp4_widen: N={n} and K={k} must be multiples of 128")
    idx = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)) if stacked else jnp.zeros((0,), jnp.int32)
    return jax.ffi.ffi_call(
        "dsv4_fp4_widen",
        (jax.ShapeDtypeStruct((e, n, k), E4M3), jax.ShapeDtypeStruct((e, n // 128, k // 128), F32)),
    )(w, _scale_operand("fp4_widen", s), idx)


def fp4_grouped(q, sfa, group_sizes, weights, layer=None) -> tuple[jax.Array, ...]:
    """The MXFP4 experts at prefill sizes without an FP8 copy of them (`dsv4_fp4_grouped`, one launch for one or two
    projections of one shape): rows of `q` (e4m3 `[R, K]` in the wgmma order, with `sfa` `[1, K/128, P]`:
    `act_quant_rows(..., wgmma=True)`) sorted by expert, `group_sizes` int32 `[E]` rows per expert from row 0 (later
    rows: zeros); `weights` one or two `(w, s)`: uint8 `[E, N, K/2]` with scales `[E, N, K/32]` (or uint32 slab words
    `[E, N, K/128]`), or stacks `[L, E, ...]` read at `layer` in place. Returns bf16 `[R, N]` per weight."""
    if len(weights) not in (1, 2):
        raise ValueError(f"fp4_grouped: one or two (weight, scales) pairs, got {len(weights)}")
    ops = []
    for w, s in weights:
        if w.dtype != jnp.uint8 or w.ndim != (3 if layer is None else 4):
            raise ValueError(f"fp4_grouped: weight {w.dtype}{list(w.shape)} is not uint8 [(L,) E, N, K/2]")
        ops += [w, _scale_operand("fp4_grouped", s)]
    n = weights[0][0].shape[-2]
    out = jax.ShapeDtypeStruct((q.shape[0], n), BF16)
    args = (q, sfa, _i32(group_sizes), *ops, _layer_operand(layer))
    if len(weights) == 1:
        return (jax.ffi.ffi_call("dsv4_fp4_grouped", out)(*args),)
    return tuple(jax.ffi.ffi_call("dsv4_fp4_grouped_pair", (out, out))(*args))
