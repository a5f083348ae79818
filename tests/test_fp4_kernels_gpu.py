"""GPU tests of the MXFP4 decode kernels: `dsv4_fp4_moe_gate_up` (gate + up projections fused with the clamped
SwiGLU and the routing weight), `dsv4_fp4_moe_down` and the plain `dsv4_fp4_gemv` (`ffi/csrc/fp4_*kernels.cu`). This
file: one MXFP4 linear (`fp4_gemv`) and the helpers; tests/test_fp4_moe_gpu.py: the routed-expert launches, the
variant knob, the handlers' checks and command-buffer capture, under the bounds below.

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


def rand_fp4_experts(keys, e: int, d: int, i: int, lead: tuple[int, ...] = ()):
    """The six operands `(w1, s1, w3, s3, w2, s2)` of `e` routed experts (hidden `d`, intermediate `i`) drawn by
    `rand_fp4_weight` from three keys (w1, w3, w2 in that order): w1/w3 `[*lead, e, i, d/2]`, w2
    `[*lead, e, d, i/2]`."""
    k1, k3, k2 = keys
    return (*rand_fp4_weight(k1, (*lead, e, i, d)), *rand_fp4_weight(k3, (*lead, e, i, d)),
            *rand_fp4_weight(k2, (*lead, e, d, i)))  # fmt: skip


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
