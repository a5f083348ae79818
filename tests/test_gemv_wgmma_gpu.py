"""GPU tests of the wide layer GEMV on wgmma (`DSV4_FFI_GEMV_WIDE=wgmma`, `ffi/csrc/gemv_wgmma_kernels.cu`): a stacked
layer's 9..64 decode rows (`dsv4_fp8_gemv_layer`, `dsv4_fp8_gemv_layer_pair`, wide route) against the same call on
the mma.sync wide kernel (itself bit-identical to quantisation + `dsv4_fp8_gemv`, tests/test_gemv_quant_gpu.py).

The knob is read at every launch, so one executable runs both kernels on the same inputs; outputs poisoned first.
Shapes: the Flash layer linears (K from 1024 to 8192: one to eight K splits, the splits added through distributed
shared memory), N not a multiple of the 64-row tile, 16- and 32-row segments with a partial last one.

Bounds and why: the same e4m3 products, but the wgmma kernel adds each 128-wide K block's four k32 steps inside the
tensor core (Hopper's FP8 accumulator keeps ~14 mantissa bits) where the mma.sync kernel sums exact products in fp32:
relative differences ~1e-4 of a block's sum before the bf16 rounding of the output (2^-9). So >= 85% of the outputs
bit-identical, rel-RMS within 2e-3, every element within 2^-6 of its value plus 2^-6 of the output's RMS (a layout
or indexing error gives O(1) differences).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison
from test_kernels_gpu import rand_bf16, rand_fp8_weight

pytestmark = pytest.mark.gpu


def _close(got, want, what):
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(g).all(), what
    rms = np.sqrt(np.mean(w.astype(np.float64) ** 2))
    assert rms > 0, what
    assert np.sqrt(np.mean((g.astype(np.float64) - w) ** 2)) / rms <= 2e-3, what
    assert np.mean(np.asarray(got).view(np.uint16) == np.asarray(want).view(np.uint16)) >= 0.85, what
    assert np.all(np.abs(g - w) <= 2.0**-6 * np.abs(w) + 2.0**-6 * rms), what


def _both(f, args, monkeypatch):
    """(wgmma, mma.sync) outputs of the jitted call `f(*args)`."""
    out = {}
    for kernel in ("wgmma", "mma"):
        monkeypatch.setenv("DSV4_FFI_GEMV_WIDE", kernel)
        poison()
        out[kernel] = jax.tree.map(np.asarray, f(*args))
    return out["wgmma"], out["mma"]


@pytest.mark.parametrize("n,k", [(1024, 4096), (32768, 1024), (4096, 8192), (4096, 2048), (512, 4096), (520, 384)])
@pytest.mark.parametrize("m", [9, 16, 21, 32, 40, 64])
def test_gemv_wgmma_wide_matches_mma(ffi, n, k, m, monkeypatch):
    monkeypatch.setenv("DSV4_FFI_GEMV_LAYER", "wide")
    keys = jax.random.split(jax.random.key(m * 5 + n + k), 2)
    x = rand_bf16(keys[0], (m, k))
    w, s = rand_fp8_weight(keys[1], (3, n, k))
    f = jax.jit(lambda *a: ffi.fp8_gemv_layer(*a))
    for layer in (1, 2):
        got, want = _both(f, (x, w, s, jnp.int32(layer)), monkeypatch)
        _close(got, want, f"n={n} k={k} m={m} layer {layer}")


@pytest.mark.parametrize("n1,n2,k", [(1024, 512, 4096), (32768, 8192, 1024), (2048, 2048, 4096), (136, 520, 384)])
@pytest.mark.parametrize("m", [16, 24, 40])
def test_gemv_wgmma_wide_pair_matches_mma(ffi, n1, n2, k, m, monkeypatch):
    """Two stacks one input feeds in one launch (either projection the wider): each output as on the mma.sync kernel."""
    monkeypatch.setenv("DSV4_FFI_GEMV_LAYER", "wide")
    keys = jax.random.split(jax.random.key(m * 11 + n1 + n2 + k), 3)
    x = rand_bf16(keys[0], (m, k))
    w1, s1 = rand_fp8_weight(keys[1], (3, n1, k))
    w2, s2 = rand_fp8_weight(keys[2], (3, n2, k))
    f = jax.jit(lambda *a: ffi.fp8_gemv_layer_pair(*a))
    (g1, g2), (m1, m2) = _both(f, (x, w1, s1, w2, s2, jnp.int32(1)), monkeypatch)
    _close(g1, m1, "first projection")
    _close(g2, m2, "second projection")


@pytest.mark.parametrize("splits", ["1", "2", "4", "8"])
def test_gemv_wgmma_wide_every_split(ffi, splits, monkeypatch):
    """The K splits forced (`DSV4_FFI_GEMV_WIDE_SPLITS`; a split whose K range would not fit keeps the heuristic's):
    the same outputs within the bounds, whatever the cluster size."""
    monkeypatch.setenv("DSV4_FFI_GEMV_LAYER", "wide")
    monkeypatch.setenv("DSV4_FFI_GEMV_WIDE_SPLITS", splits)
    keys = jax.random.split(jax.random.key(int(splits)), 2)
    x = rand_bf16(keys[0], (32, 4096))
    w, s = rand_fp8_weight(keys[1], (2, 2048, 4096))
    f = jax.jit(lambda *a: ffi.fp8_gemv_layer(*a))
    got, want = _both(f, (x, w, s, jnp.int32(1)), monkeypatch)
    _close(got, want, f"splits {splits}")
