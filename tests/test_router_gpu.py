"""GPU tests of the MoE router kernel (`dsv4_route`, `ffi/csrc/router_kernels.cu`) against its reference twin
`ops.route_experts` (= `ops.router.route`): scores `sqrt(softplus(logits))` (both sides of the softplus threshold),
top-k of scores + bias with exact ties (lower expert id first, as `lax.top_k`), or the hash table's experts of each
token; bias and table read from a layer stack at layer 1 (`LayerSlice`) or unstacked; outputs poisoned first.

Bounds and why: the ids are exact (the same fp32 scores and comparisons) up to exactly tied experts, whose order is
checked as `lax.top_k` documents it (lower id first, no lower tied id left out) rather than against XLA's GPU top-k.
The weights are the chosen scores over their k-term sum: the same bits except where the sum's order differs from
XLA's, so within a few fp32 ulps (1e-6 relative).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison

from dsv4_jax import ops
from dsv4_jax.layer_view import LayerSlice

pytestmark = pytest.mark.gpu


def _logits(rng, t, e):
    x = rng.normal(size=(t, e)) * 4
    x[:, : e // 8] = 25.0 + rng.normal(size=(t, e // 8))  # above torch's softplus threshold (identity there)
    x[:, e // 4 : e // 4 + 3] = x[:, :1]  # exact ties with expert 0
    return jnp.asarray(x, jnp.float32)


def _run(backend, *args, k, route_scale):
    f = jax.jit(lambda *a: ops.route_experts(*a, k=k, route_scale=route_scale, opts=ops.Opts(backend=backend)))
    return [np.asarray(v) for v in f(*args)]


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("e,k", [(256, 6), (384, 6), (8, 2)])
@pytest.mark.parametrize("stacked", [False, True])
def test_route_bias_kernel_vs_reference(ffi, t, e, k, stacked):
    rng = np.random.default_rng(t * 31 + e + k)
    logits = _logits(rng, t, e)
    bias = rng.normal(size=(3, e)) * 0.5
    bias[:, :1] = 4.0  # expert 0 and its three exact ties lead the top k
    bias[:, e // 4 : e // 4 + 3] = bias[:, :1]  # the tied scores stay tied after the bias
    bias = jnp.asarray(bias, jnp.float32)
    bias = LayerSlice(bias, jnp.int32(1)) if stacked else bias[1]
    ref_w, ref_i = _run("reference", logits, bias, None, None, k=k, route_scale=2.5)
    poison()
    w, i = _run("ffi", logits, bias, None, None, k=k, route_scale=2.5)
    lg, bs = np.asarray(logits), np.asarray(bias.get() if stacked else bias)

    def key(r, ids):  # the exact inputs of experts: equal keys are exactly tied
        return list(zip(lg[r, ids].tolist(), bs[ids].tolist(), strict=True))

    for r in range(t):
        assert key(r, i[r]) == key(r, ref_i[r]), (i[r], ref_i[r])  # the same experts up to exact ties
        for a, b in itertools.pairwise(i[r]):
            assert key(r, [a]) != key(r, [b]) or a < b  # tied: the lower id first
        tied_lower = [x for ch in i[r] for x in range(ch) if key(r, [x]) == key(r, [ch])]
        assert set(tied_lower) <= set(i[r].tolist())  # no lower tied id left out
    assert (i[:, :2] == [0, e // 4]).all()  # the tie group leads, so the checks above saw ties
    np.testing.assert_allclose(w, ref_w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("t", [1, 64])
@pytest.mark.parametrize("stacked", [False, True])
def test_route_hash_kernel_vs_reference(ffi, t, stacked):
    rng = np.random.default_rng(t)
    e, k, vocab = 256, 6, 1000
    logits = _logits(rng, t, e)
    table = jnp.asarray(np.stack([np.stack([rng.permutation(e)[:k] for _ in range(vocab)]) for _ in range(3)]),
                        jnp.int32)  # fmt: skip
    table = LayerSlice(table, jnp.int32(2)) if stacked else table[2]
    tokens = jnp.asarray(rng.integers(0, vocab, t), jnp.int32)
    ref_w, ref_i = _run("reference", logits, None, table, tokens, k=k, route_scale=1.5)
    poison()
    w, i = _run("ffi", logits, None, table, tokens, k=k, route_scale=1.5)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(w, ref_w, rtol=1e-6, atol=0)
