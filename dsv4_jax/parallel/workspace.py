"""The activation / workspace allowance of one model step on one device: an estimate, phase by phase.

A step is `k` new tokens on each of `rows` rows on top of a cache of capacity `n` tokens (prefill: k = the prompt,
the cache empty; decode: k = 1). The layers run one after the other under `lax.scan`, and within a layer the phases
(query projection, indexer, sparse attention, output projection, MoE) one after the other, so what is alive at the
peak is the residual streams carried between layers, plus the largest phase, plus the weights the reference decodes
to fp32; after the last layer, the head's logits. Each term names the arrays it counts, at the dtype the reference
path (`dsv4_jax.attention`, `moe`, `ops`) creates them; the GPU kernels need less (they do not decode weights to
fp32), except the MXFP4 experts' grouped prefill route, whose FP8 copy of a layer's experts is counted too. What the
terms leave out (small vectors, XLA's own copies) is covered by the plan's reserve.

The term that grows fastest is the lightning indexer's: every query scores every compressed entry of the cache with
each indexer head (`[rows, k, index_heads, n/4]` fp32, twice: the product and its weighted relu before the head
sum), i.e. `128 k n` bytes per row for V4's 64 indexer heads. A whole 64K-token prompt in one step needs 512 GiB
for it alone; a chunked prefill of `k` tokens per step bounds it by `k`.

Checked against XLA's own buffer assignment (`compiled.memory_analysis().temp_size_in_bytes`) of `prefill` on CPU,
where the reference path is what runs (`tests/test_memory_plan.py::test_workspace_tracks_xla`): within 10 % on a
small Pro-shaped model (1 x 512, 1 x 4096 and 2 x 2048 tokens). At V4-Flash width (2 layers; prefill of 1024 / 4096
tokens, decode at 16K) XLA's CPU temp was 3.7 / 4.2 / 2.6 GiB above the estimate: 2 GiB of that is an fp32 copy of
the head's `[vocab, dim]` bf16 weight that only the CPU backend makes (it upcasts bf16 matmul operands), the rest
(1.7 / 2.2 / 0.6 GiB) fp32 decodes of two layer bodies' weights alive at once, which the plan's reserve covers.
"""

from __future__ import annotations

from dsv4_jax.config import Config
from dsv4_jax.kernels.moe_fp4 import grouped_min_rows, prefill_kernel
from dsv4_jax.ops.experts import PER_ROW_ELEMENTS

__all__ = ["step_workspace", "QUERY_CHUNK", "KEY_TILE"]

# `attention.sparse_attention` processes queries in chunks of 1024 and keys in tiles of 64.
QUERY_CHUNK = 1024
KEY_TILE = 64
F32, BF16, I32 = 4, 2, 4


def _largest_dense_fp8(cfg: Config, heads_split: int) -> int:
    """Elements of the largest FP8 linear one device holds (the reference decodes it to fp32 for its GEMM)."""
    d, h, hd, q = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.q_lora_rank
    g, r = cfg.o_groups, cfg.o_lora_rank
    shapes = [
        (h * hd // heads_split, q),  # wq_b
        (g * r // heads_split, h // g * hd),  # wo_a
        (d, g * r // heads_split),  # wo_b
        (q, d),  # wq_a
        (hd, d),  # wkv
        (cfg.moe_inter_dim * cfg.n_shared_experts, d),  # shared expert w1 / w3
    ]
    return max(a * b for a, b in shapes)


def step_workspace(cfg: Config, rows: int, k: int, n: int, *, heads_split: int = 1, index_heads_split: int = 1,
                   expert_split: int = 1, logits_all: bool = False) -> dict[str, int]:  # fmt: skip
    """Bytes of the temporaries of one step, by phase, and `"peak"`: what is alive at once (see the module doc).

    Args:
      rows: batch rows this device computes.  k: new tokens per row.  n: the cache capacity in tokens (the reference
        scores every compressed slot of the cache, filled or not).
      heads_split / index_heads_split: devices the attention / indexer heads are split over (tensor parallelism).
      expert_split: devices the routed experts are split over.
      logits_all: the step returns logits for all k tokens (`extend`), not only each row's last (`prefill`).

    The phases of a layer run one after the other, so the peak is the streams, plus the largest phase, plus the
    weights the reference decodes to fp32.
    """
    t = rows * k
    d, hc, dh, w = cfg.dim, cfg.hc_mult, cfg.head_dim, cfg.window_size
    h = cfg.n_heads // heads_split
    hi = cfg.index_n_heads // index_heads_split
    groups = max(cfg.o_groups // heads_split, 1)
    topk, inter = cfg.n_activated_experts, cfg.moe_inter_dim
    csa, hca = 4 in cfg.compress_ratios, 128 in cfg.compress_ratios
    c = min(k, QUERY_CHUNK)
    ni = n // 4
    q_live = t * h * dh * BF16  # the queries, alive from the projection to the end of sparse attention
    out = {}
    # The streams [t, hc, d]: bf16 into and out of a layer, fp32 copies inside hc_pre / hc_post.
    out["streams"] = t * hc * d * (BF16 + BF16 + F32 + F32)
    # The query projection [t, h, D]: the reference FP8 GEMM keeps an fp32 accumulator and an fp32 partial
    # product of its output, the per-head norm an fp32 copy.
    out["attn_query"] = t * h * dh * 3 * F32
    # CSA's indexer: q.K per head [t, hi, n/4] fp32 and its weighted relu (XLA may keep both before the head sum),
    # the head-summed and masked scores and visibility [t, n/4], the layer's keys [rows, n/4, 128] bf16 copied with
    # this step's new keys, the indexer queries [t, hi, 128] fp32.
    out["indexer"] = (q_live + 2 * t * hi * ni * F32 + t * ni * (2 * F32 + 1) + rows * ni * cfg.index_head_dim * BF16
                      + t * hi * cfg.index_head_dim * F32) if csa else 0  # fmt: skip
    # Sparse attention: q and the bf16 output o [t, h, D]; one query chunk's fp32 accumulator and PV product
    # [c, h, D], a key tile of gathered rows [c, 64, D] fp32, scores and probabilities [c, h, 64] fp32; the index
    # lists [t, window + compressed picks] int32 (HCA: also visibility and ids over its n/128 entries).
    picks = max(cfg.index_topk if csa else 0, n // 128 if hca else 0)
    out["attn_sparse"] = (2 * q_live + rows * c * (2 * h * dh * F32 + KEY_TILE * dh * F32 + 2 * h * KEY_TILE * F32)
                          + t * (w + picks) * I32 + (t * (n // 128) * (I32 + 1) if hca else 0))  # fmt: skip
    # The output projection: o, wo_a's fp32 output [t, g, r], wo_b's fp32 accumulator and partial product [t, d].
    out["attn_output"] = q_live + t * groups * cfg.o_lora_rank * F32 + 2 * t * d * F32
    # MoE: t * topk dispatched rows (all of them on this device: the worst case of expert parallelism): bf16
    # inputs, fp32 gate and up [r, inter], bf16 hidden, bf16 outputs; the fp32 combine accumulator [t, d]; the
    # shared expert's fp32 gate and up.
    r = t * topk
    out["moe"] = (r * (d * BF16 + 2 * inter * F32 + inter * BF16 + d * BF16) + t * d * F32
                  + t * inter * cfg.n_shared_experts * 2 * F32)  # fmt: skip
    # The MXFP4 experts' grouped route where it widens (the kernels', from `grouped_min_rows()` dispatched rows and
    # beyond what the one-pass kernel takes, `prefill_kernel`): this device's experts of the layer widened to the FP8
    # weight format, e4m3 bytes and f32 128 x 128 tile scales (3.2 GB per device for Flash at expert=2), alive
    # through the layer's grouped GEMMs. (The one-pass kernel needs no copy of the weights.)
    per_row = 3 * inter * d
    if cfg.expert_dtype == "fp4" and r >= grouped_min_rows() and prefill_kernel(r) == "widen":
        out["moe"] += cfg.n_routed_experts // expert_split * per_row * (1 + F32 / (128 * 128))
    # The head's fp32 logits (each row's last token, or all k) and the sampler's softmax of them.
    out["head"] = rows * (k if logits_all else 1) * cfg.vocab_size * F32 * 2
    # The reference decodes weights to fp32 for its GEMMs: the largest dense FP8 linear, and the routed experts —
    # per-row path: each row's expert weights (up to PER_ROW_ELEMENTS); per-expert path: one expert, and the block
    # scales of all this device's experts (XLA hoists their decode out of the expert loop).
    if r * per_row <= PER_ROW_ELEMENTS:
        experts = r * per_row
    else:
        block = 32 if cfg.expert_dtype == "fp4" else 128 * 128
        experts = per_row + per_row // block * (cfg.n_routed_experts // expert_split)
    out["reference_weights"] = (_largest_dense_fp8(cfg, heads_split) + experts) * F32
    phases = ("attn_query", "indexer", "attn_sparse", "attn_output", "moe", "head")
    out["peak"] = out["streams"] + max(out[p] for p in phases) + out["reference_weights"]
    return out
