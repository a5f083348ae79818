"""One decode-sized routed-expert GEMV (T tokens x top-6 of 256 Flash experts), launched a few times: a target for
`ncu --kernel-name regex:gemv` (the benchmark's many-calls executables would give the profiler hundreds of launches).

    ncu --clock-control none --kernel-name regex:gemv --launch-skip 2 --launch-count 1 \\
        python benchmarks/profile_decode_gemv.py --tokens 1 --impl mma
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

from dsv4_jax import quant
from dsv4_jax.kernels import ffi_ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--impl", choices=("mma", "cuda"), default="mma")
    ap.add_argument("--launches", type=int, default=4)
    args = ap.parse_args()
    os.environ["DSV4_FFI_GEMV"] = args.impl
    mod, why = ffi_ops.load()
    assert mod is not None, why
    e, topk, t = 256, 6, args.tokens
    key = jax.random.key(0)
    w, s = quant.quantize_fp8_weight(jax.random.normal(key, (e, args.n, args.k), jnp.float32) * args.k**-0.5)
    s = ffi_ops.sm90_weight_scales(s)
    x = jax.random.normal(jax.random.fold_in(key, 1), (t, args.k), jnp.float32).astype(jnp.bfloat16)
    q, sfa = ffi_ops.act_quant_rows(x)
    f = jax.jit(lambda q, sfa, w, s, tok, grp: ffi_ops.fp8_gemv(q, sfa, w, s, rows=tok, groups=grp))
    tok = jnp.arange(t * topk, dtype=jnp.int32) // topk
    for i in range(args.launches):
        grp = jax.random.permutation(jax.random.fold_in(key, 10 + i), e)[: t * topk].astype(jnp.int32)
        jax.block_until_ready(f(q, sfa, w, s, tok, grp))
    print("done", args)


if __name__ == "__main__":
    main()
