"""MoE routing and experts against hand-derived expectations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax import Config, ops
from dsv4_jax.moe import MoE, route, swiglu
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
    rngs = nnx.Rngs(0)
    hash_moe, bias_moe = MoE(CFG, 0, rngs=rngs), MoE(CFG, CFG.n_hash_layers, rngs=rngs)
    assert hash_moe.gate.is_hash and not hasattr(hash_moe.gate, "bias")
    assert not bias_moe.gate.is_hash and not hasattr(bias_moe.gate, "tid2eid")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, CFG.dim)), jnp.bfloat16)
    tokens = jnp.asarray([[3, 3, 7, 7, 9, 11]])
    rec = {}
    hash_moe(x, tokens, ops.Opts(), rec)
    idx = np.asarray(rec["route_idx"])
    np.testing.assert_array_equal(idx[0], idx[1])  # same token, same experts, whatever the hidden state
    np.testing.assert_array_equal(idx, np.asarray(hash_moe.gate.tid2eid[...])[np.asarray(tokens[0])])
    # Padding (valid False) gets no routed experts: only the shared expert contributes.
    valid = jnp.asarray([[True] * 5 + [False]])
    y = np.asarray(bias_moe(x, tokens, ops.Opts(), None, valid), np.float32)
    shared = np.asarray(bias_moe.shared_experts(x.reshape(6, -1), ops.Opts()), np.float32)
    np.testing.assert_array_equal(y[0, 5], shared[5])
    assert not np.array_equal(y[0, 4], shared[4])


def test_routing_weight_is_applied_before_w2():
    """The official order: w2 sees bf16(weight * swiglu(...)) (its FP8 input quantization differs from applying the
    weight after w2, which HF does)."""
    moe = MoE(CFG, CFG.n_hash_layers, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, CFG.dim)), jnp.bfloat16)
    dense = jnp.zeros((5, CFG.n_routed_experts)).at[:, 3].set(0.37)
    got = np.asarray(moe.experts(x, dense, ops.Opts()))
    e = moe.experts
    w = {n: (getattr(e, n).weight[...][3], getattr(e, n).scale[...][3]) for n in ("w1", "w2", "w3")}
    g = ops.expert_linear(x, *w["w1"], ops.Opts()).astype(jnp.float32)
    u = ops.expert_linear(x, *w["w3"], ops.Opts()).astype(jnp.float32)
    h = swiglu(g, u, CFG.swiglu_limit)
    before = np.asarray(ops.expert_linear(to_bf16(0.37 * h), *w["w2"], ops.Opts()), np.float32)
    after = 0.37 * np.asarray(ops.expert_linear(to_bf16(h), *w["w2"], ops.Opts()), np.float32)
    np.testing.assert_array_equal(got, before)
    assert not np.array_equal(got, after)
    y0 = np.asarray(moe.experts(x, jnp.zeros_like(dense), ops.Opts()))
    np.testing.assert_array_equal(y0, 0.0)  # unrouted tokens contribute exact zeros
