"""GPU tests of the dsv4_jax_ffi kernels against the pure-JAX reference (run on the device: `pytest -m gpu`).

Every check draws fresh random inputs (never zeros) and poisons device memory before each kernel call (a 0xFF-filled
block is allocated and freed, so XLA's allocator hands the kernel outputs poisoned memory; 0xFF is NaN in bf16, f32
and e4m3): an element the kernel fails to write shows up as NaN or a mismatch.

Bounds (relative RMS error over the checked elements):
  * act_quant: bit-identical (FP8 bytes and FP32 scales).
  * FP8 GEMMs (dense, grouped) vs the reference blockwise FP32 accumulation of the same FP8 operands, bf16 output:
    <= 2e-3 (accumulation order inside the tensor cores + one bf16 rounding; bf16 has 8 mantissa bits, 2^-9 ~ 2e-3
    is the worst single rounding).
  * Routed experts (grouped path incl. the fused SwiGLU quantization) vs the dense reference: <= 1e-2 (the FP8
    re-quantization of h can flip by one e4m3 step where the reference and kernel SwiGLU differ in the last bit).
  * End to end: kernel logits vs reference logits no further apart than the reference from itself under one-ulp
    bf16 perturbations of the input embeddings.

Observed on an H100 (2026-11-22): XLA rewrites a dot of fp8-converted operands into a cuBLASLt GEMM that was
~2.7e-2 off the exact product; the reference therefore decodes FP8 bytes by table lookup (`quant.e4m3_to_f32`) and
is now bit-identical on GPU and CPU (`benchmarks/gpu_reference_check.py`). The FP8 linear tests still compare with a
float64 host reference, which is independent of XLA altogether.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import ops, quant

pytestmark = pytest.mark.gpu

FLASH_LINEARS = [(1024, 4096), (32768, 1024), (512, 4096), (4096, 8192), (8192, 1024), (2048, 4096), (4096, 2048)]


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


@pytest.fixture(scope="module")
def ffi():
    from dsv4_jax.kernels import ffi_ops

    mod, why = ffi_ops.load()
    if mod is None:
        pytest.fail(f"GPU present but the FFI extension is unavailable: {why}")
    return ffi_ops


def poison(nbytes: int = 1 << 30) -> None:
    jax.block_until_ready(jnp.full((nbytes // 4,), 0xFFFFFFFF, jnp.uint32)).delete()


def rand_bf16(key, shape, spread: bool = True):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, shape, jnp.float32)
    if spread:  # row magnitudes over many binades, some blocks under the 1e-4 amax floor
        x = x * 10.0 ** jax.random.uniform(k2, shape[:-1] + (1,), minval=-7, maxval=3)
    return x.astype(jnp.bfloat16)


def rand_fp8_weight(key, shape):
    """Random e4m3 weight bytes (nonzero, |v| in [2^-6, 240], either sign) and UE8M0 block scales 2^-9..2^-5, drawn
    as bytes from uint32 random bits (one draw per 4 bytes): a 256-expert Flash projection stays 2 GB on the device,
    where drawing a uint32 (or float32) per element would take 8 GB per test and run parallel workers out of memory."""
    k1, k2 = jax.random.split(key)
    bits = jax.random.bits(k1, (*shape[:-1], shape[-1] // 4), jnp.uint32)
    b = jax.lax.bitcast_convert_type(bits, jnp.uint8).reshape(shape)
    # bit 7: sign; bits 0-6 -> magnitude byte 0x08..0x76 (exponent >= 1: no subnormals, no NaN)
    w = jax.lax.bitcast_convert_type((b & 0x80) | (0x08 + (b & 0x7F) % 0x6F), jnp.float8_e4m3fn)
    sshape = (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    s = jax.random.randint(k2, sshape, 127 - 9, 127 - 4, jnp.uint8)
    return w, jax.lax.bitcast_convert_type(s, jnp.float8_e8m0fnu)


@pytest.mark.parametrize("m,k", [(1, 4096), (7, 1024), (130, 4096), (1000, 2048)])
def test_act_quant_bit_identical(ffi, m, k):
    x = rand_bf16(jax.random.key(m * 7 + k), (m, k))
    poison()
    q, s = jax.jit(ffi.act_quant)(x)
    cpu = jax.devices("cpu")[0]
    q_ref, s_ref = jax.jit(quant.act_quant, static_argnums=1, device=cpu)(jax.device_put(x, cpu), 128)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(q_ref).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(s).view(np.uint32), np.asarray(s_ref).view(np.uint32))


def _host_ref_rows(x, w, s, rows):
    """float64 host reference of the quant_sim FP8 linear on `rows` (the exact FP8 operands; XLA not involved)."""
    cpu = jax.devices("cpu")[0]
    xq, sx = jax.jit(quant.act_quant, static_argnums=1)(jax.device_put(x, cpu), 128)
    xd = np.asarray(xq, np.float64) * np.repeat(np.asarray(sx, np.float64), 128, axis=-1)
    wd = np.asarray(quant.dequant_fp8_weight(jax.device_put(w, cpu), jax.device_put(s, cpu)), np.float64)
    return xd[rows] @ wd.T


@pytest.mark.parametrize("n,k", FLASH_LINEARS)
@pytest.mark.parametrize("m,multicast", [(1, "0"), (5, "0"), (8, "0"), (64, "0"), (65, "0"), (1024, "0"), (1024, "1")])
def test_fp8_linear(ffi, m, multicast, n, k, monkeypatch):
    """M <= 8 runs the GEMV, larger M the DeepGEMM GEMMs (M=1024 also the opt-in TMA-multicast variant)."""
    monkeypatch.setenv("DSV4_FFI_TMA_MULTICAST", multicast)
    key = jax.random.key(m + 3 * n + k)
    x = rand_bf16(key, (m, k), spread=False)
    w, s = rand_fp8_weight(jax.random.fold_in(key, 1), (n, k))
    rows = np.arange(m) if m <= 65 else np.sort(np.random.default_rng(m).choice(m, 48, replace=False))
    want = _host_ref_rows(x, w, s, rows)
    poison()
    out = np.asarray(jax.jit(ffi.fp8_linear)(x, w, s), np.float32)
    assert np.isfinite(out).all()
    ref = np.asarray(
        jax.jit(lambda x, w, s: ops.fp8_linear(x, w, s, ops.Opts(backend="reference")))(x, w, s), np.float32
    )
    err, err_xla_ref = rel_rms(out[rows], want), rel_rms(ref[rows], want)
    assert err <= 2e-3, f"kernel vs float64: {err:.3e} (XLA reference vs float64: {err_xla_ref:.3e})"


@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (8192, 1024), (520, 2048)])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("impl", ["mma", "cuda"])
def test_gemv_dense_variants(ffi, m, n, k, impl, monkeypatch):
    """Dense decode linears through both GEMV variants: 1, 2, 4 and 8 tokens per pass over the weights (M=3 leaves
    a segment part empty), N=520 a partial 16-row mma tile and a partial 128-row scale block."""
    monkeypatch.setenv("DSV4_FFI_GEMV", impl)
    key = jax.random.key(m + 5 * n + k)
    x = rand_bf16(key, (m, k), spread=True)
    w, s = rand_fp8_weight(jax.random.fold_in(key, 1), (n, k))
    want = _host_ref_rows(x, w, s, np.arange(m))
    poison()
    out = np.asarray(jax.jit(ffi.fp8_linear)(x, w, s), np.float32)
    assert out.shape == (m, n) and np.isfinite(out).all()
    assert rel_rms(out, want) <= 2e-3


def _grouped_case(key, t, k, e, n, kdim):
    """Random routing of t tokens to k of e experts (each token's experts distinct), FP8 weights, FP8 inputs."""
    ks = jax.random.split(key, 4)
    idx = jnp.argsort(jax.random.uniform(ks[0], (t, e)), axis=-1)[:, :k].astype(jnp.int32)
    x = rand_bf16(ks[1], (t, kdim), spread=False)
    w, s = rand_fp8_weight(ks[2], (e, n, kdim))
    return idx, x, w, s


def _ref_rows(xq, sx, w, s, expert_of_row):
    """Reference: row r times expert expert_of_row[r], the exact FP8 operands, float64 accumulation on the host
    (only the experts used are dequantized)."""
    out = {}
    xd = np.asarray(xq.astype(jnp.float32)) * np.repeat(np.asarray(sx), 128, axis=-1)
    for e in np.unique(expert_of_row):
        rows = np.nonzero(expert_of_row == e)[0]
        wd = np.asarray(quant.dequant_fp8_weight(w[int(e)], s[int(e)]), np.float64)
        out.update(zip(rows, xd[rows].astype(np.float64) @ wd.T, strict=True))
    return out


@pytest.mark.parametrize(
    "layout,t,multicast",
    [("contig", 512, "0"), ("contig", 512, "1"), ("contig", 8, "0"), ("masked", 16, "0"), ("masked", 64, "0")],
)
@pytest.mark.parametrize("n,kdim", [(2048, 4096), (4096, 2048)])
def test_grouped_gemm(ffi, layout, t, multicast, n, kdim, monkeypatch):
    """contig 512 tokens runs BLOCK_M 128, with DSV4_FFI_TMA_MULTICAST=1 the cluster-of-2 variant."""
    from dsv4_jax.kernels import moe_grouped

    monkeypatch.setenv("DSV4_FFI_TMA_MULTICAST", multicast)
    e, k = 256, 6
    idx, x, w, s = _grouped_case(jax.random.key(t + n), t, k, e, n, kdim)
    block_m = 64 if (layout == "masked" or t <= 256) else 128
    dest, rows, lay = moe_grouped.plan_rows(idx, e, layout, block_m)
    tok = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    src = jnp.full((rows,), -1, jnp.int32).at[dest.reshape(-1)].set(tok)
    groups = e if layout == "masked" else 1
    q, sfa = ffi.act_quant_rows(x, src=src, rows_out=rows, groups=groups)
    poison()
    if layout == "masked":
        y = ffi.grouped_gemm_masked(q.reshape(e, rows // e, -1), sfa, w, s, lay, block_m).reshape(rows, n)
    else:
        y = ffi.grouped_gemm_contig(q, sfa, w, s, lay, block_m)
    y = np.asarray(y, np.float32)
    d = np.asarray(dest).reshape(-1)
    xq, sx = quant.act_quant(x, 128)
    ref = _ref_rows(xq[np.asarray(tok)], sx[np.asarray(tok)], w, s, np.asarray(idx).reshape(-1))
    got = y[d]
    want = np.stack([ref[i] for i in range(len(d))])
    assert np.isfinite(got).all()
    assert rel_rms(got, want) <= 2e-3


@pytest.mark.parametrize("t", [4, 60, 100])
def test_routed_experts_vs_reference(ffi, t):
    """The kernel path through moe.Experts (dispatch hook) vs the dense reference, tiny-width FP8 experts (top-2):
    4 tokens run the per-pair GEMV (8 pairs), 60 the masked and 100 the contiguous grouped GEMMs."""
    from flax import nnx

    import dsv4_jax
    from dsv4_jax import moe

    cfg = dsv4_jax.Config.tiny(expert_dtype="fp8")
    experts = moe.Experts(cfg, rngs=nnx.Rngs(t))
    key = jax.random.key(t)
    x = rand_bf16(key, (t, cfg.dim), spread=False)
    idx = jnp.argsort(jax.random.uniform(jax.random.fold_in(key, 1), (t, cfg.n_routed_experts)), -1)[:, :2]
    w = jax.random.uniform(jax.random.fold_in(key, 2), (t, 2), minval=0.1, maxval=1.0)
    dense = jnp.zeros((t, cfg.n_routed_experts)).at[jnp.arange(t)[:, None], idx].add(w)
    ref = experts(x, dense, ops.Opts(backend="reference"))
    poison()
    got = experts(x, dense, ops.Opts(backend="ffi"))
    assert np.isfinite(np.asarray(got)).all()
    assert rel_rms(got, ref) <= 1e-2


@pytest.mark.parametrize("n,kdim", [(2048, 4096), (4096, 2048), (1024, 4096)])
@pytest.mark.parametrize("pairs", [1, 6, 96])
@pytest.mark.parametrize("impl", ["mma", "cuda"])
def test_gemv_pairs(ffi, pairs, n, kdim, impl, monkeypatch):
    """Per-(token, expert) GEMV rows: output p = activation row rows[p] x expert groups[p]. With 96 pairs two rows are
    invalid on purpose (an out-of-range activation row, a negative expert): they must come back as zeros. Both
    variants: tensor-core mma (default) and the CUDA-core loop (DSV4_FFI_GEMV=cuda)."""
    monkeypatch.setenv("DSV4_FFI_GEMV", impl)
    e, t = 32, max(1, pairs // 6)
    ks = jax.random.split(jax.random.key(pairs * 7 + n), 4)
    x = rand_bf16(ks[0], (t, kdim), spread=True)
    w, s = rand_fp8_weight(ks[1], (e, n, kdim))
    rows = jax.random.randint(ks[2], (pairs,), 0, t, jnp.int32)
    groups = jax.random.randint(ks[3], (pairs,), 0, e, jnp.int32)
    bad = []
    if pairs > 2:
        rows, groups, bad = rows.at[0].set(t + 5), groups.at[pairs - 1].set(-1), [0, pairs - 1]
    q, sfa = ffi.act_quant_rows(x)
    poison()
    got = np.asarray(ffi.fp8_gemv(q, sfa, w, s, rows=rows, groups=groups), np.float32)
    assert got.shape == (pairs, n) and np.isfinite(got).all()
    assert (got[bad] == 0).all()
    ok = np.setdiff1d(np.arange(pairs), bad)
    xq, sx = quant.act_quant(x, 128)
    r_np, g_np = np.asarray(rows)[ok], np.asarray(groups)[ok]
    ref = _ref_rows(xq[r_np], sx[r_np], w, s, g_np)
    want = np.stack([ref[i] for i in range(len(ok))])
    assert rel_rms(got[ok], want) <= 2e-3


@pytest.mark.parametrize("pairs,dense", [(6, False), (48, False), (3, True)])
@pytest.mark.parametrize("impl", ["mma", "cuda"])
def test_gemv_pair_matches_two_gemvs(ffi, pairs, dense, impl, monkeypatch):
    """The gate/up pair in one launch is bit-identical to two single-projection launches (same kernel, same K order),
    grouped (T=1 and T=8 tokens x top-6, one out-of-range activation row and one negative expert: zeros in both
    outputs) and dense (M=3: 4 tokens per weight pass, one slot empty)."""
    monkeypatch.setenv("DSV4_FFI_GEMV", impl)
    n, kdim, e = 2048, 4096, 32
    ks = jax.random.split(jax.random.key(pairs + 100 * dense), 5)
    t = pairs if dense else max(1, pairs // 6)
    x = rand_bf16(ks[0], (t, kdim), spread=True)
    shape = (n, kdim) if dense else (e, n, kdim)
    w1, s1 = rand_fp8_weight(ks[1], shape)
    w3, s3 = rand_fp8_weight(ks[2], shape)
    q, sfa = ffi.act_quant_rows(x)
    rows = groups = None
    if not dense:
        rows = jax.random.randint(ks[3], (pairs,), 0, t, jnp.int32).at[0].set(t + 5)
        groups = jax.random.randint(ks[4], (pairs,), 0, e, jnp.int32).at[pairs - 1].set(-1)
    poison()
    g, u = (np.asarray(o, np.float32) for o in ffi.fp8_gemv_pair(q, sfa, w1, s1, w3, s3, rows=rows, groups=groups))
    g1 = np.asarray(ffi.fp8_gemv(q, sfa, w1, s1, rows=rows, groups=groups), np.float32)
    u1 = np.asarray(ffi.fp8_gemv(q, sfa, w3, s3, rows=rows, groups=groups), np.float32)
    assert g.shape == u.shape == (pairs, n) and np.isfinite(g).all() and np.isfinite(u).all()
    np.testing.assert_array_equal(g, g1)
    np.testing.assert_array_equal(u, u1)
    live = slice(None) if dense else slice(1, pairs - 1)
    assert (g[live] != 0).mean() > 0.99 and (u[live] != 0).mean() > 0.99 and not np.array_equal(g, u)
    if not dense:
        assert (g[[0, pairs - 1]] == 0).all() and (u[[0, pairs - 1]] == 0).all()


def test_commands_buffers_capture_the_kernels():
    """Handlers are declared command-buffer compatible: force XLA to record them into CUDA graphs (custom calls
    included, any graph size) and check, in a fresh process, that they were recorded and that the replayed graphs
    give bit-identical results to plain stream execution."""
    import json
    import pathlib
    import subprocess
    import sys

    probe = pathlib.Path(__file__).with_name("gpu_cmdbuf_probe.py")
    outs = {}
    for mode, flags in (
        ("graphs", "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"),
        ("stream", "--xla_gpu_enable_command_buffer="),
    ):
        env = dict(os.environ, XLA_FLAGS=flags, XLA_PYTHON_CLIENT_MEM_FRACTION="0.2")
        try:
            r = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{mode}: probe timed out after 150 s\nstdout: {e.stdout}\nstderr: {str(e.stderr)[-3000:]}")
        assert r.returncode == 0, f"{mode}: probe failed\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        outs[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    assert outs["graphs"]["captured"], f"no dsv4 custom call was recorded in a command buffer: {outs['graphs']}"
    assert not outs["stream"]["captured"]
    assert outs["graphs"]["digests"] == outs["stream"]["digests"]
    assert outs["graphs"]["replays_agree"]


def _perturb_embeddings(state, seed):
    import dsv4_jax

    model = state.model()
    w = model.embed.weight[...]
    bits = jax.lax.bitcast_convert_type(w, jnp.uint16).astype(jnp.int32)
    step = jax.random.choice(jax.random.key(seed), jnp.array([-1, 1], jnp.int32), w.shape)
    model.embed.weight.value = jax.lax.bitcast_convert_type((bits + step).astype(jnp.uint16), jnp.bfloat16)
    return dsv4_jax.ModelState.from_model(model)


@pytest.mark.parametrize("expert_dtype,batch,seq", [("fp4", 2, 64), ("fp8", 2, 64), ("fp8", 4, 1)])
def test_end_to_end_flash_layers(ffi, expert_dtype, batch, seq, capsys):
    """seq=1 (a decode-sized forward, 4 rows): every FP8 linear and the routed experts run the GEMV paths."""
    import dsv4_jax

    if expert_dtype == "fp4":  # full-width Flash layers (FP8 linears through the kernels), 16 experts to fit memory
        cfg = dsv4_jax.Config.flash(
            n_layers=2, compress_ratios=(4, 128, 0), n_hash_layers=1, vocab_size=4096, n_routed_experts=16
        )
    else:  # FP8 routed experts through the grouped kernels: tiny widths (instantiated for G=8)
        cfg = dsv4_jax.Config.tiny(expert_dtype="fp8")
    state = dsv4_jax.init_random(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 2, cfg.vocab_size)
    ref = np.asarray(dsv4_jax.forward(state, tokens, backend="reference"))
    got = np.asarray(dsv4_jax.forward(state, tokens, backend="ffi"))
    noise = max(rel_rms(np.asarray(dsv4_jax.forward(_perturb_embeddings(state, s), tokens)), ref) for s in (1, 2))
    err = rel_rms(got, ref)
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    line = (
        f"[e2e {expert_dtype}-experts config, tokens {batch}x{seq}] rel-RMS(ffi, ref)={err:.3e} "
        f"one-ulp noise floor={noise:.3e} argmax agreement={agree:.4f}"
    )
    with capsys.disabled():
        print("\n" + line)
    if report := os.environ.get("DSV4_GPU_REPORT"):  # pytest-xdist workers do not forward prints
        with open(report, "a") as f:
            f.write(line + "\n")
    assert np.isfinite(got).all()
    assert err <= noise
