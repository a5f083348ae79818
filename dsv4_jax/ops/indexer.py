"""`indexer_scores` and `indexer_topk`: the lightning indexer's scores of cached packed keys (spec §3.2) and its
selection of the top-k visible compressed entries.

    scores_btn = indexer_scores(q_bthc, w_bth, keys_bnp, opts=opts)
    idx_btk = indexer_topk(scores_btn, n_visible_bt, k=512, opts=opts)

q: `[b, t, H, 128]` index queries (bf16, FP4-simulated in the model), w: `[b, t, H]` bf16 head weights, keys: the
packed MXFP4 indexer keys `[b, n, 68]` of one layer (`kv_format.pack_index_keys`; an array or a `LayerSlice` of the
stacked cache). Returns f32 `[b, t, n]` holding bf16 values. The reference unpacks every key and runs `score_keys`;
the kernel twin (`dsv4_jax.kernels.indexer`) reads the packed bytes (the whole stack and the layer index) and does
the same arithmetic in one launch.

`indexer_topk`: entries `j < n_visible[b, t]` are visible (the compressed entries complete at the query: a prefix);
the picks are `jax.lax.top_k` of the scores with the others masked to -inf, in its order (IEEE total order
descending, -0 taken as +0, ties by ascending index), picks that are not visible as -1. The kernel twin is a radix
select (one launch; XLA sorts every row: at 64 rows of 16,384 scores, half of the indexer's time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import kv_format
from dsv4_jax.layer_view import materialize
from dsv4_jax.ops import registry
from dsv4_jax.rounding import to_bf16

__all__ = ["indexer_scores", "indexer_topk", "score_keys"]

F32, BF16 = jnp.float32, jnp.bfloat16
HEAD_DIM = 128
MAX_HEADS = 144  # the kernel stages a query row's heads in 48 KiB of shared memory


def score_keys(q_bthc, w_bth, keys_bnc) -> jax.Array:
    """`sum_h w[h] * relu(q[h] . K)` with the reference's bf16 rounding points -> `[b, t, n]` (bf16 values, f32):
    `qk = bf16(q . K)` (fp32 sum), `bf16(relu(qk) * w)`, then `bf16` of their fp32 sum over the heads."""
    qk = to_bf16(jnp.einsum("bthc,bnc->bthn", q_bthc.astype(F32), keys_bnc.astype(F32), precision="highest"))
    wq = to_bf16(jnp.maximum(qk, 0).astype(F32) * w_bth.astype(F32)[..., None])
    return to_bf16(jnp.sum(wq.astype(F32), axis=2)).astype(F32)


def _reference(q, w, keys, *, quant_sim: bool = True):
    del quant_sim  # the packed keys hold their exact values either way; q is what the caller computed
    return score_keys(q, w, kv_format.unpack_index_keys(materialize(keys)))


def _supports(q, w, keys, *, quant_sim: bool = True) -> str | None:
    b, t, h, c = q.shape
    if c != HEAD_DIM:
        return f"index head_dim {c} (the kernel takes {HEAD_DIM})"
    if h % 16 or not 16 <= h <= MAX_HEADS:
        return f"{h} index heads (the kernel takes multiples of 16 up to {MAX_HEADS})"
    if q.dtype != BF16 or w.dtype != BF16:
        return f"q {q.dtype} / w {w.dtype} (the kernel reads bf16)"
    if keys.dtype != jnp.uint8 or len(keys.shape) != 3 or keys.shape[-1] != kv_format.index_key_bytes(HEAD_DIM):
        return f"keys {keys.dtype}{tuple(keys.shape)} are not packed MXFP4 keys [b, n, 68]"
    if keys.shape[0] != b or w.shape != (b, t, h):
        return f"q {q.shape}, w {w.shape} and keys {tuple(keys.shape)} disagree in batch or heads"
    return None


# Its GPU tests (tests/test_indexer_kernels_gpu.py) passed on an H200 on 2026-12-01: "auto" takes it.
indexer_scores = registry.register(
    "indexer_scores",
    reference=_reference,
    kernel="dsv4_jax.kernels.indexer:scores",
    supports=_supports,
)


def _topk_reference(scores_btn, n_visible_bt, *, k: int, quant_sim: bool = True):
    """int32 `[..., k]`: the top `k` of f32 scores `[..., n]` among the first `n_visible [...]` entries (-1: a pick
    that is not visible, when fewer than k are)."""
    del quant_sim
    n_vis = n_visible_bt.astype(jnp.int32)[..., None]
    scores = scores_btn.astype(F32)
    scores = jnp.where(scores == 0, 0.0, scores)  # -0 as +0: XLA's CPU top_k ranks +0 above -0, its GPU top_k does not
    masked = jnp.where(jnp.arange(scores_btn.shape[-1]) < n_vis, scores, -jnp.inf)
    _, top_i = jax.lax.top_k(masked, k)
    return jnp.where(top_i < n_vis, top_i, -1).astype(jnp.int32)


def _topk_supports(scores_btn, n_visible_bt, *, k: int, quant_sim: bool = True) -> str | None:
    from dsv4_jax.kernels.ffi_ops import TOPK_MAX_K

    n = scores_btn.shape[-1]
    if scores_btn.dtype != F32:
        return f"scores {scores_btn.dtype} (the kernel reads f32)"
    if not 1 <= k <= min(n, TOPK_MAX_K):
        return f"k={k} of n={n} (the kernel takes 1 <= k <= min(n, {TOPK_MAX_K}))"
    if tuple(n_visible_bt.shape) != tuple(scores_btn.shape[:-1]):
        return f"n_visible {tuple(n_visible_bt.shape)} is not scores' leading shape {tuple(scores_btn.shape[:-1])}"
    return None


# Its GPU tests (tests/test_topk_gpu.py: picks equal to a NumPy model of lax.top_k and to the reference on the device)
# passed on an H200 on 2026-12-01: "auto" takes it.
indexer_topk = registry.register(
    "indexer_topk",
    reference=_topk_reference,
    kernel="dsv4_jax.kernels.indexer:topk",
    supports=_topk_supports,
)
