"""MXFP4 routed experts at prefill sizes (issue #14, item 2): one V4-Flash MoE layer's experts (256 experts of
4096 -> 2048 -> 4096, top-6 random routing, rows sorted by expert as `moe.dispatch` leaves them) through the two
kernel routes of `dsv4_jax.kernels.moe_fp4`, timed on the GPU:

  * fused: our one-pass kernel (`ffi_ops.fp4_grouped`: gate and up in one launch, SwiGLU + requantization, down),
    on the weights as stored and in the slab layout `prepare_params` gives gate/up on SM90;
  * widen: the layer's MXFP4 weights widened to FP8 blocks (`quant.fp4_to_fp8_blocks`), then the m-grouped
    contiguous DeepGEMM GEMMs of the FP8 experts; also its two parts alone (the widening; the GEMMs on weights widened
    beforehand = the landed FP8-expert path on the same shape);
  * gemv: the decode kernels (each expert's weights read once per 8 of its rows).

TFLOP/s count the valid rows' FLOPs (6 * rows * 2048 * 4096), against the dense FP8 rates measured in the same run
(XLA's FP8 dot; DeepGEMM's dense GEMM at M=8192). Where the routes cross is what sets `moe_fp4.GROUPED_MIN_ROWS`.

    python benchmarks/bench_fp4_prefill.py [--tokens 512,2048,8192] [--routes fused,slabs,widen,gemms,gemv]
        [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from bench_kernels import bench_dense_gemm, ceilings, ffi_env, fp4_weight, result_row, timed

from dsv4_jax import quant
from dsv4_jax.kernels import ffi_ops, moe_fp4, moe_fp8

E, D, I, TOPK = 256, 4096, 2048, 6  # V4-Flash routed experts
LIMIT = 10.0
ROUTES = {  # --routes name: what the row says
    "fused": "fused",
    "slabs": "fused, gate/up in slabs",
    "widen": "grouped (widen + GEMMs)",
    "gemms": "  GEMMs alone (FP8-expert path)",
    "gemv": "gemv",
}


def layer(key):
    ks = jax.random.split(key, 3)
    return (*fp4_weight(ks[0], (E, I, D)), *fp4_weight(ks[1], (E, I, D)), *fp4_weight(ks[2], (E, D, I)))


def dispatched(key, tokens: int):
    """Rows sorted by expert: (x [R, D] bf16, expert [R], weight [R], group_sizes [E])."""
    k1, k2, k3 = jax.random.split(key, 3)
    idx = np.asarray(jnp.argsort(jax.random.uniform(k1, (tokens, E)), axis=-1)[:, :TOPK]).reshape(-1)
    order = np.argsort(idx, kind="stable")
    tok = np.repeat(np.arange(tokens), TOPK)[order]
    x = (jax.random.normal(k2, (tokens, D), jnp.float32) * (32.0 / D**0.5)).astype(jnp.bfloat16)[jnp.asarray(tok)]
    w = jax.random.uniform(k3, (len(tok),), minval=0.05, maxval=1.0)
    gs = np.bincount(idx, minlength=E).astype(np.int32)
    return x, jnp.asarray(idx[order].astype(np.int32)), w, jnp.asarray(gs)


def route(min_rows: str, prefill: str = "fused"):
    """The kernel side jitted under DSV4_FFI_FP4_GROUPED_MIN_ROWS and DSV4_FFI_FP4_PREFILL (read when traced)."""
    fn = jax.jit(lambda x, e, w, gs, ws: moe_fp4.routed_experts(x, e, w, gs, ws, LIMIT))

    def run(*args):
        with ffi_env("DSV4_FFI_FP4_GROUPED_MIN_ROWS", min_rows), ffi_env("DSV4_FFI_FP4_PREFILL", prefill):
            return fn(*args)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--routes", default=",".join(ROUTES), help="the routes timed (device time: gemv is slow at 8K)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    routes = args.routes.split(",")
    if unknown := set(routes) - set(ROUTES):
        ap.error(f"--routes: unknown {sorted(unknown)}; known {list(ROUTES)}")
    mod, why = ffi_ops.load()
    assert mod is not None, why
    bw, fp8, bf16 = ceilings()
    print(f"copy {bw / 1e12:.2f} TB/s, XLA FP8 dot {fp8 / 1e12:.0f} TFLOP/s, bf16 {bf16 / 1e12:.0f} TFLOP/s")
    rows = []
    bench_dense_gemm(rows, 8192, 4096, 4096, bw, fp8)
    dense = rows[-1]["tflops"] * 1e12
    ws = layer(jax.random.key(0))
    slabs = (*quant.fp4_to_slabs(*ws[:2]), *quant.fp4_to_slabs(*ws[2:4]), *ws[4:])
    fp4_bytes = sum(a.nbytes for a in ws)
    widen = jax.jit(moe_fp4.widen_experts)
    t_widen = timed(widen, ws, reps=4)
    wide = widen(ws)
    wide_bytes = sum(a.nbytes for a in wide)
    rows.append(result_row("widen MXFP4 -> FP8 blocks (one layer)", f"E={E}", t_widen, float("nan"), 0,
                           fp4_bytes + wide_bytes, bw, fp8))  # fmt: skip
    gemms = jax.jit(lambda x, e, w, gs, wd: moe_fp8.grouped(x, e, w, gs, wd, LIMIT))
    for tokens in (int(v) for v in args.tokens.split(",")):
        x, ex, w, gs = dispatched(jax.random.key(tokens), tokens)
        r = x.shape[0]
        flops = 6 * r * I * D
        shape = f"T={tokens} rows={r}"
        runs = {  # name: (function, weights, repetitions)
            "fused": (route("1"), ws, 3),
            "slabs": (route("1"), slabs, 3),
            "widen": (route("1", "widen"), ws, 3),
            "gemms": (gemms, wide, 3),
            "gemv": (route("0"), ws, 2 if tokens > 2048 else 4),
        }
        t = {name: timed(fn, x, ex, w, gs, wts, reps=reps) for name, (fn, wts, reps) in runs.items() if name in routes}
        for name, v in t.items():
            rows.append(result_row(f"fp4 experts {ROUTES[name]}", shape, v, float("nan"), flops, fp4_bytes, bw, fp8))
        said = [f"{ROUTES[name].strip()} {v * 1e3:.2f} ms = {flops / v / 1e12:.0f} TFLOP/s "
                f"({100 * flops / v / dense:.0f}% of DeepGEMM dense)" for name, v in t.items()]  # fmt: skip
        print(f"  {shape}: " + "; ".join(said) + f"; widen alone {t_widen * 1e3:.2f} ms")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind, commit=commit,
                copy_tbs=bw / 1e12, xla_fp8_tflops=fp8 / 1e12, deepgemm_dense_tflops=dense / 1e12,
                xla_flags=os.environ.get("XLA_FLAGS", ""))  # fmt: skip
    print(json.dumps(meta))
    print("| op | shape | time µs | TFLOP/s | % FP8 ceiling | % copy BW |\n|---|---|---|---|---|---|")
    for r in rows:
        nums = (f"{r['us']:.1f}", f"{r['tflops']:.0f}", f"{r['pct_fp8']:.0f}", f"{r['pct_bw']:.0f}")
        cells = (r["op"], r["shape"], *nums)
        print("| " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
