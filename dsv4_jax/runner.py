"""The one layer walker: every model function is "k new tokens per row on top of a cache".

* `forward(state, tokens [B, S])`: the whole sequence from position 0, no cache; logits `[B, S, V]`.
* `prefill(state, cache, tokens [B, S], lengths [B])`: right-padded prompts from position 0 into an empty cache.
* `decode_step(state, cache, tokens [B])`: one token per row at the row's own position `cache.lengths[b]`.
* `extend(state, cache, tokens [B, k], n_new [B])`: k tokens per row on top of the cache (chunked prefill,
  speculative verification); the first `n_new[b]` of each row are real.
* `mtp_prefill` / `mtp_decode_step` / `mtp_extend`: the MTP layer, which has its own window cache. At position p
  it reads the main residual stream of p and the embedding of the token at p+1, and predicts the token at p+2.

All run `walk`: the layer groups of `dsv4_jax.model.layer_groups` in order, each under one `lax.scan` over its
stacked parameters and caches (a layer is a `LayerSlice` of its stack, so kernels take weights without a copy and
cache writes happen in place), so a program holds one compiled body per layer kind. Per-layer activations are
recorded in one place, a `Capture` per layer, when asked for.

The public functions are jitted with the cache donated: the cache passed in is consumed; use the returned one.
The `_`-prefixed functions are the traceable bodies (`dsv4_jax.generation` composes them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.cache import Cache
from dsv4_jax.inputs import check_tokens
from dsv4_jax.layer_view import LayerSlice
from dsv4_jax.model import ModelState, layer_groups
from dsv4_jax.options import Opts

__all__ = ["Capture", "Output", "walk", "forward", "forward_outputs", "prefill", "decode_step", "extend",
           "mtp_prefill", "mtp_decode_step", "mtp_extend", "check_prompts"]  # fmt: skip

_DEFAULT = Opts()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Capture:
    """One layer's recorded activations (None where the layer has no such thing). Shapes for `b` rows of `k` new
    tokens: attn_in / attn_out / ffn_in / ffn_out `[b, k, d]`; mid (after the attention sublayer) and block_out
    `[b, k, n, d]`; route_idx / route_w `[b*k, topk]` (the router's experts and weights); attn_kv `[b, rows, D]` (the
    KV rows attention indexes) and attn_topk `[b, k, keys]` (each query's index list into them, -1 = none);
    CSA layers: indexer_topk `[b, k, index_topk]` (the selected compressed entries j in the official layouts: row
    `k + j` when fresh (prefill, forward), `W + j` on top of a cache; -1 = none) and indexer_scores `[b, k, entries]`
    (-inf where invisible). Indexable like a dict: `cap["route_idx"]`."""

    attn_in: jax.Array | None = None
    attn_out: jax.Array | None = None
    mid: jax.Array | None = None
    ffn_in: jax.Array | None = None
    ffn_out: jax.Array | None = None
    block_out: jax.Array | None = None
    route_idx: jax.Array | None = None
    route_w: jax.Array | None = None
    attn_kv: jax.Array | None = None
    attn_topk: jax.Array | None = None
    indexer_topk: jax.Array | None = None
    indexer_scores: jax.Array | None = None

    def __getitem__(self, name: str) -> jax.Array:
        value = getattr(self, name, None)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: str) -> bool:
        return getattr(self, name, None) is not None

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Output:
    """logits `[b,s,V]` fp32; mtp_logits `[b,s,V]` or None; hidden: residual streams before hc_head `[b,s,n,d]`;
    captures: `{"layer0": Capture, ..., "mtp": Capture}` when asked for."""

    logits: jax.Array
    mtp_logits: jax.Array | None = None
    hidden: jax.Array | None = None
    captures: dict | None = None


# ---- the walker -------------------------------------------------------------------------------------------------


def walk(model, X_bknd, tokens_bk, start_b, n_new_b, groups, opts: Opts, fresh: bool, capture: bool = False):
    """Runs every main layer: `(streams, new cache groups or None, {"layer{L}": Capture})`. `groups` is
    `Cache.groups` (or None: no cache, `fresh` only)."""
    cfg = model.cfg
    new_groups, caps = [], {}
    for g, grp in enumerate(layer_groups(cfg)):
        units = [nnx.split(block) for block in model.groups[g]]

        def body(carry, i, units=units):
            X, caches = carry
            new, recs = [], []
            for u, (graphdef, params) in enumerate(units):
                block = nnx.merge(graphdef, jax.tree.map(lambda a: LayerSlice(a, i), params))
                rec = Capture() if capture else None
                lc = None if caches is None else caches[u].view(i)
                X, upd = block.step(X, tokens_bk, start_b, n_new_b, lc, opts, fresh, rec)
                if caches is not None:
                    new.append(caches[u].write(i, upd))
                if rec is not None:
                    rec.block_out = X
                    recs.append(rec)
            return (X, None if caches is None else tuple(new)), tuple(recs)

        caches = None if groups is None else tuple(groups[g])
        (X_bknd, caches), recs = jax.lax.scan(body, (X_bknd, caches), jnp.arange(grp.repeats, dtype=jnp.int32))
        new_groups.append(caches)
        for u, rec in enumerate(recs):
            for r in range(grp.repeats):
                caps[f"layer{grp.layer(u, r)}"] = jax.tree.map(lambda a, r=r: a[r], rec)
    return X_bknd, (None if groups is None else new_groups), caps


def _mtp(model, X_main, next_tokens_bk, start_b, n_new_b, lc, opts: Opts, fresh: bool, capture: bool):
    """The MTP block on the main streams and the next tokens -> (its streams, its new cache or None, Capture)."""
    mtp = model.mtp[0]
    X = mtp.mix_inputs(X_main, model.embed(next_tokens_bk), opts)
    rec = Capture() if capture else None
    X, upd = mtp.step(X, next_tokens_bk, start_b, n_new_b, lc, opts, fresh, rec)
    if rec is not None:
        rec.block_out = X
    return X, None if lc is None else lc.write(None, upd), rec


def _last(x_bs, lengths_b):
    """`x[b, lengths[b] - 1]` keeping a length-1 sequence axis."""
    idx = jnp.clip(lengths_b - 1, 0, x_bs.shape[1] - 1)
    return jnp.take_along_axis(x_bs, idx.reshape(-1, *([1] * (x_bs.ndim - 1))), axis=1)


# ---- traceable bodies -------------------------------------------------------------------------------------------


def _forward(state: ModelState, tokens_bs, mtp_tokens_bs, opts: Opts, capture: bool) -> Output:
    model = state.model()
    b, s = tokens_bs.shape
    zero = jnp.zeros((b,), jnp.int32)
    X, _, caps = walk(model, model.streams(tokens_bs), tokens_bs, zero, zero + s, None, opts, True, capture)
    logits = model.head_logits(X, model)
    mtp_logits = None
    if mtp_tokens_bs is not None and len(model.mtp):
        Xm, _, rec = _mtp(model, X, mtp_tokens_bs, zero, zero + s, None, opts, True, capture)
        mtp_logits = model.head_logits(Xm, model.mtp[0])
        if capture:
            caps["mtp"] = rec
    return Output(logits=logits, mtp_logits=mtp_logits, hidden=X, captures=caps if capture else None)


def chunked(opts: Opts, prompt_width: int) -> bool:
    """Whether a prompt of this (padded) width is prefilled in chunks (`Opts.prefill_chunk`)."""
    return opts.prefill_chunk is not None and prompt_width > opts.prefill_chunk


def _prefill_chunks(state: ModelState, cache: Cache, tokens_bs, lengths_b, opts: Opts, mtp_next_bs=None):
    """Prefill in chunks of `opts.prefill_chunk` tokens: the extend step on each, one compiled body in a loop.

    -> (logits at each row's last prompt token `[B, V]`, the streams at that token `[B, 1, n, d]`, cache). With
    `mtp_next_bs` (the token after each position) the MTP layer runs on every chunk too, on all positions but each
    row's last prompt position (its next token is the one sampled from these logits: the caller runs it)."""
    model = state.model()
    c = opts.prefill_chunk
    b, s = tokens_bs.shape
    n_chunks = -(-s // c)
    pad = ((0, 0), (0, n_chunks * c - s))
    tokens = jnp.pad(tokens_bs, pad)
    nxt = None if mtp_next_bs is None else jnp.pad(mtp_next_bs, pad)
    zero = jnp.zeros_like(lengths_b, jnp.int32)
    cache = dataclasses.replace(cache, lengths=zero, mtp_lengths=zero)
    X_last = jnp.zeros_like(model.streams(tokens[:, :1]))  # [b, 1, n, d]

    def chunk(i, carry):
        cache, X_last = carry
        off = i * c
        tk = jax.lax.dynamic_slice_in_dim(tokens, off, c, axis=1)
        n_new = jnp.clip(lengths_b - off, 0, c).astype(jnp.int32)
        X, groups, _ = walk(model, model.streams(tk), tk, cache.lengths, n_new, cache.groups, opts, False)
        cache = dataclasses.replace(cache, groups=groups, lengths=cache.lengths + n_new)
        j = lengths_b - 1 - off  # each row's last prompt token within this chunk, if there
        here = (j >= 0) & (j < c)
        X_last = jnp.where(here[:, None, None, None], _last(X, j + 1), X_last)
        if nxt is not None:
            n_mtp = jnp.clip(lengths_b - 1 - off, 0, c).astype(jnp.int32)
            nk = jax.lax.dynamic_slice_in_dim(nxt, off, c, axis=1)
            _, lc, _ = _mtp(model, X, nk, cache.mtp_lengths, n_mtp, cache.mtp[0], opts, False, False)
            cache = dataclasses.replace(cache, mtp=[lc, *cache.mtp[1:]], mtp_lengths=cache.mtp_lengths + n_mtp)
        return cache, X_last

    cache, X_last = jax.lax.fori_loop(0, n_chunks, chunk, (cache, X_last))
    return model.head_logits(X_last, model)[:, 0], X_last, cache


def _prefill(state: ModelState, cache: Cache, tokens_bs, lengths_b, opts: Opts):
    """-> (logits at each row's last prompt token `[B, V]` fp32, residual streams `[B, S, n, d]` (with
    `Opts.prefill_chunk` and a longer prompt: None), cache)."""
    if chunked(opts, tokens_bs.shape[1]):
        logits, _, cache = _prefill_chunks(state, cache, tokens_bs, lengths_b, opts)
        return logits, None, cache
    model = state.model()
    zero = jnp.zeros_like(lengths_b)
    X, groups, _ = walk(model, model.streams(tokens_bs), tokens_bs, zero, lengths_b, cache.groups, opts, True)
    logits = model.head_logits(_last(X, lengths_b), model)[:, 0]
    return logits, X, dataclasses.replace(cache, groups=groups, lengths=lengths_b.astype(jnp.int32))


def _extend(state: ModelState, cache: Cache, tokens_bk, n_new_b, opts: Opts, capture: bool = False):
    """-> (logits `[B, k, V]`, streams `[B, k, n, d]`, cache[, captures]); rows advance by `n_new`."""
    model = state.model()
    start = cache.lengths
    X, groups, caps = walk(model, model.streams(tokens_bk), tokens_bk, start, n_new_b, cache.groups, opts, False,
                           capture)  # fmt: skip
    logits = model.head_logits(X, model)
    cache = dataclasses.replace(cache, groups=groups, lengths=start + n_new_b.astype(jnp.int32))
    return (logits, X, cache, caps) if capture else (logits, X, cache)


def _decode(state: ModelState, cache: Cache, tokens_b, opts: Opts, active_b=None, capture: bool = False):
    """-> (logits `[B, V]` fp32, residual streams `[B, n, d]`, cache[, captures]). Rows with `active` False are not
    run: their cache and length stay as they were."""
    n_new = jnp.ones_like(cache.lengths) if active_b is None else active_b.astype(jnp.int32)
    out = _extend(state, cache, tokens_b[:, None], n_new, opts, capture)
    return (out[0][:, 0], out[1][:, 0], *out[2:])


def _mtp_prefill(state: ModelState, cache: Cache, hidden_bsnd, mtp_tokens_bs, opts: Opts):
    """MTP over the prompt (positions `0..S-1`, lengths = `cache.lengths`) -> (MTP logits at each row's last prompt
    position `[B, V]`, cache with the MTP window written)."""
    model = state.model()
    lengths = cache.lengths
    zero = jnp.zeros_like(lengths)
    X, lc, _ = _mtp(model, hidden_bsnd, mtp_tokens_bs, zero, lengths, cache.mtp[0], opts, True, False)
    logits = model.head_logits(_last(X, lengths), model.mtp[0])[:, 0]
    return logits, dataclasses.replace(cache, mtp=[lc, *cache.mtp[1:]], mtp_lengths=lengths)


def _mtp_extend(state: ModelState, cache: Cache, hidden_bknd, tokens_bk, n_new_b, opts: Opts):
    """MTP at positions `cache.mtp_lengths + i` with the main streams of those positions and the tokens after them
    -> (MTP logits `[B, k, V]`, cache)."""
    model = state.model()
    start = cache.mtp_lengths
    X, lc, _ = _mtp(model, hidden_bknd, tokens_bk, start, n_new_b, cache.mtp[0], opts, False, False)
    logits = model.head_logits(X, model.mtp[0])
    return logits, dataclasses.replace(cache, mtp=[lc, *cache.mtp[1:]], mtp_lengths=start + n_new_b)


def _mtp_decode(state: ModelState, cache: Cache, hidden_bnd, tokens_b, opts: Opts, active_b=None):
    n_new = jnp.ones_like(cache.mtp_lengths) if active_b is None else active_b.astype(jnp.int32)
    logits, cache = _mtp_extend(state, cache, hidden_bnd[:, None], tokens_b[:, None], n_new, opts)
    return logits[:, 0], cache


_forward_jit = jax.jit(_forward, static_argnames=("opts", "capture"))
_prefill_jit = jax.jit(_prefill, static_argnames=("opts",), donate_argnames=("cache",))
_extend_jit = jax.jit(_extend, static_argnames=("opts", "capture"), donate_argnames=("cache",))
_decode_jit = jax.jit(_decode, static_argnames=("opts", "capture"), donate_argnames=("cache",))
_mtp_prefill_jit = jax.jit(_mtp_prefill, static_argnames=("opts",), donate_argnames=("cache",))
_mtp_extend_jit = jax.jit(_mtp_extend, static_argnames=("opts",), donate_argnames=("cache",))
_mtp_decode_jit = jax.jit(_mtp_decode, static_argnames=("opts",), donate_argnames=("cache",))


# ---- public API -------------------------------------------------------------------------------------------------


def check_prompts(cfg, tokens, lengths, max_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validates right-padded prompts on the host -> (`tokens [B, S]` int32, `lengths [B]` int32): the one
    validation every entry point shares (`dsv4_jax.inputs.check_tokens`)."""
    return check_tokens(cfg, tokens, lengths, max_len=max_len)


def forward_outputs(state: ModelState, tokens, *, mtp_tokens=None, capture: bool = False,
                    opts: Opts = _DEFAULT) -> Output:  # fmt: skip
    """Full-sequence forward from position 0 with everything: logits, MTP logits (if `mtp_tokens` — the token at
    p+1 for each position p — is given), the final residual streams and, with `capture`, a `Capture` per layer."""
    tokens = _checked(state.config, tokens, "tokens")
    if mtp_tokens is not None:
        mtp_tokens = _checked(state.config, mtp_tokens, "mtp_tokens")
        if mtp_tokens.shape != tokens.shape:
            raise ValueError(f"mtp_tokens shape {mtp_tokens.shape} differs from tokens shape {tokens.shape}")
    return _forward_jit(state, tokens, mtp_tokens, opts, capture)


def _checked(cfg, tokens, name: str):
    """`tokens` validated (before any int32 cast, which would truncate float ids) as a device int32 array."""
    if isinstance(tokens, jax.core.Tracer):
        check_tokens(cfg, tokens, name=name)
        return tokens
    out, _ = check_tokens(cfg, tokens, name=name)
    return jnp.asarray(out)


def forward(state: ModelState, tokens, *, opts: Opts = _DEFAULT) -> jax.Array:
    """Logits `[B, S, V]` fp32 for `tokens [B, S]` (positions 0..S-1), jitted."""
    return forward_outputs(state, tokens, opts=opts).logits


def prefill(state: ModelState, cache: Cache, tokens, lengths=None, *, opts: Opts = _DEFAULT):
    """Prefill right-padded prompts `tokens [B, S]` of `lengths [B]` tokens (default: all S) from position 0.

    Returns `(logits [B, V], hidden [B, S, n, d], cache)`: the logits at each row's last prompt token, the residual
    streams before hc_head (the MTP input) and the cache (the one passed in is donated). A prompt wider than
    `opts.prefill_chunk` is prefilled in chunks; `hidden` is then None (`generate` runs MTP chunk by chunk)."""
    tokens, lengths = check_prompts(state.config, tokens, lengths, cache.max_len)
    if tokens.shape[1] > cache.max_len:
        raise ValueError(f"padded prompt width {tokens.shape[1]} exceeds max_len={cache.max_len}")
    return _prefill_jit(state, cache, jnp.asarray(tokens), jnp.asarray(lengths), opts)


def decode_step(state: ModelState, cache: Cache, tokens, *, opts: Opts = _DEFAULT, active=None,
                capture: bool = False):  # fmt: skip
    """One token per row (`tokens [B]`) at position `cache.lengths[b]` -> `(logits [B, V], hidden [B, n, d],
    cache)` (+ `{"layer{L}": Capture}` with `capture`). The caller keeps `cache.lengths < cache.max_len` (the cache
    has no room past it). `active [B]` False: the row is skipped (nothing written, its length unchanged)."""
    active = None if active is None else jnp.asarray(active, bool)
    return _decode_jit(state, cache, jnp.asarray(tokens, jnp.int32), opts, active, capture)


def extend(state: ModelState, cache: Cache, tokens, n_new=None, *, opts: Opts = _DEFAULT, capture: bool = False):
    """`k` tokens per row (`tokens [B, k]`) at positions `cache.lengths[b] + i`; the first `n_new[b]` (default k)
    of each row are real, the rest padding (not written) -> `(logits [B, k, V], hidden [B, k, n, d], cache)`.
    Equals k decode steps (and `forward` over the whole sequence) within the reference's reduction-order noise.
    The caller keeps `cache.lengths + n_new <= cache.max_len`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, k], got shape {tokens.shape}")
    n_new = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32) if n_new is None else jnp.asarray(n_new)
    return _extend_jit(state, cache, tokens, n_new.astype(jnp.int32), opts, capture)


def mtp_prefill(state: ModelState, cache: Cache, hidden, mtp_tokens, *, opts: Opts = _DEFAULT):
    """MTP over the prefilled prompt: `hidden [B, S, n, d]` from `prefill`, `mtp_tokens [B, S]` the token at p+1
    for each position p (for the last prompt position: the first generated token) -> `(mtp_logits [B, V], cache)`."""
    return _mtp_prefill_jit(state, cache, hidden, jnp.asarray(mtp_tokens, jnp.int32), opts)


def mtp_decode_step(state: ModelState, cache: Cache, hidden, tokens, *, opts: Opts = _DEFAULT, active=None):
    """MTP at position `cache.mtp_lengths`: `hidden [B, n, d]` (the main stream of that position, from
    `decode_step`) and `tokens [B]` (the token after it) -> `(mtp_logits [B, V], cache)`."""
    active = None if active is None else jnp.asarray(active, bool)
    return _mtp_decode_jit(state, cache, hidden, jnp.asarray(tokens, jnp.int32), opts, active)


def mtp_extend(state: ModelState, cache: Cache, hidden, tokens, n_new=None, *, opts: Opts = _DEFAULT):
    """MTP at positions `cache.mtp_lengths + i`: `hidden [B, k, n, d]`, `tokens [B, k]` -> `(mtp_logits [B, k,
    V], cache)`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    n_new = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32) if n_new is None else jnp.asarray(n_new)
    return _mtp_extend_jit(state, cache, hidden, tokens, n_new.astype(jnp.int32), opts)
