"""The kernel side of `dsv4_jax.ops.q_heads`: the query heads' RMS norm and RoPE in one launch."""

from __future__ import annotations

from dsv4_jax.kernels import ffi_ops

__all__ = ["q_heads"]


def q_heads(q_bthd, pos_bt, inv_freq, *, eps: float):
    """bf16 `[b, t, H, D]`: every head normed and rotated (`ops.q_heads`)."""
    b, t, h, d = q_bthd.shape
    out = ffi_ops.q_heads(q_bthd.reshape(b * t, h, d), pos_bt.reshape(-1), inv_freq, eps=eps)
    return out.reshape(b, t, h, d)
