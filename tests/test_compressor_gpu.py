"""GPU tests of the compressor's decode step (`dsv4_compressor_decode`, `ffi/csrc/compressor_kernels.cu`) against its
reference twin `ops.compressor_decode` (= `ops.compress_step` with one new token per row).

Inputs as a decode step has them: fp32 projections, block states read from a stack of 3 layers at layer 1 and the
parameters from their own stack at layer 2 (`LayerSlice`s: the kernel takes the stacks and the indices), rows at
positions that open a block, sit inside one, complete one, start the sequence, and a padded row (n_new = 0); outputs
poisoned first. The state rows at or after the new token's slot are random (a real state holds zeros there): both
sides must ignore them.

Bounds and why: the state after the step is copies and one fp32 add (score + ape): bit-identical. The entry is a
softmax-weighted sum over 8 or 128 slots summed in another order than XLA (fp32 noise, ~1e-7 relative), rounded to
bf16 before RMSNorm, RoPE and the FP8 / FP4 simulation: the same bits except where that noise crosses a rounding
boundary (a bf16 ulp, or one quantisation step of the block), so >= 98% of the entry elements bit-identical and the
rel-RMS difference within 2e-2 (FP8) / 6e-2 (FP4: one e2m1 step is up to a third of the value).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison

from dsv4_jax import ops
from dsv4_jax.config import Config
from dsv4_jax.layer_view import LayerSlice
from dsv4_jax.nn import layer_inv_freq

pytestmark = pytest.mark.gpu


def _inputs(seed: int, ratio: int, dc: int, starts, n_new):
    rng = np.random.default_rng(seed)
    coff = 2 if ratio == 4 else 1
    b, c, slots = len(starts), coff * dc, coff * ratio
    kv_new = jnp.asarray(rng.normal(size=(b, c)), jnp.float32)
    sc_new = jnp.asarray(rng.normal(size=(b, c)) * 2, jnp.float32)
    kv_state = jnp.asarray(rng.normal(size=(3, b, slots, c)), jnp.float32)
    sc_state = jnp.asarray(rng.normal(size=(3, b, slots, c)) * 2, jnp.float32)
    ape = jnp.asarray(rng.normal(size=(4, ratio, c)) * 0.1, jnp.float32)
    norm_w = jnp.asarray(1 + 0.1 * rng.normal(size=(4, dc)), jnp.bfloat16)
    i, p = jnp.int32(1), jnp.int32(2)
    return (kv_new, sc_new, LayerSlice(kv_state, i), LayerSlice(sc_state, i), LayerSlice(ape, p),
            LayerSlice(norm_w, p), jnp.asarray(starts, jnp.int32), jnp.asarray(n_new, jnp.int32))  # fmt: skip


def _run(backend: str, args, inv_freq, **kw):
    f = jax.jit(lambda *a: ops.compressor_decode(*a, inv_freq, **kw, opts=ops.Opts(backend=backend)))
    return [np.asarray(v) for v in f(*args)]


CASES = {  # ratio, entry width, rotate (the indexer's keys)
    "csa": (4, 512, False),
    "csa-indexer": (4, 128, True),
    "hca": (128, 512, False),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows", [1, 6, 64])
def test_compressor_decode_kernel_vs_reference(ffi, case, rows):
    ratio, dc, rotate = CASES[case]
    cfg = Config.flash()
    # positions: the first token, inside a block, completing one, opening one, deep in the sequence; one padded row
    pattern = [0, 2, ratio - 1, ratio, 5 * ratio + 1, 7 * ratio - 1]
    starts = [pattern[i % len(pattern)] + (i // len(pattern)) * 2 * ratio for i in range(rows)]
    n_new = [0 if (i % len(pattern)) == 4 and rows > 1 else 1 for i in range(rows)]
    args = _inputs(rows * 7 + ratio + dc, ratio, dc, starts, n_new)
    inv = layer_inv_freq(cfg, ratio)
    kw = dict(ratio=ratio, rotate=rotate, eps=cfg.norm_eps)
    ref = _run("reference", args, inv, **kw)
    poison()
    got = _run("ffi", args, inv, **kw)
    for name, g, r in zip(("kv_state", "score_state"), got[1:], ref[1:], strict=True):
        np.testing.assert_array_equal(g, r, err_msg=name)
    e, er = got[0], ref[0]
    assert e.shape == er.shape == (rows, 1, dc)
    ef, erf = e.astype(np.float32), er.astype(np.float32)
    assert np.isfinite(ef).all()
    assert np.mean(e.view(np.uint16) == er.view(np.uint16)) >= 0.98
    rel = np.sqrt(np.mean((ef - erf) ** 2) / max(np.mean(erf**2), 1e-30))
    assert rel <= (6e-2 if rotate else 2e-2), rel


def test_compressor_decode_kernel_in_a_decode_step(ffi):
    """`Compressor.step` with one token per row takes the kernel under backend="ffi" (recorded), and its entries and
    states match the reference's: the states within fp32 noise, not bit for bit, because the new token's projections
    come from XLA's bf16 x fp32 dots in two different programs (cuBLAS picked other algorithms: ~1 ulp on 7% of them,
    H200), the entries within the bounds above."""
    from flax import nnx

    from dsv4_jax.attention import Compressor

    cfg = Config.flash()
    comp = Compressor(cfg, 4, 512, rotate=False, rngs=nnx.Rngs(0))
    graph, params = nnx.split(comp)
    inv = layer_inv_freq(cfg, 4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 1, cfg.dim)), jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(4, 8, 1024)), jnp.float32)
    sc = jnp.asarray(rng.normal(size=(4, 8, 1024)), jnp.float32)
    start, n_new = jnp.asarray([3, 4, 9, 0], jnp.int32), jnp.asarray([1, 1, 1, 1], jnp.int32)

    def step(backend):
        f = jax.jit(lambda p: nnx.merge(graph, p).step(x, start, n_new, kv, sc, inv, ops.Opts(backend=backend),
                                                       fresh=False))  # fmt: skip
        with ops.record() as rec:
            out = f(params)
        return out, rec

    ref, _ = step("reference")
    got, rec = step("ffi")
    assert rec.get("compressor_decode") == "kernel"
    for g, r in ((got.kv_state, ref.kv_state), (got.score_state, ref.score_state)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    e, er = np.asarray(got.entries), np.asarray(ref.entries)
    assert np.mean(e.view(np.uint16) == er.view(np.uint16)) >= 0.98
