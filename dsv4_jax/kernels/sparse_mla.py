"""The kernel side of `dsv4_jax.ops.sparse_decode` and `ops.sparse_prefill`: sparse-MLA over the packed FP8 cache in
one FFI call (the attention kernel, then the combine of its split-KV runs); prefill runs the same kernel with the k
queries of a row sharing its sources. Compressed entries that are one layer of a stacked cache (`LayerSlice`) reach
the kernel as the stack and the layer index: no copy of the stack."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import LayerSlice, materialize

__all__ = ["sparse_decode", "sparse_prefill"]

# Queries per prefill call: the kernel's fp32 workspace is 128 KiB per query row (64 heads x 512 dims x 4 B at one
# split), 128 MiB for this many; longer steps run as a loop of such calls.
PREFILL_CHUNK = 1024


def sparse_decode(q_bhd, ring, entries, extra, idx_bn, sink_h, *, scale: float, rope_dim: int) -> jax.Array:
    """bf16 `[b, h, 512]` (see `dsv4_jax.ops.attention`)."""
    del rope_dim  # the kernel's layout: 448 + 64 (checked by the op's `supports`)
    layer = None
    if isinstance(entries, LayerSlice):
        entries, layer = entries.stack, entries.index
    return ffi_ops.sparse_mla_decode(q_bhd, materialize(ring), entries, layer, materialize(extra), idx_bn,
                                     sink_h, scale)  # fmt: skip


def sparse_prefill(q_bkhd, ring, entries, extra, idx_bkn, sink_h, *, scale: float, rope_dim: int) -> jax.Array:
    """bf16 `[b, k, h, 512]` (see `dsv4_jax.ops.attention`): the k queries of each row as k query rows of
    `sparse_decode` over that row's sources, in chunks of `PREFILL_CHUNK` queries (the query chunking of
    `ops.attention.sparse_attention`, which kernel modules do not import)."""
    b, k, h, d = q_bkhd.shape

    def run(q, idx):  # [b, c, h, d], [b, c, n]
        c = q.shape[1]
        o = sparse_decode(q.reshape(b * c, h, d), ring, entries, extra, idx.reshape(b * c, -1), sink_h, scale=scale,
                          rope_dim=rope_dim)  # fmt: skip
        return o.reshape(b, c, h, d)

    if k <= PREFILL_CHUNK:
        return run(q_bkhd, idx_bkn)
    pad = (-k) % PREFILL_CHUNK
    qp = jnp.pad(q_bkhd, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, PREFILL_CHUNK, h, d).swapaxes(0, 1)
    ip = jnp.pad(idx_bkn, ((0, 0), (0, pad), (0, 0)), constant_values=-1)
    ip = ip.reshape(b, -1, PREFILL_CHUNK, idx_bkn.shape[-1]).swapaxes(0, 1)
    out = jax.lax.map(lambda a: run(*a), (qp, ip))
    return out.swapaxes(0, 1).reshape(b, k + pad, h, d)[:, :k]
