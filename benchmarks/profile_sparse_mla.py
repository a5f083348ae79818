"""Sparse-MLA decode kernel launches for a profiler (each case twice: skip the first launch of each):

  * decode: 128 query rows, each over its own 128-row window and 512 entries picked at random from 16,384 (a 64K
    context), the cache in DRAM;
  * prefill: 1,024 queries of one sequence (8K rows, 2K compressed entries: L2-resident), each over a 128-row causal
    window and 512 random entries.

    ncu --kernel-name regex:decode_wgmma --launch-skip 1 --launch-count 1 --set full \\
        python benchmarks/profile_sparse_mla.py prefill

The bytes are random (small e4m3 values and scales): the kernels' work does not depend on them.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kernels import ffi_ops

ROW_BYTES, WINDOW, TOP = 584, 128, 512


def case(rng, name: str):
    """(ring, entries, idx, q rows) of one profiled case."""
    if name == "decode":
        b, w, cap, nq = 128, WINDOW, 16384, 128
        idx = np.concatenate([np.tile(np.arange(w), (nq, 1)), w + rng.integers(0, cap, (nq, TOP))], 1)
    else:
        b, w, cap, nq = 1, 8192, 2048, 1024
        pos = rng.integers(WINDOW, w, nq)[:, None]
        idx = np.concatenate([pos - np.arange(WINDOW)[None], w + rng.integers(0, cap, (nq, TOP))], 1)
    ring = jnp.asarray(rng.integers(0, 120, size=(b, w, ROW_BYTES), dtype=np.uint8))
    entries = jnp.asarray(rng.integers(0, 120, size=(b, cap, ROW_BYTES), dtype=np.uint8))
    return ring, entries, jnp.asarray(idx, jnp.int32), nq


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="?", default="decode,prefill")
    args = ap.parse_args()
    mod, why = ffi_ops.load()
    assert mod is not None, why
    rng = np.random.default_rng(0)
    run = jax.jit(lambda q, r, e, i, s: ffi_ops.sparse_mla_decode(q, r, e, None, None, i, s, 0.04))
    for name in args.cases.split(","):
        ring, entries, idx, nq = case(rng, name)
        q = jnp.asarray(rng.normal(size=(nq, 64, 512)), jnp.bfloat16)
        sink = jnp.zeros((64,), jnp.float32)
        for _ in range(2):
            out = run(q, ring, entries, idx, sink).block_until_ready()
        print(name, float(jnp.abs(out.astype(jnp.float32)).mean()))


if __name__ == "__main__":
    main()
