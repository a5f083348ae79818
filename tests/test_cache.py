"""The cache pytree: layout per layer ratio, prefill writing (ring, block state, entries, padding left out), sizes,
and the compressor's one-token update against its full-sequence pooling."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import cache as C
from dsv4_jax.config import Config


@pytest.mark.parametrize("kv,row,key", [("bf16", 512, 128), ("fp8", 584, 68)])
def test_layout_per_ratio(kv, row, key):
    cfg = Config.tiny()
    c = C.init_cache(cfg, 3, 256, kv)
    assert len(c.layers) == cfg.n_layers and len(c.mtp) == 1 and c.max_len == 256
    dtype = jnp.bfloat16 if kv == "bf16" else jnp.uint8
    raw = [c.layer(i, unpack=False) for i in range(cfg.n_layers)]
    for r, lc in zip(cfg.compress_ratios, [*raw, *c.mtp], strict=True):
        assert lc.window.shape == (3, 128, row) and lc.window.dtype == dtype
        assert (lc.entries is None) == (r == 0)
        assert (lc.idx_keys is None) == (r != 4)
        if r == 4:
            assert lc.comp_kv.shape == (3, 8, 1024) and lc.entries.shape == (3, 64, row)
            assert lc.idx_kv.shape == (3, 8, 256) and lc.idx_keys.shape == (3, 64, key)
            assert lc.idx_keys.dtype == dtype and lc.entries.dtype == dtype
        if r == 128:
            assert lc.comp_score.shape == (3, 128, 512) and lc.entries.shape == (3, 2, row)
    for lc in c.layers:  # for inspection: rows decoded
        assert lc.window.shape == (3, 128, 512) and lc.window.dtype == jnp.bfloat16
    leaves, tree = jax.tree.flatten(c)
    c2 = jax.tree.unflatten(tree, leaves)
    assert c2.max_len == 256 and isinstance(c2, C.Cache)
    with pytest.raises(ValueError, match="max_len=5000"):
        C.init_cache(cfg, 1, 5000)


def test_cache_bytes():
    cfg = Config.tiny()
    per = C.cache_bytes_per_token(cfg, "bf16")
    # two CSA layers (512*2/4 + 128*2/4 bytes per token) and two HCA layers (512*2/128)
    assert per["per_token"] == pytest.approx(2 * (256 + 64) + 2 * 8)
    # packed: 584 B per KV row, 68 B per indexer key
    assert C.cache_bytes_per_token(cfg)["per_token"] == pytest.approx(2 * (584 / 4 + 68 / 4) + 2 * 584 / 128)
    for kv in ("bf16", "fp8"):
        per = C.cache_bytes_per_token(cfg, kv)
        growth = C.cache_bytes(cfg, 1, 1024, kv) - C.cache_bytes(cfg, 1, 512, kv)
        assert growth == pytest.approx(512 * per["per_token"])
        assert C.cache_bytes(cfg, 1, 512, kv) == per["fixed"] + 512 * per["per_token"] + 8  # + lengths (int32 x 2)
    # V4-Flash: the released layout's 3,514 B per token of context (indexer keys included)
    assert round(C.cache_bytes_per_token(Config.flash())["per_token"]) == 3514
    for c in (Config.flash(), Config.pro()):
        assert C.cache_bytes_per_token(c)["per_token"] > 0


def test_window_ring_after_a_step():
    """Slot j holds the latest position p < start + n_new with p % W == j: from the step's rows where p >= start,
    else the old ring; zeros where no position has reached it. Rows advance by their own n_new (0: unchanged)."""
    from dsv4_jax.attention import _ring

    w, k, d = 4, 6, 3
    start = jnp.array([0, 5, 7])
    n_new = jnp.array([3, 6, 0])
    new = (100 * (1 + jnp.arange(3))[:, None] + start[:, None] + jnp.arange(k)[None, :]).astype(jnp.float32)
    new = jnp.broadcast_to(new[..., None], (3, k, d))
    old = jnp.broadcast_to((-1.0 - jnp.arange(w, dtype=jnp.float32))[None, :, None], (3, w, d))
    ring = np.asarray(_ring(old, new, start, n_new, w))[..., 0]
    np.testing.assert_array_equal(ring[0], [100, 101, 102, 0])  # positions 0..2 written, slot 3 never reached
    np.testing.assert_array_equal(ring[1], [208, 209, 210, 207])  # positions 7..10 (5, 6 overwritten)
    np.testing.assert_array_equal(ring[2], [-1, -2, -3, -4])  # nothing new: the old ring


@pytest.mark.parametrize("ratio", [4, 128])
def test_compressor_steps_match_full_sequence(ratio):
    """Feeding a sequence in steps of varying sizes (two rows at different offsets, one padded) emits the entries
    of pooling the whole sequence, quant_sim off (CSA overlap across steps, HCA 128-token blocks, state carry)."""
    from flax import nnx

    from dsv4_jax import Opts, nn
    from dsv4_jax.attention import Compressor
    from dsv4_jax.rounding import to_bf16

    cfg = Config.tiny()
    comp = Compressor(cfg, ratio, 512, rotate=False, rngs=nnx.Rngs(0))
    graph, params = nnx.split(comp)
    inv = nn.layer_inv_freq(cfg, ratio)
    opts = Opts(quant_sim=False)
    t = 3 * ratio + 3 if ratio == 4 else 300
    x = to_bf16(jax.random.normal(jax.random.key(1), (2, t, cfg.dim)))
    full = jax.jit(lambda p, x: nnx.merge(graph, p)(x, inv, opts))(params, x)

    @functools.partial(jax.jit, static_argnums=6)
    def step(p, xs, start, n_new, lc, first, _k):
        out = nnx.merge(graph, p).step(xs, start, n_new, lc.comp_kv, lc.comp_score, inv, opts, fresh=False)
        return dataclasses.replace(lc, comp_kv=out.kv_state, comp_score=out.score_state,
                                   entries=C._write_entries(lc.entries, None, out))  # fmt: skip

    lc = C._layer_cache(cfg, ratio, 2, t + 8, "bf16")
    pos = np.array([0, 0])
    sizes = [1, 3, 7, 1, 2, 5, 64, 1, 130, 9] * 4
    for i, k in enumerate(sizes):
        if (pos == t).all():
            break
        n_new = np.minimum([k, max(k - 1, 0) if i % 2 else k], t - pos)  # row 1 sometimes one token short (padding)
        idx = np.minimum(pos[:, None] + np.arange(k)[None, :], t - 1)
        xs = x[jnp.arange(2)[:, None], idx]
        lc = step(params, xs, jnp.asarray(pos), jnp.asarray(n_new), lc, i == 0, k)
        pos = pos + n_new
    assert (pos == t).all()
    nb = t // ratio
    e, f = np.asarray(lc.entries[:, :nb], np.float32), np.asarray(full, np.float32)
    rel = np.sqrt(np.mean((e - f) ** 2) / np.mean(f**2))
    assert rel < 2e-3, rel
    assert not np.asarray(lc.entries[:, nb:], np.float32).any()  # no incomplete block was written


@pytest.mark.parametrize("kv", ["fp8", "bf16"])
def test_fill_synthetic_is_a_cache_at_that_context(kv):
    """Every row as if it had seen `context` tokens: entries and keys up to context // ratio hold finite, nonzero,
    valid rows (packed rows decode), nothing beyond; lengths = context; a decode step then runs at that position
    (its index lists reach the filled entries: the logits depend on them)."""
    import dsv4_jax
    from dsv4_jax import Opts

    cfg = Config.tiny()
    context, max_len = 200, 256
    cache = C.fill_synthetic(C.init_cache(cfg, 2, max_len, kv), context, seed=1)
    assert np.asarray(cache.lengths).tolist() == [context, context]
    assert np.asarray(cache.mtp_lengths).tolist() == [context, context]
    for r, lc in zip(cfg.compress_ratios, [*cache.layers, *cache.mtp], strict=True):
        win = np.asarray(lc.window, np.float32)
        assert np.isfinite(win).all() and (np.abs(win).sum(-1) > 0).all()  # all 128 slots filled (context >= 128)
        if r:
            e = np.asarray(lc.entries, np.float32)
            n = context // r
            assert np.isfinite(e).all() and (np.abs(e[:, :n]).sum(-1) > 0).all() and not e[:, n:].any()
        if r == 4:
            k = np.asarray(lc.idx_keys, np.float32)
            assert np.isfinite(k).all() and (np.abs(k[:, : context // 4]).sum(-1) > 0).all()
            assert not k[:, context // 4 :].any()
    with pytest.raises(ValueError, match="context=256"):
        C.fill_synthetic(C.init_cache(cfg, 1, max_len, kv), max_len)
    if kv == "bf16":  # the fill's content is the point here; decode over it runs for the default layout (compile time)
        return
    state = dsv4_jax.init_random(cfg, 0)
    opts = Opts(kv_cache=kv)
    tok = jnp.asarray([5, 7], jnp.int32)
    logits, _, after = dsv4_jax.decode_step(state, cache, tok, opts=opts)
    assert np.isfinite(np.asarray(logits, np.float32)).all()
    assert np.asarray(after.lengths).tolist() == [context + 1, context + 1]
    other = C.fill_synthetic(C.init_cache(cfg, 2, max_len, kv), context, seed=2)
    logits2, _, _ = dsv4_jax.decode_step(state, other, tok, opts=opts)
    assert not np.array_equal(np.asarray(logits, np.float32), np.asarray(logits2, np.float32))
