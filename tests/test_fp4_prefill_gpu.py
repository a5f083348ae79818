"""GPU tests of the MXFP4 routed experts at prefill sizes: `dsv4_fp4_widen` (MXFP4 -> FP8 128x128 blocks, the kernel
of `quant.fp4_to_fp8_blocks`) and the grouped route of `dsv4_jax.kernels.moe_fp4` (the widened experts through the
FP8 experts' m-grouped GEMMs). Run on the device: `pytest -m gpu tests/test_fp4_prefill_gpu.py` (skipped without a
GPU). Inputs and host references: the helpers of tests/test_fp4_kernels_gpu.py (the decode kernels' tests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gpu_report, poison, rel_rms  # the `ffi` fixture lives in conftest too
from test_fp4_kernels_gpu import (
    FLASH,
    SMALL,
    act_quant_host,
    check_close,
    dequant_host,
    rand_bf16,
    rand_fp4_experts,
    rand_fp4_weight,
    routing,
    seed,
)

from dsv4_jax import quant

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("prefill", ["fused", "widen"])
@pytest.mark.parametrize("shape,t,stacked", [("small", 1024, False), ("small", 1024, True), ("flash", 768, False)])
def test_fp4_experts_grouped_route_matches_reference(ffi, shape, t, stacked, prefill, monkeypatch, capsys):
    """Prefill sizes (>= `moe_fp4.grouped_min_rows()` dispatched rows) on either kernel of the grouped route (fused:
    `fp4_grouped`, the default; widen: the experts widened to FP8 blocks and run through the m-grouped contiguous
    GEMMs), against the reference op (`ops.moe_experts`, backend "reference", on the
    GPU) and against the GEMV route on the same rows. Bounds: rel-RMS <= 1e-2 (the decode step's bound) and at most
    the reference's own one-ulp noise (its output moved by one bf16 ulp of the inputs): the grouped GEMMs differ from
    the reference by the summation order and the FP8 tensor core's accumulation inside each 128-wide K step, as the
    FP8 linears do. Rows with expert -1 (padding) must be exact zeros. stacked: the weights
    are layer 1 of a 2-layer stack (`LayerSlice`), as inside the model's layer loop."""
    from dsv4_jax import ops
    from dsv4_jax.kernels import moe_fp4
    from dsv4_jax.layer_view import LayerSlice
    from dsv4_jax.options import Opts

    c = {"small": SMALL, "flash": FLASH}[shape]
    e, d, i = c["e"], c["d"], c["i"]
    lead = (2,) if stacked else ()
    ks = jax.random.split(jax.random.key(seed("grouped", shape, t, stacked)), 6)
    x = rand_bf16(ks[0], (t, d), scale=32.0 / d**0.5)
    ws = rand_fp4_experts(ks[1:4], e, d, i, lead)
    rows, groups = routing(ks[4], t, e, 6)
    pad = 40  # padding rows (expert -1) after the routed ones
    rows = np.concatenate([rows, np.zeros(pad, np.int32)])
    groups = np.concatenate([groups, np.full(pad, -1, np.int32)])
    route_w = np.asarray(jax.random.uniform(ks[5], (len(rows),), minval=0.05, maxval=1.0), np.float32)
    xr, ex, rw = x[jnp.asarray(rows)], jnp.asarray(groups), jnp.asarray(route_w)
    gs = jnp.asarray(np.bincount(groups[groups >= 0], minlength=e).astype(np.int32))

    def view(ws):
        return tuple(LayerSlice(a, jnp.int32(1)) for a in ws) if stacked else ws

    monkeypatch.setenv("DSV4_FFI_FP4_GROUPED_MIN_ROWS", str(len(rows)))
    monkeypatch.setenv("DSV4_FFI_FP4_PREFILL", prefill)
    kernel = jax.jit(lambda x, ex, rw, gs, ws: moe_fp4.routed_experts(x, ex, rw, gs, view(ws), limit=10.0))
    hlo = kernel.lower(xr, ex, rw, gs, ws).as_text()
    assert "dsv4_fp4_moe" not in hlo, "not grouped"
    if prefill == "fused":
        assert "dsv4_fp4_grouped_pair" in hlo and "dsv4_fp4_widen" not in hlo and "dsv4_fp8_gemm" not in hlo
    else:
        assert "dsv4_fp8_gemm_contig" in hlo and "dsv4_fp4_widen" in hlo and "dsv4_fp4_grouped" not in hlo
    poison()
    got = np.asarray(kernel(xr, ex, rw, gs, ws), np.float64)
    monkeypatch.setenv("DSV4_FFI_FP4_GROUPED_MIN_ROWS", "0")
    gemv = jax.jit(lambda x, ex, rw, gs, ws: moe_fp4.routed_experts(x, ex, rw, gs, view(ws), limit=10.0))
    assert "dsv4_fp4_moe_gate_up" in gemv.lower(xr, ex, rw, gs, ws).as_text()
    via_gemv = np.asarray(gemv(xr, ex, rw, gs, ws), np.float64)
    ref_opts = Opts(backend="reference")
    ref_fn = jax.jit(lambda x, ex, rw, gs, ws: ops.moe_experts(x, ex, rw, gs, view(ws), 10.0, opts=ref_opts))
    want = np.asarray(ref_fn(xr, ex, rw, gs, ws), np.float64)
    assert (got[-pad:] == 0).all(), "rows with expert -1 must be exact zeros"
    err = check_close(got, want, 1e-2, f"grouped route {shape} T={t}")
    err_gemv = check_close(via_gemv, want, 1e-2, f"GEMV route {shape} T={t}")
    # The reference's own rounding noise: its output when every input row moves by one bf16 ulp (half of the
    # elements up, half down), which moves some FP8 roundings of x by a step, as the accumulation order moves h's.
    bits = jax.lax.bitcast_convert_type(xr, jnp.uint16)
    step = jnp.where(jax.random.bernoulli(jax.random.key(3), 0.5, xr.shape), 1, -1).astype(jnp.int16)
    x_ulp = jax.lax.bitcast_convert_type((bits.astype(jnp.int32) + step).astype(jnp.uint16), jnp.bfloat16)
    noise = rel_rms(np.asarray(ref_fn(x_ulp, ex, rw, gs, ws), np.float64), want)
    gpu_report(f"[fp4 experts grouped route {prefill} {shape} T={t} stacked={stacked}] rel-RMS vs reference: "
               f"grouped {err:.2e}, "
               f"GEMV {err_gemv:.2e}, grouped vs GEMV {rel_rms(got, via_gemv):.2e}; the reference's one-ulp noise "
               f"{noise:.2e}", capsys)  # fmt: skip
    assert err <= noise, f"the grouped route's error {err:.2e} exceeds the reference's one-ulp noise {noise:.2e}"


@pytest.mark.parametrize("stacked,k", [(False, 512), (True, 512), (False, 384)])
def test_fp4_widen_equals_the_reference(ffi, stacked, k):
    """`ffi_ops.fp4_widen` (the grouped route's widening kernel) equals `quant.fp4_to_fp8_blocks` bit for bit: the
    e4m3 values (+0 and -0 alike) and the tile scales, with tiles whose scale bytes span 0..40 binades (the exponent
    shift up to 11, the f32 route beyond: exact up to 14, rounded further), a 255 byte (a NaN tile) and, stacked, one
    layer of a `[L, E, ...]` stack read in place. K = 512: four tiles per block; 384: one."""
    rng = np.random.default_rng(5)
    layers, e, n = 3, 4, 256
    lo = rng.integers(90, 131, (layers, e, n // 128, 1, k // 128, 1))  # per-tile least byte: spans 0..40
    b = np.minimum(lo + rng.integers(0, 41, (layers, e, n // 128, 128, k // 128, 4)), 254).astype(np.uint8)
    b = b.reshape(layers, e, n, k // 32)
    b[1, 2, 7, 9] = 255  # layer 1, expert 2, N tile 0, K tile 2
    w = jnp.asarray(rng.integers(0, 256, (layers, e, n, k // 2), dtype=np.uint8))
    s = jax.lax.bitcast_convert_type(jnp.asarray(b), jnp.float8_e8m0fnu)
    layer = 1
    poison()
    if stacked:
        q, sf = jax.jit(ffi.fp4_widen)(w, s, jnp.int32(layer))
    else:
        q, sf = jax.jit(ffi.fp4_widen)(w[layer], s[layer])
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        q_ref, sf_ref = jax.jit(quant.fp4_to_fp8_blocks)(*jax.device_put((w[layer], s[layer]), cpu))
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), np.asarray(q_ref.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(sf), np.asarray(sf_ref))  # NaN tile included
    assert np.isnan(np.asarray(sf)[2, 0, 2]) and np.isfinite(np.asarray(sf)).sum() == sf.size - 1
    with pytest.raises(ValueError, match="multiples of 128"):
        ffi.fp4_widen(w[layer, :, :200], s[layer, :, :200])


# Rows per expert of the direct tests: none, one, a narrow tile (<= 64 rows: wgmma N = 64), 65 (a wide partial
# tile), 128, 128 + 72, 2 x 128 + 44; then 37 rows of padding (expert -1).
GROUPED_SIZES = [0, 1, 64, 65, 128, 200, 300]
GROUPED_PAD = 37


@pytest.mark.parametrize("layout", ["stored", "slabs", "stacked-slabs"])
@pytest.mark.parametrize("scale_bytes", [(117, 125), (95, 131)])
def test_fp4_grouped_against_float64(ffi, layout, scale_bytes, capsys):
    """`ffi_ops.fp4_grouped` (the fused prefill kernel) against float64 on the FP8-quantized rows: each expert's rows
    times its dequantized MXFP4 weight, with partial tiles of both widths, an expert without rows and padding rows
    (exact zeros). Scale bytes (95, 131): rows spanning up to 35 binades, which leave the exact exponent-shift
    widening for the rounded one. Also: the pair launch equals two single launches bit for bit; a 255 scale byte
    makes exactly its weight row's outputs of that expert NaN; act_quant's wgmma order is a permutation of the stored
    bytes within each 32-block."""
    e, n, k = len(GROUPED_SIZES), 256, 512
    rows = sum(GROUPED_SIZES) + GROUPED_PAD
    expert = np.concatenate([np.full(c, i, np.int32) for i, c in enumerate(GROUPED_SIZES)] + [np.full(GROUPED_PAD, -1)])
    ks = jax.random.split(jax.random.key(seed("fp4_grouped", layout, scale_bytes)), 3)
    x = rand_bf16(ks[0], (rows, k), scale=1.0, spread=True)
    lead = (2,) if layout == "stacked-slabs" else ()
    wa, sa = rand_fp4_weight(ks[1], (*lead, e, n, k), scale_bytes)
    wb, sb = rand_fp4_weight(ks[2], (*lead, e, n, k), scale_bytes)
    if layout == "stacked-slabs":
        sa = sa.at[1, 2, 5, 3].set(jax.lax.bitcast_convert_type(jnp.uint8(255), jnp.float8_e8m0fnu))
    else:
        sa = sa.at[2, 5, 3].set(jax.lax.bitcast_convert_type(jnp.uint8(255), jnp.float8_e8m0fnu))
    layer = jnp.int32(1) if lead else None
    host = [(np.asarray(w[1] if lead else w), np.asarray(s[1] if lead else s)) for w, s in ((wa, sa), (wb, sb))]
    if layout != "stored":
        (wa, sa), (wb, sb) = quant.fp4_to_slabs(wa, sa), quant.fp4_to_slabs(wb, sb)
    gs = jnp.asarray(GROUPED_SIZES, jnp.int32)

    q_nat, sfa_nat = jax.jit(ffi.act_quant_rows)(x)
    q, sfa = jax.jit(lambda x: ffi.act_quant_rows(x, wgmma=True))(x)
    np.testing.assert_array_equal(np.asarray(sfa), np.asarray(sfa_nat))
    qb = np.asarray(jax.lax.bitcast_convert_type(q, jnp.uint8)).reshape(rows, k // 32, 2, 4, 4)  # [.., h, i, j]
    qn = np.asarray(jax.lax.bitcast_convert_type(q_nat, jnp.uint8)).reshape(rows, k // 32, 4, 2, 4)  # [.., i, h, j]
    np.testing.assert_array_equal(qb, qn.transpose(0, 1, 3, 2, 4))

    poison()
    pair = jax.jit(lambda q, sfa, gs, wa, sa, wb, sb: ffi.fp4_grouped(q, sfa, gs, ((wa, sa), (wb, sb)), layer))
    got_a, got_b = (np.asarray(v, np.float64) for v in pair(q, sfa, gs, wa, sa, wb, sb))
    single = jax.jit(lambda q, sfa, gs, w, s: ffi.fp4_grouped(q, sfa, gs, ((w, s),), layer)[0])
    np.testing.assert_array_equal(np.asarray(single(q, sfa, gs, wb, sb), np.float64), got_b)

    xd = act_quant_host(x)
    errs = []
    for got, (w, s), name in ((got_a, host[0], "first"), (got_b, host[1], "second")):
        assert (got[-GROUPED_PAD:] == 0).all(), f"{name}: padding rows must be exact zeros"
        want = np.zeros((rows, n))
        for i in range(e):
            sel = expert == i
            if sel.any():
                want[sel] = xd[sel] @ np.nan_to_num(dequant_host(w[i], s[i]), nan=0.0).T
        nan_rows = expert == 2
        if name == "first":  # the 255 byte: expert 2's outputs of weight row 5 NaN, nothing else
            assert np.isnan(got[nan_rows, 5]).all() and np.isfinite(np.delete(got, 5, axis=1)).all()
            assert np.isfinite(got[~nan_rows]).all()
            got, want = np.delete(got, 5, axis=1), np.delete(want, 5, axis=1)
        errs.append(check_close(got, want, 4e-3, f"fp4_grouped {layout} {scale_bytes} {name}"))
    gpu_report(f"[fp4_grouped {layout} scale bytes {scale_bytes}] rel-RMS vs float64: {errs[0]:.2e}, {errs[1]:.2e} "
               "(the bf16 rounding of the outputs alone: ~1.1e-3)", capsys)  # fmt: skip


def test_fp4_grouped_refuses_bad_arguments(ffi):
    """The handler names what it refuses: shapes that do not match, K off 128, an uneven second weight."""
    w, s = rand_fp4_weight(jax.random.key(0), (4, 256, 512))
    q, sfa = ffi.act_quant_rows(jnp.ones((8, 512), jnp.bfloat16), wgmma=True)
    gs = jnp.asarray([2, 2, 2, 2], jnp.int32)
    with pytest.raises(Exception, match="does not match"):
        jax.block_until_ready(ffi.fp4_grouped(q, sfa, gs, ((w, s), (w[:, :128], s[:, :128]))))
    with pytest.raises(Exception, match="one count per expert"):
        jax.block_until_ready(ffi.fp4_grouped(q, sfa, gs[:3], ((w, s),)))
    with pytest.raises(ValueError, match="one or two"):
        ffi.fp4_grouped(q, sfa, gs, ())
