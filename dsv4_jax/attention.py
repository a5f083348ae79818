"""Attention of DeepSeek-V4: window KV, the compressor (CSA ratio 4 / HCA ratio 128), the lightning indexer, sparse
attention with an attention sink, inverse RoPE and the grouped low-rank output projection (spec §3.2).

Shapes: `b` batch, `s` query positions, `h` heads, `D` head_dim (512), `n` KV rows, `k` keys per query.
Full-sequence functions assume positions `0..s-1` (prefill from position 0); rows may be right-padded: a query only
sees keys at or before its own position, so padding after a row's end never reaches its valid positions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax import nn, ops, quant
from dsv4_jax.config import Config
from dsv4_jax.rounding import to_bf16

__all__ = ["Attention", "Compressor", "Indexer", "sparse_attention", "window_indices", "compressed_indices"]

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


# ---- sparse attention ------------------------------------------------------------------------------------------


def sparse_attention(q_bshd, kv_bnd, idx_bsk, sink_h, scale: float, chunk: int = 1024) -> jax.Array:
    """Softmax attention of each query over the KV rows listed in `idx` (-1 = none), V = K, sink in the denominator.

    `o = sum_u exp(z_u - M) K_u / (sum_u exp(z_u - M) + exp(sink_h - M))`, `z_u = scale * q.K_u` (fp32), the
    probabilities rounded to bf16 before the PV product (as the kernel does); returns bf16 `[b, s, h, D]`.
    Queries are processed in chunks of `chunk` to bound the gathered `[b, chunk, k, D]` block.
    """
    b, s, h, d = q_bshd.shape
    tile = 64

    def attend(q, idx):
        # The kernel's order: 64-key tiles in index order, online softmax, probabilities rounded to bf16 against the
        # running max before the PV product, fp32 accumulation, the sink added to the denominator at the end.
        c, k = idx.shape[1], idx.shape[2]
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, (-k) % tile)), constant_values=-1)
        nt = idx.shape[-1] // tile
        idx_t = idx.reshape(b, c, nt, tile).transpose(2, 0, 1, 3)  # [nt, b, c, tile]
        qf = q.astype(F32)

        def step(carry, it):
            m_prev, den, acc = carry
            rows = jnp.take_along_axis(kv_bnd[:, None, :, :], jnp.maximum(it, 0)[..., None], axis=2).astype(F32)
            rows = jnp.where((it >= 0)[..., None], rows, 0.0)
            z = jnp.einsum("bchd,bckd->bchk", qf, rows, precision="highest") * F32(scale)
            z = jnp.where((it >= 0)[:, :, None, :], z, -jnp.inf)
            m = jnp.maximum(m_prev, jnp.max(z, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(z - m_safe[..., None])
            den = den * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bchk,bckd->bchd", to_bf16(p).astype(F32), rows, precision="highest")
            return (m, den, acc * alpha[..., None] + pv), None

        init = (jnp.full((b, c, h), -jnp.inf, F32), jnp.zeros((b, c, h), F32), jnp.zeros((b, c, h, d), F32))
        (m, den, acc), _ = jax.lax.scan(step, init, idx_t)
        den = den + jnp.exp(sink_h.astype(F32)[None, None, :] - m)
        return to_bf16(acc / den[..., None])

    if s <= chunk:
        return attend(q_bshd, idx_bsk)
    pad = (-s) % chunk
    qp = jnp.pad(q_bshd, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, chunk, h, d).swapaxes(0, 1)
    ip = jnp.pad(idx_bsk, ((0, 0), (0, pad), (0, 0)), constant_values=-1).reshape(b, -1, chunk, idx_bsk.shape[-1])
    out = jax.lax.map(lambda a: attend(*a), (qp, ip.swapaxes(0, 1)))
    return out.swapaxes(0, 1).reshape(b, s + pad, h, d)[:, :s]


def head_rms_norm_bf16(q: jax.Array, eps: float) -> jax.Array:
    """Weightless per-head RMS norm with the reference's bf16 tensor arithmetic: each of square, mean, +eps, rsqrt and
    the product is rounded to bf16 (the means accumulate in fp32)."""
    qf = q.astype(F32)
    q2 = to_bf16(qf * qf).astype(F32)
    ms = to_bf16(jnp.sum(q2, axis=-1, keepdims=True) / F32(q.shape[-1])).astype(F32)
    r = to_bf16(jax.lax.rsqrt(to_bf16(ms + F32(eps)).astype(F32))).astype(F32)
    return to_bf16(qf * r)


# ---- compressor ------------------------------------------------------------------------------------------------


class Compressor(nnx.Module):
    """Pools every `ratio` tokens into one KV entry with a per-channel softmax over learned scores.

    CSA (ratio 4) overlaps: entry j pools 8 slots, the Ca half of block j-1 and the Cb half of block j.
    Main compressor: `head_dim` 512, FP8 fake-quant of the nope dims. Indexer compressor: 128, Hadamard + FP4.
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
        """fp32 projections `(kv, score)` `[b, t, coff*Dc]` of each token (score without `ape`)."""
        xf = x_btd.astype(F32)
        return self.wkv(xf, fp32=True), self.wgate(xf, fp32=True)

    def pool(self, kv_bjrc: jax.Array, score_bjrc: jax.Array) -> jax.Array:
        """Per-channel softmax pooling over the slot axis (2) -> fp32 `[b, j, Dc]`."""
        return jnp.sum(kv_bjrc * jax.nn.softmax(score_bjrc, axis=2), axis=2)

    def finish(self, e_bjc: jax.Array, pos_bj: jax.Array, inv_freq: np.ndarray, opts: ops.Opts) -> jax.Array:
        """bf16 round, RMSNorm, RoPE at the block's first position, then FP8 (main) or Hadamard + FP4 (indexer)."""
        e = self.norm(to_bf16(e_bjc))
        e = nn.rope_tail(e, pos_bj, inv_freq)
        if self.rotate:
            e = nn.hadamard_128(e)
            return quant.fp4_sim(e, 32) if opts.quant_sim else e
        if opts.quant_sim:
            nope = self.head_dim - self.rope_dim
            e = jnp.concatenate([quant.fp8_sim(e[..., :nope], 64), e[..., nope:]], axis=-1)
        return e

    def tokens(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """fp32 `(kv, score + ape[t % ratio])` `[b, t, coff*Dc]` of tokens at positions `0..t-1`."""
        kv, sc = self.project(x_btd)
        return kv, sc + self.ape[...][jnp.arange(x_btd.shape[1]) % self.ratio][None]

    def blocks(self, kv_btc: jax.Array, score_btc: jax.Array, inv_freq: np.ndarray, opts: ops.Opts) -> jax.Array:
        """Entries `[b, t // ratio, Dc]` bf16 of the complete blocks of per-token projections (score with `ape`)
        of positions `0..t-1`, `t` a multiple of `ratio`."""
        b, t, _ = kv_btc.shape
        m, dc = self.ratio, self.head_dim
        nb = t // m
        kv = kv_btc.reshape(b, nb, m, kv_btc.shape[-1])
        sc = score_btc.reshape(b, nb, m, score_btc.shape[-1])
        if self.coff == 2:
            # Slots 0..3: the previous block through its Ca half (none before block 0); slots 4..7: this block's Cb.
            # ([:, :nb] keeps nb = 0, a sequence shorter than one block, at zero blocks.)
            prev_kv = jnp.pad(kv[:, :-1, :, :dc], ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :nb]
            prev_sc = jnp.pad(sc[:, :-1, :, :dc], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf)[:, :nb]
            kv = jnp.concatenate([prev_kv, kv[..., dc:]], axis=2)
            sc = jnp.concatenate([prev_sc, sc[..., dc:]], axis=2)
        e = self.pool(kv, sc)
        pos = jnp.broadcast_to(jnp.arange(nb) * m, (b, nb))
        return self.finish(e, pos, inv_freq, opts)

    def __call__(self, x_btd: jax.Array, inv_freq: np.ndarray, opts: ops.Opts) -> jax.Array:
        """All complete blocks of a sequence starting at position 0 -> entries `[b, t // ratio, Dc]` bf16."""
        nb = x_btd.shape[1] // self.ratio
        kv, sc = self.tokens(x_btd[:, : nb * self.ratio])
        return self.blocks(kv, sc, inv_freq, opts)

    def decode(self, x_b1d, pos_b, kv_state, score_state, entries, inv_freq: np.ndarray, opts: ops.Opts):
        """One token per row at position `pos_b`: store its projections (score with `ape[pos % ratio]`) in the
        block state and, in the rows whose block it completes (`(pos+1) % ratio == 0`), emit entry `pos // ratio`.

        State layout (the official one): `[b, coff*ratio, coff*Dc]` fp32; CSA rows 0..3 hold the previous complete
        block, rows 4..7 the current one; HCA rows 0..127 the current block. Returns `(kv_state, score_state,
        entries)`."""
        b = x_b1d.shape[0]
        m, dc, rows = self.ratio, self.head_dim, self.coff * self.ratio
        kv, sc = self.project(x_b1d)
        kv, sc = kv[:, 0], sc[:, 0] + self.ape[...][pos_b % m]
        slot = (m if self.coff == 2 else 0) + pos_b % m
        hit = (jnp.arange(rows)[None, :] == slot[:, None])[..., None]
        kv_state = jnp.where(hit, kv[:, None, :], kv_state)
        score_state = jnp.where(hit, sc[:, None, :], score_state)
        if self.coff == 2:
            pool_kv = jnp.concatenate([kv_state[:, :m, :dc], kv_state[:, m:, dc:]], axis=1)
            pool_sc = jnp.concatenate([score_state[:, :m, :dc], score_state[:, m:, dc:]], axis=1)
        else:
            pool_kv, pool_sc = kv_state, score_state
        e = self.pool(pool_kv[:, None], pool_sc[:, None])
        e = self.finish(e, (pos_b + 1 - m)[:, None], inv_freq, opts)[:, 0]
        done = (pos_b + 1) % m == 0
        rows_b, j = jnp.arange(b), pos_b // m
        entries = entries.at[rows_b, j].set(jnp.where(done[:, None], e, entries[rows_b, j]), mode="drop")
        if self.coff == 2:  # the completed block becomes the previous block of the next entry
            shifted = jnp.concatenate([kv_state[:, m:], kv_state[:, m:]], axis=1)
            kv_state = jnp.where(done[:, None, None], shifted, kv_state)
            shifted = jnp.concatenate([score_state[:, m:], score_state[:, m:]], axis=1)
            score_state = jnp.where(done[:, None, None], shifted, score_state)
        return kv_state, score_state, entries


# ---- indexer ---------------------------------------------------------------------------------------------------


class Indexer(nnx.Module):
    """The lightning indexer of CSA layers: scores compressed entries per query and keeps the top `index_topk`."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = nn.Fp8Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, ("index_heads", "q_lora"), rngs=rngs)
        self.weights_proj = nn.Bf16Linear(cfg.dim, self.n_heads, ("index_heads_w", "embed"), rngs=rngs)
        self.compressor = Compressor(cfg, 4, self.head_dim, rotate=True, rngs=rngs)

    def queries(self, x_btd, qr_btr, pos_bt, inv_freq, opts: ops.Opts):
        """(`q [b,t,h,128]` after RoPE, Hadamard, FP4; head weights `w [b,t,h]` bf16)."""
        b, t, _ = qr_btr.shape
        q = self.wq_b(qr_btr, opts).reshape(b, t, self.n_heads, self.head_dim)
        q = nn.rope_tail(q, pos_bt[:, :, None], inv_freq)
        q = nn.hadamard_128(q)
        if opts.quant_sim:
            q = quant.fp4_sim(q, 32)
        c = np.float32(self.head_dim**-0.5 * self.n_heads**-0.5)
        w = to_bf16(self.weights_proj(x_btd).astype(F32) * c)
        return q, w

    @staticmethod
    def scores(q_bthc, w_bth, keys_bnc) -> jax.Array:
        """`sum_h w[h] * relu(q[h] . K)` with the reference's bf16 rounding points -> `[b, t, n]` (bf16 values, f32)."""
        qk = to_bf16(jnp.einsum("bthc,bnc->bthn", q_bthc.astype(F32), keys_bnc.astype(F32), precision="highest"))
        wq = to_bf16(jnp.maximum(qk, 0).astype(F32) * w_bth.astype(F32)[..., None])
        return to_bf16(jnp.sum(wq.astype(F32), axis=2)).astype(F32)

    def select(self, scores_btn, visible_btn) -> tuple[jax.Array, jax.Array]:
        """Top-`min(index_topk, n)` visible entries per query: (`idx [b,t,k]` with -1 for invisible picks, scores)."""
        n = scores_btn.shape[-1]
        k = min(self.topk, n)
        masked = jnp.where(visible_btn, scores_btn, -jnp.inf)
        top_v, top_i = jax.lax.top_k(masked, k)
        chosen_visible = jnp.take_along_axis(visible_btn, top_i, axis=-1)
        return jnp.where(chosen_visible, top_i, -1).astype(jnp.int32), masked


# ---- attention -------------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    def __init__(self, cfg: Config, layer_id: int, *, rngs: nnx.Rngs):
        self.cfg, self.layer_id = cfg, layer_id
        self.ratio = cfg.compress_ratios[layer_id]
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

    # -- pieces shared by prefill and decode --
    def query(self, x_btd, pos_bt, opts: ops.Opts):
        """(`q [b,t,H,D]` normed and rotated, `qr [b,t,q_lora]` which also feeds the indexer)."""
        b, t, _ = x_btd.shape
        qr = self.q_norm(self.wq_a(x_btd, opts))
        q = self.wq_b(qr, opts).reshape(b, t, self.cfg.n_heads, self.cfg.head_dim)
        q = head_rms_norm_bf16(q, self.cfg.norm_eps)
        return nn.rope_tail(q, pos_bt[:, :, None], self.inv_freq), qr

    def window_kv(self, x_btd, pos_bt, opts: ops.Opts):
        """The token's own KV vector `[b,t,D]`: RMSNorm, RoPE on the tail, FP8 fake-quant of the nope dims."""
        kv = nn.rope_tail(self.kv_norm(self.wkv(x_btd, opts)), pos_bt, self.inv_freq)
        if opts.quant_sim:
            nope = self.cfg.nope_head_dim
            kv = jnp.concatenate([quant.fp8_sim(kv[..., :nope], 64), kv[..., nope:]], axis=-1)
        return kv

    def output(self, o_bthd, pos_bt, opts: ops.Opts):
        """Inverse RoPE, grouped low-rank `wo_a` (bf16 dequantized, as the reference converts it), then `wo_b`."""
        b, t, h, d = o_bthd.shape
        g, r = self.cfg.o_groups, self.cfg.o_lora_rank
        o = nn.rope_tail(o_bthd, pos_bt[:, :, None], self.inv_freq, inverse=True)
        wo_a = to_bf16(self.wo_a.dequantized()).reshape(g, r, -1)
        u = jnp.einsum("btgi,gri->btgr", o.reshape(b, t, g, -1).astype(F32), wo_a.astype(F32), precision="highest")
        return self.wo_b(to_bf16(u).reshape(b, t, g * r), opts)

    def __call__(self, x_btd: jax.Array, opts: ops.Opts, rec: dict | None = None) -> jax.Array:
        """Full-sequence attention from position 0. `x` is the attn_norm output `[b, s, dim]` bf16."""
        return self.prefill(x_btd, opts, rec)[0]

    def prefill(self, x_btd: jax.Array, opts: ops.Opts, rec: dict | None = None, with_cache: bool = False):
        """Full-sequence attention from position 0 -> `(out [b, s, dim] bf16, pieces)`.

        With `with_cache`, `pieces` holds what a cache needs for every position (the caller keeps the rows that
        belong to each sequence): `window` `[b,s,D]` KV rows; for ratio > 0 the compressor's per-token projections
        `comp_kv`/`comp_score` `[b,s,coff*D]` fp32 (score with `ape`) and the entries `[b, s//ratio, D]`; for ratio
        4 the same for the indexer (`idx_kv`, `idx_score`, `idx_keys`). Otherwise `pieces` is None."""
        b, s, _ = x_btd.shape
        pieces: dict | None = {} if with_cache else None
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        q, qr = self.query(x_btd, pos, opts)
        kv = self.window_kv(x_btd, pos, opts)
        if with_cache:
            pieces["window"] = kv
        win = window_indices(s, self.cfg.window_size)
        idx = jnp.broadcast_to(jnp.asarray(win), (b, *win.shape))
        if self.ratio:
            # Per-token projections of every position (the trailing incomplete block feeds only the cache), pooled
            # over the complete blocks.
            nb = s // self.ratio
            ckv, csc = self.compressor.tokens(x_btd)
            entries = self.compressor.blocks(ckv[:, : nb * self.ratio], csc[:, : nb * self.ratio], self.inv_freq, opts)
            if with_cache:
                pieces.update(comp_kv=ckv, comp_score=csc, entries=entries)
            kv = jnp.concatenate([kv, entries], axis=1)
            comp = jnp.asarray(compressed_indices(s, self.ratio, offset=s))
            comp = jnp.broadcast_to(comp, (b, *comp.shape))
            if self.ratio == 4:
                ikv, isc = self.indexer.compressor.tokens(x_btd)
                keys = self.indexer.compressor.blocks(ikv[:, : nb * 4], isc[:, : nb * 4], self.inv_freq, opts)
                if with_cache:
                    pieces.update(idx_kv=ikv, idx_score=isc, idx_keys=keys)
            if self.ratio == 4 and comp.shape[-1]:
                qi, wi = self.indexer.queries(x_btd, qr, pos, self.inv_freq, opts)
                raw = self.indexer.scores(qi, wi, keys)
                sel, masked = self.indexer.select(raw, comp >= 0)
                comp = jnp.where(sel >= 0, sel + s, -1)
                if rec is not None:
                    rec["indexer_topk"], rec["indexer_scores"] = comp, masked
            idx = jnp.concatenate([idx, comp], axis=-1)
        if rec is not None:
            rec["attn_kv"], rec["attn_topk"] = kv, idx
        o = sparse_attention(q, kv, idx, self.attn_sink[...], self.cfg.head_dim**-0.5)
        return self.output(o, pos, opts), pieces

    def decode(self, x_b1d: jax.Array, pos_b: jax.Array, lc, opts: ops.Opts, rec: dict | None = None):
        """One token per row at per-row positions `pos_b [b]` against the layer cache `lc` (a
        `dsv4_jax.cache.LayerCache`) -> `(out [b, 1, dim] bf16, updated lc)`.

        KV rows are `[window ring (W slots); compressed entries]`: the token's KV goes to ring slot `pos % W`, the
        compressors update their block state (emitting an entry when a block completes), the indexer scores the
        visible `(pos+1)//4` keys and keeps the top `min(index_topk, .)`; index lists follow the official decode
        layout (ring slots oldest to newest, then `W + j`)."""
        b = x_b1d.shape[0]
        w = self.cfg.window_size
        pos = pos_b[:, None]
        rows = jnp.arange(b)
        q, qr = self.query(x_b1d, pos, opts)
        kv = self.window_kv(x_b1d, pos, opts)
        window = lc.window.at[rows, pos_b % w].set(kv[:, 0], mode="drop")
        lc = dataclasses.replace(lc, window=window)
        c = jnp.arange(w)[None, :]
        full = pos >= w - 1
        idx = jnp.where(full, (pos + 1 + c) % w, jnp.where(c <= pos, c, -1)).astype(jnp.int32)
        kv_rows = window
        if self.ratio:
            kv_state, sc_state, entries = self.compressor.decode(x_b1d, pos_b, lc.comp_kv, lc.comp_score,
                                                                 lc.entries, self.inv_freq, opts)  # fmt: skip
            lc = dataclasses.replace(lc, comp_kv=kv_state, comp_score=sc_state, entries=entries)
            n = entries.shape[1]
            visible = jnp.arange(n)[None, :] < (pos + 1) // self.ratio
            if self.ratio == 4:
                ikv, isc, keys = self.indexer.compressor.decode(x_b1d, pos_b, lc.idx_kv, lc.idx_score, lc.idx_keys,
                                                                self.inv_freq, opts)  # fmt: skip
                lc = dataclasses.replace(lc, idx_kv=ikv, idx_score=isc, idx_keys=keys)
                qi, wi = self.indexer.queries(x_b1d, qr, pos, self.inv_freq, opts)
                raw = self.indexer.scores(qi, wi, keys)
                sel, _ = self.indexer.select(raw, visible[:, None, :])
                comp = jnp.where(sel[:, 0] >= 0, sel[:, 0] + w, -1)
                if rec is not None:
                    rec["indexer_topk"] = comp
            else:
                comp = jnp.where(visible, jnp.arange(n)[None, :] + w, -1).astype(jnp.int32)
            idx = jnp.concatenate([idx, comp], axis=-1)
            kv_rows = jnp.concatenate([window, entries], axis=1)
        o = sparse_attention(q, kv_rows, idx[:, None, :], self.attn_sink[...], self.cfg.head_dim**-0.5)
        return self.output(o, pos, opts), lc
