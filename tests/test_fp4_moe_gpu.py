"""GPU tests of the MXFP4 routed-expert launches: the fused gate/up + SwiGLU (`dsv4_fp4_moe_gate_up`), the down
projection (`dsv4_fp4_moe_down`), a whole routed-expert step against the reference ops, the variant knob, the
handlers' shape checks and capture in XLA command buffers. Bounds, conventions and helpers:
tests/test_fp4_kernels_gpu.py (its docstring says why each bound). Run on the device:
`pytest -m gpu tests/test_fp4_moe_gpu.py`.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import command_buffer_probe, poison  # the `ffi` fixture lives in conftest too
from test_fp4_kernels_gpu import (
    BF16,
    BIT_IDENTICAL_MIN,
    FLASH,
    SMALL,
    VARIANTS,
    act_quant_host,
    bf16_bits_equal,
    check_close,
    rand_bf16,
    rand_fp4_experts,
    rand_fp4_weight,
    ref_linear,
    routing,
    seed,
    swiglu_f32,
)

pytestmark = pytest.mark.gpu


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
    w1, s1, w3, s3, w2, s2 = rand_fp4_experts(ks[1:4], e, d, i)
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
    command_buffer_probe(probe, str(pathlib.Path(__file__).parent), timeout=200)
