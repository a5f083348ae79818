"""The packed FP8 KV cache format of DeepSeek-V4 (the V4.0 "MODEL1" serving layout) and the packed MXFP4 indexer
keys: what the decode cache stores when the model runs with the official quantization (`Opts.quant_sim`).

A KV row (`head_dim` D = nope + rope, e.g. 448 + 64) is one byte string per entry, 584 B for V4:

    [0, nope)                      e4m3 NoPE values, in tiles of 64, each with its own power-of-two scale
    [nope, nope + 2 rope)          the RoPE values as bf16 (little-endian)
    [nope + 2 rope, + nope / 64)   the tiles' UE8M0 scale bytes
    then zero padding to a multiple of 8 bytes

The bytes of a row are those of the serving layout; their arrangement differs in one respect: the cache here is not
paged, so each row carries its scales (FlashMLA's and vLLM's pages put all rows' 576-byte data regions first and the
8-byte scale areas after them).

An indexer key (128 values after the Hadamard rotation) is 64 B of e2m1 pairs (low nibble first) and 4 UE8M0 scale
bytes, one per 32 values: 68 B.

Packing is lossless for rows the model produced with `quant_sim` (NoPE FP8-simulated in tiles of 64, keys FP4-
simulated in blocks of 32): the values are e4m3 (e2m1) numbers times a power of two, and the scale recomputed from
them re-expresses each value exactly (it can only come out smaller, which doubles the stored number exactly). So
unpacking gives back the bf16 rows bit for bit, and the reference computes on the same values as with a bf16 cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv4_jax import quant

__all__ = ["KV_TILE", "INDEX_BLOCK", "kv_row_bytes", "index_key_bytes", "pack_kv", "unpack_kv", "pack_index_keys",
           "unpack_index_keys", "PackedKV"]  # fmt: skip

KV_TILE = 64  # NoPE values per FP8 scale
INDEX_BLOCK = 32  # indexer key values per FP4 scale
BF16, F32 = jnp.bfloat16, jnp.float32


def kv_row_bytes(head_dim: int, rope_dim: int) -> int:
    """Bytes of one packed KV row (584 for V4's 512 = 448 + 64)."""
    nope = head_dim - rope_dim
    if nope % KV_TILE:
        raise ValueError(f"the packed FP8 KV layout needs head_dim - rope_dim = {nope} to be a multiple of {KV_TILE}")
    return -(-(nope + 2 * rope_dim + nope // KV_TILE) // 8) * 8


def index_key_bytes(dim: int) -> int:
    """Bytes of one packed indexer key (68 for 128 values)."""
    return dim // 2 + dim // INDEX_BLOCK


def _bytes_of(x: jax.Array) -> jax.Array:
    """The bytes of `x [..., n]` (1- or 2-byte dtype) as uint8 `[..., n * itemsize]`."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return b.reshape(*x.shape[:-1], -1)


def pack_kv(kv: jax.Array, rope_dim: int) -> jax.Array:
    """KV rows `[..., D]` (NoPE values FP8-simulated in tiles of 64) -> packed uint8 `[..., kv_row_bytes]`."""
    *lead, d = kv.shape
    q, s = quant.act_quant(kv[..., : d - rope_dim], KV_TILE)  # the simulation's own quantization, tiles of 64
    parts = [_bytes_of(q), _bytes_of(kv[..., d - rope_dim :].astype(BF16)), _bytes_of(quant.f32_to_e8m0(s))]
    pad = kv_row_bytes(d, rope_dim) - sum(p.shape[-1] for p in parts)
    if pad:
        parts.append(jnp.zeros((*lead, pad), jnp.uint8))
    return jnp.concatenate(parts, axis=-1)


def _nope_dim(row_bytes: int, rope_dim: int) -> int:
    nope = KV_TILE * ((row_bytes - 2 * rope_dim) // (KV_TILE + 1))
    if kv_row_bytes(nope + rope_dim, rope_dim) != row_bytes:
        raise ValueError(f"{row_bytes} bytes per row is not a packed KV row with rope_dim={rope_dim}")
    return nope


def unpack_kv(packed: jax.Array, rope_dim: int, dtype=BF16) -> jax.Array:
    """Packed uint8 `[..., kv_row_bytes]` -> KV rows `[..., D]` in `dtype` (exact in bf16 and f32)."""
    *lead, nb = packed.shape
    nope = _nope_dim(nb, rope_dim)
    r0, s0 = nope + 2 * rope_dim, nope + 2 * rope_dim + nope // KV_TILE
    q = quant.e4m3_to_f32(jax.lax.bitcast_convert_type(packed[..., :nope], jnp.float8_e4m3fn))
    s = quant.e8m0_to_f32(packed[..., r0:s0])
    nope_v = (q.reshape(*lead, nope // KV_TILE, KV_TILE) * s[..., None]).reshape(*lead, nope)
    rope = jax.lax.bitcast_convert_type(packed[..., nope:r0].reshape(*lead, rope_dim, 2), BF16)
    return jnp.concatenate([nope_v.astype(dtype), rope.astype(dtype)], axis=-1)


def pack_index_keys(keys: jax.Array) -> jax.Array:
    """Indexer keys `[..., n, 128]` (FP4-simulated in blocks of 32) -> packed uint8 `[..., n, 68]`: the MXFP4
    format of the routed experts' weights (`quant.quantize_fp4_weight`), one row per key."""
    packed, s = quant.quantize_fp4_weight(keys)
    return jnp.concatenate([packed, _bytes_of(s)], axis=-1)


def unpack_index_keys(packed: jax.Array, dtype=BF16) -> jax.Array:
    """Packed uint8 `[..., n, 68]` -> indexer keys `[..., n, 128]` in `dtype`."""
    nb = packed.shape[-1]
    d = nb * 2 * INDEX_BLOCK // (INDEX_BLOCK + 2)
    if index_key_bytes(d) != nb:
        raise ValueError(f"{nb} bytes per row is not a packed indexer key")
    return quant.dequant_fp4_weight(packed[..., : d // 2], packed[..., d // 2 :]).astype(dtype)


@dataclasses.dataclass(frozen=True)
class PackedKV:
    """Packed KV rows `[b, n, kv_row_bytes]` (an array or a `LayerSlice` of a stacked cache) read as `[b, n, D]`
    rows: `take` unpacks only the rows it gathers, `get` all of them (bf16)."""

    rows: object
    rope_dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, nb = self.rows.shape
        return (*lead, _nope_dim(nb, self.rope_dim) + self.rope_dim)

    def take(self, bi, li) -> jax.Array:
        """f32 rows `[b, ..., D]` at batch indices `bi` and row indices `li` (broadcast together)."""
        from dsv4_jax.layer_view import take

        return unpack_kv(take(self.rows, bi, li), self.rope_dim, F32)

    def get(self) -> jax.Array:
        from dsv4_jax.layer_view import materialize

        return unpack_kv(materialize(self.rows), self.rope_dim)
