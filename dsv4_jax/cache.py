"""The decode cache of DeepSeek-V4: an explicit pytree, donated through every step (spec §7).

Per layer (`LayerCache`), per batch row:

* `window` `[B, W, D]` bf16: the sliding-window ring (W = 128 slots); token p lives in slot `p % W`. Values are the
  KV rows exactly as attention uses them (nope dims FP8-simulated when `quant_sim`, RoPE dims bf16).
* ratio > 0 (CSA 4 / HCA 128): the compressor's block state `comp_kv` / `comp_score` `[B, coff*ratio, coff*D]` fp32
  (the score includes `ape`; CSA rows 0..3 = the previous complete block, rows 4..7 = the current one; HCA rows
  0..127 = the current block; slots of positions not yet seen are masked by position, not by value), and the
  compressed entries `entries` `[B, max_len // ratio, D]` bf16.
* ratio 4: the same for the indexer's compressor (`idx_kv` / `idx_score` `[B, 8, 256]` fp32) and the indexer keys
  `idx_keys` `[B, max_len // 4, 128]` bf16 (after Hadamard + FP4 simulation).

Like the parameters, the main layers' caches are stacked by layer group (`Cache.groups[g][u]`, leading axis the
group's repeats; `dsv4_jax.model.layer_groups`), so the layer scan carries them and writes each step in place.
`Cache.mtp` holds the MTP layer's (unstacked). `lengths [B]` counts the tokens each row has in the main cache, i.e. the
position of its next token; `mtp_lengths` the same for the MTP layer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dsv4_jax.config import Config
from dsv4_jax.layer_view import LayerSlice

__all__ = ["LayerCache", "Cache", "init_cache", "cache_bytes", "cache_bytes_per_token"]

BF16, F32 = jnp.bfloat16, jnp.float32
_FIELDS = ("window", "comp_kv", "comp_score", "entries", "idx_kv", "idx_score", "idx_keys")


def _write_entries(stack, i, step):
    """Writes the complete entries of a `CompressorStep` into `stack` (`[R, B, cap, D]` at layer `i`, or `[B, cap,
    D]` when `i` is None); incomplete ones are dropped."""
    nb = step.entries.shape[1]
    cap = stack.shape[-2]
    q = jnp.arange(nb)[None, :]
    j = jnp.where(q < step.n_done[:, None], step.j0[:, None] + q, cap)  # cap: out of bounds, dropped
    rows = jnp.arange(step.entries.shape[0])[:, None]
    vals = step.entries.astype(stack.dtype)
    if i is None:
        return stack.at[rows, j].set(vals, mode="drop")
    return stack.at[i, rows, j].set(vals, mode="drop")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One attention layer's cache (fields that a layer's ratio does not use are None), or a stack of them."""

    window: jax.Array
    comp_kv: jax.Array | None = None
    comp_score: jax.Array | None = None
    entries: jax.Array | None = None
    idx_kv: jax.Array | None = None
    idx_score: jax.Array | None = None
    idx_keys: jax.Array | None = None

    def view(self, i) -> LayerCache:
        """Layer `i` of a stacked cache, as `LayerSlice`s (read without copying the stack)."""
        return LayerCache(*(None if (v := getattr(self, f)) is None else LayerSlice(v, i) for f in _FIELDS))

    def slice(self, r: int) -> LayerCache:
        """Layer `r` of a stacked cache as plain arrays (a copy; for inspection)."""
        return LayerCache(*(None if (v := getattr(self, f)) is None else v[r] for f in _FIELDS))

    def write(self, i, upd) -> LayerCache:
        """The cache after a step's `LayerUpdate` (`dsv4_jax.attention`) at layer `i` of the stack (None: this is
        one unstacked layer). Small fields are replaced whole, entries written row by row."""

        def put(stack, value):
            return value.astype(stack.dtype) if i is None else stack.at[i].set(value.astype(stack.dtype))

        out = dataclasses.replace(self, window=put(self.window, upd.window))
        if upd.comp is not None:
            out.comp_kv = put(self.comp_kv, upd.comp.kv_state)
            out.comp_score = put(self.comp_score, upd.comp.score_state)
            out.entries = _write_entries(self.entries, i, upd.comp)
        if upd.idx is not None:
            out.idx_kv = put(self.idx_kv, upd.idx.kv_state)
            out.idx_score = put(self.idx_score, upd.idx.score_state)
            out.idx_keys = _write_entries(self.idx_keys, i, upd.idx)
        return out


@functools.partial(jax.tree_util.register_dataclass, data_fields=["groups", "mtp", "lengths", "mtp_lengths"],
                   meta_fields=["max_len", "config"])  # fmt: skip
@dataclasses.dataclass
class Cache:
    """All layers' caches (stacked by layer group), the MTP layers' caches and per-row lengths; `max_len` (static)
    is the capacity of a row."""

    groups: list[tuple[LayerCache, ...]]
    mtp: list[LayerCache]
    lengths: jax.Array
    mtp_lengths: jax.Array
    max_len: int
    config: Config

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def layer(self, layer: int) -> LayerCache:
        """Main layer `layer`'s cache (a copy sliced out of its stack; for inspection)."""
        from dsv4_jax.model import layer_slot

        g, u, r = layer_slot(self.config, layer)
        return self.groups[g][u].slice(r)

    @property
    def layers(self) -> list[LayerCache]:
        """Every main layer's cache, in layer order (copies; for inspection)."""
        return [self.layer(i) for i in range(self.config.n_layers)]


def _check_capacity(cfg: Config, max_len: int) -> None:
    if max_len <= 0:
        raise ValueError(f"max_len={max_len} must be positive")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")


def _capacity(max_len: int, ratio: int) -> int:
    """Compressed entries a row can hold (at least one slot, so that indexing stays in bounds)."""
    return max(max_len // ratio, 1)


def _layer_cache(cfg: Config, ratio: int, batch: int, max_len: int, lead: tuple = ()) -> LayerCache:
    d, w = cfg.head_dim, cfg.window_size

    def z(*shape, dtype):
        return jnp.zeros((*lead, *shape), dtype)

    lc = LayerCache(window=z(batch, w, d, dtype=BF16))
    if ratio:
        coff = 2 if ratio == 4 else 1
        lc.comp_kv = z(batch, coff * ratio, coff * d, dtype=F32)
        lc.comp_score = z(batch, coff * ratio, coff * d, dtype=F32)
        lc.entries = z(batch, _capacity(max_len, ratio), d, dtype=BF16)
    if ratio == 4:
        di = cfg.index_head_dim
        lc.idx_kv = z(batch, 8, 2 * di, dtype=F32)
        lc.idx_score = z(batch, 8, 2 * di, dtype=F32)
        lc.idx_keys = z(batch, _capacity(max_len, 4), di, dtype=BF16)
    return lc


def init_cache(cfg: Config, batch: int, max_len: int) -> Cache:
    """An empty cache for `batch` rows of up to `max_len` tokens each (prompt + generated)."""
    from dsv4_jax.model import layer_groups

    _check_capacity(cfg, max_len)
    groups = [tuple(_layer_cache(cfg, k.ratio, batch, max_len, (g.repeats,)) for k in g.unit)
              for g in layer_groups(cfg)]  # fmt: skip
    n = cfg.n_layers
    return Cache(
        groups=groups,
        mtp=[_layer_cache(cfg, cfg.compress_ratios[n + i], batch, max_len) for i in range(cfg.n_mtp_layers)],
        lengths=jnp.zeros((batch,), jnp.int32),
        mtp_lengths=jnp.zeros((batch,), jnp.int32),
        max_len=max_len,
        config=cfg,
    )


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
