"""The decode cache of DeepSeek-V4: an explicit pytree, donated through every prefill / decode step (spec §7).

Per layer (`LayerCache`), per batch row:

* `window` `[B, W, D]` bf16: the sliding-window ring (W = 128 slots); token p lives in slot `p % W`. Values are the
  KV rows exactly as attention uses them (nope dims FP8-simulated when `quant_sim`, RoPE dims bf16).
* ratio > 0 (CSA 4 / HCA 128): the compressor's block state `comp_kv` / `comp_score` `[B, coff*ratio, coff*D]` fp32
  (the score already includes `ape`; CSA rows 0..3 = the previous complete block, rows 4..7 = the current one; HCA
  rows 0..127 = the current block), and the compressed entries `entries` `[B, max_len // ratio, D]` bf16.
* ratio 4: the same for the indexer's compressor (`idx_kv` / `idx_score` `[B, 8, 256]` fp32) and the indexer keys
  `idx_keys` `[B, max_len // 4, 128]` bf16 (after Hadamard + FP4 simulation).

`Cache.mtp` holds the MTP layer's window (sliding-only). `lengths [B]` counts the tokens each row has in the main
cache, i.e. the position of its next token; `mtp_lengths` the same for the MTP layer. A cache is per sequence: prefill
rewrites every field of every row (the official code never resets its compressor state; we do).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dsv4_jax.config import Config

__all__ = ["LayerCache", "Cache", "init_cache", "layer_cache_from_prefill", "cache_bytes", "cache_bytes_per_token"]

BF16, F32 = jnp.bfloat16, jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One attention layer's cache (fields that a layer's ratio does not use are None)."""

    window: jax.Array
    comp_kv: jax.Array | None = None
    comp_score: jax.Array | None = None
    entries: jax.Array | None = None
    idx_kv: jax.Array | None = None
    idx_score: jax.Array | None = None
    idx_keys: jax.Array | None = None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["layers", "mtp", "lengths", "mtp_lengths"],
                   meta_fields=["max_len"])  # fmt: skip
@dataclasses.dataclass
class Cache:
    """All layers' caches, the MTP layers' windows and per-row lengths; `max_len` (static) is the capacity."""

    layers: list[LayerCache]
    mtp: list[LayerCache]
    lengths: jax.Array
    mtp_lengths: jax.Array
    max_len: int

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def _check_capacity(cfg: Config, max_len: int) -> None:
    if max_len <= 0:
        raise ValueError(f"max_len={max_len} must be positive")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")


def _capacity(max_len: int, ratio: int) -> int:
    """Compressed entries a row can hold (at least one slot, so that decode indexing stays in bounds)."""
    return max(max_len // ratio, 1)


def _layer_cache(cfg: Config, ratio: int, batch: int, max_len: int, zeros=jnp.zeros) -> LayerCache:
    d, w = cfg.head_dim, cfg.window_size
    lc = LayerCache(window=zeros((batch, w, d), BF16))
    if ratio:
        coff = 2 if ratio == 4 else 1
        lc.comp_kv = zeros((batch, coff * ratio, coff * d), F32)
        lc.comp_score = zeros((batch, coff * ratio, coff * d), F32)
        lc.entries = zeros((batch, _capacity(max_len, ratio), d), BF16)
    if ratio == 4:
        di = cfg.index_head_dim
        lc.idx_kv = zeros((batch, 8, 2 * di), F32)
        lc.idx_score = zeros((batch, 8, 2 * di), F32)
        lc.idx_keys = zeros((batch, _capacity(max_len, 4), di), BF16)
    return lc


def init_cache(cfg: Config, batch: int, max_len: int) -> Cache:
    """An empty cache for `batch` rows of up to `max_len` tokens each (prompt + generated)."""
    _check_capacity(cfg, max_len)
    n = cfg.n_layers
    return Cache(
        layers=[_layer_cache(cfg, cfg.compress_ratios[i], batch, max_len) for i in range(n)],
        mtp=[_layer_cache(cfg, cfg.compress_ratios[n + i], batch, max_len) for i in range(cfg.n_mtp_layers)],
        lengths=jnp.zeros((batch,), jnp.int32),
        mtp_lengths=jnp.zeros((batch,), jnp.int32),
        max_len=max_len,
    )


# ---- writing a prefill's pieces ---------------------------------------------------------------------------------


def _gather_rows(x_bsc, pos_bk):
    return jnp.take_along_axis(x_bsc, jnp.clip(pos_bk, 0, x_bsc.shape[1] - 1)[..., None], axis=1)


def _ring(kv_bsd, lengths_b, w: int):
    """Ring slot j <- the latest position p < length with p % w == j (zeros where none)."""
    j = jnp.arange(w)[None, :]
    last = lengths_b[:, None] - 1
    p = j + w * jnp.floor_divide(last - j, w)
    return jnp.where((last >= j)[..., None], _gather_rows(kv_bsd, p), 0).astype(kv_bsd.dtype)


def _block_state(kv_bsc, sc_bsc, lengths_b, ratio: int):
    """The compressor state after `length` tokens: CSA rows 0..3 = the last complete block, rows 4.. (HCA: 0..) =
    the tokens of the incomplete block; unused rows get kv 0 and score -inf."""
    nb, r = (lengths_b // ratio)[:, None], (lengths_b % ratio)[:, None]
    i = jnp.arange(ratio)[None, :]
    pos, valid = nb * ratio + i, i < r
    if ratio == 4:
        pos = jnp.concatenate([(nb - 1) * ratio + i, pos], axis=1)
        valid = jnp.concatenate([jnp.broadcast_to(nb >= 1, (nb.shape[0], ratio)), valid], axis=1)
    kv = jnp.where(valid[..., None], _gather_rows(kv_bsc, pos), 0.0)
    sc = jnp.where(valid[..., None], _gather_rows(sc_bsc, pos), -jnp.inf)
    return kv, sc


def _entries(e_bjd, lengths_b, ratio: int, capacity: int):
    nb = e_bjd.shape[1]
    keep = jnp.arange(nb)[None, :] < (lengths_b // ratio)[:, None]
    e = jnp.where(keep[..., None], e_bjd, 0).astype(e_bjd.dtype)
    return jnp.zeros((e.shape[0], capacity, e.shape[2]), e.dtype).at[:, :nb].set(e)


def layer_cache_from_prefill(pieces: dict, lengths_b: jax.Array, ratio: int, window: int, max_len: int) -> LayerCache:
    """A layer's cache after prefilling each row's first `lengths[b]` tokens, from `Attention.prefill(...,
    with_cache=True)` pieces; everything at or after a row's length (padding) is left out."""
    lc = LayerCache(window=_ring(pieces["window"], lengths_b, window))
    if ratio:
        lc.comp_kv, lc.comp_score = _block_state(pieces["comp_kv"], pieces["comp_score"], lengths_b, ratio)
        lc.entries = _entries(pieces["entries"], lengths_b, ratio, _capacity(max_len, ratio))
    if ratio == 4:
        lc.idx_kv, lc.idx_score = _block_state(pieces["idx_kv"], pieces["idx_score"], lengths_b, 4)
        lc.idx_keys = _entries(pieces["idx_keys"], lengths_b, 4, _capacity(max_len, 4))
    return lc


# ---- sizes ------------------------------------------------------------------------------------------------------


def cache_bytes(cfg: Config, batch: int, max_len: int) -> int:
    """Bytes of a `Cache` for `batch` rows of capacity `max_len` (this implementation's layout)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def cache_bytes_per_token(cfg: Config) -> dict[str, float]:
    """Cache bytes per token of context, per sequence.

    Returns a dict: `per_token` (the growth per token: compressed entries and indexer keys, as stored here: bf16),
    `per_token_fp8` (the same in the official/vLLM packed layout: 584 B per FP8 KV entry, 68 B per MXFP4 indexer
    key), and `fixed` (bytes independent of length: window rings of every layer incl. MTP, and compressor states).
    """
    d, w, di = cfg.head_dim, cfg.window_size, cfg.index_head_dim
    per_tok = per_tok_fp8 = 0.0
    fixed = 0
    for ratio in cfg.compress_ratios:  # main layers and MTP
        fixed += w * d * 2
        if ratio:
            coff = 2 if ratio == 4 else 1
            fixed += 2 * coff * ratio * coff * d * 4
            per_tok += d * 2 / ratio
            per_tok_fp8 += 584 / ratio
        if ratio == 4:
            fixed += 2 * 8 * 2 * di * 4
            per_tok += di * 2 / 4
            per_tok_fp8 += 68 / 4
    return {"per_token": per_tok, "per_token_fp8": per_tok_fp8, "fixed": float(fixed)}
