"""The decode cache of DeepSeek-V4: an explicit pytree, donated through every step (spec §7).

Per layer (`LayerCache`), per batch row, in one of two layouts (`init_cache(..., kv=)`): "fp8" (the default, the
official serving layout of `dsv4_jax.kv_format`: a KV row is 584 packed bytes, an indexer key 68) or "bf16" (rows as
bf16 values: what the exact-arithmetic model, `Opts(quant_sim=False)`, needs, since FP8 cannot hold its values).

* `window` `[B, W, D]` bf16 or `[B, W, 584]` uint8: the sliding-window ring (W = 128 slots); token p lives in slot
  `p % W`. Values are the KV rows exactly as attention uses them (nope dims FP8-simulated when `quant_sim`, RoPE dims
  bf16).
* ratio > 0 (CSA 4 / HCA 128): the compressor's block state `comp_kv` / `comp_score` `[B, coff*ratio, coff*D]` fp32
  (the score includes `ape`; CSA rows 0..3 = the previous complete block, rows 4..7 = the current one; HCA rows
  0..127 = the current block; slots of positions not yet seen are masked by position, not by value), and the
  compressed entries `entries` `[B, max_len // ratio, D]` bf16 (or 584-byte rows).
* ratio 4: the same for the indexer's compressor (`idx_kv` / `idx_score` `[B, 8, 256]` fp32) and the indexer keys
  `idx_keys` `[B, max_len // 4, 128]` bf16 after Hadamard + FP4 simulation (or 68-byte packed MXFP4 rows).

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

from dsv4_jax import kv_format
from dsv4_jax.config import Config
from dsv4_jax.layer_view import LayerSlice

__all__ = ["LayerCache", "Cache", "init_cache", "fill_synthetic", "cache_bytes", "cache_bytes_per_token"]

BF16, F32 = jnp.bfloat16, jnp.float32
_FIELDS = ("window", "comp_kv", "comp_score", "entries", "idx_kv", "idx_score", "idx_keys")
KV_LAYOUTS = ("fp8", "bf16")


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

    @property
    def packed(self) -> bool:
        """Whether the rows are in the packed FP8 layout (`dsv4_jax.kv_format`)."""
        return self.window.dtype == jnp.uint8

    def unpacked(self, rope_dim: int) -> LayerCache:
        """The same cache with packed rows decoded to bf16 (window, entries, indexer keys; for inspection)."""
        if not self.packed:
            return self

        def kv(x):
            return None if x is None else kv_format.unpack_kv(x, rope_dim)

        keys = None if self.idx_keys is None else kv_format.unpack_index_keys(self.idx_keys)
        return dataclasses.replace(self, window=kv(self.window), entries=kv(self.entries), idx_keys=keys)

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

    def layer(self, layer: int, unpack: bool = True) -> LayerCache:
        """Main layer `layer`'s cache (a copy sliced out of its stack; for inspection), packed rows decoded to bf16
        unless `unpack` is False."""
        from dsv4_jax.model import layer_slot

        g, u, r = layer_slot(self.config, layer)
        lc = self.groups[g][u].slice(r)
        return lc.unpacked(self.config.rope_head_dim) if unpack else lc

    @property
    def layers(self) -> list[LayerCache]:
        """Every main layer's cache, in layer order (copies, rows as bf16; for inspection)."""
        return [self.layer(i) for i in range(self.config.n_layers)]


def _check_capacity(cfg: Config, max_len: int) -> None:
    if max_len <= 0:
        raise ValueError(f"max_len={max_len} must be positive")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")


def _capacity(max_len: int, ratio: int) -> int:
    """Compressed entries a row can hold (at least one slot, so that indexing stays in bounds)."""
    return max(max_len // ratio, 1)


def _row_shapes(cfg: Config, kv: str) -> tuple[tuple[int, jnp.dtype], tuple[int, jnp.dtype]]:
    """((last dim, dtype) of a KV row, (last dim, dtype) of an indexer key) in layout `kv`."""
    if kv not in KV_LAYOUTS:
        raise ValueError(f"kv={kv!r}; expected one of {', '.join(map(repr, KV_LAYOUTS))}")
    if kv == "bf16":
        return (cfg.head_dim, BF16), (cfg.index_head_dim, BF16)
    return ((kv_format.kv_row_bytes(cfg.head_dim, cfg.rope_head_dim), jnp.uint8),
            (kv_format.index_key_bytes(cfg.index_head_dim), jnp.uint8))  # fmt: skip


def _layer_cache(cfg: Config, ratio: int, batch: int, max_len: int, kv: str, lead: tuple = ()) -> LayerCache:
    d, w = cfg.head_dim, cfg.window_size
    (row, row_dtype), (key, key_dtype) = _row_shapes(cfg, kv)

    def z(*shape, dtype):
        return jnp.zeros((*lead, *shape), dtype)

    lc = LayerCache(window=z(batch, w, row, dtype=row_dtype))
    if ratio:
        coff = 2 if ratio == 4 else 1
        lc.comp_kv = z(batch, coff * ratio, coff * d, dtype=F32)
        lc.comp_score = z(batch, coff * ratio, coff * d, dtype=F32)
        lc.entries = z(batch, _capacity(max_len, ratio), row, dtype=row_dtype)
    if ratio == 4:
        di = cfg.index_head_dim
        lc.idx_kv = z(batch, 8, 2 * di, dtype=F32)
        lc.idx_score = z(batch, 8, 2 * di, dtype=F32)
        lc.idx_keys = z(batch, _capacity(max_len, 4), key, dtype=key_dtype)
    return lc


def init_cache(cfg: Config, batch: int, max_len: int, kv: str = "fp8") -> Cache:
    """An empty cache for `batch` rows of up to `max_len` tokens each (prompt + generated), KV rows in layout `kv`:
    "fp8" (packed, `dsv4_jax.kv_format`; needs `Opts.quant_sim`) or "bf16" (`Opts.kv_cache` picks it for
    `generate`)."""
    from dsv4_jax.model import layer_groups

    _check_capacity(cfg, max_len)
    groups = [tuple(_layer_cache(cfg, k.ratio, batch, max_len, kv, (g.repeats,)) for k in g.unit)
              for g in layer_groups(cfg)]  # fmt: skip
    n = cfg.n_layers
    return Cache(
        groups=groups,
        mtp=[_layer_cache(cfg, cfg.compress_ratios[n + i], batch, max_len, kv) for i in range(cfg.n_mtp_layers)],
        lengths=jnp.zeros((batch,), jnp.int32),
        mtp_lengths=jnp.zeros((batch,), jnp.int32),
        max_len=max_len,
        config=cfg,
    )


def fill_synthetic(cache: Cache, context: int, seed: int = 0) -> Cache:
    """`cache` as if every row had seen `context` tokens, for timing decode at long context without a prefill of that
    length: window rings, compressed entries and indexer keys hold random values in the cache's layout (packed rows
    are valid FP8 / MXFP4 rows of normal draws), block states random, `lengths` (and `mtp_lengths`) = `context`. The
    values are not a model's: logits are meaningless, the work per step is the real one. Generated one stacked layer
    at a time (peak memory: one layer's entries as f32)."""
    if not 0 < context < cache.max_len:
        raise ValueError(f"context={context} must be in [1, max_len={cache.max_len})")
    cfg = cache.config
    d, rope, di, w = cfg.head_dim, cfg.rope_head_dim, cfg.index_head_dim, cfg.window_size
    root = jax.random.key(seed)

    def rows(key, field, width, n_valid, pack):
        """Rows like `field` `[B, n, bytes or width]`: random for the first `n_valid`, zeros after (empty slots)."""
        x = jax.random.normal(key, (*field.shape[:-1], width), F32)
        x = pack(x) if field.dtype == jnp.uint8 else x.astype(field.dtype)
        return jnp.where((jnp.arange(field.shape[-2]) < n_valid)[:, None], x, jnp.zeros_like(x))

    def layer(key, lc: LayerCache) -> LayerCache:
        ks = jax.random.split(key, 7)
        out = dataclasses.replace(lc, window=rows(ks[0], lc.window, d, min(context, w),
                                                  lambda x: kv_format.pack_kv(x, rope)))  # fmt: skip
        if lc.entries is not None:
            ratio = 4 if lc.comp_kv.shape[-2] == 8 else 128
            out.entries = rows(ks[1], lc.entries, d, context // ratio, lambda x: kv_format.pack_kv(x, rope))
            out.comp_kv = jax.random.normal(ks[2], lc.comp_kv.shape, F32)
            out.comp_score = jax.random.normal(ks[3], lc.comp_score.shape, F32)
        if lc.idx_keys is not None:
            out.idx_keys = rows(ks[4], lc.idx_keys, di, context // 4, kv_format.pack_index_keys)
            out.idx_kv = jax.random.normal(ks[5], lc.idx_kv.shape, F32)
            out.idx_score = jax.random.normal(ks[6], lc.idx_score.shape, F32)
        return out

    @functools.partial(jax.jit, donate_argnums=1)
    def stacked(key, lc: LayerCache) -> LayerCache:
        n = lc.window.shape[0]
        return jax.lax.map(lambda a: layer(*a), (jax.random.split(key, n), lc))

    groups = [tuple(stacked(jax.random.fold_in(root, 100 * g + u), lc) for u, lc in enumerate(grp))
              for g, grp in enumerate(cache.groups)]  # fmt: skip
    mtp = [jax.jit(layer, donate_argnums=1)(jax.random.fold_in(root, 10_000 + i), lc) for i, lc in enumerate(cache.mtp)]
    return dataclasses.replace(cache, groups=groups, mtp=mtp, lengths=jnp.full_like(cache.lengths, context),
                               mtp_lengths=jnp.full_like(cache.mtp_lengths, context))  # fmt: skip


# ---- sizes ------------------------------------------------------------------------------------------------------


def cache_bytes(cfg: Config, batch: int, max_len: int, kv: str = "fp8") -> int:
    """Bytes of a `Cache` for `batch` rows of capacity `max_len` in layout `kv`."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, max_len, kv))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def cache_bytes_per_token(cfg: Config, kv: str = "fp8") -> dict[str, float]:
    """Cache bytes per token of context, per sequence, in layout `kv`.

    Returns a dict: `per_token` (the growth per token: compressed entries and indexer keys), `fixed` (bytes
    independent of length: window rings of every layer incl. MTP, and compressor states), and `per_token_fp8` /
    `per_token_bf16` (the growth in either layout: 584 B per packed FP8 KV entry and 68 B per MXFP4 indexer key, the
    official serving layout, or bf16 rows).
    """
    (row, row_dtype), _ = _row_shapes(cfg, kv)
    d, w, di = cfg.head_dim, cfg.window_size, cfg.index_head_dim
    kv_fp8, key_fp8 = kv_format.kv_row_bytes(d, cfg.rope_head_dim), kv_format.index_key_bytes(di)
    per = {"fp8": 0.0, "bf16": 0.0}
    fixed = 0
    for ratio in cfg.compress_ratios:  # main layers and MTP
        fixed += w * row * jnp.dtype(row_dtype).itemsize
        if ratio:
            coff = 2 if ratio == 4 else 1
            fixed += 2 * coff * ratio * coff * d * 4
            per["bf16"] += d * 2 / ratio
            per["fp8"] += kv_fp8 / ratio
        if ratio == 4:
            fixed += 2 * 8 * 2 * di * 4
            per["bf16"] += di * 2 / 4
            per["fp8"] += key_fp8 / 4
    return {"per_token": per[kv], "fixed": float(fixed), "per_token_fp8": per["fp8"], "per_token_bf16": per["bf16"]}
