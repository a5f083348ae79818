"""GPU tests of the sparse-MLA decode kernel (`dsv4_sparse_mla_decode`, `ffi/csrc/sparse_mla_kernels.cu`) against
its reference twin `ops.sparse_decode` (`sparse_attention` over the packed rows).

Inputs: KV rows as the model stores them (NoPE FP8-simulated in tiles of 64, RoPE bf16, packed to 584 bytes with
`kv_format.pack_kv`), a window ring, a stack of compressed entries read at a nonzero layer, this step's completed
entries, index lists with -1 padding, a tail tile, keys that name no row, and a row with no key at all; outputs
poisoned before every call (0xFF = NaN) so that an element the kernel does not write shows.

Bounds and why. The kernel's products are the reference's (bf16 x bf16, exact in fp32); what differs is the order
of the fp32 sums and, with split-KV, the running max against which each probability is rounded to bf16 before the
PV product (the reference rounds against its running max over all tiles; a split against its own). Both are
rounding noise of the same size as the reference's own bf16 rounding of p, so: the kernel's error against a float64
softmax (unrounded probabilities) is at most 1.5x the reference's own plus one bf16 ulp of the output scale, and
kernel vs reference rel-RMS <= 4e-3 (2^-8, one bf16 ulp relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import poison, rel_rms

from dsv4_jax import kv_format, ops, quant
from dsv4_jax.layer_view import LayerSlice

pytestmark = pytest.mark.gpu

D, ROPE, W = 512, 64, 128


def _rows(rng, shape, spread: float = 1.0):
    """Packed KV rows `[..., 584]` and their bf16 values (NoPE FP8-simulated in tiles of 64)."""
    x = rng.normal(size=(*shape, D)) * spread
    x *= np.exp(rng.normal(size=(*shape, 1)) * 0.5)  # rows of different norms
    v = jnp.asarray(x, jnp.float32)
    v = jnp.concatenate([quant.fp8_sim(v[..., : D - ROPE], 64), v[..., D - ROPE :]], axis=-1).astype(jnp.bfloat16)
    return kv_format.pack_kv(v, ROPE), v


def _case(seed: int, batch: int, heads: int, cap: int, n_extra: int, n_comp: int):
    rng = np.random.default_rng(seed)
    ring, _ = _rows(rng, (batch, W))
    stack, _ = _rows(rng, (3, batch, cap))
    extra, _ = _rows(rng, (batch, n_extra)) if n_extra else (None, None)
    win = np.tile(np.arange(W), (batch, 1))
    win[:, rng.integers(0, W) :] = -1  # a partly filled window
    comp = rng.integers(W, W + cap + n_extra + 2, size=(batch, n_comp))  # the last 2 name no row: zero keys
    comp[:, rng.integers(n_comp // 2, n_comp) :] = -1
    idx = np.concatenate([win, comp], axis=1).astype(np.int32)
    if batch > 1:
        idx[1] = -1  # a row with no key: output 0
    q = jnp.asarray(rng.normal(size=(batch, heads, D)) * 2, jnp.bfloat16)
    sink = jnp.asarray(rng.normal(size=(heads,)), jnp.float32)
    entries = LayerSlice(stack, jnp.int32(1))
    return q, ring, entries, extra, jnp.asarray(idx), sink


def _exact(q, ring, entries, extra, idx, sink, scale, q_per_src: int = 1):
    """float64 softmax with the sink over the gathered rows, probabilities unrounded; query row r reads the sources
    of batch row r // q_per_src."""
    rows = [np.asarray(kv_format.unpack_kv(ring, ROPE), np.float64)]
    rows.append(np.asarray(kv_format.unpack_kv(entries.get(), ROPE), np.float64))
    if extra is not None:
        rows.append(np.asarray(kv_format.unpack_kv(extra, ROPE), np.float64))
    kv = np.concatenate(rows, axis=1)  # [b, W + cap + n, D]
    idx, q = np.asarray(idx), np.asarray(q, np.float64)
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        sel = idx[b][idx[b] >= 0]
        k = np.where((sel < kv.shape[1])[:, None], kv[b // q_per_src, np.minimum(sel, kv.shape[1] - 1)], 0.0)
        z = q[b] @ k.T * scale  # [h, n]
        m = np.maximum(z.max(-1, initial=-np.inf), np.asarray(sink, np.float64))
        p = np.exp(z - m[:, None])
        out[b] = p @ k / (p.sum(-1) + np.exp(np.asarray(sink, np.float64) - m))[:, None]
    return out


@pytest.mark.parametrize(
    "batch,heads,cap,n_extra,n_comp",
    [(1, 64, 300, 1, 512), (3, 64, 40, 2, 37), (2, 128, 900, 0, 640), (70, 64, 64, 1, 20), (1, 64, 9000, 1, 8000)],
)
def test_sparse_decode_kernel_vs_reference(ffi, batch, heads, cap, n_extra, n_comp):
    """Flash (64 heads) and Pro (128) decode shapes; many splits (batch 1, up to 128 tiles: HCA at 1M tokens) and
    one split (batch 70)."""
    scale = D**-0.5
    args = _case(batch * 7 + cap, batch, heads, cap, n_extra, n_comp)
    ref = np.asarray(ops.sparse_decode(*args, scale=scale, rope_dim=ROPE, opts=ops.Opts(backend="reference")))
    poison()
    got = np.asarray(ops.sparse_decode(*args, scale=scale, rope_dim=ROPE, opts=ops.Opts(backend="ffi")))
    assert np.isfinite(got).all()
    exact = _exact(*args, scale)
    err_ref, err_got = rel_rms(ref, exact), rel_rms(got, exact)
    assert err_got <= 1.5 * err_ref + 2**-9, (err_got, err_ref)
    assert rel_rms(got, ref) <= 2**-8
    if batch > 1:  # row 1 has no key: the reference's 0 / inf
        assert not got[1].any() and not ref[1].any()


@pytest.mark.parametrize(
    "heads,kernel", [(32, None), (64, "16"), (64, "mma64"), (128, "mma64"), (64, "wgmma4"), (128, "wgmma4")]
)
def test_sparse_decode_kernel_variants(ffi, monkeypatch, heads, kernel):
    """The kernels the default (wgmma, heads a multiple of 64) is measured against: the 16-head kernel (heads not a
    multiple of 64: 32 heads; or forced by DSV4_FFI_SPARSE_DECODE=16, read at launch), the 64-head mma.sync kernel
    (DSV4_FFI_SPARSE_DECODE=mma64) and the wgmma kernel's four-warpgroup form (=wgmma4); the bounds above, and each
    forced kernel within rounding of the default's output."""
    scale = D**-0.5
    args = _case(11 + heads, 3, heads, 300, 1, 512)
    ref = np.asarray(ops.sparse_decode(*args, scale=scale, rope_dim=ROPE, opts=ops.Opts(backend="reference")))
    if kernel:
        poison()
        default = np.asarray(ops.sparse_decode(*args, scale=scale, rope_dim=ROPE, opts=ops.Opts(backend="ffi")))
        monkeypatch.setenv("DSV4_FFI_SPARSE_DECODE", kernel)
    poison()
    got = np.asarray(ops.sparse_decode(*args, scale=scale, rope_dim=ROPE, opts=ops.Opts(backend="ffi")))
    exact = _exact(*args, scale)
    assert rel_rms(got, exact) <= 1.5 * rel_rms(ref, exact) + 2**-9
    assert rel_rms(got, ref) <= 2**-8
    assert not got[1].any()  # row 1 has no key
    if kernel:
        assert rel_rms(default, got) <= 2**-8
        assert not default[1].any()


def test_sparse_decode_kernel_plain_entries_and_no_extra(ffi):
    """Entries as one layer's plain array (no stack, no layer index) and no completed entries; a window-only layer
    (no entries at all)."""
    q, ring, entries, _, idx, sink = _case(5, 2, 64, 100, 0, 64)
    for ent in (entries.get(), None):
        ix = idx if ent is not None else jnp.where(idx < W, idx, -1)
        kw = dict(scale=0.05, rope_dim=ROPE)
        ref = np.asarray(ops.sparse_decode(q, ring, ent, None, ix, sink, **kw, opts=ops.Opts(backend="reference")))
        poison()
        got = np.asarray(ops.sparse_decode(q, ring, ent, None, ix, sink, **kw, opts=ops.Opts(backend="ffi")))
        assert rel_rms(got, ref) <= 2**-8


def test_sparse_decode_refuses_bad_shapes(ffi):
    q, ring, entries, extra, idx, sink = _case(1, 1, 64, 16, 1, 8)
    with pytest.raises(Exception, match="multiple of 16"):
        jax.block_until_ready(ffi.sparse_mla_decode(q[:, :8], ring, entries.stack, 1, extra, idx, sink[:8], 0.1))
    with pytest.raises(Exception, match="ring"):
        jax.block_until_ready(ffi.sparse_mla_decode(q, ring[..., :576], None, None, None, idx, sink, 0.1))


@pytest.mark.parametrize("batch,k,cap,n_extra,n_comp", [(2, 37, 40, 3, 37), (1, 1030, 300, 20, 512)])
def test_sparse_prefill_kernel_vs_reference(ffi, batch, k, cap, n_extra, n_comp):
    """`ops.sparse_prefill`: k queries per batch row, each with its own index list, over that row's sources (the
    kernel's `q_per_src` row mapping); 1,030 queries cross the kernel side's 1,024-query chunks (the last chunk
    padded with keyless queries). Bounds as for decode; every query checked against the float64 softmax."""
    scale = D**-0.5
    rng = np.random.default_rng(batch * 11 + k)
    _, ring, entries, extra, _, sink = _case(batch * 13 + k, batch, 64, cap, n_extra, 8)
    n_src = W + cap + n_extra
    win = np.where(rng.random((batch, k, W)) < 0.8, rng.integers(0, W, (batch, k, W)), -1)
    comp = rng.integers(W, n_src + 2, size=(batch, k, n_comp))  # the last 2 name no row: zero keys
    comp[rng.random((batch, k, n_comp)) < 0.3] = -1
    idx = jnp.asarray(np.concatenate([win, comp], axis=-1).astype(np.int32))
    if batch > 1:
        idx = idx.at[1, 3].set(-1)  # a query with no key: output 0
    q = jnp.asarray(rng.normal(size=(batch, k, 64, D)) * 2, jnp.bfloat16)
    kw = dict(scale=scale, rope_dim=ROPE)
    ref = np.asarray(ops.sparse_prefill(q, ring, entries, extra, idx, sink, **kw, opts=ops.Opts(backend="reference")))
    poison()
    got = np.asarray(ops.sparse_prefill(q, ring, entries, extra, idx, sink, **kw, opts=ops.Opts(backend="ffi")))
    assert got.shape == ref.shape == (batch, k, 64, D) and np.isfinite(got).all()
    exact = _exact(q.reshape(batch * k, 64, D), ring, entries, extra, idx.reshape(batch * k, -1), sink, scale,
                   q_per_src=k).reshape(got.shape)  # fmt: skip
    err_ref, err_got = rel_rms(ref, exact), rel_rms(got, exact)
    assert err_got <= 1.5 * err_ref + 2**-9, (err_got, err_ref)
    assert rel_rms(got, ref) <= 2**-8
    if batch > 1:
        assert not got[1, 3].any() and not ref[1, 3].any()


def test_sparse_prefill_refuses_mismatched_sources(ffi):
    """Query rows that are not a multiple of the sources' rows: a clear error naming the ring."""
    q, ring, _, _, idx, sink = _case(2, 2, 64, 16, 0, 8)
    with pytest.raises(Exception, match="multiple of its sources"):
        jax.block_until_ready(ffi.sparse_mla_decode(q[:1].repeat(3, 0), ring, None, None, None, idx[:1].repeat(3, 0),
                                                    sink, 0.1))  # fmt: skip
