"""The kernel side of `dsv4_jax.ops.compressor_decode`: the compressor's decode step (pooling, the state after the
step, RMSNorm, RoPE and the FP8 or Hadamard + FP4 simulation of the entry) in two launches."""

from __future__ import annotations

from dsv4_jax.kernels import ffi_ops
from dsv4_jax.layer_view import stacks_and_index

__all__ = ["compressor_decode", "kv_row"]


def compressor_decode(kv_new_bc, sc_new_bc, kv_state, score_state, ape, norm_w, start_b, n_new_b, inv_freq, *,
                      ratio: int, rotate: bool, eps: float):  # fmt: skip
    """(entries `[b, 1, Dc]` bf16, kv_state, score_state `[b, coff*m, C]` f32). The block states and the parameters
    that are `LayerSlice`s go to the kernel as their stacks and layer indices (no per-step copy)."""
    states, layer = stacks_and_index(kv_state, score_state)
    params, param_layer = stacks_and_index(ape, norm_w)
    entry, kv_s, sc_s = ffi_ops.compressor_decode(kv_new_bc, sc_new_bc, *states, *params, inv_freq, start_b, n_new_b,
                                                  layer, param_layer, ratio=ratio, rotate=rotate, eps=eps)  # fmt: skip
    return entry[:, None], kv_s, sc_s


def kv_row(kva_btd, norm_w, pos_bt, inv_freq, *, eps: float, row_bytes: int = 0):
    """(kv `[..., D]` bf16, packed uint8 `[..., row_bytes]` or None) in one launch; a norm weight that is a
    `LayerSlice` goes to the kernel as its stack and layer index."""
    lead, d = kva_btd.shape[:-1], kva_btd.shape[-1]
    (w,), layer = stacks_and_index(norm_w)
    kv, packed = ffi_ops.kv_row(kva_btd.reshape(-1, d), w, layer, pos_bt.reshape(-1), inv_freq, eps=eps,
                                row_bytes=row_bytes)  # fmt: skip
    return kv.reshape(*lead, d), (packed.reshape(*lead, row_bytes) if row_bytes else None)
