"""GPU tests of the slab layout of the MXFP4 routed experts (`quant.fp4_to_slabs`, made at load by
`dsv4_jax.prepare_params` on SM90; ffi/csrc/kernels.h): the wgb decode kernels and the prefill widening read it and
must give the same bits as from the stored layout (the same bytes at other addresses, the same arithmetic); every other
kernel refuses it by name. Run on the device: `pytest -m gpu tests/test_fp4_slabs_gpu.py` (skipped without a GPU).
Inputs: the helpers of tests/test_fp4_kernels_gpu.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison
from test_fp4_kernels_gpu import FLASH, SMALL, rand_bf16, rand_fp4_experts, rand_fp4_weight, routing, seed

from dsv4_jax import quant

pytestmark = pytest.mark.gpu


def bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint16)


@pytest.mark.parametrize("shape,t,sort", [("small", 5, True), ("flash", 1, True), ("flash", 8, True),
                                          ("flash", 32, True), ("flash", 8, False)])  # fmt: skip
def test_fp4_moe_slabs_bit_identical_to_stored(ffi, shape, t, sort):
    """Both routed-expert launches (gate/up with the SwiGLU, down) and the plain grouped GEMV on the slab layout equal
    the same launches on the stored layout bit for bit, with invalid pairs (zeros) among them; at one token (the
    guessed work plan), 8 and 32 tokens (segments of several rows, blocks spanning segments) and pairs in token
    order."""
    c = {"small": SMALL, "flash": FLASH}[shape]
    e, d, i = c["e"], c["d"], c["i"]
    ks = jax.random.split(jax.random.key(seed("slabs", shape, t, sort)), 6)
    x = rand_bf16(ks[0], (t, d), scale=32.0 / d**0.5)
    w1, s1, w3, s3, w2, s2 = rand_fp4_experts(ks[1:4], e, d, i)
    rows, groups = routing(ks[4], t, e, 6, sort)
    groups[::7] = -1  # pairs of experts elsewhere
    rows, groups = jnp.asarray(rows), jnp.asarray(groups)
    route_w = jax.random.uniform(ks[5], (len(rows),), minval=0.05, maxval=1.0)
    slabs = [quant.fp4_to_slabs(w, s) for w, s in ((w1, s1), (w3, s3), (w2, s2))]
    assert slabs[0][1].dtype == jnp.uint32 and slabs[0][0].shape == w1.shape

    def step(w1, s1, w3, s3, w2, s2):
        poison()
        h = ffi.fp4_moe_gate_up(x, rows, groups, route_w, w1, s1, w3, s3, 10.0, variant="wgb")
        y = ffi.fp4_moe_down(h, groups, w2, s2, tokens=t, variant="wgb")
        g = ffi.fp4_gemv(x, w1, s1, rows=rows, groups=groups, variant="wgb")
        return bits(h), bits(y), bits(g)

    stored = step(w1, s1, w3, s3, w2, s2)
    got = step(*(a for pair in slabs for a in pair))
    assert np.isfinite(stored[1].view(jnp.bfloat16).astype(np.float32)).all()
    assert (stored[0][np.asarray(groups) < 0] == 0).all(), "invalid pairs: zero rows"
    for name, a, b in zip(("gate/up h", "down y", "gemv"), got, stored, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} on slabs differs from the stored layout ({shape} T={t})")


@pytest.mark.parametrize("stacked", [False, True])
def test_fp4_widen_slabs_equal_stored(ffi, stacked):
    """The prefill widening (`fp4_widen`) reads slabs to the same e4m3 values and tile scales, also one layer of a
    stack read in place (the stack as `prepare_params` leaves it: every layer in slabs)."""
    ks = jax.random.split(jax.random.key(11), 2)
    w, s = rand_fp4_weight(ks[0], (3, 4, 256, 512))
    ws, ss = quant.fp4_to_slabs(w, s)
    layer = (jnp.int32(2),) if stacked else ()
    pick = (lambda a: a) if stacked else (lambda a: a[2])
    poison()
    q0, sf0 = jax.jit(ffi.fp4_widen)(pick(w), pick(s), *layer)
    poison()
    q1, sf1 = jax.jit(ffi.fp4_widen)(pick(ws), pick(ss), *layer)
    np.testing.assert_array_equal(np.asarray(q1).view(np.uint8), np.asarray(q0).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(sf1), np.asarray(sf0))


def test_fp4_experts_slabs_through_both_routes(ffi, monkeypatch):
    """`moe_fp4.routed_experts` on layer 1 of a 2-layer stack in slabs (the model's layer loop after `prepare_params`)
    equals the stored layout bit for bit on the GEMV route (decode) and on both kernels of the grouped route (the
    one-pass `fp4_grouped`; widen + grouped GEMMs)."""
    from dsv4_jax.kernels import moe_fp4
    from dsv4_jax.layer_view import LayerSlice

    e, d, i, t = SMALL["e"], SMALL["d"], SMALL["i"], 512
    ks = jax.random.split(jax.random.key(5), 6)
    x = rand_bf16(ks[0], (t, d), scale=32.0 / d**0.5)
    stored = rand_fp4_experts(ks[1:4], e, d, i, lead=(2,))
    slabs = tuple(a for w, s in zip(stored[0::2], stored[1::2], strict=True) for a in quant.fp4_to_slabs(w, s))
    rows, groups = routing(ks[4], t, e, 6)
    xr, ex = x[jnp.asarray(rows)], jnp.asarray(groups)
    rw = jax.random.uniform(ks[5], (len(rows),), minval=0.05, maxval=1.0)
    gs = jnp.asarray(np.bincount(groups, minlength=e).astype(np.int32))

    def run(ws):
        fn = jax.jit(lambda x, ws: moe_fp4.routed_experts(x, ex, rw, gs, [LayerSlice(a, jnp.int32(1)) for a in ws],
                                                         limit=10.0))  # fmt: skip
        poison()
        return bits(fn(xr, ws)), fn.lower(xr, ws).as_text()

    routes = [("0", "auto", "dsv4_fp4_moe_gate_up"), (str(len(rows)), "fused", "dsv4_fp4_grouped_pair"),
              (str(len(rows)), "widen", "dsv4_fp4_widen")]  # fmt: skip
    for min_rows, prefill, marker in routes:
        monkeypatch.setenv("DSV4_FFI_FP4_GROUPED_MIN_ROWS", min_rows)
        monkeypatch.setenv("DSV4_FFI_FP4_PREFILL", prefill)
        (a, hlo), (b, _) = run(slabs), run(stored)
        assert marker in hlo
        np.testing.assert_array_equal(a, b, err_msg=f"route of {marker}: slabs differ from the stored layout")


def test_fp4_slabs_refused_by_other_kernels(ffi):
    """Only the wgb kernels read slabs: a launch that resolves to another variant fails naming the layout."""
    ks = jax.random.split(jax.random.key(2), 3)
    x = rand_bf16(ks[0], (2, 256))
    w, s = quant.fp4_to_slabs(*rand_fp4_weight(ks[1], (4, 128, 256)))
    groups = jnp.asarray([0, 3], jnp.int32)
    for variant in ("ring", "wg", "wg8"):
        with pytest.raises(Exception, match="slab layout"):
            jax.block_until_ready(ffi.fp4_gemv(x, w, s, groups=groups, variant=variant))
