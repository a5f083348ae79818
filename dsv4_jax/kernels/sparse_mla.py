"""The kernel side of `dsv4_jax.ops.sparse_decode`: sparse-MLA decode over the packed FP8 cache in one FFI call (the
attention kernel, then the combine of its split-KV runs). Compressed entries that are one layer of a stacked cache
(`LayerSlice`) reach the kernel as the stack and the layer index: no copy of the stack."""

from __future__ import annotations

import jax

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import LayerSlice, materialize

__all__ = ["sparse_decode"]


def sparse_decode(q_bhd, ring, entries, extra, idx_bn, sink_h, *, scale: float, rope_dim: int) -> jax.Array:
    """bf16 `[b, h, 512]` (see `dsv4_jax.ops.attention`)."""
    del rope_dim  # the kernel's layout: 448 + 64 (checked by the op's `supports`)
    layer = None
    if isinstance(entries, LayerSlice):
        entries, layer = entries.stack, entries.index
    return ffi_ops.sparse_mla_decode(q_bhd, materialize(ring), entries, layer, materialize(extra), idx_bn,
                                     sink_h, scale)  # fmt: skip
