"""`kv_row`: the window KV row a step writes (spec §3.3): `wkv`'s output RMS-normed (`kv_norm`), RoPE on its tail at
the token's position, the NoPE channels FP8-simulated in tiles of 64; with `row_bytes`, also that row in the packed
cache layout (`kv_format.pack_kv`).

    kv_btd, packed_btr = kv_row(kva_btd, norm_w, pos_bt, inv_freq, eps=1e-6, row_bytes=584, opts=opts)

The kernel twin (`dsv4_jax.kernels.compressor:kv_row`) is one launch; XLA runs the reference as five fusions at
decode (the norm's reduction, the simulation's and the packing's amax, the RoPE and packing concatenations).
"""

from __future__ import annotations

import jax.numpy as jnp

from dsv4_jax import kv_format, quant
from dsv4_jax.layer_view import materialize
from dsv4_jax.ops import registry

__all__ = ["kv_row"]


def _reference(kva_btd, norm_w, pos_bt, inv_freq, *, eps: float, row_bytes: int = 0, quant_sim: bool = True):
    """(kv `[..., D]` bf16, packed uint8 `[..., row_bytes]` or None): `kv = rope_tail(rms_norm(kva), pos)`, then
    (quant_sim) the first D - rope channels through `quant.fp8_sim` in tiles of 64; packed: `kv_format.pack_kv(kv)`."""
    from dsv4_jax import nn  # nn's linears call ops: imported here, not at module load

    rope = 2 * len(inv_freq)
    kv = nn.rope_tail(nn.rms_norm(kva_btd, materialize(norm_w), eps), pos_bt, inv_freq)
    if quant_sim:
        nope = kv.shape[-1] - rope
        kv = jnp.concatenate([quant.fp8_sim(kv[..., :nope], kv_format.KV_TILE), kv[..., nope:]], axis=-1)
    if not row_bytes:
        return kv, None
    if row_bytes != kv_format.kv_row_bytes(kv.shape[-1], rope):
        raise ValueError(f"kv_row: row_bytes={row_bytes}, but a packed row of D={kv.shape[-1]}, rope={rope} is "
                         f"{kv_format.kv_row_bytes(kv.shape[-1], rope)} bytes")  # fmt: skip
    return kv, kv_format.pack_kv(kv, rope)


def _supports(kva_btd, norm_w, pos_bt, inv_freq, *, eps: float, row_bytes: int = 0, quant_sim: bool = True):
    if not quant_sim:
        return "quant_sim=False (the kernel implements the FP8-simulated row)"
    d, rope = kva_btd.shape[-1], 2 * len(inv_freq)
    if d not in (128, 512) or rope > d or (d - rope) % kv_format.KV_TILE or kva_btd.dtype != jnp.bfloat16:
        return f"kv {kva_btd.dtype}{tuple(kva_btd.shape)}, rope {rope}: the kernel takes bf16 rows of 512 or 128, " \
               "NoPE a multiple of 64"  # fmt: skip
    if tuple(pos_bt.shape) != tuple(kva_btd.shape[:-1]) or norm_w.shape[-1] != d:
        return f"positions {tuple(pos_bt.shape)} / norm weight {tuple(norm_w.shape)} for kv {tuple(kva_btd.shape)}"
    return None


# Validated on an H200 (tests/test_kv_row_gpu.py): "auto" takes it.
kv_row = registry.register(
    "kv_row", reference=_reference, kernel="dsv4_jax.kernels.compressor:kv_row", supports=_supports, validated=True
)
