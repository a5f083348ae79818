"""MoE routing, dispatch / combine and the sparse experts against hand-derived expectations."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax import Capture, Config, Opts, ops
from dsv4_jax.moe import MoE, combine, dispatch, route, swiglu
from dsv4_jax.ops import experts as ME
from dsv4_jax.rounding import to_bf16

CFG = Config.tiny()


def test_route_bias_selects_but_does_not_weight():
    logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0]], jnp.float32)
    bias = jnp.asarray([10.0, 0.0, 0.0, 0.0], jnp.float32)  # forces expert 0 into the top-2
    w, idx = route(logits, bias, None, 2, 1.5)
    assert sorted(np.asarray(idx)[0].tolist()) == [0, 3]
    sc = np.sqrt(np.log1p(np.exp([0.0, 1.0, 2.0, 3.0])))  # sqrt(softplus)
    chosen = {int(i): float(v) for i, v in zip(np.asarray(idx)[0], np.asarray(w)[0], strict=True)}
    np.testing.assert_allclose(chosen[0], 1.5 * sc[0] / (sc[0] + sc[3]), rtol=1e-6)
    np.testing.assert_allclose(chosen[3], 1.5 * sc[3] / (sc[0] + sc[3]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w).sum(), 1.5, rtol=1e-6)  # renormalised, times route_scale


def test_route_hash_table_overrides_scores():
    logits = jnp.asarray([[5.0, -5.0, 0.0]], jnp.float32)
    w, idx = route(logits, None, jnp.asarray([[1, 2]]), 2, 1.0)
    assert np.asarray(idx).tolist() == [[1, 2]]  # the table, not the top scores
    sc = np.sqrt(np.log1p(np.exp([-5.0, 0.0])))
    np.testing.assert_allclose(np.asarray(w)[0], sc / sc.sum(), rtol=1e-5)  # weights still from the learned gate


def test_softplus_threshold_matches_torch():
    w, _ = route(jnp.asarray([[30.0, 25.0]], jnp.float32), None, jnp.asarray([[0, 1]]), 2, 1.0)
    np.testing.assert_allclose(np.asarray(w)[0], np.sqrt([30.0, 25.0]) / np.sqrt([30.0, 25.0]).sum(), rtol=1e-6)


def test_swiglu_clamp_is_asymmetric():
    gate = jnp.asarray([20.0, -20.0, 1.0], jnp.float32)
    up = jnp.asarray([20.0, -20.0, -20.0], jnp.float32)
    got = np.asarray(swiglu(gate, up, 10.0))
    silu = lambda g: g / (1 + np.exp(-g))
    np.testing.assert_allclose(got, [silu(10.0) * 10.0, silu(-20.0) * -10.0, silu(1.0) * -10.0], rtol=1e-6)


def test_hash_and_bias_layers_and_padding():
    # Built and called under jit: eagerly, each of the modules' ~460 small ops compiles on its own (~15 s of the
    # suite's 2-core time).
    hash_moe, bias_moe = nnx.jit(lambda: (MoE(CFG, True, rngs=nnx.Rngs(0)), MoE(CFG, False, rngs=nnx.Rngs(1))))()
    assert hash_moe.gate.is_hash and not hasattr(hash_moe.gate, "bias")
    assert not bias_moe.gate.is_hash and not hasattr(bias_moe.gate, "tid2eid")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, CFG.dim)), jnp.bfloat16)
    tokens = jnp.asarray([[3, 3, 7, 7, 9, 11]])

    @nnx.jit
    def hash_route(moe, x, tokens):
        rec = Capture()
        moe(x, tokens, Opts(), rec)
        return rec["route_idx"]

    idx = np.asarray(hash_route(hash_moe, x, tokens))
    np.testing.assert_array_equal(idx[0], idx[1])  # same token, same experts, whatever the hidden state
    np.testing.assert_array_equal(idx, np.asarray(hash_moe.gate.tid2eid[...])[np.asarray(tokens[0])])
    # Padding (valid False) gets no routed experts: only the shared expert contributes (one program computes both,
    # so the shared expert's arithmetic is the same on both sides).
    valid = jnp.asarray([[True] * 5 + [False]])
    y, shared = nnx.jit(lambda m, x, t, v: (m(x, t, Opts(), None, v), m.shared_experts(x.reshape(6, -1), Opts())))(
        bias_moe, x, tokens, valid)  # fmt: skip
    y, shared = np.asarray(y, np.float32), np.asarray(shared, np.float32)
    np.testing.assert_array_equal(y[0, 5], shared[5])
    assert not np.array_equal(y[0, 4], shared[4])


def test_dispatch_sorts_by_expert_and_combine_sums_in_index_order():
    idx = jnp.asarray([[3, 1], [1, 0], [2, 3]], jnp.int32)  # token 0: experts 3 and 1, ...
    w = jnp.asarray([[0.25, 0.75], [0.5, 0.5], [1.0, 2.0]], jnp.float32)
    x = jnp.arange(3, dtype=jnp.float32)[:, None] * jnp.ones((3, 2))
    rows, lay = dispatch(x, idx, w, 4, valid_t=jnp.asarray([True, True, False]))
    np.testing.assert_array_equal(np.asarray(lay.expert), [0, 1, 1, 3, -1, -1])  # sorted; the padding token last
    np.testing.assert_array_equal(np.asarray(lay.group_sizes), [1, 2, 0, 1])
    np.testing.assert_array_equal(np.asarray(rows)[:4, 0], [1, 0, 1, 0])  # e0: token 1; e1: tokens 0, 1; e3: token 0
    np.testing.assert_allclose(np.asarray(lay.weight)[:4], [0.5, 0.75, 0.5, 0.25])
    np.testing.assert_array_equal(np.asarray(lay.row_of_pair)[:2], [[1, 3], [0, 2]])  # each token's experts in order
    # combine: token t sums its rows in expert-index order
    y = jnp.asarray(np.arange(6, dtype=np.float32)[:, None] * np.ones((6, 2)), jnp.bfloat16)
    out = np.asarray(combine(y, lay))
    np.testing.assert_allclose(out[:, 0], [1 + 3, 0 + 2, np.asarray(lay.row_of_pair)[2].sum()])


@pytest.mark.parametrize("t,k,e", [(1, 6, 256), (5, 2, 4), (64, 6, 16)])
def test_dispatch_by_counting_equals_dispatch_by_sorting(t, k, e, monkeypatch):
    """Small batches rank the pairs by counting instead of sorting: the same rows, layout and order, bit for bit
    (hash routing's repeated experts across tokens, padding tokens, and a token whose experts are not in order)."""
    import dsv4_jax.moe as M

    rng = np.random.default_rng(t)
    idx = jnp.asarray(np.argsort(rng.random((t, e)), -1)[:, :k], jnp.int32)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(t, 8)), jnp.bfloat16)
    valid = jnp.asarray(rng.random(t) < 0.8)
    counted = jax.jit(dispatch, static_argnums=3)(x, idx, w, e, valid)
    monkeypatch.setattr(M, "COUNTING_DISPATCH_MAX_PAIRS", 0)
    sorted_ = jax.jit(dispatch, static_argnums=3)(x, idx, w, e, valid)
    for a, b in zip(jax.tree.leaves(counted), jax.tree.leaves(sorted_), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _experts(fmt: str, e: int, d: int = 256, inter: int = 128):
    from dsv4_jax.moe import Experts

    cfg = Config.tiny(n_routed_experts=e, dim=d, moe_inter_dim=inter, expert_dtype=fmt)
    return Experts(cfg, rngs=nnx.Rngs(3)).weights()


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_sparse_experts_per_row_and_per_expert_paths_agree(fmt, monkeypatch):
    """The reference gathers each row's expert weights for few rows and scans the experts that have rows for many:
    the same numbers either way (a row's result does not depend on the batch), and unrouted rows are exact zeros."""
    ws = _experts(fmt, 8)
    rng = np.random.default_rng(0)
    t, k = 7, 2
    x = jnp.asarray(rng.normal(size=(t, 256)), jnp.bfloat16)
    idx = jnp.asarray(np.argsort(rng.random((t, 8)), -1)[:, :k], jnp.int32)
    w = jnp.asarray(rng.random((t, k)) + 0.5, jnp.float32)
    rows, lay = dispatch(x, idx, w, 8, valid_t=jnp.asarray([True] * 6 + [False]))
    args = (rows, lay.expert, lay.weight, lay.group_sizes, ws, 10.0)
    per_row = np.asarray(ME._moe_experts_reference(*args, quant_sim=True), np.float32)
    monkeypatch.setattr(ME, "PER_ROW_ELEMENTS", 0)
    monkeypatch.setattr(ME, "CHUNK_ROWS", 2)  # several chunks per expert
    per_expert = np.asarray(ME._moe_experts_reference(*args, quant_sim=True), np.float32)
    np.testing.assert_array_equal(per_row, per_expert)
    assert (per_row[-2:] == 0).all() and np.abs(per_row[:-2]).min(axis=-1).max() > 0


def test_routing_weight_is_applied_before_w2():
    """The official order: w2 sees bf16(weight * swiglu(...)) (its FP8 input quantization differs from applying the
    weight after w2, which HF does). One row, expert 3 of the fp4 experts."""
    ws = _experts("fp4", 8)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 256)), jnp.bfloat16)
    got = np.asarray(ops.moe_experts(x, jnp.asarray([3]), jnp.asarray([0.37]), jnp.asarray([0, 0, 0, 1, 0, 0, 0, 0]),
                                     ws, 10.0), np.float32)  # fmt: skip
    w1, s1, w3, s3, w2, s2 = (a[3] for a in ws)
    g = ops.fp4_linear(x, w1, s1).astype(jnp.float32)
    u = ops.fp4_linear(x, w3, s3).astype(jnp.float32)
    h = swiglu(g, u, 10.0)
    before = np.asarray(ops.fp4_linear(to_bf16(0.37 * h), w2, s2), np.float32)
    after = 0.37 * np.asarray(ops.fp4_linear(to_bf16(h), w2, s2), np.float32)
    np.testing.assert_array_equal(got, before)
    assert not np.array_equal(got, after)
    none = np.asarray(ops.moe_experts(x, jnp.asarray([-1]), jnp.asarray([0.37]), jnp.zeros(8, jnp.int32), ws, 10.0))
    np.testing.assert_array_equal(none, 0.0)  # an unrouted row gives exact zeros


def test_moe_reference_cost_grows_with_routed_rows_not_experts():
    """The lowered reference for 256 experts holds no [tokens, experts] array: its work is per routed row."""
    ws = _experts("fp4", 256)
    x = jnp.ones((16, 256), jnp.bfloat16)
    e = jnp.zeros((16,), jnp.int32)
    text = jax.jit(lambda x, e: ops.moe_experts(x, e, jnp.ones(16), jnp.zeros(256, jnp.int32), ws, 10.0)).lower(
        x, e).as_text()  # fmt: skip
    decoded = re.findall(r"tensor<(256x[0-9x]+)xf32>", text)
    assert not decoded, decoded  # no decoded stack of all experts: only the 16 rows' experts are decoded
    assert re.findall(r"tensor<16x128x256xf32>", text)


def test_route_experts_reference_reads_layer_stacks_and_supports_names_its_limits():
    """`ops.route_experts` (the op with the router kernel twin) equals `route` with the bias or the hash table's rows
    taken from a layer stack; its `supports` takes the presets' routers and names what the kernel cannot do."""
    from dsv4_jax import Config, ops
    from dsv4_jax.layer_view import LayerSlice
    from dsv4_jax.ops.router import _supports

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(5, 16)) * 3, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
    table = jnp.asarray(rng.integers(0, 16, (2, 40, 3)), jnp.int32)
    tokens = jnp.asarray([3, 0, 39, 7, 7], jnp.int32)
    got = ops.route_experts(logits, LayerSlice(bias, jnp.int32(1)), None, None, k=3, route_scale=2.0)
    want = route(logits, bias[1], None, 3, 2.0)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    got = ops.route_experts(logits, None, LayerSlice(table, jnp.int32(0)), tokens, k=3, route_scale=2.0)
    want = route(logits, None, table[0][tokens], 3, 2.0)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    for cfg in (Config.flash(), Config.pro(), Config.tiny()):
        lg = jax.ShapeDtypeStruct((4, cfg.n_routed_experts), jnp.float32)
        assert _supports(lg, bias[0], None, None, k=cfg.n_activated_experts, route_scale=1.0) is None
    assert "E <= 512" in _supports(jax.ShapeDtypeStruct((4, 1024), jnp.float32), bias, None, None, k=6, route_scale=1.0)
    assert "not both" in _supports(logits, bias, table, tokens, k=3, route_scale=1.0)
