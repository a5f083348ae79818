"""Attention of DeepSeek-V4: window KV, the compressor (CSA ratio 4 / HCA ratio 128), the lightning indexer, sparse
attention with an attention sink, inverse RoPE and the grouped low-rank output projection (spec §3.2).

One step for every mode: `Attention.step` takes `k` new tokens per row at positions `start[b] .. start[b] + k - 1`
(the first `n_new[b]` of them real, the rest padding) on top of a layer cache (`dsv4_jax.cache.LayerCache`), and
returns the output and what to write back (`LayerUpdate`). Prefill is a step on an empty cache (`fresh`: start 0,
nothing read from the cache), decode a step with k = 1, extend (chunked prefill, speculative verification) any k.

Keys are never concatenated into one buffer: a query's index list points into up to four sources (the window ring,
the new tokens' KV rows, the cached compressed entries and the entries completed in this step), and
`sparse_attention` gathers each listed row from its source. Index lists follow the official layouts: window keys
oldest to newest then -1 (prefill: min(k, 128) columns, decode: 128), then the compressed entries (HCA: every visible
entry in order; CSA: the indexer's top-k in score order).

Shapes: `b` batch, `k` new tokens, `h` heads, `D` head_dim (512), `W` window (128), `m` compression ratio.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax import kv_format, nn, ops, quant
from dsv4_jax.config import Config
from dsv4_jax.kv_format import PackedKV
from dsv4_jax.layer_view import materialize
from dsv4_jax.ops.attention import gather_rows, sparse_attention
from dsv4_jax.ops.compressor import block_ids
from dsv4_jax.ops.indexer import score_keys
from dsv4_jax.options import Opts
from dsv4_jax.rounding import to_bf16

__all__ = ["Attention", "Compressor", "Indexer", "LayerUpdate", "CompressorStep", "sparse_attention", "gather_rows",
           "window_indices", "compressed_indices"]  # fmt: skip

BF16, F32 = jnp.bfloat16, jnp.float32


# ---- index lists -----------------------------------------------------------------------------------------------


def window_indices(s: int, window: int) -> np.ndarray:
    """`[s, min(s, window)]` int32: query t attends to raw rows `max(0, t-window+1) .. t`; -1 marks unused columns
    (the official `get_window_topk_idxs` layout)."""
    w = min(s, window)
    t = np.arange(s)[:, None]
    cols = np.maximum(0, t - window + 1) + np.arange(w)[None, :]
    return np.where(cols > t, -1, cols).astype(np.int32)


def compressed_indices(s: int, ratio: int, offset: int) -> np.ndarray:
    """`[s, s // ratio]` int32: every compressed entry j visible to query t (`j < (t+1)//ratio`), as `j + offset`."""
    j = np.arange(s // ratio)[None, :]
    visible = j < (np.arange(1, s + 1)[:, None] // ratio)
    return np.where(visible, j + offset, -1).astype(np.int32)


def _take_rows(x_bnc, i_bm):
    """`x[b, i[b, m]]` for indices already in range."""
    return jnp.take_along_axis(x_bnc, i_bm[..., None], axis=1)


# ---- compressor ------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressorStep:
    """What one compressor step produced: the entries of the blocks this step touched (`entries [b, nblk, Dc]`;
    block q is entry `j0[b] + q`, complete, i.e. valid, for `q < n_done[b]`) and the block state after it."""

    entries: jax.Array
    j0: jax.Array
    n_done: jax.Array
    kv_state: jax.Array | None
    score_state: jax.Array | None


class Compressor(nnx.Module):
    """Pools every `ratio` tokens into one KV entry with a per-channel softmax over learned scores.

    CSA (ratio 4) overlaps: entry j pools 8 slots, the Ca half of block j-1 and the Cb half of block j.
    Main compressor: `head_dim` 512, FP8 fake-quant of the nope dims. Indexer compressor: 128, Hadamard + FP4.

    Block state (the official layout) `[b, coff*ratio, coff*Dc]` fp32, the score including `ape`: CSA rows 0..3 hold
    the previous complete block, rows 4..7 the current one; HCA rows 0..127 the current block.
    """

    def __init__(self, cfg: Config, ratio: int, head_dim: int, rotate: bool, *, rngs: nnx.Rngs):
        self.ratio, self.head_dim, self.rotate = ratio, head_dim, rotate
        self.coff = 2 if ratio == 4 else 1
        self.rope_dim, self.eps = cfg.rope_head_dim, cfg.norm_eps
        width = self.coff * head_dim
        self.wkv = nn.Bf16Linear(cfg.dim, width, ("kv_proj", "embed"), rngs=rngs)
        self.wgate = nn.Bf16Linear(cfg.dim, width, ("kv_proj", "embed"), rngs=rngs)
        self.ape = nn.param(nn.normal(rngs, (ratio, width), 0.1), (None, "kv_proj"))
        self.norm = nn.RMSNorm(head_dim, cfg.norm_eps, None)

    def project(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """fp32 projections `(kv, score)` `[b, t, coff*Dc]` of each token (score without `ape`): the official fp32
        linear of the bf16 input."""
        return self.wkv(x_btd, fp32=True), self.wgate(x_btd, fp32=True)

    def step(self, x_bkd, start_b, n_new_b, kv_state, score_state, inv_freq, opts: Opts, fresh: bool):
        """`k` new tokens per row at positions `start..start+k-1` (the first `n_new` real) on top of the block
        state (ignored if `fresh`: the sequence starts here; may be `LayerSlice`s) -> `CompressorStep`
        (`ops.compress_step`; a decode step, k = 1, through `ops.compressor_decode` and its kernel)."""
        kv_new, sc_new = self.project(x_bkd)
        kw = dict(ratio=self.ratio, rotate=self.rotate, eps=self.eps)
        params = (self.ape.get_value(), self.norm.weight.get_value())
        if x_bkd.shape[1] == 1 and not fresh and kv_state is not None:
            e, kv_s, sc_s = ops.compressor_decode(kv_new[:, 0], sc_new[:, 0], kv_state, score_state, *params, start_b,
                                                  n_new_b, inv_freq, opts=opts, **kw)  # fmt: skip
            return CompressorStep(e, *block_ids(start_b, n_new_b, self.ratio, 1), kv_s, sc_s)
        return CompressorStep(*ops.compress_step(kv_new, sc_new, kv_state, score_state, *params, start_b, n_new_b,
                                                 inv_freq, quant_sim=opts.quant_sim, fresh=fresh, **kw))  # fmt: skip

    def __call__(self, x_btd: jax.Array, inv_freq: np.ndarray, opts: Opts) -> jax.Array:
        """All complete blocks of a sequence starting at position 0 -> entries `[b, t // ratio, Dc]` bf16."""
        b, t, _ = x_btd.shape
        zero = jnp.zeros((b,), jnp.int32)
        out = self.step(x_btd, zero, zero + t, None, None, inv_freq, opts, fresh=True)
        return out.entries[:, : t // self.ratio]


# ---- indexer ---------------------------------------------------------------------------------------------------


class Indexer(nnx.Module):
    """The lightning indexer of CSA layers: scores compressed entries per query and keeps the top `index_topk`."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = nn.Fp8Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, ("index_heads", "q_lora"), rngs=rngs)
        self.weights_proj = nn.Bf16Linear(cfg.dim, self.n_heads, ("index_heads_w", "embed"), rngs=rngs)
        self.compressor = Compressor(cfg, 4, self.head_dim, rotate=True, rngs=rngs)

    def queries(self, x_btd, qp_bte, pos_bt, inv_freq, opts: Opts):
        """(`q [b,t,h,128]` after RoPE, Hadamard, FP4; head weights `w [b,t,h]` bf16) from `qp = wq_b(qr)` (the
        attention computes it with its own `wq_b(qr)`, one launch for both)."""
        b, t, _ = qp_bte.shape
        q = qp_bte.reshape(b, t, self.n_heads, self.head_dim)
        q = nn.rope_tail(q, pos_bt[:, :, None], inv_freq)
        q = nn.hadamard_128(q)
        if opts.quant_sim:
            q = quant.fp4_sim(q, 32)
        c = np.float32(self.head_dim**-0.5 * self.n_heads**-0.5)
        w = to_bf16(self.weights_proj(x_btd).astype(F32) * c)
        return q, w

    @staticmethod
    def scores(q_bthc, w_bth, keys_bnc) -> jax.Array:
        """`sum_h w[h] * relu(q[h] . K)` with the reference's bf16 rounding points -> `[b, t, n]` (bf16 values, f32);
        the arithmetic is `ops.indexer.score_keys`, the reference of the `indexer_scores` op."""
        return score_keys(q_bthc, w_bth, keys_bnc)

    def select(self, scores_btn, n_visible_bt, opts: Opts) -> jax.Array:
        """Top-`min(index_topk, n)` of the first `n_visible [b, t]` entries per query (`ops.indexer_topk`): `idx
        [b, t, k]`, -1 for picks that are not visible."""
        k = min(self.topk, scores_btn.shape[-1])
        if k == 0:  # no compressed entry yet (a prompt shorter than the ratio)
            return jnp.zeros((*scores_btn.shape[:-1], 0), jnp.int32)
        return ops.indexer_topk(scores_btn, n_visible_bt, k=k, opts=opts)


# ---- attention -------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerUpdate:
    """What a step writes back to its layer cache: the new window ring and block states (whole: they are small) and
    the compressed entries / indexer keys of the blocks it touched (`CompressorStep`; only complete ones are
    written). Fields a layer's ratio does not use are None."""

    window: jax.Array
    comp: CompressorStep | None = None
    idx: CompressorStep | None = None


def _ring(ring_old, kv_new, start_b, n_new_b, w: int):
    """The window ring after the step: slot s holds the latest position p < start + n_new with p % w == s (from the
    step's rows where p >= start, else the old ring; zeros where no such position exists)."""
    k = kv_new.shape[1]
    s = jnp.arange(w)[None, :]
    end = (start_b + n_new_b)[:, None]
    p = s + w * jnp.floor_divide(end - 1 - s, w)
    new = _take_rows(kv_new, jnp.clip(p - start_b[:, None], 0, k - 1))
    old = jnp.zeros_like(new) if ring_old is None else ring_old
    keep_old = jnp.where((p >= 0)[..., None], old, jnp.zeros_like(old))
    return jnp.where((p >= start_b[:, None])[..., None], new, keep_old).astype(kv_new.dtype)


def _is_packed(lc) -> bool:
    """Whether a layer cache (if any) stores the packed FP8 KV layout (`LayerCache.packed`)."""
    return lc is not None and lc.packed


class Attention(nnx.Module):
    def __init__(self, cfg: Config, ratio: int, *, rngs: nnx.Rngs):
        self.cfg, self.ratio = cfg, ratio
        h, d, g, r = cfg.n_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
        out_std = (2 * cfg.n_blocks) ** -0.5 * (g * r) ** -0.5
        self.attn_sink = nn.param(jnp.zeros((h,), F32), ("heads",))
        self.wq_a = nn.Fp8Linear(cfg.dim, cfg.q_lora_rank, ("q_lora", "embed"), rngs=rngs)
        self.q_norm = nn.RMSNorm(cfg.q_lora_rank, cfg.norm_eps, "q_lora")
        self.wq_b = nn.Fp8Linear(cfg.q_lora_rank, h * d, ("q_heads", "q_lora"), rngs=rngs)
        self.wkv = nn.Fp8Linear(cfg.dim, d, ("kv_dim", "embed"), rngs=rngs)
        self.kv_norm = nn.RMSNorm(d, cfg.norm_eps, "kv_dim")
        self.wo_a = nn.Fp8Linear(h // g * d, g * r, ("o_groups", "o_in"), rngs=rngs)
        self.wo_b = nn.Fp8Linear(g * r, cfg.dim, ("embed", "o_groups"), rngs=rngs, std=out_std)
        if self.ratio:
            self.compressor = Compressor(cfg, self.ratio, d, rotate=False, rngs=rngs)
        if self.ratio == 4:
            self.indexer = Indexer(cfg, rngs=rngs)

    @property
    def inv_freq(self) -> np.ndarray:
        return nn.layer_inv_freq(self.cfg, self.ratio)

    # -- pieces --
    def query(self, qa_btr, pos_bt, opts: Opts):
        """From `qa = wq_a(x)`: (`q [b,t,H,D]` normed and rotated; the indexer's query projection `wq_b(qr)` of
        `qr = q_norm(qa)` `[b,t,h*c]` in CSA layers, else None). The two projections of qr share one op (a launch)."""
        b, t, _ = qa_btr.shape
        qr = self.q_norm(qa_btr)
        if self.ratio == 4:
            q, qp = nn.fp8_linear_pair(qr, self.wq_b, self.indexer.wq_b, opts)
        else:
            q, qp = self.wq_b(qr, opts), None
        q = q.reshape(b, t, self.cfg.n_heads, self.cfg.head_dim)
        return ops.q_heads(q, pos_bt, self.inv_freq, eps=self.cfg.norm_eps, opts=opts), qp

    def window_kv(self, kva_btd, pos_bt, opts: Opts, packed: bool = False):
        """From `kva = wkv(x)`: (the token's own KV vector `[b,t,D]`: RMSNorm, RoPE on the tail, FP8 fake-quant of the
        nope dims; with `packed`, the same rows in the packed cache layout `[b,t,584]`, else None): `ops.kv_row`."""
        row_bytes = kv_format.kv_row_bytes(self.cfg.head_dim, self.cfg.rope_head_dim) if packed else 0
        return ops.kv_row(kva_btd, self.kv_norm.weight.get_value(), pos_bt, self.inv_freq, eps=self.kv_norm.eps,
                          row_bytes=row_bytes, opts=opts)  # fmt: skip

    def output(self, o_bthd, pos_bt, opts: Opts):
        """Inverse RoPE, grouped low-rank `wo_a` (bf16 dequantized, as the reference converts it), then `wo_b`."""
        b, t, h, d = o_bthd.shape
        g, r = self.cfg.o_groups, self.cfg.o_lora_rank
        o = nn.rope_tail(o_bthd, pos_bt[:, :, None], self.inv_freq, inverse=True)
        u = ops.grouped_dequant_linear(o.reshape(b, t, g, -1), self.wo_a.weight.get_value(),
                                       self.wo_a.scale.get_value(), opts=opts)  # fmt: skip
        return self.wo_b(u.reshape(b, t, g * r), opts)

    def __call__(self, x_btd: jax.Array, opts: Opts, rec=None) -> jax.Array:
        """Full-sequence attention from position 0 (no cache). `x` is the attn_norm output `[b, s, dim]` bf16."""
        b, s, _ = x_btd.shape
        zero = jnp.zeros((b,), jnp.int32)
        return self.step(x_btd, zero, zero + s, None, opts, fresh=True, rec=rec)[0]

    def _compressed(self, comp: CompressorStep, lc, fresh: bool, k: int, w: int, packed_rows=None):
        """(sources of the compressed entries, the number of entry ids, a map from entry ids `j [b, k, n]` to source
        indices). Fresh: this step's complete entries, after the k new KV rows. Otherwise the cached entries, right
        after the ring (the official decode offset, W), with the entries this step completed taken from the step
        (after the new KV rows; given `packed_rows`, this step's entries packed: right after the cached entries, as
        `ops.sparse_decode` reads them)."""
        if fresh:  # positions start at 0: the complete blocks of the k tokens, no partial block
            entries = comp.entries[:, : k // self.ratio]
            return [(entries, k)], entries.shape[1], lambda j: k + j
        cap = lc.entries.shape[1]
        new_at = w + cap + (0 if packed_rows is not None else k)

        def to_source(j):
            q = j - comp.j0[:, None, None]
            new = (q >= 0) & (q < comp.n_done[:, None, None])
            return jnp.where(new, new_at + q, w + j)

        rope = self.cfg.rope_head_dim
        cached = PackedKV(lc.entries, rope) if _is_packed(lc) else lc.entries
        completed = comp.entries if packed_rows is None else PackedKV(packed_rows, rope)
        return [(cached, w), (completed, new_at)], cap, to_source

    def _index_keys(self, x, qp, pos, comp_i: CompressorStep, lc, opts, fresh: bool, n_ent: int, n_visible, rec):
        """The indexer's top-k entry ids `[b, k, topk]` among the first `n_visible [b, k]` entries (-1: none).

        Decode / extend over a packed cache: the cached keys are scored where they lie (`ops.indexer_scores`, which
        reads the packed stack), then the score columns of the entries this step completed (`j0 + q`, q < n_done)
        are replaced by their scores against the step's own keys: the same numbers as overlaying those key rows
        before scoring (the old way, still taken for the bf16 cache), without materialising every key."""
        qi, wi = self.indexer.queries(x, qp, pos, self.inv_freq, opts)
        if fresh:
            raw = self.indexer.scores(qi, wi, comp_i.entries[:, :n_ent])  # the complete blocks
        else:
            b, nb, cap = x.shape[0], comp_i.entries.shape[1], lc.idx_keys.shape[1]
            q = jnp.arange(nb)[None, :]
            j = jnp.where(q < comp_i.n_done[:, None], comp_i.j0[:, None] + q, cap)  # cap: dropped
            if _is_packed(lc):
                raw = ops.indexer_scores(qi, wi, lc.idx_keys, opts=opts)
                new = self.indexer.scores(qi, wi, comp_i.entries.astype(BF16))  # as the overlaid bf16 key rows
                bi, ti = jnp.arange(b)[:, None, None], jnp.arange(qi.shape[1])[None, :, None]
                raw = raw.at[bi, ti, j[:, None, :]].set(new, mode="drop")
            else:
                keys = materialize(lc.idx_keys)
                keys = keys.at[jnp.arange(b)[:, None], j].set(comp_i.entries, mode="drop")
                raw = self.indexer.scores(qi, wi, keys)
        if rec is not None:
            rec.indexer_scores = jnp.where(jnp.arange(raw.shape[-1]) < n_visible[..., None], raw, -jnp.inf)
        return self.indexer.select(raw, n_visible, opts)

    def step(self, x_bkd, start_b, n_new_b, lc, opts: Opts, fresh: bool, rec=None):
        """`k` new tokens per row at positions `start .. start+k-1` (the first `n_new` real) -> `(out [b, k, dim]
        bf16, LayerUpdate)`. `lc` is the layer cache (a `LayerCache`, fields possibly `LayerSlice`s), None or unread
        when `fresh` (positions start at 0 and nothing precedes them)."""
        b, k, _ = x_bkd.shape
        w, rope = self.cfg.window_size, self.cfg.rope_head_dim
        packed = _is_packed(lc)
        if packed and not opts.quant_sim:
            raise ValueError("this cache stores KV rows in the packed FP8 layout, which holds only FP8-simulated "
                             "values; with quant_sim=False use init_cache(..., kv='bf16') (Opts.kv_cache)")  # fmt: skip
        pos = start_b[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
        qa, kva = nn.fp8_linear_pair(x_bkd, self.wq_a, self.wkv, opts)  # one input, one op (a launch)
        q, qp = self.query(qa, pos, opts)
        kv, kv_packed = self.window_kv(kva, pos, opts, packed=packed)

        # Decode over the packed cache (one query per row) reads every key from packed rows, as the kernel of
        # `ops.sparse_decode` does: the window from the ring after this step's own write, the entries this step
        # completed packed after the cached ones.
        direct = packed and not fresh and k == 1
        # Window keys: positions max(0, p - W + 1) .. p, oldest first, then -1.
        n_win = min(k, w) if fresh else w
        u = jnp.maximum(pos - w + 1, 0)[..., None] + jnp.arange(n_win)
        # the ring is rebuilt in the cache's layout: packed, only the step's own rows are packed (k, not W)
        kv_stored = kv_packed if packed else kv
        ring = None if fresh else materialize(lc.window)
        upd = LayerUpdate(window=_ring(ring, kv_stored, start_b, n_new_b, w))
        if fresh:
            sources, row = [(kv, 0)], u
        elif direct:  # sources: the new ring [0, W), cached entries [W, W + cap), new entries
            sources, row = [(PackedKV(upd.window, rope), 0)], u % w
        else:  # sources: ring [0, W), cached entries [W, W + cap), new KV rows, new entries
            new_at = w + (lc.entries.shape[1] if self.ratio else 0)
            sources = [(PackedKV(ring, rope) if packed else ring, 0), (kv, new_at)]
            row = jnp.where(u >= start_b[:, None, None], new_at + u - start_b[:, None, None], u % w)
        idx = jnp.where(u <= pos[..., None], row, -1).astype(jnp.int32)

        if self.ratio:
            m = self.ratio
            state = (None, None) if lc is None else (lc.comp_kv, lc.comp_score)
            with jax.named_scope("compressor"):
                comp = self.compressor.step(x_bkd, start_b, n_new_b, *state, self.inv_freq, opts, fresh)
            # the update in the cache's layout; packed, the same rows are decode's last attention source
            stored = dataclasses.replace(comp, entries=kv_format.pack_kv(comp.entries, rope)) if packed else comp
            upd = dataclasses.replace(upd, comp=stored)
            ent_sources, n_ent, to_source = self._compressed(comp, lc, fresh, k, w, stored.entries if direct else None)
            sources += ent_sources
            n_visible = (pos + 1) // m  # entries complete at each query: the visible prefix
            if m == 4:
                state_i = (None, None) if lc is None else (lc.idx_kv, lc.idx_score)
                with jax.named_scope("indexer"):
                    comp_i = self.indexer.compressor.step(x_bkd, start_b, n_new_b, *state_i, self.inv_freq, opts,
                                                          fresh)  # fmt: skip
                    sel = self._index_keys(x_bkd, qp, pos, comp_i, lc, opts, fresh, n_ent, n_visible, rec)
                keys = kv_format.pack_index_keys(comp_i.entries) if packed else comp_i.entries
                upd = dataclasses.replace(upd, idx=dataclasses.replace(comp_i, entries=keys))
                comp_idx = jnp.where(sel >= 0, to_source(sel), -1)
                if rec is not None:  # the official layouts: entry j is row k + j (prefill) or W + j (decode)
                    rec.indexer_topk = jnp.where(sel >= 0, sel + (k if fresh else w), -1)
            else:
                j = jnp.broadcast_to(jnp.arange(n_ent, dtype=jnp.int32), (*pos.shape, n_ent))
                comp_idx = jnp.where(j < n_visible[..., None], to_source(j), -1)
            idx = jnp.concatenate([idx, comp_idx.astype(jnp.int32)], axis=-1)
        if rec is not None:
            rec.attn_kv = jnp.concatenate([materialize(s) for s, _ in sorted(sources, key=lambda so: so[1])], axis=1)
            rec.attn_topk = idx
        with jax.named_scope("sparse_attention"):
            if direct:
                entries = lc.entries if self.ratio else None
                extra = upd.comp.entries if self.ratio else None  # this step's entries, packed
                o = ops.sparse_decode(q[:, 0], upd.window, entries, extra, idx[:, 0], self.attn_sink[...],
                                      scale=self.cfg.head_dim**-0.5, rope_dim=rope,
                                      opts=opts)[:, None]  # fmt: skip
            elif opts.quant_sim and (fresh or packed):
                # Prefill / extend: the same sources, packed (lossless for FP8-simulated rows), as the three the
                # kernel reads: fresh, the step's rows [0, k) and its entries at k; extend, the ring [0, W), the
                # cached entries at W and the step's rows then its entries at W + cap.
                rows = kv_stored if packed else kv_format.pack_kv(kv, rope)
                new_entries = None
                if self.ratio:
                    new_entries = upd.comp.entries if packed else kv_format.pack_kv(upd.comp.entries, rope)
                if fresh:
                    ring_p, entries_p, extra_p = rows, None, new_entries
                else:
                    extra_p = rows if new_entries is None else jnp.concatenate([rows, new_entries], axis=1)
                    ring_p, entries_p = ring, (lc.entries if self.ratio else None)
                o = ops.sparse_prefill(q, ring_p, entries_p, extra_p, idx, self.attn_sink[...],
                                       scale=self.cfg.head_dim**-0.5, rope_dim=rope, opts=opts)  # fmt: skip
            else:
                o = sparse_attention(q, sources, idx, self.attn_sink[...], self.cfg.head_dim**-0.5)
        return self.output(o, pos, opts), upd
