"""`indexer_scores`: the lightning indexer's scores of cached packed keys (spec §3.2), the op behind decode's
top-k selection of compressed entries.

    scores_btn = indexer_scores(q_bthc, w_bth, keys_bnp, opts=opts)

q: `[b, t, H, 128]` index queries (bf16, FP4-simulated in the model), w: `[b, t, H]` bf16 head weights, keys: the
packed MXFP4 indexer keys `[b, n, 68]` of one layer (`kv_format.pack_index_keys`; an array or a `LayerSlice` of the
stacked cache). Returns f32 `[b, t, n]` holding bf16 values. The reference unpacks every key and runs `score_keys`;
the kernel twin (`dsv4_jax.kernels.indexer`) reads the packed bytes (the whole stack and the layer index) and does
the same arithmetic in one launch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import kv_format
from dsv4_jax.layer_view import materialize
from dsv4_jax.ops import registry
from dsv4_jax.rounding import to_bf16

__all__ = ["indexer_scores", "score_keys"]

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
