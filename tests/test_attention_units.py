"""Attention pieces: index lists, compressor pooling (CSA overlap, HCA), indexer selection, the attention sink."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax import Config, nn, ops
from dsv4_jax.attention import Compressor, Indexer, compressed_indices, sparse_attention, window_indices

CFG = Config.tiny()
EXACT = ops.Opts(quant_sim=False)


def test_window_indices():
    w = window_indices(200, 128)
    assert w.shape == (200, 128)
    assert w[0].tolist() == [0] + [-1] * 127
    assert w[5, :7].tolist() == [0, 1, 2, 3, 4, 5, -1]
    assert w[127].tolist() == list(range(128))
    assert w[199].tolist() == list(range(72, 200))  # the last 128 positions, itself included
    assert window_indices(10, 128).shape == (10, 10)


def test_compressed_indices_visibility():
    c = compressed_indices(12, 4, offset=100)
    assert c.shape == (12, 3)
    assert c[2].tolist() == [-1, -1, -1]  # block 0 (tokens 0..3) is not complete at t = 2
    assert c[3].tolist() == [100, -1, -1]  # ... and complete at t = 3
    assert c[11].tolist() == [100, 101, 102]
    assert compressed_indices(130, 128, 0)[126].tolist() == [-1] and compressed_indices(130, 128, 0)[127].tolist() == [
        0
    ]


def _np_rms(x, w):
    return w * x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("ratio", [4, 128])
def test_compressor_matches_the_spec_formula(ratio):
    comp = Compressor(CFG, ratio, 512, rotate=False, rngs=nnx.Rngs(0))
    s = 2 * ratio + 3  # two complete blocks and a partial one
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, s, CFG.dim)), jnp.bfloat16)
    inv = nn.layer_inv_freq(CFG, ratio)
    got = np.asarray(comp(x, inv, EXACT), np.float32)[0]
    assert got.shape == (2, 512)

    xf = np.asarray(x, np.float64)[0]
    C = xf @ np.asarray(comp.wkv.weight[...], np.float64).T
    Z = xf @ np.asarray(comp.wgate.weight[...], np.float64).T + np.tile(np.asarray(comp.ape[...]), (3, 1))[:s]
    for j in range(2):
        blk = slice(j * ratio, (j + 1) * ratio)
        if ratio == 4:  # 8 slots: block j-1 through its first half, block j through its second half
            vals, logits = [C[blk, 512:]], [Z[blk, 512:]]
            if j > 0:
                prev = slice((j - 1) * ratio, j * ratio)
                vals.insert(0, C[prev, :512])
                logits.insert(0, Z[prev, :512])
            v, z = np.concatenate(vals), np.concatenate(logits)
        else:
            v, z = C[blk], Z[blk]
        p = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)  # per-channel softmax over the slots
        e = _np_rms((p * v).sum(0), 1.0)
        ang = j * ratio * inv.astype(np.float64)  # RoPE at the block's first position
        zc = (e[448::2] + 1j * e[449::2]) * np.exp(1j * ang)
        e[448::2], e[449::2] = zc.real, zc.imag
        np.testing.assert_allclose(got[j], e, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("ratio,rotate", [(4, False), (4, True), (128, False)])
def test_compressor_decode_step_is_the_general_step_with_one_token(ratio, rotate):
    """A decode step (one token per row) goes through `ops.compressor_decode` (the op with the kernel twin), whose
    block ids and completion counts `Compressor.step` derives itself: all equal `ops.compress_step` at k = 1, for rows
    that open, fill, complete a block, start the sequence, or are padding; state rows from a layer stack."""
    from dsv4_jax.layer_view import LayerSlice

    dc = 128 if rotate else 512
    comp = Compressor(CFG, ratio, dc, rotate=rotate, rngs=nnx.Rngs(3))
    inv = nn.layer_inv_freq(CFG, ratio)
    rng = np.random.default_rng(ratio)
    coff = 2 if ratio == 4 else 1
    starts = jnp.asarray([0, 1, ratio - 1, ratio, 3 * ratio - 1, 2 * ratio + 2], jnp.int32)
    n_new = jnp.asarray([1, 1, 1, 1, 1, 0], jnp.int32)
    x = jnp.asarray(rng.normal(size=(6, 1, CFG.dim)), jnp.bfloat16)
    stack = [jnp.asarray(rng.normal(size=(2, 6, coff * ratio, coff * dc)), jnp.float32) for _ in range(2)]
    opts = ops.Opts()
    got = comp.step(x, starts, n_new, *(LayerSlice(s, jnp.int32(1)) for s in stack), inv, opts, fresh=False)
    kv_new, sc_new = comp.project(x)
    kw = dict(ratio=ratio, rotate=rotate, eps=CFG.norm_eps, quant_sim=True, fresh=False)
    want = ops.compress_step(kv_new, sc_new, stack[0][1], stack[1][1], comp.ape[...], comp.norm.weight[...], starts,
                             n_new, inv, **kw)  # fmt: skip
    names = ("entries", "j0", "n_done", "kv_state", "score_state")
    for name, w in zip(names, want, strict=True):
        g = getattr(got, name)
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=name)
    assert np.asarray(got.n_done).tolist() == [0, 0, 1, 0, 1, 0]
    assert np.asarray(got.j0).tolist() == [0, 0, 0, 1, 2, 2]


def test_compressor_is_causal_per_block():
    comp = Compressor(CFG, 4, 512, rotate=False, rngs=nnx.Rngs(1))
    inv = nn.layer_inv_freq(CFG, 4)
    x = np.random.default_rng(1).normal(size=(1, 16, CFG.dim)).astype(np.float32)
    base = np.asarray(comp(jnp.asarray(x, jnp.bfloat16), inv, EXACT), np.float32)
    x2 = x.copy()
    x2[0, 9] += 1.0  # a token of block 2
    new = np.asarray(comp(jnp.asarray(x2, jnp.bfloat16), inv, EXACT), np.float32)
    np.testing.assert_array_equal(new[0, :2], base[0, :2])  # entries 0, 1 do not see block 2
    assert not np.array_equal(new[0, 2], base[0, 2]) and not np.array_equal(new[0, 3], base[0, 3])  # overlap


def test_indexer_selection_respects_visibility_and_topk():
    idx = Indexer(CFG, rngs=nnx.Rngs(2))  # index_topk 8
    scores = jnp.asarray(np.arange(20, dtype=np.float32)[None, None, :].repeat(3, 1))  # later entries score higher
    n_vis = (compressed_indices(80, 4, 0)[[10, 40, 79]] >= 0).sum(-1)
    assert n_vis.tolist() == [2, 10, 20]
    sel = np.asarray(idx.select(scores, jnp.asarray(n_vis[None], jnp.int32), EXACT))[0]
    assert sel[0].tolist() == [1, 0] + [-1] * 6  # only 2 visible: the rest marked -1
    assert sel[1].tolist() == list(range(9, 1, -1))  # top 8 of the 10 visible, best first
    assert sel[2].tolist() == list(range(19, 11, -1))


def test_indexer_topk_reference_order_ties_and_masking():
    """`ops.indexer_topk`'s reference: jax.lax.top_k's order over the visible prefix (ties by lower index, IEEE total
    order, -0 as +0), invisible picks -1, whatever the masked entries hold."""
    s = jnp.asarray([[1.0, 3.0, -0.0, 3.0, 0.0, 9.0, np.inf, -np.inf], [5.0, 5.0, 5.0, 7.0, 7.0, 1.0, 2.0, 3.0]])
    got = np.asarray(ops.indexer_topk(s, jnp.asarray([6, 3], jnp.int32), k=5, opts=EXACT))
    assert got[0].tolist() == [5, 1, 3, 0, 2]  # 9, 3, 3 (lower index first), 1, then -0 and +0 as equals: -0 first
    assert got[1].tolist() == [0, 1, 2, -1, -1]  # three visible: the masked 7s are not picked


def test_indexer_score_is_weighted_relu_sum():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 2, 16, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(1, 2, 16)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(1, 5, 128)), jnp.bfloat16)
    got = np.asarray(Indexer.scores(q, w, k))
    qk = np.einsum("bthc,bnc->bthn", np.asarray(q, np.float64), np.asarray(k, np.float64))
    want = (np.maximum(qk, 0) * np.asarray(w, np.float64)[..., None]).sum(2)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=0.05)


def test_sparse_attention_sink_and_masking():
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(1, 1, 2, 512)) * 0.05, jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(1, 70, 512)), jnp.bfloat16)
    idx = jnp.asarray([[list(range(0, 70, 2)) + [-1] * 5]], jnp.int32)  # 35 keys, spread over two 64-tiles
    sink = jnp.asarray([-1e30, 2.0], jnp.float32)  # head 0: no sink; head 1: a large sink
    o = np.asarray(sparse_attention(q, kv, idx, sink, 512**-0.5), np.float64)[0, 0]
    K = np.asarray(kv, np.float64)[0, 0:70:2]
    z = np.asarray(q, np.float64)[0, 0] @ K.T * 512**-0.5
    p = np.exp(z - z.max(-1, keepdims=True))
    want0 = (p[0] / p[0].sum()) @ K
    np.testing.assert_allclose(o[0], want0, rtol=2e-2, atol=2e-2)
    den1 = p[1].sum() + np.exp(2.0 - z[1].max())
    np.testing.assert_allclose(o[1], (p[1] / den1) @ K, rtol=2e-2, atol=2e-2)
    assert np.linalg.norm(o[1]) < np.linalg.norm(o[0])  # the sink only takes probability mass away
    # Unlisted rows do not matter.
    kv2 = kv.at[0, 1].set(100.0)
    np.testing.assert_array_equal(
        np.asarray(sparse_attention(q, kv2, idx, sink, 512**-0.5)),
        np.asarray(sparse_attention(q, kv, idx, sink, 512**-0.5)),
    )


def test_sparse_attention_chunking_changes_nothing_but_summation_order():
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.normal(size=(1, 40, 2, 512)), jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(1, 40, 512)), jnp.bfloat16)
    idx = jnp.asarray(window_indices(40, 128))[None]
    a = sparse_attention(q, kv, idx, jnp.zeros(2), 0.05)
    b = sparse_attention(q, kv, idx, jnp.zeros(2), 0.05, chunk=16)
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.mean(a != b) < 1e-3  # XLA may order an fp32 reduction differently per shape: a rare 1-ulp flip
    np.testing.assert_allclose(a, b, rtol=2**-7)


def test_sparse_attention_tiles_at_once_equal_the_tile_loop():
    """Decode's path (every tile's products at once, the online-softmax recurrence unrolled) and the loop over 64-key
    tiles do the same arithmetic per tile (up to the order of the dots' fp32 sums); two sources (a ring and compressed
    entries), -1 padding, a tile with no visible key, a query with none at all."""
    from dsv4_jax.ops import attention as A

    rng = np.random.default_rng(7)
    b, c, h, d = 2, 3, 4, 512
    qf = jnp.asarray(rng.normal(size=(b, c, h, d)), jnp.float32)
    ring = jnp.asarray(rng.normal(size=(b, 128, d)) * 3, jnp.bfloat16)
    entries = jnp.asarray(rng.normal(size=(b, 40, d)), jnp.bfloat16)
    sources = [(ring, 0), (entries, 128)]
    idx = rng.integers(0, 168, size=(b, c, 256))
    idx[:, :, 64:128] = -1  # a tile with no key
    idx[:, 1, 200:] = -1
    idx[1, 2, :] = -1  # a query with no key at all
    idx = jnp.asarray(idx, jnp.int32)
    init = (jnp.full((b, c, h), -jnp.inf), jnp.zeros((b, c, h)), jnp.zeros((b, c, h, d)))
    m1, den1, acc1 = A._tiles_at_once(qf, sources, idx, init, 0.04, 64)
    m2, den2, acc2 = A._tiles_in_a_loop(qf, sources, idx, init, 0.04, 64)
    # The scores come from differently shaped dots (XLA may add a 512-long product in another order): fp32 noise.
    # Scores are ~3 here, sums of 512 products of size ~3: a few 1e-6 relative.
    np.testing.assert_allclose(np.asarray(m1), np.asarray(m2), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(den1), np.asarray(den2), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(acc1), np.asarray(acc2), rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(den1)[1, 2] == 0) and np.all(np.asarray(acc1)[1, 2] == 0)
