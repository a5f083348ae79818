"""Sparse-MLA decode kernel launches for a profiler (each case twice: skip the first launch of each):

  * decode: 128 query rows, each over its own 128-row window and 512 entries picked at random from 16,384 (a 64K
    context), the cache in DRAM;
  * prefill: 1,024 queries of one sequence (8K rows, 2K compressed entries: L2-resident), each over a 128-row causal
    window and 512 random entries.

    ncu --kernel-name regex:decode_wgmma --launch-skip 1 --launch-count 1 --set full \\
        python benchmarks/profile_sparse_mla.py prefill

The bytes are random (small e4m3 values and scales): the kernels' work does not depend on them.

With `--time`, each case is timed instead under each kernel DSV4_FFI_SPARSE_DECODE names (read at every launch, so
one process and one executable compare them; `bench_kernels.timed`, kernel + combine):

    python benchmarks/profile_sparse_mla.py --time --kernels mma64,wgmma,wgmma4
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from bench_kernels import timed

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
    ap.add_argument("--time", action="store_true", help="time each case under each of --kernels")
    ap.add_argument("--kernels", default="mma64,wgmma,wgmma4", help="DSV4_FFI_SPARSE_DECODE values (with --time)")
    args = ap.parse_args()
    mod, why = ffi_ops.load()
    assert mod is not None, why
    rng = np.random.default_rng(0)
    run = jax.jit(lambda q, r, e, i, s: ffi_ops.sparse_mla_decode(q, r, e, None, None, i, s, 0.04))
    for name in args.cases.split(","):
        ring, entries, idx, nq = case(rng, name)
        q = jnp.asarray(rng.normal(size=(nq, 64, 512)), jnp.bfloat16)
        sink = jnp.zeros((64,), jnp.float32)
        if not args.time:
            for _ in range(2):
                out = run(q, ring, entries, idx, sink).block_until_ready()
            print(name, float(jnp.abs(out.astype(jnp.float32)).mean()))
            continue
        flops = 4 * nq * 64 * 512 * idx.shape[1]  # QK^T and PV over every listed key
        outs = {}
        for kernel in args.kernels.split(","):
            os.environ["DSV4_FFI_SPARSE_DECODE"] = kernel
            t = min(timed(run, q, ring, entries, idx, sink, reps=10) for _ in range(3))
            outs[kernel] = np.asarray(run(q, ring, entries, idx, sink), np.float32)
            diff = np.abs(outs[kernel] - next(iter(outs.values()))).max()
            print(
                f"{name} {nq} queries x {idx.shape[1]} keys, {kernel}: {t * 1e6:.1f} us = {flops / t / 1e12:.0f} "
                f"TFLOP/s; max |diff| vs the first kernel {diff:.3g}"
            )


if __name__ == "__main__":
    main()
