"""GPU tests of the lightning indexer's score kernels (`dsv4_indexer_scores`, op `ops.indexer_scores`; its mma.sync
and wgmma variants) against the pure-JAX reference (on the device: `pytest -m gpu tests/test_indexer_kernels_gpu.py`).

Inputs as the model makes them: queries FP4-simulated in blocks of 32 (`quant.fp4_sim`), keys FP4-simulated and
packed (`kv_format.pack_index_keys`), bf16 head weights of either sign; fresh random values per case, outputs
poisoned before every kernel call (`conftest.poison`). Every product q * K is exact in fp32 and, with block scales a
few binades apart, so is every q . K: the kernel's tensor-core sums and XLA's differ only in the order of fp32
additions. Bound: scores bit-identical to the reference for >= 99% of the elements and every element within 2 bf16
ulps (a different summation order can flip one bf16 rounding); top-k selections equal except at near-ties.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison, rel_rms  # the `ffi` fixture lives in conftest too

from dsv4_jax import kv_format, ops, quant
from dsv4_jax.layer_view import LayerSlice
from dsv4_jax.ops import registry
from dsv4_jax.ops.indexer import score_keys

pytestmark = pytest.mark.gpu

BF16, F32 = jnp.bfloat16, jnp.float32


def _fp4_values(key, shape, spread: int):
    """FP4-simulated values `shape` (blocks of 32 along the last axis) whose blocks lie up to `spread` binades apart."""
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, shape, F32)
    blocks = x.reshape(*shape[:-1], shape[-1] // 32, 32)
    e = jax.random.randint(k2, (*shape[:-1], shape[-1] // 32, 1), -spread, spread + 1).astype(F32)
    return quant.fp4_sim((blocks * jnp.exp2(e)).reshape(shape), 32).astype(BF16)


def _inputs(seed: int, b: int, t: int, h: int, n: int, layers: int):
    """(q bf16 [b, t, h, 128], w bf16 [b, t, h], packed keys uint8 [layers, b, n, 68])."""
    kq, kw, kk = jax.random.split(jax.random.key(seed), 3)
    q = _fp4_values(kq, (b, t, h, 128), 2)
    w = (jax.random.normal(kw, (b, t, h), F32) * 0.2).astype(BF16)
    keys = _fp4_values(kk, (layers, b, n, 128), 3)
    return q, w, kv_format.pack_index_keys(keys)


def _ordered(x) -> np.ndarray:
    """bf16 values (held in f32) as integers in value order: adjacent bf16 numbers differ by 1, +0 == -0."""
    bits = np.asarray(jnp.asarray(x, F32).astype(BF16)).view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def _scores(q, w, packed, layer, backend: str):
    """`ops.indexer_scores` on layer `layer` of the stack (a `LayerSlice`; None: the plain array of layer 0)."""

    def f(q, w, packed):
        keys = packed[0] if layer is None else LayerSlice(packed, jnp.int32(layer))
        return ops.indexer_scores(q, w, keys, opts=ops.Opts(backend=backend))

    with ops.record() as rec:
        out = np.asarray(jax.jit(f)(q, w, packed))
    assert rec == {"indexer_scores": "kernel" if backend == "ffi" else "reference"}, rec
    return out


def _reference_on_cpu(q, w, packed, layer):
    cpu = jax.devices("cpu")[0]
    args = [jax.device_put(a, cpu) for a in (q, w, packed)]
    f = jax.jit(lambda q, w, p: score_keys(q, w, kv_format.unpack_index_keys(p[layer or 0])), device=cpu)
    return np.asarray(f(*args))


CASES = [  # (b, t, heads, n, layers, layer): n never a multiple of the 128-key tile except one
    (1, 1, 64, 1000, 3, 2),
    (3, 1, 64, 333, 2, 1),
    (1, 2, 64, 129, 3, 1),
    (3, 2, 64, 4097, 2, 1),
    (2, 1, 64, 256, 1, None),
    (1, 1, 16, 7, 2, 1),  # the tiny config's 16 heads; fewer keys than a warp's 16
    (2, 5, 32, 515, 3, 2),  # more query rows than one block stages at a time
    (1, 1, 64, 65537, 2, 1),  # a long context: blocks stride over many key tiles
]


@pytest.mark.parametrize("b,t,h,n,layers,layer", CASES)
def test_indexer_scores_kernel_vs_reference(ffi, b, t, h, n, layers, layer):
    q, w, packed = _inputs(b * 1000 + t * 100 + n, b, t, h, n, layers)
    ref = _scores(q, w, packed, layer, "reference")
    poison()
    got = _scores(q, w, packed, layer, "ffi")
    assert got.shape == ref.shape == (b, t, n)
    assert np.isfinite(got).all()
    same = float(np.mean(got == ref))
    ulps = np.abs(_ordered(got) - _ordered(ref))
    assert same >= 0.99, f"only {same:.4f} of the scores are bit-identical; max {ulps.max()} ulps"
    assert ulps.max() <= 2, f"{int((ulps > 2).sum())} scores differ by more than 2 bf16 ulps (max {ulps.max()})"
    assert rel_rms(got, ref) <= 1e-2


WGMMA_CASES = [  # (b, n, layers, layer): one query row per batch row, 64 heads; n around the 64-key tile
    (1, 1, 2, 1),
    (3, 63, 2, 1),
    (2, 64, 1, None),
    (5, 65, 3, 2),
    (1, 1000, 3, 2),
    (64, 4097, 2, 1),
    (1, 65537, 2, 1),
]


@pytest.mark.parametrize("b,n,layers,layer", WGMMA_CASES)
def test_indexer_scores_wgmma_variant_vs_reference(ffi, b, n, layers, layer):
    """The wgmma variant (`ffi_ops.indexer_scores(..., variant="wgmma")`) under the mma.sync kernel's bounds, and
    against the mma.sync kernel itself."""
    q, w, packed = _inputs(b * 7 + n, b, 1, 64, n, layers)
    ref = _scores(q, w, packed, layer, "reference")[:, 0]
    keys, li = (packed[0], None) if layer is None else (packed, jnp.int32(layer))
    call = jax.jit(lambda q, w, k, i, v: ffi.indexer_scores(q[:, 0], w[:, 0], k, i, variant=v), static_argnums=4)
    poison()
    got = np.asarray(call(q, w, keys, li, "wgmma"))
    mma = np.asarray(call(q, w, keys, li, "mma"))
    assert got.shape == ref.shape == (b, n) and np.isfinite(got).all()
    ulps = np.abs(_ordered(got) - _ordered(ref))
    same = float(np.mean(got == ref))
    assert same >= 0.99, f"only {same:.4f} of the scores are bit-identical; max {ulps.max()} ulps"
    assert ulps.max() <= 2, f"{int((ulps > 2).sum())} scores differ by more than 2 bf16 ulps (max {ulps.max()})"
    assert np.abs(_ordered(got) - _ordered(mma)).max() <= 2


def test_indexer_scores_wgmma_variant_refuses_what_it_does_not_take(ffi):
    q, w, packed = _inputs(5, 2, 2, 64, 100, 1)  # two query rows per batch row
    with pytest.raises(Exception, match="dsv4_indexer_scores_wgmma: the wgmma variant takes 64 heads"):
        jax.block_until_ready(ffi.indexer_scores(q.reshape(4, 64, 128), w.reshape(4, 64), packed, None,
                                                 variant="wgmma"))  # fmt: skip


def test_indexer_scores_layer_index_selects_the_layer(ffi):
    """Every layer of a stack through one program: the layer index is read on the device (a traced scalar)."""
    q, w, packed = _inputs(7, 2, 1, 64, 300, 3)
    f = jax.jit(lambda q, w, p, i: ops.indexer_scores(q, w, LayerSlice(p, i), opts=ops.Opts(backend="ffi")))
    outs = []
    for i in range(3):
        poison()
        outs.append(np.asarray(f(q, w, packed, jnp.int32(i))))
        ulps = np.abs(_ordered(outs[-1]) - _ordered(_reference_on_cpu(q, w, packed, i)))
        assert ulps.max() <= 2
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])


@pytest.mark.parametrize("n,k", [(5000, 512), (600, 512), (300, 512)])
def test_indexer_topk_matches_except_near_ties(ffi, n, k):
    """The selection decode makes from the scores (`Indexer.select`: lax.top_k): the same entries, except where the
    k-th largest reference score ties (within 2 ulps) with entries left out."""
    b, t, layers = 2, 2, 2
    q, w, packed = _inputs(n + k, b, t, 64, n, layers)
    ref = _scores(q, w, packed, 1, "reference")
    poison()
    got = _scores(q, w, packed, 1, "ffi")
    kk = min(k, n)
    _, top_ref = jax.lax.top_k(jnp.asarray(ref), kk)
    _, top_got = jax.lax.top_k(jnp.asarray(got), kk)
    top_ref, top_got = np.asarray(top_ref), np.asarray(top_got)
    ordered = _ordered(ref)
    for bi in range(b):
        for ti in range(t):
            a, r = set(top_got[bi, ti].tolist()), set(top_ref[bi, ti].tolist())
            kth = ordered[bi, ti, top_ref[bi, ti, -1]]
            for j in a ^ r:  # entries one side picked and the other did not: near the k-th score
                assert abs(ordered[bi, ti, j] - kth) <= 2, (bi, ti, j)
            assert len(a ^ r) <= 0.01 * kk + 2


@pytest.mark.parametrize(
    "qshape,wshape,kshape,match",
    [
        ((2, 24, 128), (2, 24), (1, 2, 50, 68), "multiple of 16"),
        ((2, 16, 64), (2, 16), (1, 2, 50, 68), "head_dim 128"),
        ((2, 16, 128), (2, 8), (1, 2, 50, 68), "w \\[2,8\\] must be \\[rows, heads\\]"),
        ((3, 16, 128), (3, 16), (1, 2, 50, 68), "not a multiple of the keys' batch"),
        ((2, 16, 128), (2, 16), (1, 2, 50, 64), "packed MXFP4 indexer keys"),
        ((2, 160, 128), (2, 160), (1, 2, 50, 68), "do not fit"),
    ],
)
def test_indexer_scores_bad_shapes_are_refused(ffi, qshape, wshape, kshape, match):
    q = jnp.ones(qshape, BF16)
    w = jnp.ones(wshape, BF16)
    keys = jnp.zeros(kshape, jnp.uint8)
    with pytest.raises(Exception, match="dsv4_indexer_scores: .*" + match):
        jax.block_until_ready(jax.jit(ffi.indexer_scores)(q, w, keys))


def test_indexer_scores_ffi_backend_names_what_it_cannot_run(ffi):
    q, w, packed = _inputs(3, 1, 1, 64, 40, 1)
    bad_q = jnp.zeros((1, 1, 24, 128), BF16)
    with pytest.raises(ops.KernelUnavailable, match="indexer_scores.*24 index heads"):
        ops.indexer_scores(bad_q, w[..., :24], packed[0], opts=ops.Opts(backend="ffi"))


def _decode(cfg, state, opts, prompt, steps: int):
    """Prefill `prompt` into a packed (fp8) cache, then `steps` greedy decode steps -> (logits [steps, B, V], which
    implementation each op ran)."""
    from dsv4_jax import cache as C
    from dsv4_jax import runner

    jax.clear_caches()  # a fresh trace: the registry decides (and records) while tracing
    b, s = prompt.shape
    with ops.record() as ran:
        cache = C.init_cache(cfg, b, s + steps + 1, "fp8")
        logits, _, cache = runner.prefill(state, cache, prompt, opts=opts)
        out = []
        for _ in range(steps):
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            logits, _, cache = runner.decode_step(state, cache, tok, opts=opts)
            out.append(np.asarray(logits, np.float32))
    return np.stack(out), dict(ran)


def test_decode_runs_the_indexer_kernel(ffi, monkeypatch):
    """Decode on the tiny config (16 index heads, top-8 of more than 8 visible entries: the prompt is past 32 tokens)
    over the packed cache: with backend "auto" the indexer's scores come from the kernel; the logits equal those of the
    same run with the indexer's kernel killed (`DSV4_JAX_DISABLE_KERNELS`; every other op the same kernels) up to the
    indexer's reduction-order noise."""
    import dsv4_jax

    cfg = dsv4_jax.Config.tiny(expert_dtype="fp8")
    state = dsv4_jax.init_random(cfg, 0)
    prompt = jax.random.randint(jax.random.key(5), (2, 41), 2, cfg.vocab_size)
    opts = dsv4_jax.Opts(backend="auto")
    monkeypatch.setenv(registry.KILL_SWITCH, "indexer_scores")
    ref, ran_ref = _decode(cfg, state, opts, prompt, 4)
    monkeypatch.delenv(registry.KILL_SWITCH)
    poison()
    got, ran = _decode(cfg, state, opts, prompt, 4)
    assert ran_ref.get("indexer_scores") == "reference" and ran.get("indexer_scores") == "kernel", (ran_ref, ran)
    assert np.isfinite(got).all()
    assert rel_rms(got, ref) <= 1e-2, rel_rms(got, ref)


def test_ffi_decode_lowers_to_the_indexer_kernel(ffi, monkeypatch):
    """Decode over a packed cache with the kernel opted in calls `dsv4_indexer_scores` (once per CSA layer in the
    layer scan), reading the whole stacked cache: no dynamic slice of the keys feeds it. (backend "auto": the tiny
    model's 8 attention heads have no sparse-MLA decode kernel, which "ffi" would demand.)"""
    import dsv4_jax
    from dsv4_jax import cache as C
    from dsv4_jax import runner

    cfg = dsv4_jax.Config.tiny(expert_dtype="fp8")
    state = dsv4_jax.init_random(cfg, 0)
    cache = C.init_cache(cfg, 2, 48, "fp8")
    tok = jnp.zeros((2,), jnp.int32)
    jax.clear_caches()
    with ops.record() as ran:
        monkeypatch.setenv(registry.OPT_IN, "indexer_scores")
        text = runner._decode_jit.lower(state, cache, tok, dsv4_jax.Opts(backend="auto"), None, False).as_text()
    assert ran.get("indexer_scores") == "kernel", ran
    assert "dsv4_indexer_scores" in text
