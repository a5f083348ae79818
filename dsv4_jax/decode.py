"""Prefill and single-token decode against an explicit `Cache` (spec §7), for batches of prompts of different lengths.

* `prefill(state, cache, tokens [B, S], lengths [B])`: right-padded prompts, positions `0..S-1`. Runs the same math
  as the full-sequence `forward` (a query only sees keys at or before it, so padding after a row's end never reaches
  its valid positions; padded tokens get no routed experts) and writes each row's first `lengths[b]` tokens into
  the cache: the window ring, the compressor block states, the compressed entries and the indexer keys.
* `decode_step(state, cache, tokens [B])`: one token per row at the row's own position `cache.lengths[b]`.
* `mtp_prefill` / `mtp_decode_step`: the MTP layer, which has its own window cache. At position p it reads the main
  residual stream of p and the embedding of the token at p+1, and predicts the token at p+2.

The public functions are jitted with the cache donated (`donate_argnames=("cache",)`): the cache passed in is
consumed; use the returned one. The `_`-prefixed functions are the traceable bodies (used by `dsv4_jax.generation`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.cache import Cache, layer_cache_from_prefill
from dsv4_jax.model import ModelState
from dsv4_jax.ops import Opts

_DEFAULT_OPTS = Opts()

__all__ = ["prefill", "decode_step", "mtp_prefill", "mtp_decode_step", "check_prompts"]


def _last(x_bs, lengths_b):
    """`x[b, lengths[b] - 1]` keeping a length-1 sequence axis."""
    idx = jnp.clip(lengths_b - 1, 0, x_bs.shape[1] - 1)
    return jnp.take_along_axis(x_bs, idx.reshape(-1, *([1] * (x_bs.ndim - 1))), axis=1)


# ---- traceable bodies -------------------------------------------------------------------------------------------


def _prefill(state: ModelState, cache: Cache, tokens_bs, lengths_b, opts: Opts):
    """-> (logits at each row's last prompt token `[B, V]` fp32, residual streams `[B, S, n, d]`, cache)."""
    model, cfg = state.model(), state.config
    s = tokens_bs.shape[1]
    valid = jnp.arange(s)[None, :] < lengths_b[:, None]
    X = model.streams(tokens_bs)
    layers = []
    for i, layer in enumerate(model.layers):
        attend = functools.partial(layer.attn.prefill, opts=opts, with_cache=True)
        X, pieces = layer.attn_sublayer(X, attend)
        X = layer.ffn_sublayer(X, tokens_bs, opts, None, valid)
        layers.append(layer_cache_from_prefill(pieces, lengths_b, cfg.compress_ratios[i], cfg.window_size,
                                               cache.max_len))  # fmt: skip
    logits = model.head_logits(_last(X, lengths_b), model)[:, 0]
    return logits, X, dataclasses.replace(cache, layers=layers, lengths=lengths_b.astype(jnp.int32))


def _decode(state: ModelState, cache: Cache, tokens_b, opts: Opts, active_b=None, capture: bool = False):
    """-> (logits `[B, V]` fp32, residual streams `[B, n, d]`, cache); rows with `active` False get no routed
    experts (their cache still advances). With `capture`, a 4th element: `{"block_out": [L, B, n, d],
    "indexer_topk_L{l}": [B, k]}` (CSA layers; offset = window, -1 = none)."""
    model = state.model()
    pos = cache.lengths
    tok = tokens_b[:, None]
    valid = None if active_b is None else active_b[:, None]
    X = model.streams(tok)
    layers, caps, block_out = [], {}, []
    for i, (layer, lc) in enumerate(zip(model.layers, cache.layers, strict=True)):
        rec = {} if capture else None
        attend = functools.partial(layer.attn.decode, pos_b=pos, lc=lc, opts=opts, rec=rec)
        X, lc = layer.attn_sublayer(X, attend)
        X = layer.ffn_sublayer(X, tok, opts, None, valid)
        layers.append(lc)
        if capture:
            block_out.append(X[:, 0])
            if "indexer_topk" in rec:
                caps[f"indexer_topk_L{i}"] = rec["indexer_topk"]
    logits = model.head_logits(X, model)[:, 0]
    cache = dataclasses.replace(cache, layers=layers, lengths=pos + 1)
    if capture:
        caps["block_out"] = jnp.stack(block_out)
        return logits, X[:, 0], cache, caps
    return logits, X[:, 0], cache


def _mtp_prefill(state: ModelState, cache: Cache, hidden_bsnd, mtp_tokens_bs, opts: Opts):
    """MTP over the prompt (positions `0..S-1`, lengths = `cache.lengths`) -> (MTP logits at each row's last prompt
    position `[B, V]`, cache with the MTP window written)."""
    model, cfg = state.model(), state.config
    lengths = cache.lengths
    s = mtp_tokens_bs.shape[1]
    valid = jnp.arange(s)[None, :] < lengths[:, None]
    mtp = model.mtp[0]
    X = mtp.mix_inputs(hidden_bsnd, model.embed(mtp_tokens_bs), opts)
    X, pieces = mtp.attn_sublayer(X, functools.partial(mtp.attn.prefill, opts=opts, with_cache=True))
    X = mtp.ffn_sublayer(X, mtp_tokens_bs, opts, None, valid)
    lc = layer_cache_from_prefill(pieces, lengths, cfg.compress_ratios[cfg.n_layers], cfg.window_size, cache.max_len)
    logits = model.head_logits(_last(X, lengths), mtp)[:, 0]
    return logits, dataclasses.replace(cache, mtp=[lc, *cache.mtp[1:]], mtp_lengths=lengths)


def _mtp_decode(state: ModelState, cache: Cache, hidden_bnd, tokens_b, opts: Opts, active_b=None):
    """MTP at position `cache.mtp_lengths` with the main stream of that position and the next token's embedding ->
    (MTP logits `[B, V]`, cache)."""
    model = state.model()
    mtp = model.mtp[0]
    pos = cache.mtp_lengths
    tok = tokens_b[:, None]
    valid = None if active_b is None else active_b[:, None]
    X = mtp.mix_inputs(hidden_bnd[:, None], model.embed(tok), opts)
    X, lc = mtp.attn_sublayer(X, functools.partial(mtp.attn.decode, pos_b=pos, lc=cache.mtp[0], opts=opts))
    X = mtp.ffn_sublayer(X, tok, opts, None, valid)
    logits = model.head_logits(X, mtp)[:, 0]
    return logits, dataclasses.replace(cache, mtp=[lc, *cache.mtp[1:]], mtp_lengths=pos + 1)


_prefill_jit = jax.jit(_prefill, static_argnames=("opts",), donate_argnames=("cache",))
_decode_jit = jax.jit(_decode, static_argnames=("opts", "capture"), donate_argnames=("cache",))
_mtp_prefill_jit = jax.jit(_mtp_prefill, static_argnames=("opts",), donate_argnames=("cache",))
_mtp_decode_jit = jax.jit(_mtp_decode, static_argnames=("opts",), donate_argnames=("cache",))


# ---- public API -------------------------------------------------------------------------------------------------


def check_prompts(cfg, tokens, lengths, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Validates right-padded prompts on the host -> (`tokens [B, S]` int32, `lengths [B]` int32): see
    `dsv4_jax.inputs.check_tokens` (the one validation every entry point shares)."""
    from dsv4_jax.inputs import check_tokens

    return check_tokens(cfg, tokens, lengths, max_len=max_len)


def prefill(state: ModelState, cache: Cache, tokens, lengths=None, *, opts: Opts = _DEFAULT_OPTS):
    """Prefill right-padded prompts `tokens [B, S]` of `lengths [B]` tokens (default: all S) from position 0.

    Returns `(logits [B, V], hidden [B, S, n, d], cache)`: the logits at each row's last prompt token, the residual
    streams before hc_head (the MTP input) and the cache (the one passed in is donated)."""
    tokens, lengths = check_prompts(state.config, tokens, lengths, cache.max_len)
    if tokens.shape[1] > cache.max_len:
        raise ValueError(f"padded prompt width {tokens.shape[1]} exceeds max_len={cache.max_len}")
    return _prefill_jit(state, cache, jnp.asarray(tokens), jnp.asarray(lengths), opts)


def decode_step(state: ModelState, cache: Cache, tokens, *, opts: Opts = _DEFAULT_OPTS, active=None,
                capture: bool = False):  # fmt: skip
    """One token per row (`tokens [B]`) at position `cache.lengths[b]` -> `(logits [B, V], hidden [B, n, d],
    cache)` (+ captures with `capture`, see `_decode`). The caller keeps `cache.lengths < cache.max_len` (the cache
    has no room past it). `active [B]` False: the row's token gets no routed experts."""
    return _decode_jit(state, cache, jnp.asarray(tokens, jnp.int32), opts, active, capture)


def mtp_prefill(state: ModelState, cache: Cache, hidden, mtp_tokens, *, opts: Opts = _DEFAULT_OPTS):
    """MTP over the prefilled prompt: `hidden [B, S, n, d]` from `prefill`, `mtp_tokens [B, S]` the token at p+1
    for each position p (for the last prompt position: the first generated token) -> `(mtp_logits [B, V], cache)`."""
    return _mtp_prefill_jit(state, cache, hidden, jnp.asarray(mtp_tokens, jnp.int32), opts)


def mtp_decode_step(state: ModelState, cache: Cache, hidden, tokens, *, opts: Opts = _DEFAULT_OPTS, active=None):
    """MTP at position `cache.mtp_lengths`: `hidden [B, n, d]` (the main stream of that position, from
    `decode_step`) and `tokens [B]` (the token after it) -> `(mtp_logits [B, V], cache)`."""
    return _mtp_decode_jit(state, cache, hidden, jnp.asarray(tokens, jnp.int32), opts, active)
