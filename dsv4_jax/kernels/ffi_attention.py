"""JAX wrappers of the attention side's CUDA kernels: mHC (the split of the mixes, the whole hc_pre), sparse-MLA
decode, the lightning indexer's scores and top-k, the compressor's decode step, the window KV row and the query heads'
norm and RoPE. Re-exported by `ffi_ops`, the one namespace of the extension's wrappers (whose helpers these use);
plain functions of arrays, as there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kernels.ffi_ops import BF16, F32, _layer_operand, sparse_mla_splits

__all__ = ["hc_split_sinkhorn", "hc_pre", "sparse_mla_decode", "indexer_scores", "INDEXER_VARIANTS", "indexer_topk",
           "TOPK_MAX_K", "compressor_decode", "kv_row", "q_heads"]  # fmt: skip


def hc_split_sinkhorn(mix: jax.Array, scale: jax.Array, base: jax.Array, *, n: int, iters: int, eps: float):
    """mHC split, one thread per row: mix f32 `[R, (2+n)*n]` -> (pre `[R, n]`, post `[R, n]`, comb `[R, n, n]`)."""
    r = mix.shape[0]
    return jax.ffi.ffi_call(
        "dsv4_hc_split_sinkhorn",
        (jax.ShapeDtypeStruct((r, n), F32), jax.ShapeDtypeStruct((r, n), F32), jax.ShapeDtypeStruct((r, n, n), F32)),
    )(mix, scale.astype(F32), base.astype(F32), n=np.int64(n), iters=np.int64(iters), eps=np.float32(eps))


def hc_pre(x, fn, scale, base, layer, *, n: int, iters: int, eps: float, norm_eps: float, norm_w=None,
           x_norm_eps: float = 0.0):  # fmt: skip
    """mHC hc_pre in two launches: streams bf16 `[R, n, d]`; fn f32 `[(L,) (2+n)n, n d]`, scale `[(L,) 3]`, base
    `[(L,) (2+n)n]` (a layer stack with `layer`, an int32 scalar, or one layer with None) -> (x bf16 `[R, d]`,
    post f32 `[R, n]`, comb f32 `[R, n, n]`). With `norm_w` (bf16 `[d]`, or a stack `[L, d]` read at `layer`;
    d <= 8192, the extension's hc_pre_norm_max_d) x comes out RMS-normed with that weight and `x_norm_eps`
    (`nn.rms_norm`)."""
    r, _, d = x.shape
    norm_w = jnp.zeros((0,), BF16) if norm_w is None else norm_w.astype(BF16)
    m = (2 + n) * n
    chunks = -(-(n * d) // 512)
    layer = _layer_operand(layer)
    out, post, comb, _ = jax.ffi.ffi_call(
        "dsv4_hc_pre",
        (
            jax.ShapeDtypeStruct((r, d), BF16),
            jax.ShapeDtypeStruct((r, n), F32),
            jax.ShapeDtypeStruct((r, n, n), F32),
            jax.ShapeDtypeStruct((r, chunks, m + 1), F32),
        ),
    )(x, fn.astype(F32), scale.astype(F32), base.astype(F32), layer, norm_w, n=np.int64(n), iters=np.int64(iters),
      eps=np.float32(eps), norm_eps=np.float32(norm_eps), x_norm_eps=np.float32(x_norm_eps))  # fmt: skip
    return out, post, comb


def sparse_mla_decode(q, ring, entries, layer, extra, idx, sink, scale: float) -> jax.Array:
    """Sparse-MLA decode over packed FP8 KV rows (584 B): q bf16 `[R, H, 512]`, ring uint8 `[B, W, 584]`, entries
    uint8 `[B, cap, 584]` or a stack `[L, B, cap, 584]` with `layer` (int32 scalar), or None; extra uint8
    `[B, n, 584]` or None; idx int32 `[R, N]` into ring | entries | extra (-1: none); sink f32 `[H]` -> bf16
    `[R, H, 512]`. Query row r reads the sources of batch row `r // (R / B)` (decode: R = B; prefill: the k queries
    of a row, b-major)."""
    b, h, d = q.shape
    splits = sparse_mla_splits(b, h, idx.shape[1])
    none_u8 = jnp.zeros((0,), jnp.uint8)
    layer = _layer_operand(layer)
    out, _, _ = jax.ffi.ffi_call(
        "dsv4_sparse_mla_decode",
        (
            jax.ShapeDtypeStruct((b, h, d), BF16),
            jax.ShapeDtypeStruct((b, splits, h, d), F32),
            jax.ShapeDtypeStruct((b, splits, h, 2), F32),
        ),
    )(
        q.astype(BF16),
        ring,
        none_u8 if entries is None else entries,
        layer,
        none_u8 if extra is None else extra,
        idx.astype(jnp.int32),
        sink.astype(F32),
        scale=np.float32(scale),
    )
    return out


# The indexer score kernels: mma (mma.sync, any head count) and wgmma (H = 64, one query row per batch row).
INDEXER_VARIANTS = ("mma", "wgmma")


def indexer_scores(q: jax.Array, w: jax.Array, keys: jax.Array, layer: jax.Array | int | None = None, *,
                   variant: str | None = None) -> jax.Array:  # fmt: skip
    """The lightning indexer's scores against packed MXFP4 keys, one launch: `out[r, j] = bf16(sum_h bf16(relu(
    bf16(q[r, h] . K[j])) * w[r, h]))` as f32, K the dequantized key j of row r's batch row.

    `q` bf16 `[R, H, 128]` (H a multiple of 16, at most 144; row r belongs to batch row `r // (R / B)`), `w` bf16
    `[R, H]`, `keys` uint8 `[B, n, 68]` or a layer stack `[L, B, n, 68]` with `layer` (an int32 scalar, clamped)
    naming the layer. Returns f32 `[R, n]`. `variant` (one of `INDEXER_VARIANTS`) fixes the kernel; None: the one
    DSV4_FFI_INDEXER names at launch (default wgmma where it fits: 64 heads, R = B on SM90; else mma)."""
    if keys.ndim == 3:
        keys = keys[None]
    if keys.ndim != 4 or keys.dtype != jnp.uint8:
        raise ValueError(f"indexer_scores: keys {keys.dtype}{keys.shape} are not packed keys [(L,) B, n, 68]")
    if variant is not None and variant not in INDEXER_VARIANTS:
        raise ValueError(f"indexer_scores: variant {variant!r} is not one of {INDEXER_VARIANTS}")
    layer = _layer_operand(layer)
    sfx = "" if variant is None else "_" + variant
    return jax.ffi.ffi_call("dsv4_indexer_scores" + sfx, jax.ShapeDtypeStruct((q.shape[0], keys.shape[2]), F32))(
        q.astype(BF16), w.astype(BF16), keys, layer
    )


# The largest k of `indexer_topk` (the kernel's sort holds 2048 pairs; V4's index_topk: 512 Flash, 1024 Pro).
TOPK_MAX_K = 2048


def indexer_topk(scores: jax.Array, n_vis: jax.Array, k: int) -> jax.Array:
    """The indexer's top-k in one launch: scores f32 `[R, n]`, n_vis int32 `[R]` (row r's first n_vis[r] entries
    are visible, the rest count as -inf) -> int32 `[R, k]`, the picks in `jax.lax.top_k`'s order (IEEE total order
    descending, -0 as +0, ties by ascending index), those at or past n_vis[r] as -1. 1 <= k <= min(n, TOPK_MAX_K)."""
    r, n = scores.shape
    if not 1 <= k <= min(n, TOPK_MAX_K):
        raise ValueError(f"indexer_topk: k={k} must be in [1, min(n={n}, {TOPK_MAX_K})]")
    return jax.ffi.ffi_call("dsv4_indexer_topk", jax.ShapeDtypeStruct((r, k), jnp.int32))(
        scores.astype(F32), n_vis.astype(jnp.int32), k=np.int64(k)
    )


def compressor_decode(kv_new, sc_new, kv_state, sc_state, ape, norm_w, inv_freq, start, n_new, layer, param_layer, *,
                      ratio: int, rotate: bool, eps: float):  # fmt: skip
    """The compressor's decode step in two launches: projections kv_new / sc_new f32 `[B, C]` on top of the block
    state kv_state / sc_state f32 `[(L,) B, coff*m, C]` (a stack with `layer`, an int32 scalar, or one layer with
    None), ape f32 `[(P,) m, C]` and norm_w bf16 `[(P,) Dc]` (a stack with `param_layer`, or None), inv_freq
    `[rope/2]`, start / n_new int32 `[B]` -> (entry bf16 `[B, Dc]`, the state after the step f32 `[B, coff*m, C]`
    x 2)."""
    b, dc = kv_new.shape[0], norm_w.shape[-1]
    state = jax.ShapeDtypeStruct(kv_state.shape[-3:], F32)
    entry, kv_out, sc_out, _ = jax.ffi.ffi_call(
        "dsv4_compressor_decode",
        (jax.ShapeDtypeStruct((b, dc), BF16), state, state, jax.ShapeDtypeStruct((b, dc), F32)),
    )(kv_new.astype(F32), sc_new.astype(F32), kv_state.astype(F32), sc_state.astype(F32), ape.astype(F32),
      norm_w.astype(BF16), jnp.asarray(inv_freq, F32), start.astype(jnp.int32), n_new.astype(jnp.int32),
      _layer_operand(layer), _layer_operand(param_layer), ratio=np.int64(ratio), rotate=np.int64(rotate),
      eps=np.float32(eps))  # fmt: skip
    return entry, kv_out, sc_out


def kv_row(kva, norm_w, layer, pos, inv_freq, *, eps: float, row_bytes: int = 0):
    """The window KV row in one launch: kva bf16 `[R, D]` (D 512 or 128), norm_w bf16 `[(L,) D]` (a stack with
    `layer`, an int32 scalar, or one layer with None), pos int32 `[R]`, inv_freq `[rope/2]` -> (kv bf16 `[R, D]`:
    RMSNorm, RoPE of the tail, FP8-simulated NoPE in tiles of 64; the packed rows uint8 `[R, row_bytes]`, or an
    empty array for row_bytes 0)."""
    r, d = kva.shape
    packed = jax.ShapeDtypeStruct((r, row_bytes) if row_bytes else (0,), jnp.uint8)
    return jax.ffi.ffi_call("dsv4_kv_row", (jax.ShapeDtypeStruct((r, d), BF16), packed))(
        kva.astype(BF16),
        norm_w.astype(BF16),
        _layer_operand(layer),
        pos.astype(jnp.int32),
        jnp.asarray(inv_freq, F32),
        eps=np.float32(eps),
    )


def q_heads(q, pos, inv_freq, *, eps: float):
    """The query heads after wq_b in one launch: q bf16 `[R, H, d]` (d 512 or 256), pos int32 `[R]`, inv_freq
    `[rope/2]` -> bf16 `[R, H, d]`: each head's weightless RMS norm in bf16 arithmetic, RoPE of the tail."""
    return jax.ffi.ffi_call("dsv4_q_heads", jax.ShapeDtypeStruct(q.shape, BF16))(
        q.astype(BF16), pos.astype(jnp.int32), jnp.asarray(inv_freq, F32), eps=np.float32(eps)
    )
