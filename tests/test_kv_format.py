"""The packed FP8 KV rows and MXFP4 indexer keys of the decode cache: byte layout, a lossless round trip for the rows
the model produces (FP8/FP4-simulated), clear errors, and decoding with the packed cache against the bf16 one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4_jax import kv_format as K
from dsv4_jax import quant


def _kv_rows(rng, n, d=512, rope=64):
    """FP8-simulated NoPE (tiles of very different magnitudes, one all-zero tile) and bf16 RoPE, as `window_kv`."""
    x = rng.normal(size=(n, d)) * np.exp(rng.uniform(-12, 8, size=(n, 1)))
    x[:, 64:128] *= 1e-3
    x[0, :64] = 0.0
    x = jnp.asarray(x, jnp.bfloat16)
    return jnp.concatenate([quant.fp8_sim(x[:, : d - rope], 64), x[:, d - rope :]], axis=-1)


def test_kv_row_layout_and_lossless_round_trip():
    rng = np.random.default_rng(0)
    kv = _kv_rows(rng, 200)
    p = jax.jit(K.pack_kv, static_argnums=1)(kv, 64)
    assert p.dtype == jnp.uint8 and p.shape == (200, 584) == (200, K.kv_row_bytes(512, 64))
    back = K.unpack_kv(p, 64)
    np.testing.assert_array_equal(np.asarray(back).view(np.uint16), np.asarray(kv).view(np.uint16))
    pn, kn = np.asarray(p), np.asarray(kv)
    np.testing.assert_array_equal(pn[:, 448:576].view(ml_dtypes.bfloat16), kn[:, 448:])  # RoPE as bf16 bytes
    scales = pn[:, 576:583].astype(np.float64) - 127  # UE8M0 exponents, one per tile of 64
    nope = pn[:, :448].view(ml_dtypes.float8_e4m3fn).astype(np.float64).reshape(200, 7, 64)
    np.testing.assert_array_equal(nope * 2.0 ** scales[..., None], kn[:, :448].astype(np.float64).reshape(200, 7, 64))
    assert (pn[:, 583] == 0).all()
    np.testing.assert_array_equal(np.asarray(K.unpack_kv(p, 64, jnp.float32)), kn.astype(np.float32))


def test_index_key_layout_and_lossless_round_trip():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 128)) * np.exp(rng.uniform(-10, 6, size=(300, 1)))
    x[5, 32:64] = 0.0
    keys = quant.fp4_sim(jnp.asarray(x, jnp.bfloat16), 32)
    p = K.pack_index_keys(keys)
    assert p.dtype == jnp.uint8 and p.shape == (300, 68) == (300, K.index_key_bytes(128))
    np.testing.assert_array_equal(np.asarray(K.unpack_index_keys(p)).view(np.uint16), np.asarray(keys).view(np.uint16))
    codes = np.asarray(p)[:, :64]
    lo = quant.E2M1_VALUES[codes & 15]
    scale = 2.0 ** (np.asarray(p)[:, 64:].astype(np.float64) - 127)
    np.testing.assert_array_equal(lo * np.repeat(scale, 16, axis=1), np.asarray(keys)[:, 0::2].astype(np.float64))


def test_bad_row_widths_are_named():
    with pytest.raises(ValueError, match="583 bytes per row is not a packed KV row"):
        K.unpack_kv(jnp.zeros((2, 583), jnp.uint8), 64)
    with pytest.raises(ValueError, match="67 bytes per row is not a packed indexer key"):
        K.unpack_index_keys(jnp.zeros((2, 67), jnp.uint8))
    with pytest.raises(ValueError, match="multiple of 64"):
        K.kv_row_bytes(500, 64)


def test_packed_cache_decodes_like_the_bf16_cache(official_state):
    """Prefill, decode steps and an extend with padding on the packed cache give the bf16 cache's logits bit for bit:
    the cache holds the same values (FP8/FP4-simulated), only stored in the official layout. The exact model refuses
    it."""
    import dsv4_jax
    from dsv4_jax import runner as D

    cfg = official_state.config
    # test_decode's shapes (batch 2, a 160-wide prompt, capacity 320) and its decode step with captures (unused
    # here): the packed run reuses its compiled prefill and decode programs
    toks = np.random.default_rng(2).integers(2, 512, (2, 170)).astype(np.int32)
    lengths = np.array([150, 100])
    pt = np.where(np.arange(160)[None] < lengths[:, None], toks[:, :160], 0)

    def run(kv):
        cache = dsv4_jax.init_cache(cfg, 2, 320, kv)
        logits, hidden, cache = D.prefill(official_state, cache, pt, lengths)
        out = [np.asarray(logits)[:, None]]
        for i in range(4):
            lg, hidden, cache, _ = D.decode_step(official_state, cache, toks[np.arange(2), lengths + i], capture=True)
            out.append(np.asarray(lg)[:, None])
        # an extend (chunked prefill, speculative verification): 5 new tokens on row 0, 3 and padding on row 1
        chunk = np.stack([toks[0, 154:159], np.concatenate([toks[1, 104:107], [7, 7]])]).astype(np.int32)
        lg, hidden, cache = dsv4_jax.extend(official_state, cache, chunk, np.array([5, 3]))
        out.append(np.asarray(lg))
        return np.concatenate(out, axis=1), cache

    packed, cache_p = run("fp8")
    plain, cache_b = run("bf16")
    np.testing.assert_array_equal(packed, plain)
    assert cache_p.layer(2, unpack=False).window.dtype == jnp.uint8
    for a, b in zip(cache_p.layers, cache_b.layers, strict=True):
        for f in ("window", "entries", "idx_keys"):
            if getattr(a, f) is not None:
                np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), f)
    with pytest.raises(ValueError, match="quant_sim=False"):
        D.decode_step(official_state, cache_p, toks[:, 160], opts=dsv4_jax.Opts(quant_sim=False))
    with pytest.raises(ValueError, match="kv_cache='fp8' needs quant_sim=True"):
        dsv4_jax.Opts(quant_sim=False, kv_cache="fp8")
