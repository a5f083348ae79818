"""The cache pytree: layout per layer ratio, prefill writing (ring, block state, entries, padding left out), sizes,
and the compressor's one-token update against its full-sequence pooling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import cache as C
from dsv4_jax.config import Config


def test_layout_per_ratio():
    cfg = Config.tiny()
    c = C.init_cache(cfg, 3, 256)
    assert len(c.layers) == cfg.n_layers and len(c.mtp) == 1 and c.max_len == 256
    for r, lc in zip(cfg.compress_ratios, [*c.layers, *c.mtp], strict=True):
        assert lc.window.shape == (3, 128, 512) and lc.window.dtype == jnp.bfloat16
        assert (lc.entries is None) == (r == 0)
        assert (lc.idx_keys is None) == (r != 4)
        if r == 4:
            assert lc.comp_kv.shape == (3, 8, 1024) and lc.entries.shape == (3, 64, 512)
            assert lc.idx_kv.shape == (3, 8, 256) and lc.idx_keys.shape == (3, 64, 128)
        if r == 128:
            assert lc.comp_score.shape == (3, 128, 512) and lc.entries.shape == (3, 2, 512)
    leaves, tree = jax.tree.flatten(c)
    c2 = jax.tree.unflatten(tree, leaves)
    assert c2.max_len == 256 and isinstance(c2, C.Cache)
    with pytest.raises(ValueError, match="max_len=5000"):
        C.init_cache(cfg, 1, 5000)


def test_cache_bytes():
    cfg = Config.tiny()
    per = C.cache_bytes_per_token(cfg)
    # two CSA layers (512*2/4 + 128*2/4 bytes per token) and two HCA layers (512*2/128)
    assert per["per_token"] == pytest.approx(2 * (256 + 64) + 2 * 8)
    growth = C.cache_bytes(cfg, 1, 1024) - C.cache_bytes(cfg, 1, 512)
    assert growth == pytest.approx(512 * per["per_token"])
    for c in (Config.flash(), Config.pro()):
        assert C.cache_bytes_per_token(c)["per_token"] > 0


def test_prefill_pieces_written_per_row():
    """Ring slot j holds the latest position p < length with p % W == j; CSA state rows 0..3 = last complete block,
    4.. = the partial block (score -inf where empty); entries past a row's complete blocks are zero."""
    b, s, w, d = 2, 11, 4, 3
    pos = jnp.arange(s, dtype=jnp.float32)[None, :, None] + 100 * jnp.arange(b)[:, None, None]
    x = jnp.broadcast_to(pos, (b, s, d))
    lengths = jnp.array([10, 3])
    ent = jnp.ones((b, s // 4, d), jnp.bfloat16)
    pieces = {"window": x, "comp_kv": x, "comp_score": x, "entries": ent, "idx_kv": x, "idx_score": x,
              "idx_keys": ent}  # fmt: skip
    lc = C.layer_cache_from_prefill(pieces, lengths, 4, w, 16)
    ring = np.asarray(lc.window)[..., 0]
    np.testing.assert_array_equal(ring[0], [8, 9, 6, 7])
    np.testing.assert_array_equal(ring[1], [100, 101, 102, 0])
    kv, sc = np.asarray(lc.comp_kv)[..., 0], np.asarray(lc.comp_score)[..., 0]
    np.testing.assert_array_equal(kv[0], [4, 5, 6, 7, 8, 9, 0, 0])
    assert np.isneginf(sc[0, 6:]).all() and np.isneginf(sc[1, :4]).all() and np.isneginf(sc[1, 7:]).all()
    np.testing.assert_array_equal(kv[1, 4:7], [100, 101, 102])
    e = np.asarray(lc.entries, np.float32)[..., 0]
    assert e.shape == (2, 4)
    np.testing.assert_array_equal(e, [[1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("ratio", [4, 128])
def test_compressor_decode_matches_full_sequence(ratio):
    """Feeding tokens one at a time (two rows at different positions) emits the same entries as pooling the whole
    sequence, quant_sim off (CSA overlap, HCA 128-token blocks, state shift)."""
    from flax import nnx

    from dsv4_jax import nn
    from dsv4_jax.attention import Compressor
    from dsv4_jax.ops import Opts
    from dsv4_jax.rounding import to_bf16

    cfg = Config.tiny()
    comp = Compressor(cfg, ratio, 512, rotate=False, rngs=nnx.Rngs(0))
    graph, params = nnx.split(comp)
    inv = nn.layer_inv_freq(cfg, ratio)
    opts = Opts(quant_sim=False)
    t = 2 * ratio + 3 if ratio == 4 else 260
    x = to_bf16(jax.random.normal(jax.random.key(1), (2, t, cfg.dim)))
    full = jax.jit(lambda p, x: nnx.merge(graph, p)(x, inv, opts))(params, x)

    @jax.jit
    def step(p, x1, pos, kv, sc, ent):
        return nnx.merge(graph, p).decode(x1, pos, kv, sc, ent, inv, opts)

    lc = C._layer_cache(cfg, ratio, 2, t + 8)
    kv, sc, ent = lc.comp_kv, jnp.full_like(lc.comp_score, -jnp.inf), lc.entries
    offset = 5  # row 1 runs 5 positions behind row 0: rows complete blocks at different steps
    for i in range(t + offset):
        pos = jnp.array([min(i, t - 1), max(i - offset, 0)])
        if i >= t:  # row 0 is finished: feed its last token again at the clamped position only if row 1 needs steps
            pos = pos.at[0].set(t + 7)  # a position whose block never completes within capacity
        xs = jnp.stack([x[0, min(i, t - 1)], x[1, max(i - offset, 0)]])[:, None]
        if i < offset:  # row 1 has not started: keep it at position 0 until it does
            xs = xs.at[1].set(x[1, 0][None])
        kv, sc, ent = step(params, xs, pos, kv, sc, ent)
    nb = t // ratio
    e, f = np.asarray(ent[:, :nb], np.float32), np.asarray(full, np.float32)
    rel = np.sqrt(np.mean((e - f) ** 2) / np.mean(f**2))
    assert rel < 2e-3, rel
