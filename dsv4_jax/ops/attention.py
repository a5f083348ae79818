"""Sparse attention of DeepSeek-V4 (spec §3.2): each query attends over the KV rows its index list names (V = K), with
an attention sink in the softmax denominator; the reference `sparse_attention`, and `sparse_decode`, the op with a
kernel: one query per batch row over the packed FP8 cache (`dsv4_jax.kv_format`), FlashMLA's decode regime.

    o_bhd = sparse_decode(q_bhd, ring_bwr, entries, extra_bnr, idx_bn, sink_h, scale=D**-0.5, rope_dim=64, opts=opts)
    o_bkhd = sparse_prefill(q_bkhd, ring_bwr, entries, extra_bnr, idx_bkn, ...)  # k queries per row, same sources

Index lists point into a virtual concatenation of sources (`gather_rows`); for `sparse_decode` the sources are the
window ring after this step's write `[b, W, 584]` (index r < W: ring slot r), the cached compressed entries
`[b, cap, 584]` (index W + j; a `LayerSlice` of the stacked cache reaches the kernel as the stack and the layer), and
the entries this step completed `[b, n, 584]` (index W + cap + q); -1 = no key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import kv_format
from dsv4_jax.kv_format import PackedKV
from dsv4_jax.layer_view import materialize, take
from dsv4_jax.ops import registry
from dsv4_jax.rounding import to_bf16

__all__ = ["sparse_attention", "gather_rows", "sparse_decode", "sparse_prefill"]

F32 = jnp.float32


def _as_sources(kv) -> list[tuple]:
    return [(kv, 0)] if not isinstance(kv, (list, tuple)) else list(kv)


def gather_rows(sources, idx):
    """Rows `[b, c, t, D]` f32 for index lists `idx [b, c, t]` (-1 = none: zeros) into the virtual concatenation
    of `sources`, a list of `(rows [b, n, D] (array, LayerSlice or PackedKV), offset)`."""
    b = idx.shape[0]
    bi = jnp.arange(b)[:, None, None]
    out = None
    for src, off in sources:
        n = src.shape[1]
        if n == 0:  # e.g. no complete compressed block yet
            continue
        local = idx - off
        hit = (local >= 0) & (local < n)
        li = jnp.clip(local, 0, n - 1)
        rows = src.take(bi, li) if isinstance(src, PackedKV) else take(src, bi, li)  # PackedKV: unpacks these rows
        rows = jnp.where(hit[..., None], rows.astype(F32), 0.0)
        out = rows if out is None else out + rows  # sources are disjoint: adding zeros is exact
    return out if out is not None else jnp.zeros((*idx.shape, sources[0][0].shape[-1]), F32)


# Few queries (decode, short extends): every tile's gather and products at once, only the online-softmax recurrence
# unrolled over the tiles (elementwise, one fusion): a handful of kernels instead of a loop of ~10 per tile, with the
# same arithmetic per tile as the loop.
_ALL_TILES_MAX = 32
_ALL_TILES_QUERIES = 16  # queries per row (decode: 1; short extends); prefill keeps the loop and its small workspace
_ALL_TILES_BYTES = 256 << 20


def _online_max(m_prev, den, z_t):
    """One tile of the online softmax: (new running max, rescaled denominator, the rescale factor alpha of the
    accumulator, the tile's probabilities)."""
    m = jnp.maximum(m_prev, jnp.max(z_t, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(z_t - m_safe[..., None])
    return m, den * alpha + jnp.sum(p, axis=-1), alpha, p


def _tiles_in_a_loop(qf, sources, idx, init, scale, tile):
    b, c = idx.shape[:2]
    idx_t = idx.reshape(b, c, -1, tile).transpose(2, 0, 1, 3)  # [nt, b, c, tile]

    def step(carry, it):
        m_prev, den, acc = carry
        rows = gather_rows(sources, it)
        z = jnp.einsum("bchd,bckd->bchk", qf, rows, precision="highest") * F32(scale)
        z = jnp.where((it >= 0)[:, :, None, :], z, -jnp.inf)
        m, den, alpha, p = _online_max(m_prev, den, z)
        pv = jnp.einsum("bchk,bckd->bchd", to_bf16(p).astype(F32), rows, precision="highest")
        return (m, den, acc * alpha[..., None] + pv), None

    return jax.lax.scan(step, init, idx_t)[0]


def _tiles_at_once(qf, sources, idx, init, scale, tile):
    b, c, kp = idx.shape
    nt = kp // tile
    rows = gather_rows(sources, idx).reshape(b, c, nt, tile, -1)  # [b, c, nt, tile, D]
    z = jnp.einsum("bchd,bctkd->bchtk", qf, rows, precision="highest") * F32(scale)
    z = jnp.where((idx >= 0).reshape(b, c, 1, nt, tile), z, -jnp.inf)
    # The running max after each tile decides that tile's probabilities; with all maxima known, every tile's PV
    # product is one batched contraction, and the recurrence only rescales and adds.
    m, den, acc = init
    ps, alphas = [], []
    for t in range(nt):
        m, den, alpha, p = _online_max(m, den, z[:, :, :, t])
        ps.append(p)
        alphas.append(alpha)
    p_all = jnp.stack(ps, axis=3)  # [b, c, h, nt, tile]
    pv = jnp.einsum("bchtk,bctkd->bchtd", to_bf16(p_all).astype(F32), rows, precision="highest")
    for t in range(nt):
        acc = acc * alphas[t][..., None] + pv[:, :, :, t]
    return m, den, acc


def sparse_attention(q_bshd, kv, idx_bsk, sink_h, scale: float, chunk: int = 1024) -> jax.Array:
    """Softmax attention of each query over the KV rows listed in `idx` (-1 = none), V = K, sink in the denominator.

    `kv` is one array `[b, n, D]` or a list of `(rows, offset)` sources (see `gather_rows`).
    `o = sum_u exp(z_u - M) K_u / (sum_u exp(z_u - M) + exp(sink_h - M))`, `z_u = scale * q.K_u` (fp32), the
    probabilities rounded to bf16 before the PV product (as the kernel does); returns bf16 `[b, s, h, D]`.
    Queries are processed in chunks of `chunk` to bound the gathered `[b, chunk, k, D]` block.
    """
    b, s, h, d = q_bshd.shape
    tile = 64
    sources = _as_sources(kv)

    def attend(q, idx):
        # The kernel's order: 64-key tiles in index order, online softmax, probabilities rounded to bf16 against the
        # running max before the PV product, fp32 accumulation, the sink added to the denominator at the end.
        c, k = idx.shape[1], idx.shape[2]
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, (-k) % tile)), constant_values=-1)
        nt = idx.shape[-1] // tile
        qf = q.astype(F32)
        init = (jnp.full((b, c, h), -jnp.inf, F32), jnp.zeros((b, c, h), F32), jnp.zeros((b, c, h, d), F32))
        if nt <= _ALL_TILES_MAX and c <= _ALL_TILES_QUERIES and b * c * h * nt * d * 4 <= _ALL_TILES_BYTES:
            m, den, acc = _tiles_at_once(qf, sources, idx, init, scale, tile)
        else:
            m, den, acc = _tiles_in_a_loop(qf, sources, idx, init, scale, tile)
        den = den + jnp.exp(sink_h.astype(F32)[None, None, :] - m)
        return to_bf16(acc / den[..., None])

    if s <= chunk:
        return attend(q_bshd, idx_bsk)
    pad = (-s) % chunk
    qp = jnp.pad(q_bshd, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, chunk, h, d).swapaxes(0, 1)
    ip = jnp.pad(idx_bsk, ((0, 0), (0, pad), (0, 0)), constant_values=-1).reshape(b, -1, chunk, idx_bsk.shape[-1])
    out = jax.lax.map(lambda a: attend(*a), (qp, ip.swapaxes(0, 1)))
    return out.swapaxes(0, 1).reshape(b, s + pad, h, d)[:, :s]


# ---- the decode op ---------------------------------------------------------------------------------------------


def decode_sources(ring, entries, extra, rope_dim: int, unpack_small: bool = False) -> list[tuple]:
    """The `(rows, offset)` sources of a `sparse_decode` / `sparse_prefill` call (absent parts skipped): `PackedKV`s,
    which unpack only the rows a gather takes; with `unpack_small`, the ring and the step's own rows unpacked whole
    up front (a prefill gathers each of them many times; the cached entries may be the whole context)."""

    def small(rows):
        return kv_format.unpack_kv(materialize(rows), rope_dim) if unpack_small else PackedKV(rows, rope_dim)

    sources = [(small(ring), 0)]
    w = ring.shape[1]
    cap = 0 if entries is None else entries.shape[1]
    if entries is not None:
        sources.append((PackedKV(entries, rope_dim), w))
    if extra is not None:
        sources.append((small(extra), w + cap))
    return sources


def _sparse_decode_reference(q_bhd, ring, entries, extra, idx_bn, sink_h, *, scale: float, rope_dim: int,
                             quant_sim: bool = True) -> jax.Array:  # fmt: skip
    """bf16 `[b, h, D]`: `sparse_attention` of one query per row over the packed sources."""
    del quant_sim  # the packed rows hold FP8-simulated values already
    sources = decode_sources(ring, entries, extra, rope_dim)
    return sparse_attention(q_bhd[:, None], sources, idx_bn[:, None], sink_h, scale)[:, 0]


def _sparse_decode_supports(q_bhd, ring, entries, extra, idx_bn, sink_h, *, scale: float, rope_dim: int,
                            quant_sim: bool = True) -> str | None:  # fmt: skip
    if not quant_sim:
        return "quant_sim=False (the packed cache holds FP8-simulated rows only)"
    h, d = q_bhd.shape[1:]
    if d != 512 or rope_dim != 64 or h % 16:
        return f"heads {h}, head_dim {d}, rope_dim {rope_dim}: the kernel takes 512 = 448 + 64 dims, heads % 16 == 0"
    return None


sparse_decode = registry.register(
    "sparse_decode",
    reference=_sparse_decode_reference,
    kernel="dsv4_jax.kernels.sparse_mla:sparse_decode",
    supports=_sparse_decode_supports,
)


# ---- the prefill / extend op -----------------------------------------------------------------------------------


def _sparse_prefill_reference(q_bkhd, ring, entries, extra, idx_bkn, sink_h, *, scale: float, rope_dim: int,
                              quant_sim: bool = True) -> jax.Array:  # fmt: skip
    """bf16 `[b, k, h, D]`: `sparse_attention` of the k queries of each row over its packed sources."""
    del quant_sim
    sources = decode_sources(ring, entries, extra, rope_dim, unpack_small=True)
    return sparse_attention(q_bkhd, sources, idx_bkn, sink_h, scale)


def _sparse_prefill_supports(q_bkhd, ring, entries, extra, idx_bkn, sink_h, *, scale: float, rope_dim: int,
                             quant_sim: bool = True) -> str | None:  # fmt: skip
    return _sparse_decode_supports(q_bkhd[:, 0], ring, entries, extra, idx_bkn[:, 0], sink_h, scale=scale,
                                   rope_dim=rope_dim, quant_sim=quant_sim)  # fmt: skip


# The decode kernel with k queries per source row (each query its own index list): what a prefill or extend step
# computes, 64 heads sharing each key as in FlashMLA's sparse prefill. Its GPU tests (tests/test_sparse_mla_gpu.py,
# prefill cases; the end-to-end forward of full-width Flash layers) passed on an H200 on 2026-12-01.
sparse_prefill = registry.register(
    "sparse_prefill",
    reference=_sparse_prefill_reference,
    kernel="dsv4_jax.kernels.sparse_mla:sparse_prefill",
    supports=_sparse_prefill_supports,
)
