"""GPU tests of the MXFP4 decode kernels: `dsv4_fp4_moe_gate_up` (gate + up projections fused with the clamped
SwiGLU and the routing weight), `dsv4_fp4_moe_down` and the plain `dsv4_fp4_gemv` (`ffi/csrc/fp4_gemv_kernels.cu`).

Run on the device after building the extension: `pytest -m gpu tests/test_fp4_kernels_gpu.py -v` (skipped without a
GPU by conftest). Conventions of tests/test_kernels_gpu.py: fresh random inputs per case, device memory poisoned
(0xFF = NaN) before every kernel call so that an element the kernel fails to write shows, float64 host references
built from the same FP8-quantized activations (`quant.act_quant` on the CPU) and the exact dequantized MXFP4
weights (the values of `quant.dequant_fp4_weight`, in float64).

Bounds and why:
  * One MXFP4 linear (`fp4_gemv`, the down projection): rel-RMS <= 2e-3 against float64. The kernel multiplies the
    same FP8 and e2m1 operands exactly, sums 32 products per mma in the tensor core, scales each partial by
    s_act * s_w (a power of two: exact) into fp32 and rounds to bf16 once; bf16's worst single rounding is
    2^-9 ~ 2e-3 relative, its RMS is far below.
  * Identity-like weights (one e2m1 1.0 per row, random scales): bit-exact. Each output is then one exact product
    of the kernel's own FP8 activation quantization, so this pins the quantization (bit-identical to
    `quant.act_quant`), the nibble order (low = even element), the K position of every element and the UE8M0
    decoding.
  * h (gate/up + SwiGLU + bf16): rel-RMS <= 1e-2 against the float64 reference rounded at the reference's points
    (g and u to bf16, SwiGLU in fp32 in the reference's order, times the routing weight, one bf16 rounding), and at
    least 90% of the elements bit-identical to it. What differs: g or u can land on the other side of a bf16
    rounding boundary (fp32 vs float64 summation) and expf can differ from numpy's exp by an ulp; each such element
    is off by about one bf16 ulp (2^-8 relative).
  * The fused gate/up kernel against two plain `fp4_gemv` launches (the same accumulation order) plus the SwiGLU in
    float32 numpy: >= 98% bit-identical, the rest within 2 bf16 ulps (expf vs numpy's exp only).
  * End to end (one routed-expert step, two launches) against composing the reference ops (`ops.fp4_linear` per pair
    and `moe.swiglu`): rel-RMS <= 1e-2 for h and y (the down projection re-quantizes h to FP8, where one bf16 ulp
    of h moves an e4m3 rounding by one step).
Pairs with an expert < 0 or >= E, or a token out of range, must come back as exact zeros.

Kernel variants (`variant=` of the wrappers, DSV4_FFI_FP4_VARIANT for the unsuffixed targets): every test runs each
variant on the same inputs. "ring" and "wg" are held to the bounds above, and so is "wgb" (the default: one FP8 wgmma
k32 step per 32-wide block, so its FP8 accumulator sums one block's 32 products only). "wg8" (FP8 wgmma) is not the
reference's numerics: Hopper's FP8 tensor cores keep 13 mantissa bits of the accumulator, about 1e-4 relative on g/u,
which moves ~10% of the bf16 roundings of h by one ulp; it must still be bit-exact where a single product is summed
(identity weights) and within the per-linear rel-RMS bound, and its bit-identical fractions are checked looser
(`BIT_IDENTICAL_MIN`).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import poison, rel_rms  # the `ffi` fixture lives in conftest too

from dsv4_jax import quant

pytestmark = pytest.mark.gpu

E2M1 = quant.E2M1_VALUES.astype(np.float64)
BF16 = ml_dtypes.bfloat16
SMALL = dict(e=8, d=256, i=128)  # tiny-config widths: hidden (K of gate/up, N of down) and intermediate
FLASH = dict(e=256, d=4096, i=2048)
VARIANTS = ("wg", "wg8", "wgb", "ring")  # dsv4_jax.kernels.ffi_ops.FP4_VARIANTS
# Least fraction of h bit-identical to the float64 reference rounded at the reference's points (gate/up test), and of
# the fused launch bit-identical to two plain launches + numpy SwiGLU (same kernel family: expf vs exp only).
BIT_IDENTICAL_MIN = {"wg": 0.9, "ring": 0.9, "wg8": 0.75, "wgb": 0.9}


def check_close(got, want, bound: float, what: str) -> float:
    """Asserts rel-RMS(got, want) <= bound; on failure, says where the largest differences are."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite (unwritten?) elements"
    err = rel_rms(got, want)
    if not err <= bound:
        d = np.abs(got - want)
        worst = np.unravel_index(np.argsort(d, axis=None)[-5:], d.shape)
        rows_bad = np.nonzero(d.max(axis=-1) > 4 * bound * np.sqrt(np.mean(want**2)))[0]
        pytest.fail(
            f"{what}: rel-RMS {err:.3e} > {bound:.1e}; worst elements (index: got / want) "
            + ", ".join(
                f"{tuple(int(i) for i in ix)}: {got[ix]:.6g} / {want[ix]:.6g}" for ix in zip(*worst, strict=True)
            )
            + f"; rows far off: {rows_bad[:20].tolist()} of {got.shape[0]}"
        )
    return err


def seed(*parts) -> int:
    """A deterministic seed from the test parameters (Python's hash() of strings changes per process)."""
    return zlib.crc32(repr(parts).encode()) % 2**31


def rand_bf16(key, shape, scale: float = 1.0, spread: bool = False):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, shape, jnp.float32) * scale
    if spread:  # row magnitudes over many binades, some 128-blocks under the 1e-4 amax floor
        x = x * 10.0 ** jax.random.uniform(k2, shape[:-1] + (1,), minval=-7, maxval=3)
    return x.astype(jnp.bfloat16)


def rand_fp4_weight(key, shape, scale_bytes=(117, 125)):
    """Realistic MXFP4 weight for a logical `[..., N, K]`: packed uint8 `[..., N, K/2]` with every e2m1 code (either
    sign) equally likely in either nibble, and e8m0 scales `[..., N, K/32]` in 2^-10..2^-3 (|w| up to 0.75), drawn
    as bytes from uint32 random bits so that a 256-expert Flash projection stays 1 GiB on the device."""
    *lead, n, k = shape
    k1, k2 = jax.random.split(key)
    bits = jax.random.bits(k1, (*lead, n, k // 8), jnp.uint32)
    w = jax.lax.bitcast_convert_type(bits, jnp.uint8).reshape(*lead, n, k // 2)
    s = jax.random.randint(k2, (*lead, n, k // 32), scale_bytes[0], scale_bytes[1], jnp.int32).astype(jnp.uint8)
    return w, jax.lax.bitcast_convert_type(s, jnp.float8_e8m0fnu)


def dequant_host(w, s) -> np.ndarray:
    """float64 values of packed MXFP4 `[..., N, K/2]` with e8m0 scales `[..., N, K/32]` (= quant.dequant_fp4_weight)."""
    w = np.asarray(w)
    s = np.asarray(s).view(np.uint8).astype(np.float64)
    v = np.empty((*w.shape[:-1], 2 * w.shape[-1]), np.float64)
    v[..., 0::2] = E2M1[w & 15]
    v[..., 1::2] = E2M1[w >> 4]
    sc = np.where(s == 255, np.nan, np.exp2(s - 127))
    return v * np.repeat(sc, 32, axis=-1)


def act_quant_host(x) -> np.ndarray:
    """float64 values of the FP8 activation `quant.act_quant(x, 128)` computes on the CPU."""
    cpu = jax.devices("cpu")[0]
    xq, sx = jax.jit(quant.act_quant, static_argnums=1)(jax.device_put(x, cpu), 128)
    return np.asarray(xq.astype(jnp.float32), np.float64) * np.repeat(np.asarray(sx, np.float64), 128, axis=-1)


def ref_linear(xd, w, s, rows, groups) -> np.ndarray:
    """float64 `y[p] = xd[rows[p]] @ W[groups[p]].T` (zeros for invalid pairs), dequantizing only the experts used."""
    e_count = w.shape[0]
    out = np.zeros((len(rows), w.shape[-2]), np.float64)
    ok = (groups >= 0) & (groups < e_count) & (rows >= 0) & (rows < xd.shape[0])
    for e in np.unique(groups[ok]):
        sel = np.nonzero(ok & (groups == e))[0]
        out[sel] = xd[rows[sel]] @ dequant_host(w[int(e)], s[int(e)]).T
    return out


def routing(key, t: int, e: int, k: int, sort: bool = True):
    """Top-k distinct experts of t tokens as (token, expert) pairs; sorted by expert (pairs of one expert adjacent,
    so that they share a weight pass) or in token order."""
    idx = np.asarray(jnp.argsort(jax.random.uniform(key, (t, e)), axis=-1)[:, :k])
    rows = np.repeat(np.arange(t), k).astype(np.int32)
    groups = idx.reshape(-1).astype(np.int32)
    if sort:
        order = np.argsort(groups, kind="stable")
        rows, groups = rows[order], groups[order]
    return rows, groups


def swiglu_f32(g, u, w, limit: float) -> np.ndarray:
    """bf16(w * silu(min(g, L)) * clip(u, -L, L)) in float32 numpy, the reference's order (moe.swiglu)."""
    g, u, w = (np.asarray(a, np.float32) for a in (g, u, w))
    if limit > 0:
        u = np.clip(u, np.float32(-limit), np.float32(limit))
        g = np.minimum(g, np.float32(limit))
    act = g / (np.float32(1) + np.exp(-g))
    return (w[:, None] * (act * u)).astype(BF16)


def bf16_bits_equal(a, b) -> np.ndarray:
    return np.asarray(a, BF16).view(np.uint16) == np.asarray(b, BF16).view(np.uint16)


# ---- exactness of the data path: identity-like weights ------------------------------------------------------------


def identity_weight(n: int, k: int, perm: np.ndarray, rng: np.random.Generator, special_scales: bool = False):
    """Packed MXFP4 `[n, k/2]` with one nonzero element per row n, at element perm[n], of a random e2m1 code among
    +-0.5 (the code that is an e4m3 subnormal under DSV4_FFI_FP4_CVT=bits), +-1, 3, -6; random scale bytes 120..134
    (byte 0, i.e. 2^-127, in a few rows when special_scales). Returns (packed, scale bytes, value of the nonzero)."""
    code = rng.choice(np.array([1, 9, 2, 10, 5, 15], np.uint8), n)
    codes = np.zeros((n, k), np.uint8)
    codes[np.arange(n), perm] = code
    w = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    s = rng.integers(120, 135, (n, k // 32)).astype(np.uint8)
    if special_scales:
        s[::17, :] = 0
    return w, s, E2M1[code]


@pytest.mark.parametrize("variant", ["wg", "wg8", "wgb", "wgb-lut", "ring", "ring-bits"])
@pytest.mark.parametrize("n,k,m", [(256, 256, 1), (512, 4096, 5), (384, 2048, 13), (4096, 2048, 8)])
def test_fp4_gemv_identity_bit_exact(ffi, n, k, m, variant, monkeypatch):
    """Dense (2-D weight, no maps; M=13: a full and a partial 8-token pass): y[r, n] = bf16(xq[r, perm[n]] *
    v[n] * s_act * s_w) exactly. K=256: inputs of ordinary magnitude and a few rows with scale byte 0 (2^-127,
    products in the fp32 denormal range, still exact); otherwise row magnitudes over 10 binades. "wgb" (bit placement,
    its default) and "ring-bits" (DSV4_FFI_FP4_CVT=bits) make e2m1 0.5 an e4m3 subnormal, "wgb-lut" and the others use
    the table: a failure of the bit-placement cases alone means the FP8 tensor cores (wgb) or the e4m3 -> f16
    conversion (ring) flush subnormal inputs. Every variant sums one exact product per output here, so even wg8
    (13-bit FP8 accumulator) must be exact; a failure points at the layout (K order, nibble order, scales)."""
    if variant.endswith(("-bits", "-lut")):
        monkeypatch.setenv("DSV4_FFI_FP4_CVT", variant.split("-")[1])
    else:
        monkeypatch.delenv("DSV4_FFI_FP4_CVT", raising=False)
    kernel = variant.split("-")[0]
    rng = np.random.default_rng(n + k + m)
    perm = rng.permutation(k)[:n] if n <= k else rng.integers(0, k, n)
    w, s, v = identity_weight(n, k, perm, rng, special_scales=k == 256)
    x = rand_bf16(jax.random.key(n + k + m), (m, k), spread=k != 256)
    xd = act_quant_host(x)
    # + 0.0: an accumulator starting at +0 (the kernel's, and the reference's) turns an exact -0 product into +0
    want = (xd[:, perm] * v * np.exp2(s[np.arange(n), perm // 32].astype(np.float64) - 127) + 0.0).astype(BF16)
    poison()
    got = np.asarray(jax.jit(functools.partial(ffi.fp4_gemv, variant=kernel))(x, jnp.asarray(w), jnp.asarray(s)))
    assert got.shape == (m, n)
    same = bf16_bits_equal(got, want)
    if not same.all():
        r, c = np.nonzero(~same)
        pytest.fail(
            f"[{variant}] {np.count_nonzero(~same)} of {same.size} outputs differ from the exact product, e.g. "
            + ", ".join(
                f"(row {a}, col {b}: got {got[a, b]} want {want[a, b]})" for a, b in zip(r[:6], c[:6], strict=True)
            )
        )


@pytest.mark.parametrize("m", [1, 3, 8])
def test_fp4_gemv_scale_spans_bit_exact(ffi, m):
    """Per-32 scales spanning up to 80 binades inside one 128-wide chunk of a row, for every variant: identity-like
    weights (one nonzero per row) whose nonzero sits in a block 7, 8, 17, 18, 20, 30 or 60 binades above or below the
    other blocks of its chunk (or in a block with ordinary scale next to such a block). The wg variants fold the
    per-32 scales into the widened weights relative to a per-(row, chunk) base: wg exactly while byte_q - byte_0 is
    in [-17, 7], wg8 while the chunk spans <= 11 binades; other chunks take their exact per-block path. Either way
    y[r, n] = bf16(xq[r, perm[n]] * v[n] * s_act * s_w) exactly. Also a scale byte 255 (NaN) in another block of a
    row's chunk: that row is NaN (as the reference's 0 * NaN). M=1/3/8: 1, 4 and 8 tokens per weight pass (wg: 8, 2,
    1 K-slices)."""
    rng = np.random.default_rng(41 + m)
    n, k = 520, 1024  # N = 520: a partial last row tile
    perm = rng.permutation(k)[:n]
    code = rng.choice(np.array([1, 9, 2, 10, 5, 15], np.uint8), n)
    codes = np.zeros((n, k), np.uint8)
    codes[np.arange(n), perm] = code
    w = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    s = rng.integers(118, 123, (n, k // 32)).astype(np.int64)
    offsets = [0, 7, -7, 8, -17, -18, 20, -30, 60, -60]
    nan_rows = []
    for r in range(n):
        c, j = perm[r] // 128, (perm[r] % 128) // 32
        d = offsets[r % len(offsets)]
        s[r, 4 * c : 4 * c + 4] = 120
        if r % 3 == 0:  # the nonzero's block is the extreme one
            s[r, 4 * c + j] = 120 + d
        else:  # another block of the chunk is
            s[r, 4 * c + (j + 1 + r % 3) % 4] = 120 + d
        if r % 47 == 5:
            s[r, 4 * c + (j + 2) % 4] = 255
            nan_rows.append(r)
    s = s.astype(np.uint8)
    v = E2M1[code]
    x = rand_bf16(jax.random.key(m), (m, k), spread=True)
    xd = act_quant_host(x)
    want = (xd[:, perm] * v * np.exp2(s[np.arange(n), perm // 32].astype(np.float64) - 127) + 0.0).astype(BF16)
    ok = np.ones(n, bool)
    ok[nan_rows] = False
    for variant in VARIANTS:
        poison()
        got = np.asarray(ffi.fp4_gemv(x, jnp.asarray(w), jnp.asarray(s), variant=variant))
        assert np.isnan(got[:, nan_rows].astype(np.float32)).all(), f"[{variant}] a scale byte 255 must give NaN"
        same = bf16_bits_equal(got[:, ok], want[:, ok])
        if not same.all():
            r, c = np.nonzero(~same)
            cols = np.nonzero(ok)[0][c]
            pytest.fail(
                f"[{variant}] {np.count_nonzero(~same)} of {same.size} outputs differ from the exact product, e.g. "
                + ", ".join(
                    f"(row {a}, col {b}, offset {offsets[b % len(offsets)]}: got {got[a, b]} want {want[a, b]})"
                    for a, b in zip(r[:6], cols[:6], strict=True)
                )
            )


def test_fp4_gemv_identity_grouped_rows_bit_exact(ffi):
    """Grouped weights with a row map: 20 output rows, each a (token, expert) pair of 5 tokens and 4 experts with
    different permutations; pairs in arbitrary order (some runs of one expert: shared passes). Every variant."""
    rng = np.random.default_rng(7)
    e, n, k, t = 4, 256, 1024, 5
    perms = [rng.permutation(k)[:n] for _ in range(e)]
    ws, ss, vs = zip(*(identity_weight(n, k, perms[i], rng) for i in range(e)), strict=True)
    w, s = np.stack(ws), np.stack(ss)
    x = rand_bf16(jax.random.key(3), (t, k), spread=True)
    xd = act_quant_host(x)
    rows = rng.integers(0, t, 20).astype(np.int32)
    groups = np.sort(rng.integers(0, e, 20)).astype(np.int32)
    want = np.stack(
        [
            xd[r, perms[g]] * vs[g] * np.exp2(s[g, np.arange(n), perms[g] // 32].astype(np.float64) - 127)
            for r, g in zip(rows, groups, strict=True)
        ]
    )
    want = (want + 0.0).astype(BF16)  # +0 for an exact -0, as the kernel's and the reference's accumulators give
    for variant in VARIANTS:
        poison()
        got = np.asarray(
            ffi.fp4_gemv(
                x, jnp.asarray(w), jnp.asarray(s), rows=jnp.asarray(rows), groups=jnp.asarray(groups), variant=variant
            )
        )
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16), err_msg=f"variant {variant}")


# ---- one MXFP4 linear: random realistic weights ------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,t,sort",
    [
        ("small", 1, True),
        ("small", 8, True),
        ("small", 8, False),
        ("flash_up", 1, True),
        ("flash_up", 8, True),
        ("flash_down", 1, True),
        ("flash_down", 8, True),
        ("flash_down", 8, False),
        ("flash_down", 32, True),
    ],
)
def test_fp4_gemv_grouped_vs_float64(ffi, shape, t, sort):
    """Per-(token, expert) rows with top-6 routing: T=1 (6 pairs), T=8 (48 pairs; sorted by expert: pairs of one
    expert share a weight pass, in token order: none do). Invalid pairs (expert -1, expert E, token out of range)
    are exact zeros; a scale byte 255 (NaN) poisons exactly its output column; byte 0 (2^-127) is decoded."""
    e, n, k = {"small": (8, 128, 256), "flash_up": (256, 2048, 4096), "flash_down": (256, 4096, 2048)}[shape]
    ks = jax.random.split(jax.random.key(seed(shape, t, sort)), 3)
    x = rand_bf16(ks[0], (t, k), spread=shape == "small")
    w, s = rand_fp4_weight(ks[1], (e, n, k))
    rows, groups = routing(ks[2], t, e, min(6, e), sort)
    bad = []
    if t > 1:
        rows = np.concatenate([rows, [t + 3, 0, 0]]).astype(np.int32)
        groups = np.concatenate([groups, [groups[0], -1, e]]).astype(np.int32)
        bad = [len(rows) - 3, len(rows) - 2, len(rows) - 1]
    e0, e1 = int(groups[0]), int(groups[-4 if t > 1 else -1])
    s_np = np.asarray(s).view(np.uint8).copy()
    s_np[e0, 5, 0] = 255  # output column 5 of expert e0's pairs: NaN
    s_np[e1, 9, :] = 0  # row 9 of expert e1: all scales 2^-127
    s = jax.lax.bitcast_convert_type(jnp.asarray(s_np), jnp.float8_e8m0fnu)
    want = ref_linear(act_quant_host(x), w, s_np, rows, groups)
    keep = np.ones(n, bool)
    keep[5] = False
    nan_rows = np.setdiff1d(np.nonzero(groups == e0)[0], bad)
    for variant in VARIANTS:
        poison()
        got = ffi.fp4_gemv(x, w, s, rows=jnp.asarray(rows), groups=jnp.asarray(groups), variant=variant)
        got = np.asarray(got, np.float64)
        assert got.shape == (len(rows), n)
        assert (got[bad] == 0).all(), f"[{variant}] invalid pairs must give zero rows"
        assert np.isnan(got[nan_rows, 5]).all() and np.isnan(want[nan_rows, 5]).all(), f"[{variant}] scale 255: NaN"
        check_close(got[:, keep], want[:, keep], 2e-3, f"fp4_gemv [{variant}] {shape} T={t} sort={sort}")


@pytest.mark.parametrize("t,sort,local", [(400, True, 1.0), (400, True, 0.5), (300, False, 0.5), (32, True, 1.0)])
def test_fp4_gemv_work_plan(ffi, t, sort, local):
    """wgb deals the segments' row tiles evenly over its grid, found on the device: many segments (t=400 top-6 of 8
    experts sorted: ~300 segments of <= 8 rows, past the 256 the first scan keeps, so a second scan finds a block's
    window), blocks whose range crosses segments (N = 320: 5 row tiles each), pairs in token order (segments of one
    row), and an expert-parallel map (local = 0.5: the pairs of experts >= E/2 are -1, other GPU's, zero rows)."""
    e, n, k = 8, 320, 256
    ks = jax.random.split(jax.random.key(t + int(sort) + int(10 * local)), 3)
    x = rand_bf16(ks[0], (t, k), spread=True)
    w, s = rand_fp4_weight(ks[1], (e, n, k))
    rows, groups = routing(ks[2], t, e, 6, sort)
    groups = np.where(groups < int(e * local), groups, -1).astype(np.int32)
    want = ref_linear(act_quant_host(x), w, s, rows, groups)
    for variant in ("wgb", "ring"):
        poison()
        got = np.asarray(
            ffi.fp4_gemv(x, w, s, rows=jnp.asarray(rows), groups=jnp.asarray(groups), variant=variant), np.float64
        )
        assert (got[groups < 0] == 0).all(), f"[{variant}] pairs of experts elsewhere must be zero rows"
        check_close(got, want, 2e-3, f"fp4_gemv work plan [{variant}] t={t} sort={sort} local={local}")


@pytest.mark.parametrize("ksplit", ["1", "2", "4", "8"])
@pytest.mark.parametrize("cvt", ["lut", "bits"])
def test_fp4_gemv_launch_knobs(ffi, ksplit, cvt, monkeypatch):
    """The ring variant's benchmarking knobs DSV4_FFI_FP4_KSPLIT (K split across a block's warps) and
    DSV4_FFI_FP4_CVT (e2m1 -> e4m3 by table or by bit placement) change only the summation order: every setting
    within the bound; and the wg variants' DSV4_FFI_FP4_TILES (row tiles per block) likewise."""
    monkeypatch.setenv("DSV4_FFI_FP4_KSPLIT", ksplit)
    monkeypatch.setenv("DSV4_FFI_FP4_CVT", cvt)
    e, n, k, t = 16, 520, 2048, 3  # N=520: a partial 16-row tile and a partial block
    ks = jax.random.split(jax.random.key(int(ksplit) + 10 * (cvt == "bits")), 3)
    x = rand_bf16(ks[0], (t, k), spread=True)
    w, s = rand_fp4_weight(ks[1], (e, n, k))
    rows, groups = routing(ks[2], t, e, 6)
    want = ref_linear(act_quant_host(x), w, s, rows, groups)
    poison()
    got = ffi.fp4_gemv(x, w, s, rows=jnp.asarray(rows), groups=jnp.asarray(groups), variant="ring")
    check_close(got, want, 2e-3, f"fp4_gemv ksplit={ksplit} cvt={cvt}")
    monkeypatch.setenv("DSV4_FFI_FP4_TILES", ksplit)
    for variant in ("wg", "wg8", "wgb"):
        poison()
        got = ffi.fp4_gemv(x, w, s, rows=jnp.asarray(rows), groups=jnp.asarray(groups), variant=variant)
        check_close(got, want, 2e-3, f"fp4_gemv [{variant}] tiles={ksplit}")


def test_fp4_wgb_bit_placement_equals_table(ffi, monkeypatch):
    """wgb's e2m1 -> e4m3 by bit placement (2^-6 times the value, the 2^6 in the activation scale) and by the prmt
    table give the same bits: the scaling is exact and the tensor core's sums of 2^-6-scaled products round alike.
    Random codes (every one, 0.5 among them) and scale bytes, routed pairs, both launches."""
    e, n, k, t = 16, 520, 2048, 5
    ks = jax.random.split(jax.random.key(7), 3)
    x = rand_bf16(ks[0], (t, k), spread=True)
    w, s = rand_fp4_weight(ks[1], (e, n, k))
    rows, groups = routing(ks[2], t, e, 6)
    got = {}
    for cvt in ("bits", "lut"):
        monkeypatch.setenv("DSV4_FFI_FP4_CVT", cvt)
        poison()
        got[cvt] = np.asarray(
            ffi.fp4_gemv(x, w, s, rows=jnp.asarray(rows), groups=jnp.asarray(groups), variant="wgb")
        ).view(np.uint16)
    assert np.isfinite(got["lut"].view(BF16).astype(np.float32)).all()
    np.testing.assert_array_equal(got["bits"], got["lut"])


# ---- the fused gate/up + SwiGLU and the down projection -----------------------------------------------------------


def _moe_case(shape: str, t: int, sort: bool, key_seed: int):
    """Inputs of one routed-expert step. The activation scale puts g and u at a standard deviation of about 5 with
    these weights (RMS ~0.15), so that the clamp at 10 acts on a few percent of them."""
    c = {"small": SMALL, "flash": FLASH}[shape]
    e, d, i = c["e"], c["d"], c["i"]
    ks = jax.random.split(jax.random.key(key_seed), 6)
    x = rand_bf16(ks[0], (t, d), scale=32.0 / d**0.5)
    w1, s1 = rand_fp4_weight(ks[1], (e, i, d))
    w3, s3 = rand_fp4_weight(ks[2], (e, i, d))
    rows, groups = routing(ks[3], t, e, 6, sort)
    route_w = np.asarray(jax.random.uniform(ks[4], (len(rows),), minval=0.05, maxval=1.0), np.float32)
    return x, w1, s1, w3, s3, rows, groups, route_w


@pytest.mark.parametrize("limit", [10.0, 0.0])
@pytest.mark.parametrize(
    "shape,t,sort",
    [("small", 1, True), ("small", 8, True), ("small", 8, False), ("flash", 1, True), ("flash", 8, True)],
)
def test_fp4_moe_gate_up_vs_float64(ffi, shape, t, sort, limit):
    """h against the float64 reference rounded at the reference's points; T=8 small (top-6 of 8 experts, sorted)
    makes most pairs share a weight pass. Two invalid pairs (expert -1 and E) must be zero rows."""
    x, w1, s1, w3, s3, rows, groups, route_w = _moe_case(shape, t, sort, seed(shape, t, sort, limit))
    e = w1.shape[0]
    groups = groups.copy()
    groups[1] = -1
    groups[-1] = e
    xd = act_quant_host(x)
    g64 = ref_linear(xd, w1, s1, rows, groups)
    u64 = ref_linear(xd, w3, s3, rows, groups)
    want = swiglu_f32(g64.astype(BF16).astype(np.float32), u64.astype(BF16).astype(np.float32), route_w, limit)
    if limit > 0:
        frac = float(np.mean(np.abs(u64) > limit) + np.mean(g64 > limit))
        assert frac > 1e-3, f"the case does not exercise the clamp (fraction beyond the limit {frac})"
    args = (x, jnp.asarray(rows), jnp.asarray(groups), jnp.asarray(route_w), w1, s1, w3, s3)
    for variant in VARIANTS:
        poison()
        fn = jax.jit(functools.partial(ffi.fp4_moe_gate_up, variant=variant), static_argnums=8)
        got = np.asarray(fn(*args, limit))
        assert got.shape == (len(rows), w1.shape[1])
        assert (got[[1, len(rows) - 1]] == 0).all(), f"[{variant}] pairs with an expert -1 or >= E must be zero rows"
        what = f"h [{variant}] {shape} T={t} limit={limit}"
        err = check_close(got.astype(np.float64), want.astype(np.float64), 1e-2, what)
        same = float(np.mean(bf16_bits_equal(got, want)))
        tag = f"{variant} {shape} T={t} sort={sort} limit={limit}"
        print(f"\n[fp4 gate/up {tag}] rel-RMS {err:.2e}, bit-identical {same:.4f}")
        assert same >= BIT_IDENTICAL_MIN[variant], (
            f"[{variant}] only {same:.4f} of h bit-identical to the float64 reference rounded at the same points"
        )


@pytest.mark.parametrize("shape,t", [("small", 8), ("flash", 1), ("flash", 8)])
def test_fp4_moe_gate_up_equals_two_gemvs(ffi, shape, t):
    """The fused launch accumulates exactly like two plain `fp4_gemv` launches (same K order): h equals their
    bf16 outputs put through the SwiGLU in float32 numpy, but where expf and numpy's exp differ in the last bit."""
    x, w1, s1, w3, s3, rows, groups, route_w = _moe_case(shape, t, True, seed("two gemvs", shape, t))
    limit = 10.0
    r, g = jnp.asarray(rows), jnp.asarray(groups)
    for variant in VARIANTS:
        poison()
        h = np.asarray(ffi.fp4_moe_gate_up(x, r, g, jnp.asarray(route_w), w1, s1, w3, s3, limit, variant=variant))
        poison()
        g1 = np.asarray(ffi.fp4_gemv(x, w1, s1, rows=r, groups=g, variant=variant), np.float32)
        u1 = np.asarray(ffi.fp4_gemv(x, w3, s3, rows=r, groups=g, variant=variant), np.float32)
        want = swiglu_f32(g1, u1, route_w, limit)
        same = bf16_bits_equal(h, want)
        hf, wf = h.astype(np.float64), want.astype(np.float64)
        far = np.abs(hf - wf) > 2 * 2.0**-8 * np.maximum(np.abs(wf), 1e-30)
        print(f"\n[fp4 fused vs two GEMVs {variant} {shape} T={t}] bit-identical {same.mean():.5f}")
        assert not far.any(), f"[{variant}] {far.sum()} elements off by > 2 bf16 ulps: {hf[far][:5]} vs {wf[far][:5]}"
        assert same.mean() >= 0.98, f"[{variant}] {same.mean():.5f}"


@pytest.mark.parametrize(
    "shape,t,sort",
    [("small", 1, True), ("small", 8, True), ("flash", 1, True), ("flash", 8, True), ("flash", 8, False)],
)
def test_fp4_moe_down_vs_float64(ffi, shape, t, sort):
    """y = bf16(act_quant(h) . W2^T) per pair against float64; an invalid expert gives a zero row."""
    c = {"small": SMALL, "flash": FLASH}[shape]
    e, d, i = c["e"], c["d"], c["i"]
    ks = jax.random.split(jax.random.key(seed("down", shape, t, sort)), 3)
    _, groups = routing(ks[0], t, e, 6, sort)
    groups = groups.copy()
    groups[0] = -1
    h = rand_bf16(ks[1], (len(groups), i), scale=0.5)
    w2, s2 = rand_fp4_weight(ks[2], (e, d, i))
    want = ref_linear(act_quant_host(h), w2, s2, np.arange(len(groups)), groups)
    for variant in VARIANTS:
        poison()
        got = np.asarray(ffi.fp4_moe_down(h, jnp.asarray(groups), w2, s2, tokens=t, variant=variant), np.float64)
        assert (got[0] == 0).all(), f"[{variant}] a pair with expert -1 must give a zero row"
        check_close(got, want, 2e-3, f"down [{variant}] {shape} T={t} sort={sort}")


@pytest.mark.parametrize(
    "shape,t,limit", [("small", 4, 10.0), ("small", 8, 0.0), ("flash16", 1, 10.0), ("flash16", 2, 10.0)]
)
def test_fp4_moe_step_matches_reference_ops(ffi, shape, t, limit):
    """One routed-expert step of a decode in two launches (gate/up + SwiGLU, then down) against composing the
    reference ops on the CPU: `g = ops.fp4_linear(x, w1[e], s1[e])`, `u` likewise, `h = bf16(w * moe.swiglu(g, u))`,
    `y = ops.fp4_linear(h, w2[e], s2[e])` for every pair (as `moe.Experts` does). flash16: Flash widths, 16
    experts (the CPU reference stays quick)."""
    from dsv4_jax import moe, ops
    from dsv4_jax.rounding import to_bf16

    c = dict(SMALL) if shape == "small" else dict(FLASH, e=16)
    e, d, i = c["e"], c["d"], c["i"]
    ks = jax.random.split(jax.random.key(seed("step", shape, t, limit)), 6)
    x = rand_bf16(ks[0], (t, d), scale=32.0 / d**0.5)
    w1, s1 = rand_fp4_weight(ks[1], (e, i, d))
    w3, s3 = rand_fp4_weight(ks[2], (e, i, d))
    w2, s2 = rand_fp4_weight(ks[3], (e, d, i))
    rows, groups = routing(ks[4], t, e, 6)
    route_w = np.asarray(jax.random.uniform(ks[5], (len(rows),), minval=0.05, maxval=1.0), np.float32)
    poison()
    h = ffi.fp4_moe_gate_up(x, jnp.asarray(rows), jnp.asarray(groups), jnp.asarray(route_w), w1, s1, w3, s3, limit)
    poison()
    y = ffi.fp4_moe_down(h, jnp.asarray(groups), w2, s2, tokens=t)
    h, y = np.asarray(h, np.float64), np.asarray(y, np.float64)

    cpu = jax.devices("cpu")[0]
    lin = jax.jit(lambda a, w, s: ops.fp4_linear(a, w, s))  # the reference (reference-only op)
    h_ref = np.zeros(h.shape, np.float64)
    y_ref = np.zeros(y.shape, np.float64)
    with jax.default_device(cpu):
        xc = jax.device_put(x, cpu)
        for ex in np.unique(groups):
            sel = np.nonzero(groups == ex)[0]
            xe = xc[rows[sel]]
            wc = [jax.device_put(a[int(ex)], cpu) for a in (w1, s1, w3, s3, w2, s2)]
            g = lin(xe, wc[0], wc[1]).astype(jnp.float32)
            u = lin(xe, wc[2], wc[3]).astype(jnp.float32)
            he = to_bf16(jnp.asarray(route_w[sel])[:, None] * moe.swiglu(g, u, limit))
            h_ref[sel] = np.asarray(he, np.float64)
            y_ref[sel] = np.asarray(lin(he, wc[4], wc[5]), np.float64)
    err_h = check_close(h, h_ref, 1e-2, f"h vs reference ops {shape} T={t}")
    err_y = check_close(y, y_ref, 1e-2, f"y vs reference ops {shape} T={t}")
    print(f"\n[fp4 step vs reference ops {shape} T={t} limit={limit}] h {err_h:.2e}, y {err_y:.2e}")


def test_fp4_variant_env_knob(ffi, monkeypatch):
    """The unsuffixed targets launch the variant DSV4_FFI_FP4_VARIANT names (read at launch), "wgb" when unset (the
    fastest measured): the default equals variant="wgb" and the knob set to wg/wg8/ring equals that variant, bit for
    bit (eager calls)."""
    import dsv4_jax_ffi

    e, n, k, t = 16, 256, 1024, 3
    ks = jax.random.split(jax.random.key(77), 3)
    x = rand_bf16(ks[0], (t, k), spread=True)
    w, s = rand_fp4_weight(ks[1], (e, n, k))
    rows, groups = routing(ks[2], t, e, 6)
    r, g = jnp.asarray(rows), jnp.asarray(groups)
    assert set(dsv4_jax_ffi.fp4_variants) == set(VARIANTS)
    monkeypatch.delenv("DSV4_FFI_FP4_VARIANT", raising=False)
    assert dsv4_jax_ffi.fp4_variant() == "wgb"
    named = {v: np.asarray(ffi.fp4_gemv(x, w, s, rows=r, groups=g, variant=v)) for v in VARIANTS}
    np.testing.assert_array_equal(
        np.asarray(ffi.fp4_gemv(x, w, s, rows=r, groups=g)).view(np.uint16), named["wgb"].view(np.uint16)
    )
    for v in ("wg", "wg8", "ring"):
        monkeypatch.setenv("DSV4_FFI_FP4_VARIANT", v)
        assert dsv4_jax_ffi.fp4_variant() == v
        got = np.asarray(ffi.fp4_gemv(x, w, s, rows=r, groups=g))
        np.testing.assert_array_equal(got.view(np.uint16), named[v].view(np.uint16), err_msg=v)
    with pytest.raises(ValueError, match="variant"):
        ffi.fp4_gemv(x, w, s, rows=r, groups=g, variant="nope")


def test_fp4_handlers_reject_bad_shapes(ffi):
    """Shape errors surface as clear messages from the handlers (the wrappers' own checks bypassed)."""
    out = jax.ShapeDtypeStruct((4, 128), jnp.bfloat16)
    x = jnp.zeros((2, 192), jnp.bfloat16)
    w = jnp.zeros((128, 96), jnp.uint8)
    s = jnp.zeros((128, 6), jnp.uint8)
    empty = jnp.zeros((0,), jnp.int32)
    with pytest.raises(Exception, match="not a positive multiple of 128"):
        jax.block_until_ready(jax.ffi.ffi_call("dsv4_fp4_gemv", out)(x, jnp.zeros((4,), jnp.int32), empty, w, s))
    x = jnp.zeros((2, 256), jnp.bfloat16)
    w = jnp.zeros((2, 128, 128), jnp.uint8)
    s = jnp.zeros((2, 128, 8), jnp.uint8)
    with pytest.raises(Exception, match="groups .* has 3 entries for 4 output rows"):
        call = jax.ffi.ffi_call("dsv4_fp4_gemv", out)
        jax.block_until_ready(call(x, jnp.zeros((4,), jnp.int32), jnp.zeros((3,), jnp.int32), w, s))
    with pytest.raises(Exception, match="scales .* do not match the weight"):
        jax.block_until_ready(
            jax.ffi.ffi_call("dsv4_fp4_moe_down", jax.ShapeDtypeStruct((4, 128), jnp.bfloat16))(
                jnp.zeros((4, 256), jnp.bfloat16), jnp.zeros((4,), jnp.int32), w, s[:, :, :4], tokens=np.int64(0)
            )
        )


PROBE = r"""
import hashlib, json, os, pathlib, sys, tempfile
dump = tempfile.mkdtemp(prefix="dsv4_fp4_cmdbuf_")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from test_fp4_kernels_gpu import rand_fp4_weight
from dsv4_jax.kernels import ffi_ops
assert ffi_ops.load()[0] is not None, ffi_ops.load()[1]
ks = jax.random.split(jax.random.key(0), 6)
e, d, i, t = 8, 256, 128, 2
w1, s1 = rand_fp4_weight(ks[0], (e, i, d)); w3, s3 = rand_fp4_weight(ks[1], (e, i, d))
w2, s2 = rand_fp4_weight(ks[2], (e, d, i))
x = jax.random.normal(ks[3], (t, d)).astype(jnp.bfloat16)
rows = jnp.array([0, 0, 1, 1, 0, 1], jnp.int32); groups = jnp.array([1, 3, 3, 5, 6, 7], jnp.int32)
rw = jax.random.uniform(ks[4], (6,))
@jax.jit
def step(x, rows, groups, rw, w1, s1, w3, s3, w2, s2):
    h = ffi_ops.fp4_moe_gate_up(x, rows, groups, rw, w1, s1, w3, s3, 10.0)
    return h, ffi_ops.fp4_moe_down(h, groups, w2, s2, tokens=2), ffi_ops.fp4_gemv(x, w1, s1, rows=rows, groups=groups)
args = (x, rows, groups, rw, w1, s1, w3, s3, w2, s2)
runs = [[np.asarray(o) for o in step(*args)] for _ in range(3)]
digests = [hashlib.sha256(o.tobytes()).hexdigest()[:16] for o in runs[0]]
agree = all(all(np.array_equal(a, b) for a, b in zip(runs[0], r)) for r in runs[1:])
captured = False
for hlo in sorted(pathlib.Path(dump).rglob("*after_optimizations.txt")):
    if 'custom_call_target="dsv4_fp4' not in hlo.read_text(errors="replace"):
        continue
    seq = hlo.with_name(hlo.name.split(".sm_")[0] + ".thunk_sequence_after_thunk_passes.txt")
    captured = captured or (seq.exists() and "kCommandBuffer" in seq.read_text(errors="replace"))
print(json.dumps(dict(captured=captured, digests=digests, replays_agree=agree)))
"""


def test_fp4_kernels_in_command_buffers(tmp_path):
    """The fp4 handlers are command-buffer compatible: recorded into CUDA graphs (custom calls, any graph size)
    they give bit-identical results to plain stream execution (fresh processes: XLA_FLAGS apply at start-up)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    outs = {}
    for mode, flags in (
        ("graphs", "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"),
        ("stream", "--xla_gpu_enable_command_buffer="),
    ):
        env = dict(os.environ, XLA_FLAGS=flags, XLA_CLIENT_MEM_FRACTION="0.2")
        here = str(pathlib.Path(__file__).parent)
        try:
            r = subprocess.run([sys.executable, str(probe), here], env=env, capture_output=True, text=True, timeout=200)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{mode}: probe timed out\nstdout: {e.stdout}\nstderr: {str(e.stderr)[-3000:]}")
        assert r.returncode == 0, f"{mode}: probe failed\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        outs[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    assert outs["graphs"]["captured"], f"no dsv4_fp4 custom call was recorded in a command buffer: {outs['graphs']}"
    assert not outs["stream"]["captured"]
    assert outs["graphs"]["digests"] == outs["stream"]["digests"]
    assert outs["graphs"]["replays_agree"]
