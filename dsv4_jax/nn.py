"""Small building blocks: parameters with logical axes, RMSNorm, linear layers by storage format, RoPE, Hadamard.

Parameters are created in their storage format (FP8 + UE8M0 scales, bf16, fp32) and carry `logical_axes` metadata,
which `dsv4_jax.sharding` maps to mesh axes. Random values are only for `init_random`; real weights come from a
checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax import ops, quant
from dsv4_jax.options import Opts
from dsv4_jax.rounding import cast

__all__ = [
    "param",
    "RMSNorm",
    "Fp8Linear",
    "Bf16Linear",
    "rms_norm",
    "rope_inv_freq",
    "apply_rope",
    "hadamard_128",
]

BF16 = jnp.bfloat16
F32 = jnp.float32


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match the shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(axes))


def normal(rngs, shape, std: float, dtype=F32) -> jax.Array:
    """Random init values: a fresh normal draw per call, or the next slice of a `NormalPool`."""
    if isinstance(rngs, NormalPool):
        return (rngs.take(shape) * std).astype(dtype)
    return (jax.random.normal(rngs.params(), shape, F32) * std).astype(dtype)


class NormalPool:
    """Stands in for `nnx.Rngs` at init: `normal` takes consecutive slices of one normal draw of `size` values,
    `params()` gives fresh keys. One draw instead of one per parameter: XLA compiles a kernel per draw (~0.3 s each
    on a CPU), which made a tiny model's init take ~40 s to compile. `size=None` only counts (run it under
    `jax.eval_shape` first, see `pooled`)."""

    def __init__(self, key, size: int | None = None):
        self.key, self.size, self.used, self.keys = key, size, 0, 0
        self.buf = None if size is None else jax.random.normal(jax.random.fold_in(key, 0), (max(size, 1),), F32)

    def take(self, shape) -> jax.Array:
        n = int(np.prod(shape, dtype=np.int64))
        start, self.used = self.used, self.used + n
        if self.buf is None:
            return jnp.zeros(shape, F32)
        return jax.lax.slice(self.buf, (start,), (start + n,)).reshape(shape)

    def params(self) -> jax.Array:
        self.keys += 1
        return jax.random.fold_in(self.key, self.keys)


# Above this many values per module, pooling would hold one huge fp32 draw (a full-size block: ~7 G values);
# draw per parameter instead.
POOL_MAX = 1 << 26


def pooled(make, key):
    """`make(rngs)` with a `NormalPool` sized by a counting pass (or per-parameter draws past `POOL_MAX`)."""
    counter = NormalPool(key)
    jax.eval_shape(lambda: nnx.state(make(counter)))
    if counter.used > POOL_MAX:
        return make(nnx.Rngs(key))
    return make(NormalPool(key, counter.used))


# ---- norms -----------------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """`(w_f32 * (x_f32 * rsqrt(mean(x_f32^2) + eps))).astype(x.dtype)`: the weight multiply is in fp32 before the
    cast (the official order; HF casts first)."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + F32(eps))
    return cast(w.astype(F32) * y, x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis: str | None = "embed", *, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), BF16), (axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


# ---- linear layers ---------------------------------------------------------------------------------------------


# How quantized weights are initialised: "normal" (normal draws, quantized: a well-behaved random model) or "bytes"
# (random bytes in the storage format with block scales chosen for the same standard deviation: no fp32 copy, no
# quantization pass; what a speed run of a full-size model needs). Set with `init_values(...)`.
_INIT = contextvars.ContextVar("dsv4_jax_init_values", default="normal")


@contextlib.contextmanager
def init_values(kind: str):
    if kind not in ("normal", "bytes"):
        raise ValueError(f"init values {kind!r}: expected 'normal' or 'bytes'")
    token = _INIT.set(kind)
    try:
        yield
    finally:
        _INIT.reset(token)


def init_kind() -> str:
    """The kind of init values in effect ("normal" or "bytes", see `init_values`)."""
    return _INIT.get()


def _pow2_scale_bytes(shape, std_target: float, value_std: float) -> jax.Array:
    """UE8M0 bytes of the power of two closest to `std_target / value_std`, for every block."""
    e = int(round(math.log2(std_target / value_std)))
    return jax.lax.bitcast_convert_type(jnp.full(shape, 127 + e, jnp.uint8), jnp.float8_e8m0fnu)


_HASH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C)


def _random_bytes(key, shape) -> jax.Array:
    """Pseudo-random uint8 `shape`: an integer hash of each element's coordinates and a seed drawn from `key`. One
    elementwise pass writing the bytes in place (no uint32 draw to hold, which XLA keeps alive for every parameter
    at once: as much again as the weights), and a sharded output computes only its own shards. Random enough for
    weights of a speed run, not for statistics."""
    seed = jax.random.bits(key, (), jnp.uint32)
    h = jnp.broadcast_to(seed, shape)
    for d, mult in zip(range(len(shape)), _HASH_MULTIPLIERS * 2, strict=False):
        h = h ^ (jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(mult))
        h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)  # a round of a 32-bit integer mixer per coordinate
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    return (h ^ (h >> 16)).astype(jnp.uint8)


def quantized_weight(rngs, shape, std: float, fmt: str) -> tuple[jax.Array, jax.Array]:
    """A random weight `[..., N, K]` in storage format `fmt` ("fp8": e4m3 + 128x128 UE8M0 scales, "fp4": packed e2m1
    + 1x32 UE8M0 scales) with standard deviation about `std`."""
    *lead, n, k = shape
    if _INIT.get() == "normal":
        w = normal(rngs, shape, std)
        return quant.quantize_fp4_weight(w) if fmt == "fp4" else quant.quantize_fp8_weight(w)
    key = rngs.params()
    if fmt == "fp4":  # uniform e2m1 codes: std of the values ~2.9
        w = _random_bytes(key, (*lead, n, k // 2))
        return w, _pow2_scale_bytes((*lead, n, k // 32), std, 2.93)
    # sign + exponent 2^0 + random mantissa: values +-[1, 1.875], std ~1.45
    b = _random_bytes(key, tuple(shape))
    w = jax.lax.bitcast_convert_type((b & 0x87) | 0x38, jnp.float8_e4m3fn)
    return w, _pow2_scale_bytes((*lead, -(-n // 128), -(-k // 128)), std, 1.45)


class Fp8Linear(nnx.Module):
    """FP8 e4m3 weight `[out, in]` with UE8M0 128x128 block scales `[ceil(out/128), ceil(in/128)]`."""

    def __init__(self, in_features: int, out_features: int, axes: tuple, *, rngs: nnx.Rngs, std: float | None = None):
        std = in_features**-0.5 if std is None else std
        w, s = quantized_weight(rngs, (out_features, in_features), std, "fp8")
        self.weight = param(w, axes)
        self.scale = param(s, axes)

    def __call__(self, x: jax.Array, opts: Opts) -> jax.Array:
        # get_value(): inside the layer scan a LayerSlice, which the kernels take as (stack, layer) without a copy.
        return ops.fp8_linear(x, self.weight.get_value(), self.scale.get_value(), opts=opts)


def fp8_linear_pair(x: jax.Array, a: Fp8Linear, b: Fp8Linear, opts: Opts) -> tuple[jax.Array, jax.Array]:
    """`(a(x), b(x))` for two FP8 linears one input feeds, as one op (`ops.fp8_linear_pair`: one kernel launch where
    the weights allow)."""
    return ops.fp8_linear_pair(x, a.weight.get_value(), a.scale.get_value(), b.weight.get_value(),
                               b.scale.get_value(), opts=opts)  # fmt: skip


class Bf16Linear(nnx.Module):
    """A bf16-stored weight `[out, in]`, applied in bf16 (`fp32=False`) or as its fp32 copy on fp32 input."""

    def __init__(self, in_features: int, out_features: int, axes: tuple, *, rngs: nnx.Rngs, std: float | None = None):
        std = in_features**-0.5 if std is None else std
        self.weight = param(normal(rngs, (out_features, in_features), std, BF16), axes)

    def __call__(self, x: jax.Array, fp32: bool = False) -> jax.Array:
        return ops.f32_linear(x, self.weight[...]) if fp32 else ops.bf16_linear(x, self.weight[...])


# ---- RoPE ------------------------------------------------------------------------------------------------------


@functools.cache
def rope_inv_freq(dim: int, base: float, original_seq_len: int, factor: float, beta_fast: int, beta_slow: int):
    """Inverse frequencies `[dim/2]` float32; YaRN-blended when `original_seq_len > 0` (compressed layers only).
    No mscale."""
    inv = (np.float32(1.0) / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(
        np.float32
    )
    if original_seq_len > 0:

        def corr_dim(rot):
            return dim * math.log(original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        smooth = (np.float32(1) - ramp).astype(np.float32)
        inv = (inv / np.float32(factor) * (np.float32(1) - smooth) + inv * smooth).astype(np.float32)
    return inv


def layer_inv_freq(cfg, ratio: int) -> np.ndarray:
    """The RoPE table of a layer: theta 160000 + YaRN if compressed (ratio > 0), else plain theta 10000."""
    if ratio:
        return rope_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.original_seq_len, cfg.rope_factor,
                             cfg.beta_fast, cfg.beta_slow)  # fmt: skip
    return rope_inv_freq(cfg.rope_head_dim, cfg.rope_theta, 0, 1.0, 0, 0)


def apply_rope(x: jax.Array, pos: jax.Array, inv_freq: np.ndarray, inverse: bool = False) -> jax.Array:
    """Rotates interleaved pairs `(x[2i], x[2i+1])` of the last axis by `pos * inv_freq[i]` (conjugate if `inverse`).

    Args:
      x: `[..., 2 * len(inv_freq)]`; pos: integer positions broadcastable to `x.shape[:-1]`.
    Returns the rotated `x` in its dtype; the arithmetic is fp32 (complex multiply of the official code).
    """
    ang = pos.astype(F32)[..., None] * jnp.asarray(inv_freq)
    c, s = jnp.cos(ang), jnp.sin(ang)
    if inverse:
        s = -s
    xf = x.astype(F32)
    a, b = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(x.shape)
    return cast(out, x.dtype)


def rope_tail(x: jax.Array, pos: jax.Array, inv_freq: np.ndarray, inverse: bool = False) -> jax.Array:
    """RoPE on the last `2 * len(inv_freq)` dims of `x`; the leading dims pass through."""
    r = 2 * len(inv_freq)
    return jnp.concatenate([x[..., :-r], apply_rope(x[..., -r:], pos, inv_freq, inverse)], axis=-1)


# ---- Hadamard --------------------------------------------------------------------------------------------------


@functools.cache
def _hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_128(x: jax.Array) -> jax.Array:
    """`(x @ H_128) * 128**-0.5` (Sylvester order) in fp32, rounded once to `x.dtype`."""
    h = jnp.asarray(_hadamard(x.shape[-1]))
    y = jnp.dot(x.astype(F32), h, precision="highest") * F32(x.shape[-1] ** -0.5)
    return cast(y, x.dtype)
