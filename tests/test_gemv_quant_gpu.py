"""GPU tests of the dense FP8 linear's fused activation quantisation at decode sizes (M <= 8): the GEMV reads the
bf16 rows and quantises them per 1x128 itself (`dsv4_fp8_linear_fused`, one launch) instead of our quantisation
kernel followed by the GEMV (`dsv4_fp8_linear_separate`, two launches); and of a stacked layer's GEMV
(`dsv4_fp8_gemv_layer`), whose 9..64 rows take DeepGEMM's GEMM on the layer in place ("gemm") or the wide GEMV after
one quantisation or the fused GEMV in passes of 8, and of two such layer weights in one launch
(`dsv4_fp8_gemv_layer_pair`).
Run on the device: `pytest -m gpu tests/test_gemv_quant_gpu.py`.

Bounds: none. The two paths must agree bit for bit (the same e4m3 operands and power-of-two scales reach the same
mma sequence; the in-place layer GEMM and DeepGEMM's dense GEMM on the layer's slice share their tile and block
configuration, only the scheduler's layout differs), and the e4m3 activations and scales `dsv4_fp8_linear` returns
must equal `quant.act_quant` in either path. Every call gets poisoned output buffers (`poison()`: 0xFF is NaN in
bf16, f32 and e4m3), so an element either
path fails to write shows up.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison
from test_kernels_gpu import FLASH_LINEARS, rand_bf16, rand_fp8_weight

from dsv4_jax import quant

pytestmark = pytest.mark.gpu


def _run(ffi, mode, x, w, s):
    """(y bf16 bytes, q e4m3 bytes, sfa f32 bits [M, K/128]) of one `dsv4_fp8_linear` call with poisoned outputs."""
    poison()
    y, q, sfa = jax.jit(functools.partial(ffi.fp8_linear_call, quant=mode))(x, w, s)
    m = x.shape[0]
    return (
        np.asarray(y).view(np.uint16),
        np.asarray(q).view(np.uint8),
        np.ascontiguousarray(np.asarray(sfa)[:, :m].T).view(np.uint32),
    )


def _act_quant_ref(x):
    """quant.act_quant on the CPU: (e4m3 bytes [M, K], f32 scale bits [M, K/128])."""
    cpu = jax.devices("cpu")[0]
    q, s = jax.jit(quant.act_quant, static_argnums=1, device=cpu)(jax.device_put(x, cpu), 128)
    return np.asarray(q).view(np.uint8), np.asarray(s).view(np.uint32)


def _check(ffi, x, w, s, *, vs_act_quant=True):
    yf, qf, sf = _run(ffi, "fused", x, w, s)
    ys, qs, ss = _run(ffi, "separate", x, w, s)
    np.testing.assert_array_equal(qf, qs, err_msg="e4m3 activations: fused vs separate")
    np.testing.assert_array_equal(sf, ss, err_msg="activation scales: fused vs separate")
    np.testing.assert_array_equal(yf, ys, err_msg="output: fused vs separate (bf16 bits)")
    if vs_act_quant:
        assert np.isfinite(np.asarray(yf.view(jnp.bfloat16), np.float32)).all()
        q_ref, s_ref = _act_quant_ref(x)
        np.testing.assert_array_equal(qf, q_ref, err_msg="fused e4m3 activations vs quant.act_quant")
        np.testing.assert_array_equal(sf, s_ref, err_msg="fused activation scales vs quant.act_quant")


@pytest.mark.parametrize("n,k", FLASH_LINEARS)
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_fused_quant_matches_separate_flash_shapes(ffi, m, n, k):
    """The Flash decode linears at 1, 2, 5 (an 8-token pass with three empty tokens) and 8 rows; activations spread
    over many binades, some 128-blocks under the 1e-4 amax floor."""
    key = jax.random.key(7 * m + 3 * n + k)
    x = rand_bf16(key, (m, k), spread=True)
    w, s = rand_fp8_weight(jax.random.fold_in(key, 1), (n, k))
    _check(ffi, x, w, s)


@pytest.mark.parametrize("m,n,k", [(3, 520, 1152), (7, 520, 1152), (1, 256, 16384), (8, 256, 16384), (4, 136, 384)])
def test_fused_quant_odd_shapes(ffi, m, n, k):
    """A partial 16-row mma tile and 128-row scale block (N=520, 136), an odd number of K blocks (9, 3: a K slice ends
    inside a load chunk), the largest K the brief allows (16384), M=3 and 7 (empty tokens in a 4- and 8-token pass)."""
    key = jax.random.key(11 * m + n + k)
    x = rand_bf16(key, (m, k), spread=True)
    w, s = rand_fp8_weight(jax.random.fold_in(key, 1), (n, k))
    _check(ffi, x, w, s)


@pytest.mark.parametrize("ksplit", ["1", "2", "4", "8"])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_fused_quant_every_ksplit(ffi, m, ksplit, monkeypatch):
    """Every K split (DSV4_FFI_GEMV_KSPLIT, read at launch): with ksplit < 8 a block has several row groups of warps,
    and only row group 0 of block column 0 writes the quantised rows; the others must still quantise for their mma."""
    monkeypatch.setenv("DSV4_FFI_GEMV_KSPLIT", ksplit)
    key = jax.random.key(13 * m + int(ksplit))
    x = rand_bf16(key, (m, 4096), spread=True)
    w, s = rand_fp8_weight(jax.random.fold_in(key, 1), (1024, 4096))
    _check(ffi, x, w, s)


def test_fused_quant_special_values(ffi):
    """Blocks of zeros (the amax floor), tiny values (scaled below e4m3's smallest subnormal), bf16's largest finite
    value, +-inf and NaN: the fused quantisation reproduces the separate kernel's bytes (NaN -> -448 through its clamp;
    quant.act_quant is not the reference for inf/NaN), and so the same output bits, NaN payloads included."""
    m, n, k = 2, 1024, 1024
    x = np.asarray(rand_bf16(jax.random.key(5), (m, k), spread=False), np.float32)
    x[0, 0:128] = 0.0
    x[0, 128:256] *= 1e-30
    x[0, 256] = np.float32(jnp.finfo(jnp.bfloat16).max)
    x[0, 384], x[0, 385] = np.inf, -np.inf
    x[0, 512 + 7] = np.nan
    x[1, 640:768] = -0.0
    x[1, 900] = np.nan
    x = jnp.asarray(x, jnp.bfloat16)
    w, s = rand_fp8_weight(jax.random.key(6), (n, k))
    _check(ffi, x, w, s, vs_act_quant=False)
    # the finite blocks still equal quant.act_quant
    yf, qf, sf = _run(ffi, "fused", x, w, s)
    q_ref, s_ref = _act_quant_ref(x)
    finite_blocks = [0, 1, 2, 5, 6, 7]  # of row 0 (blocks 3 and 4 hold inf and NaN)
    for b in finite_blocks:
        np.testing.assert_array_equal(qf[0, 128 * b : 128 * (b + 1)], q_ref[0, 128 * b : 128 * (b + 1)])
        assert sf[0, b] == s_ref[0, b]


@pytest.mark.parametrize("env", ["fused", "separate"])
def test_plain_target_follows_env(ffi, env, monkeypatch):
    """The plain `dsv4_fp8_linear` target (what `fp8_linear` calls by default) reads DSV4_FFI_GEMV_QUANT at launch;
    either way the result is the same bits."""
    monkeypatch.setenv("DSV4_FFI_GEMV_QUANT", env)
    key = jax.random.key(17)
    x = rand_bf16(key, (1, 4096), spread=True)
    w, s = rand_fp8_weight(jax.random.fold_in(key, 1), (2048, 4096))
    y, q, sfa = _run(ffi, None, x, w, s)
    yf, qf, sf = _run(ffi, "fused", x, w, s)
    np.testing.assert_array_equal(y, yf)
    np.testing.assert_array_equal(q, qf)
    np.testing.assert_array_equal(sfa, sf)
    out = jax.jit(ffi.fp8_linear)(x, w, s)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint16), yf)


@pytest.mark.parametrize("n,k", [(1024, 4096), (32768, 1024), (4096, 8192), (4096, 2048)])
@pytest.mark.parametrize(
    "m,route", [(1, "wide"), (3, "wide"), (8, "wide"), (16, "wide"), (21, "wide"), (64, "wide"), (16, "passes"),
                (21, "passes"), (64, "passes")]
)  # fmt: skip
def test_gemv_layer_matches_quant_then_gemv(ffi, n, k, m, route, monkeypatch):
    """`dsv4_fp8_gemv_layer` (a layer of a stacked weight: what the layer scan runs at decode; up to 8 rows the
    activation quantised inside the GEMV, beyond that (`DSV4_FFI_GEMV_LAYER`) quantised once then passes of 16 or 32
    rows ("wide"), or the fused GEMV in passes of 8 ("passes")) against our quantisation kernel + `dsv4_fp8_gemv`
    with the same layer as the group of every row: bit-identical, for a nonzero layer of a 3-layer stack."""
    monkeypatch.setenv("DSV4_FFI_GEMV_LAYER", route)
    keys = jax.random.split(jax.random.key(m * 7 + n + k), 2)
    x = rand_bf16(keys[0], (m, k))
    w, s = rand_fp8_weight(keys[1], (3, n, k))
    f = jax.jit(lambda *a: ffi.fp8_gemv_layer(*a))  # a fresh trace: the route is read when tracing
    assert (f"tensor<{m}x{k}xf8E4M3FN>" in f.lower(x, w, s, jnp.int32(1)).as_text()) == (m > 8 and route == "wide")
    for layer in (1, 2):
        poison()
        got = np.asarray(f(x, w, s, jnp.int32(layer))).view(np.uint16)
        q, sfa = ffi.act_quant_rows(x)
        poison()
        want = np.asarray(ffi.fp8_gemv(q, sfa, w, s, groups=jnp.full((m,), layer, jnp.int32))).view(np.uint16)
        np.testing.assert_array_equal(got, want, err_msg=f"layer {layer}")
        assert (got != 0).mean() > 0.99


@pytest.mark.parametrize("n,k", [(1024, 4096), (32768, 1024), (4096, 8192), (512, 4096), (8192, 1024), (512, 256)])
@pytest.mark.parametrize("m", [9, 17, 24, 33, 64])
def test_gemv_layer_gemm_route_matches_dense_gemm_on_the_slice(ffi, n, k, m, monkeypatch):
    """The "gemm" route (DeepGEMM's m-grouped contiguous GEMM reading layer `layer` of the stack in place; the rows'
    group map written by the quantisation launch) against `fp8_linear` (our quantisation + DeepGEMM's dense GEMM) on
    the layer's slice: bit-identical, for every layer of a 3-layer stack and an index past the end (clamped, as XLA
    clamps it); rows not a multiple of the 64-row block."""
    monkeypatch.setenv("DSV4_FFI_GEMV_LAYER", "gemm")
    if not ffi.layer_gemm_instantiated(n, k):
        pytest.fail(f"no layer GEMM instantiated for N={n} K={k} (a Flash or tiny linear: gen_instantiations.py)")
    keys = jax.random.split(jax.random.key(m * 5 + n + k), 2)
    x = rand_bf16(keys[0], (m, k))
    w, s = rand_fp8_weight(keys[1], (3, n, k))
    f = jax.jit(lambda *a: ffi.fp8_gemv_layer(*a))
    assert "tensor<64xi32>" in f.lower(x, w, s, jnp.int32(1)).as_text()
    dense = jax.jit(ffi.fp8_linear)
    for layer in (0, 1, 2, 5):
        poison()
        got = np.asarray(f(x, w, s, jnp.int32(layer))).view(np.uint16)
        poison()
        want = np.asarray(dense(x, w[min(layer, 2)], s[min(layer, 2)])).view(np.uint16)
        np.testing.assert_array_equal(got, want, err_msg=f"layer {layer}")
        assert (got != 0).mean() > 0.99


@pytest.mark.parametrize("n1,n2,k", [(32768, 8192, 1024), (1024, 512, 4096), (2048, 2048, 4096)])
def test_gemv_layer_pair_gemm_route_matches_two_calls(ffi, n1, n2, k, monkeypatch):
    """The pair on the "gemm" route (one quantisation, two in-place GEMMs) against two single calls: bit-identical."""
    monkeypatch.setenv("DSV4_FFI_GEMV_LAYER", "gemm")
    keys = jax.random.split(jax.random.key(n1 + n2 + k), 3)
    x = rand_bf16(keys[0], (32, k))
    w1, s1 = rand_fp8_weight(keys[1], (3, n1, k))
    w2, s2 = rand_fp8_weight(keys[2], (3, n2, k))
    pair, one = jax.jit(lambda *a: ffi.fp8_gemv_layer_pair(*a)), jax.jit(lambda *a: ffi.fp8_gemv_layer(*a))
    poison()
    y1, y2 = (np.asarray(y).view(np.uint16) for y in pair(x, w1, s1, w2, s2, jnp.int32(2)))
    for got, w, s in ((y1, w1, s1), (y2, w2, s2)):
        poison()
        np.testing.assert_array_equal(got, np.asarray(one(x, w, s, jnp.int32(2))).view(np.uint16))


def test_gemv_layer_gemm_route_reads_any_layer_of_a_deep_stack(ffi, monkeypatch):
    """The gemm route has no layer limit (the rows' group map names the layer; B is described as the stack's L
    layers): layers 0, 40 and 69 of a 70-layer stack, bit-identical to the dense GEMM on each slice."""
    monkeypatch.setenv("DSV4_FFI_GEMV_LAYER", "gemm")
    keys = jax.random.split(jax.random.key(70), 2)
    x = rand_bf16(keys[0], (24, 256))
    w, s = rand_fp8_weight(keys[1], (70, 512, 256))
    f, dense = jax.jit(lambda *a: ffi.fp8_gemv_layer(*a)), jax.jit(ffi.fp8_linear)
    for layer in (0, 40, 69):
        poison()
        got = np.asarray(f(x, w, s, jnp.int32(layer))).view(np.uint16)
        np.testing.assert_array_equal(got, np.asarray(dense(x, w[layer], s[layer])).view(np.uint16), f"layer {layer}")


def test_gemv_layer_gemm_route_refuses_what_it_cannot_take(ffi):
    """The gemm route's handler names what it cannot take: a group map of the wrong size, a shape without its
    instantiation."""
    x = jnp.ones((24, 256), jnp.bfloat16)
    w, s = rand_fp8_weight(jax.random.key(1), (2, 512, 256))

    def call(w, s, groups):
        return jax.ffi.ffi_call(
            "dsv4_fp8_gemv_layer",
            (jax.ShapeDtypeStruct((24, w.shape[1]), jnp.bfloat16), jax.ShapeDtypeStruct((24, 256), jnp.float8_e4m3fn),
             jax.ShapeDtypeStruct((2, 24), jnp.float32), jax.ShapeDtypeStruct((groups,), jnp.int32)),
        )(x, w, ffi.sm90_weight_scales(s), jnp.zeros((1,), jnp.int32))[0].block_until_ready()  # fmt: skip

    call(w, s, 64)  # well formed: runs
    with pytest.raises(Exception, match=r"groups \[64\]"):
        call(w, s, 32)
    w2, s2 = rand_fp8_weight(jax.random.key(2), (2, 520, 256))
    with pytest.raises(Exception, match="no AOT instantiation for layer N=520"):
        call(w2, s2, 64)


def test_gemv_layer_wide_route_refuses_bad_workspaces(ffi):
    """The wide route's workspace is checked by the handler: an e4m3 `[R, K]` q and a scale pitch of >= R, a
    multiple of 4; too few layer indices for its passes of 32 rows are refused with the tensor named."""
    x = jnp.ones((24, 256), jnp.bfloat16)
    w, s = rand_fp8_weight(jax.random.key(0), (2, 256, 256))

    def call(q_shape, sfa_shape, passes):
        return jax.ffi.ffi_call(
            "dsv4_fp8_gemv_layer",
            (jax.ShapeDtypeStruct((24, 256), jnp.bfloat16), jax.ShapeDtypeStruct(q_shape, jnp.float8_e4m3fn),
             jax.ShapeDtypeStruct(sfa_shape, jnp.float32), jax.ShapeDtypeStruct((0,), jnp.int32)),
        )(x, w, ffi.sm90_weight_scales(s), jnp.zeros((passes,), jnp.int32))[0].block_until_ready()  # fmt: skip

    call((24, 256), (2, 24), 1)  # well formed: runs
    with pytest.raises(Exception, match="workspace q"):
        call((24, 128), (2, 24), 1)
    with pytest.raises(Exception, match="scale pitch"):
        call((24, 256), (2, 26), 1)
    with pytest.raises(Exception, match="layer must hold the layer index once per segment of 32 rows"):
        call((24, 256), (2, 24), 3)


@pytest.mark.parametrize(
    "n1,n2,k", [(1024, 512, 4096), (32768, 8192, 1024), (2048, 2048, 4096), (512, 1024, 4096), (136, 520, 384)]
)  # fmt: skip
@pytest.mark.parametrize("m,route", [(1, "wide"), (3, "wide"), (8, "wide"), (16, "wide"), (24, "wide"), (40, "wide"),
                                     (24, "passes")])  # fmt: skip
def test_gemv_layer_pair_matches_two_layer_gemvs(ffi, n1, n2, k, m, route, monkeypatch):
    """`dsv4_fp8_gemv_layer_pair` (two stacks one input feeds, in one launch: wq_a + wkv, wq_b + the indexer's wq_b,
    the shared expert's w1 + w3) against two `dsv4_fp8_gemv_layer` calls on the same route (up to 8 rows fused; beyond,
    one quantisation then the wide GEMV, or passes of 8): bit-identical, either projection the wider, N not a multiple
    of the block's columns, for a nonzero layer of a 3-layer stack."""
    monkeypatch.setenv("DSV4_FFI_GEMV_LAYER", route)
    keys = jax.random.split(jax.random.key(m * 13 + n1 + n2 + k), 3)
    x = rand_bf16(keys[0], (m, k))
    w1, s1 = rand_fp8_weight(keys[1], (3, n1, k))
    w2, s2 = rand_fp8_weight(keys[2], (3, n2, k))
    pair, one = jax.jit(lambda *a: ffi.fp8_gemv_layer_pair(*a)), jax.jit(lambda *a: ffi.fp8_gemv_layer(*a))
    for layer in (1, 2):
        poison()
        y1, y2 = (np.asarray(y).view(np.uint16) for y in pair(x, w1, s1, w2, s2, jnp.int32(layer)))
        for got, w, s, name in ((y1, w1, s1, "first"), (y2, w2, s2, "second")):
            poison()
            want = np.asarray(one(x, w, s, jnp.int32(layer))).view(np.uint16)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} projection, layer {layer}")
            assert (got != 0).mean() > 0.99


def test_gemv_layer_pair_refuses_mismatched_stacks(ffi):
    """The handler names what does not match: stacks of different layer counts or K, more than 64 rows."""
    x = jnp.ones((2, 256), jnp.bfloat16)
    w, s = rand_fp8_weight(jax.random.key(0), (2, 256, 256))
    w3, s3 = rand_fp8_weight(jax.random.key(1), (3, 128, 256))
    wk, sk = rand_fp8_weight(jax.random.key(2), (2, 128, 384))

    def call(x, w2, s2):
        out = (jax.ShapeDtypeStruct((x.shape[0], 256), jnp.bfloat16),
               jax.ShapeDtypeStruct((x.shape[0], w2.shape[1]), jnp.bfloat16),
               jax.ShapeDtypeStruct((0,), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((0,), jnp.float32),
               jax.ShapeDtypeStruct((0,), jnp.int32))  # fmt: skip
        return jax.ffi.ffi_call("dsv4_fp8_gemv_layer_pair", out)(
            x, w, ffi.sm90_weight_scales(s), w2, ffi.sm90_weight_scales(s2), jnp.zeros((1,), jnp.int32)
        )[0].block_until_ready()

    call(x, w, s)  # well formed: runs
    with pytest.raises(Exception, match="layer stacks"):
        call(x, w3, s3)
    with pytest.raises(Exception, match="differ in K"):
        call(x, wk, sk)
    with pytest.raises(Exception, match="at most 64"):
        call(jnp.ones((65, 256), jnp.bfloat16), w, s)


@pytest.mark.parametrize("knob,kernel", [("8", "dsv4_fp8_linear"), (None, "dsv4_fp8_gemv_layer")])
def test_layer_gemv_rows_knob(ffi, monkeypatch, knob, kernel):
    """`DSV4_FFI_LAYER_GEMV_MAX_M`: a stacked layer's 24 rows go to the layer op (no slice) by default and to
    DeepGEMM on the layer's slice with the knob at 8; both within the GEMV's own result's bf16 rounding of each other
    (the same FP8 operands, fp32 sums in another order; atol: where the products cancel)."""
    from dsv4_jax import ops
    from dsv4_jax.layer_view import LayerSlice

    if knob is None:
        monkeypatch.delenv("DSV4_FFI_LAYER_GEMV_MAX_M", raising=False)
    else:
        monkeypatch.setenv("DSV4_FFI_LAYER_GEMV_MAX_M", knob)
    keys = jax.random.split(jax.random.key(11), 2)
    x = rand_bf16(keys[0], (24, 4096))
    w, s = rand_fp8_weight(keys[1], (3, 1024, 4096))
    f = jax.jit(lambda x, w, s: ops.fp8_linear(x, LayerSlice(w, jnp.int32(2)), LayerSlice(s, jnp.int32(2)),
                                               opts=ops.Opts(backend="ffi")))  # fmt: skip
    assert f"@{kernel}" in f.lower(x, w, s).as_text() or f'"{kernel}"' in f.lower(x, w, s).as_text()
    got = np.asarray(f(x, w, s), np.float32)
    want = np.asarray(jax.jit(ffi.fp8_gemv_layer)(x, w, s, jnp.int32(2)), np.float32)
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-3 * np.abs(want).max())
