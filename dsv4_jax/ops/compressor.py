"""The compressor's pooling of tokens into block entries (spec §3.2): `compress_step` for any step, and
`compressor_decode`, the decode step (one new token per row on top of the block state), registered with its kernel
(`dsv4_jax.kernels.compressor`: the reference is ~10 small launches per compressor, two compressors per CSA layer).

    entries, j0, n_done, kv_state, score_state = compress_step(kv_new, sc_new, kv_state, score_state, ape, norm_w,
        start, n_new, inv_freq, ratio=4, rotate=False, eps=1e-6, quant_sim=True, fresh=False)
    entries, kv_state, score_state = compressor_decode(kv_new_bc, sc_new_bc, kv_state, score_state, ape, norm_w,
        start, n_new, inv_freq, ratio=4, rotate=False, eps=1e-6, opts=opts)

Shapes: `b` rows, `k` new tokens, `m` the ratio, `coff` 2 for CSA (ratio 4: an entry pools 2m slots, the first
half of the previous block's channels and the second half of its own) else 1, `Dc` the entry width (`norm_w`), `C =
coff * Dc` the projection width. kv_new / sc_new: the fp32 projections `[b, k, C]` (the score without `ape`);
block state `[b, coff*m, C]` fp32 (the score with `ape`); ape `[m, C]` fp32; norm_w `[Dc]` bf16; start / n_new
`[b]` int32; inv_freq `[rope/2]` (RoPE on the entry's last `rope` dims). State and parameters may be `LayerSlice`s
(the kernel reads them from their stacks). Entries: bf16 after RMSNorm, RoPE at the block's first position, then FP8
simulation of the non-RoPE dims (main, `rotate=False`) or Hadamard + FP4 simulation (the indexer's, `rotate=True`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import quant
from dsv4_jax.layer_view import materialize
from dsv4_jax.ops import registry
from dsv4_jax.rounding import to_bf16

__all__ = ["compress_step", "compressor_decode", "block_ids", "NEG"]

F32 = jnp.float32
# An invalid slot's score. Finite (unlike -inf): a block with no valid slot pools to zeros instead of NaN;
# exp(NEG - max) is exactly 0 wherever one slot is valid, as with -inf.
NEG = float(np.finfo(np.float32).min)


def _take_rows(x_bnc, i_bm):
    """`x[b, i[b, m]]` for indices already in range."""
    return jnp.take_along_axis(x_bnc, i_bm[..., None], axis=1)


def _finish(e_bjc, pos_bj, norm_w, inv_freq, *, rotate: bool, eps: float, quant_sim: bool):
    """bf16 round, RMSNorm, RoPE at the block's first position, then FP8 (main) or Hadamard + FP4 (indexer)."""
    from dsv4_jax import nn  # nn's linears call ops: imported here, not at module load

    e = nn.rms_norm(to_bf16(e_bjc), norm_w, eps)
    e = nn.rope_tail(e, pos_bj, inv_freq)
    if rotate:
        e = nn.hadamard_128(e)
        return quant.fp4_sim(e, 32) if quant_sim else e
    if quant_sim:
        nope = e.shape[-1] - 2 * len(inv_freq)
        e = jnp.concatenate([quant.fp8_sim(e[..., :nope], 64), e[..., nope:]], axis=-1)
    return e


def block_ids(start_b, n_new_b, ratio: int, nblk: int):
    """`(j0 [b], n_done [b])` of a step's `nblk` blocks: block q is entry `j0 + q`, complete for `q < n_done`."""
    r = start_b % ratio
    return (start_b - r) // ratio, jnp.clip((r + n_new_b) // ratio, 0, nblk)


def compress_step(kv_new, sc_new, kv_state, score_state, ape, norm_w, start_b, n_new_b, inv_freq, *, ratio: int,
                  rotate: bool, eps: float, quant_sim: bool, fresh: bool):  # fmt: skip
    """`k` new tokens per row at positions `start..start+k-1` (the first `n_new` real) on top of the block state
    (ignored if `fresh`: the sequence starts here) -> `(entries [b, nblk, Dc], j0 [b], n_done [b], kv_state,
    score_state)`: block q of the step is entry `j0 + q`, complete for `q < n_done`; the states are None when
    `kv_state` is.

    The tokens of the blocks this step touches are laid out aligned to block boundaries (CSA: preceded by the
    previous block, whose first half the first entry pools): older slots from the state, newer from the step, slots
    outside `[0, start + n_new)` invalid (kv 0, score `NEG`)."""
    m = ratio
    coff = 2 if m == 4 else 1
    dc = norm_w.shape[-1]
    b, k, _ = kv_new.shape
    ape, norm_w = materialize(ape), materialize(norm_w)
    pos = start_b[:, None] + jnp.arange(k)
    sc_new = sc_new + ape[pos % m]
    r = start_b % m
    nblk = -(-((0 if fresh else m - 1) + k) // m)
    pre = (coff - 1) * m
    a = jnp.arange(pre + nblk * m)[None, :]
    base = (start_b - r)[:, None] - pre  # position of aligned slot 0
    apos = base + a
    end = (start_b + n_new_b)[:, None]
    valid = (apos >= 0) & (apos < end)
    i_new = a - pre - r[:, None]
    kv_a = _take_rows(kv_new, jnp.clip(i_new, 0, k - 1))
    sc_a = _take_rows(sc_new, jnp.clip(i_new, 0, k - 1))
    if not fresh:
        kv_old, sc_old = materialize(kv_state), materialize(score_state)
        i_old = jnp.broadcast_to(jnp.clip(a, 0, coff * m - 1), apos.shape)
        kv_a = jnp.where((i_new >= 0)[..., None], kv_a, _take_rows(kv_old, i_old))
        sc_a = jnp.where((i_new >= 0)[..., None], sc_a, _take_rows(sc_old, i_old))
    kv_a = jnp.where(valid[..., None], kv_a, 0.0)
    sc_a = jnp.where(valid[..., None], sc_a, NEG)
    kv_b = kv_a.reshape(b, -1, m, coff * dc)
    sc_b = sc_a.reshape(b, -1, m, coff * dc)
    if coff == 2:  # entry q pools the first half of block q - 1 and the second half of block q
        kv_b = jnp.concatenate([kv_b[:, :-1, :, :dc], kv_b[:, 1:, :, dc:]], axis=2)
        sc_b = jnp.concatenate([sc_b[:, :-1, :, :dc], sc_b[:, 1:, :, dc:]], axis=2)
    e = jnp.sum(kv_b * jax.nn.softmax(sc_b, axis=2), axis=2)  # per-channel softmax pooling over the slots
    e = _finish(e, (start_b - r)[:, None] + jnp.arange(nblk) * m, norm_w, inv_freq, rotate=rotate, eps=eps,
                quant_sim=quant_sim)  # fmt: skip
    kv_s = sc_s = None
    if kv_state is not None:
        # The state after the step: the open block of position start + n_new (and, CSA, the block before it).
        e_end = start_b + n_new_b
        srow = (e_end - e_end % m)[:, None] - pre + jnp.arange(coff * m)[None, :]
        si = jnp.clip(srow - base, 0, kv_a.shape[1] - 1)
        ok = ((srow >= 0) & (srow < e_end[:, None]))[..., None]
        kv_s = jnp.where(ok, _take_rows(kv_a, si), 0.0)
        sc_s = jnp.where(ok, _take_rows(sc_a, si), NEG)
    return e, *block_ids(start_b, n_new_b, m, nblk), kv_s, sc_s


# ---- decode: one new token per row ----------------------------------------------------------------------------


def _decode_reference(kv_new_bc, sc_new_bc, kv_state, score_state, ape, norm_w, start_b, n_new_b, inv_freq, *,
                      ratio: int, rotate: bool, eps: float, quant_sim: bool = True):  # fmt: skip
    """(entries `[b, 1, Dc]` bf16, kv_state, score_state `[b, coff*m, C]` fp32) of one new token per row (its
    projections `[b, C]`): `compress_step` with k = 1 on top of the state."""
    e, _, _, kv_s, sc_s = compress_step(kv_new_bc[:, None], sc_new_bc[:, None], kv_state, score_state, ape, norm_w,
                                        start_b, n_new_b, inv_freq, ratio=ratio, rotate=rotate, eps=eps,
                                        quant_sim=quant_sim, fresh=False)  # fmt: skip
    return e, kv_s, sc_s


def _decode_supports(kv_new_bc, sc_new_bc, kv_state, score_state, ape, norm_w, start_b, n_new_b, inv_freq, *,
                     ratio: int, rotate: bool, eps: float, quant_sim: bool = True) -> str | None:  # fmt: skip
    if not quant_sim:
        return "quant_sim=False (the kernel implements the FP8/FP4-simulated entries)"
    dc, rope = norm_w.shape[-1], 2 * len(inv_freq)
    if ratio not in (4, 128) or dc not in (128, 512) or (rotate and dc != 128) or rope % 64 or rope > dc:
        return f"ratio {ratio}, entry width {dc}, rope {rope}, rotate={rotate}: the kernel has ratios 4 and 128, " \
               "entries of 512 (or 128 rotated), RoPE dims a multiple of 64"  # fmt: skip
    coff = 2 if ratio == 4 else 1
    if kv_new_bc.shape[-1] != coff * dc or tuple(kv_state.shape[-2:]) != (coff * ratio, coff * dc):
        return f"projections {tuple(kv_new_bc.shape)} / state {tuple(kv_state.shape)} for ratio {ratio}, width {dc}"
    return None


# Validated on an H200 (tests/test_compressor_gpu.py, 2026-12-01): "auto" takes it.
compressor_decode = registry.register(
    "compressor_decode",
    reference=_decode_reference,
    kernel="dsv4_jax.kernels.compressor:compressor_decode",
    supports=_decode_supports,
    validated=True,
)
