"""GPU tests of the indexer's top-k kernel (`dsv4_indexer_topk`, op `ops.indexer_topk`; run on the device: `pytest -m
gpu tests/test_topk_gpu.py`).

The kernel is a selection, not arithmetic: its picks must equal, in order, those of a NumPy model of
`jax.lax.top_k` over the visible prefix (IEEE total order descending, -0 as +0, ties by ascending index; -1 past the
visible count), and those of the op's reference on the device. Inputs: bf16-valued scores with many exact ties (as the
indexer makes them: the two-pass case), general f32 values (all four radix passes), special values (+-0, +-inf,
NaN), visible counts from 0 to past n; rows kept in shared memory and rows read from L2 (`DSV4_FFI_TOPK_SMEM_MAX`);
outputs poisoned before every call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison  # the `ffi` fixture lives in conftest too

from dsv4_jax import ops
from dsv4_jax.ops import registry

pytestmark = pytest.mark.gpu

F32 = jnp.float32


def _numpy_topk(scores: np.ndarray, n_vis: np.ndarray, k: int) -> np.ndarray:
    """`jax.lax.top_k`'s picks over the visible prefix, in NumPy: keys in IEEE total order (-0 as +0), lexsorted."""
    bits = np.where(scores == 0, np.float32(0), scores).astype(np.float32).view(np.uint32).astype(np.int64)
    key = np.where(bits & 0x80000000, 0xFFFFFFFF - bits, bits | 0x80000000)
    n = scores.shape[-1]
    nv = np.clip(n_vis, 0, n)[:, None]
    key = np.where(np.arange(n)[None, :] < nv, key, 0x007FFFFF)  # -inf
    out = np.empty((scores.shape[0], k), np.int64)
    for r in range(scores.shape[0]):
        order = np.lexsort((np.arange(n), -key[r]))[:k]
        out[r] = np.where(order < nv[r], order, -1)
    return out


def _scores(rng, rows: int, n: int, kind: str) -> np.ndarray:
    if kind == "bf16":  # few distinct values: long runs of exact ties at the threshold
        x = np.round(rng.normal(size=(rows, n)) * 8) / 8
        return np.asarray(jnp.asarray(x, F32).astype(jnp.bfloat16).astype(F32))
    if kind == "f32":
        return rng.normal(size=(rows, n)).astype(np.float32)
    x = rng.choice(np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 2.5], np.float32), (rows, n))
    return np.where(rng.random((rows, n)) < 0.5, x, rng.normal(size=(rows, n)).astype(np.float32))


def _n_vis(rng, rows: int, n: int, k: int) -> np.ndarray:
    choices = [0, 1, k // 2, k, n, n + 5, -3]
    v = rng.integers(0, n + 1, rows)
    v[: min(rows, len(choices))] = choices[: min(rows, len(choices))]
    return v.astype(np.int32)


@pytest.mark.parametrize(
    "rows,n,k,kind",
    [
        (7, 16, 8, "bf16"),
        (9, 200, 1, "f32"),
        (64, 2048, 512, "bf16"),
        (8, 2048, 512, "f32"),
        (8, 3000, 2048, "bf16"),
        (12, 1000, 300, "special"),
        (64, 16384, 512, "bf16"),
        (3, 16384, 1024, "f32"),
        (2, 70000, 512, "bf16"),  # 280 KB: past shared memory, read from L2 every pass
    ],
)
@pytest.mark.parametrize("where", ["smem", "l2"])
def test_topk_kernel_equals_lax_top_k(ffi, monkeypatch, rows, n, k, kind, where):
    if where == "l2":
        monkeypatch.setenv("DSV4_FFI_TOPK_SMEM_MAX", "0")
    rng = np.random.default_rng(rows * 7919 + n + k)
    s = _scores(rng, rows, n, kind)
    nv = _n_vis(rng, rows, n, k)
    want = _numpy_topk(s, nv, k)
    poison()
    got = np.asarray(jax.jit(ffi.indexer_topk, static_argnums=2)(jnp.asarray(s), jnp.asarray(nv), k))
    bad = np.nonzero((got != want).any(-1))[0]
    assert bad.size == 0, (f"rows {bad[:5].tolist()} differ; row {bad[0]}: n_vis {nv[bad[0]]}, got "
                           f"{got[bad[0], :12].tolist()}, want {want[bad[0], :12].tolist()}")  # fmt: skip
    if kind != "special":  # the op's reference, on the device (XLA's sort): the same picks
        ref = ops.indexer_topk(jnp.asarray(s), jnp.asarray(nv), k=k, opts=ops.Opts(backend="reference"))
        np.testing.assert_array_equal(np.asarray(ref), want)


def test_topk_op_takes_the_kernel_and_matches_its_reference(ffi):
    rng = np.random.default_rng(0)
    s = jnp.asarray(_scores(rng, 2 * 3, 4096, "bf16").reshape(2, 3, 4096))
    nv = jnp.asarray(rng.integers(0, 4097, (2, 3)), jnp.int32)
    with ops.record() as ran:
        got = jax.jit(lambda s, v: ops.indexer_topk(s, v, k=512, opts=ops.Opts(backend="ffi")))(s, nv)
    assert ran == {"indexer_topk": "kernel"}, ran
    ref = ops.indexer_topk(s, nv, k=512, opts=ops.Opts(backend="reference"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize(
    "shape,nv_shape,k,match",
    [
        ((4, 10), (4,), 11, "k = 11 of n = 10"),
        ((4, 10), (3,), 4, "n_vis \\[3\\] must be \\[rows\\]"),
        ((4, 4000), (4,), 3000, "above the kernel's 2048"),
    ],  # fmt: skip
)
def test_topk_bad_shapes_are_refused(ffi, shape, nv_shape, k, match):
    call = jax.ffi.ffi_call("dsv4_indexer_topk", jax.ShapeDtypeStruct((shape[0], k), jnp.int32))
    f = jax.jit(lambda s, v: call(s, v, k=np.int64(k)))  # the handler's checks (the wrapper would refuse k first)
    with pytest.raises(Exception, match="dsv4_indexer_topk: .*" + match):
        jax.block_until_ready(f(jnp.zeros(shape, F32), jnp.zeros(nv_shape, jnp.int32)))


def test_decode_with_the_topk_kernel_is_bit_identical(ffi, monkeypatch):
    """Prefill then decode on the tiny config (top-8 of up to 12 visible entries) with the top-k kernel and with it
    killed (every other op the same): the selection is exact, so the logits are bit-identical."""
    import dsv4_jax
    from dsv4_jax import cache as C
    from dsv4_jax import runner

    cfg = dsv4_jax.Config.tiny(expert_dtype="fp8")
    state = dsv4_jax.init_random(cfg, 0)
    prompt = jax.random.randint(jax.random.key(5), (2, 41), 2, cfg.vocab_size)
    opts = dsv4_jax.Opts(backend="auto")

    def run():
        jax.clear_caches()  # a fresh trace: the registry decides while tracing
        with ops.record() as ran:
            cache = C.init_cache(cfg, 2, 48, "fp8")
            logits, _, cache = runner.prefill(state, cache, prompt, opts=opts)
            out = [np.asarray(logits, np.float32)]
            for _ in range(4):
                logits, _, cache = runner.decode_step(state, cache, jnp.argmax(logits, -1).astype(jnp.int32),
                                                      opts=opts)  # fmt: skip
                out.append(np.asarray(logits, np.float32))
        return np.stack(out), dict(ran)

    monkeypatch.setenv(registry.KILL_SWITCH, "indexer_topk")
    ref, ran_ref = run()
    monkeypatch.delenv(registry.KILL_SWITCH)
    monkeypatch.setenv(registry.OPT_IN, "indexer_topk")
    poison()
    got, ran = run()
    assert ran_ref.get("indexer_topk") == "reference" and ran.get("indexer_topk") == "kernel", (ran_ref, ran)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, ref)
