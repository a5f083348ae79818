"""A stacked layer's decode-size linears on the GPU, per Flash shape: the dense FP8 layer GEMV
(`ffi_ops.fp8_gemv_layer`) at 1..64 rows, beyond 8 rows on every route (`DSV4_FFI_GEMV_LAYER`: "gemm", quantised
once then DeepGEMM's GEMM on the layer in place; "wide", quantised once then passes of 16 or 32 rows; "passes", the
fused GEMV per 8 rows), and the grouped `wo_a` (`ffi_ops.dequant_bf16_gemv`,
`DSV4_FFI_DEQUANT_GEMV`: the tensor-core kernel up to 32 rows, the CUDA-core one up to 8). Microseconds per call and
the share of the copy bandwidth (measured in the same process) on the weight bytes.

Each executable makes one call per layer of an 8-layer stack (a different layer each time, as the layer scan does),
so the weights of one call are not in L2 from the previous one. Timed as the GPU's kernel time under the profiler
(`bench_kernels.device_us`; the wide route's quantisation kernel included): the wall-clock time per executable of
the first run measured the host's dispatch instead for these 5-50 us problems (BENCHMARKS.md).

Usage (GPU, the extension importable): `python benchmarks/bench_gemv_layer.py [--rows 1,8,16,32,64] [--ksplits 4]
[--markdown F]`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import subprocess

import jax
import jax.numpy as jnp
from bench_kernels import DECODE_LINEARS, ceilings, device_us, ffi_env

from dsv4_jax.kernels import ffi_ops

LAYERS = 8
WO_A = (8, 1024, 4096)  # Flash's grouped wo_a: groups, rows per group, K


def random_stack(key, n: int, k: int):
    """An e4m3 weight stack `[LAYERS, n, k]` of finite random bytes and unit scales `[LAYERS, n/128, k/128]`."""
    magnitude = jax.random.randint(key, (LAYERS, n, k), 0, 0x7F, jnp.uint8)  # 0x7F is NaN
    sign = jax.random.bits(jax.random.fold_in(key, 1), (LAYERS, n, k), jnp.uint8) & 0x80
    w = jax.lax.bitcast_convert_type(magnitude | sign, jnp.float8_e4m3fn)
    return w, jnp.ones((LAYERS, -(-n // 128), k // 128), jnp.float32)


def per_layer(f):
    """One executable calling f(x, w, s, layer) for every layer of the stack."""
    return jax.jit(lambda x, w, s: [f(x, w, s, jnp.int32(i)) for i in range(LAYERS)])


def time_under(env: dict[str, str], f, *args) -> float:
    """Seconds per call of f traced, compiled and timed with the extension switches `env` set (some are read when
    tracing, some at launch)."""
    with contextlib.ExitStack() as stack:
        for name, value in env.items():
            stack.enter_context(ffi_env(name, value))
        return device_us(per_layer(f), *args) * 1e-6 / LAYERS


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,16,32,64")
    ap.add_argument("--markdown", default="")
    ap.add_argument("--ksplits", default="",
                    help="also time the wide route and wo_a's tensor-core kernel with DSV4_FFI_GEMV_KSPLIT at "
                         "these values")  # fmt: skip
    ap.add_argument("--dense", action="store_true",
                    help="also time DeepGEMM's dense GEMM (`ffi_ops.fp8_linear`) beyond 8 rows on each layer as its "
                         "own array (no slice copy): what a GEMM reading the stack in place would cost")  # fmt: skip
    ap.add_argument("--shapes", default="", help="only these N x K, e.g. 32768x1024,4096x8192 (default: every one)")
    ap.add_argument("--no-wo-a", action="store_true", help="skip the grouped wo_a")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")] if args.shapes else DECODE_LINEARS
    rows_list = [int(r) for r in args.rows.split(",")]
    if ffi_ops.load()[0] is None:  # registers the extension's handlers
        raise SystemExit(ffi_ops.load()[1])
    bw, _, _ = ceilings()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"{datetime.date.today()}, {jax.devices()[0].device_kind}, commit {commit}, copy {bw / 1e9:.0f} GB/s",
        "",
        "| linear (N x K) | rows | route | us per call | % of copy on the weight bytes |",
        "|---|---|---|---|---|",
    ]

    def row(name, m, route, t, nbytes):
        lines.append(f"| {name} | {m} | {route} | {t * 1e6:.1f} | {100 * nbytes / t / bw:.0f}% |")
        print(lines[-1], flush=True)

    key = jax.random.key(0)
    for n, k in shapes:
        w, s = random_stack(jax.random.fold_in(key, n + k), n, k)
        for m in rows_list:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32).astype(jnp.bfloat16)
            for route in ("fused",) if m <= ffi_ops.GEMV_MAX_M else ffi_ops.GEMV_LAYER_ROUTES:
                env = {} if route == "fused" else {"DSV4_FFI_GEMV_LAYER": route}
                t = time_under(env, ffi_ops.fp8_gemv_layer, x, w, s)
                row(f"{n} x {k}", m, route, t, n * k)
                for ks in args.ksplits.split(",") if route == "wide" and args.ksplits else ():
                    t = time_under({**env, "DSV4_FFI_GEMV_KSPLIT": ks}, ffi_ops.fp8_gemv_layer, x, w, s)
                    row(f"{n} x {k}", m, f"wide, K split {ks}", t, n * k)
            block_m = ffi_ops.dense_block_m(m)
            if args.dense and m > ffi_ops.GEMV_MAX_M and ffi_ops.instantiated("dense", n, k, 1, block_m):
                layers = [(w[i], s[i]) for i in range(LAYERS)]  # separate arrays: each call streams its own
                dense = jax.jit(lambda x, ls: [ffi_ops.fp8_linear(x, wi, si) for wi, si in ls])
                t = device_us(dense, x, layers) * 1e-6 / LAYERS
                row(f"{n} x {k}", m, "DeepGEMM dense", t, n * k)
        del w, s
    g, rpg, k = WO_A
    w, s = random_stack(jax.random.fold_in(key, 7), g * rpg, k)
    for m in [] if args.no_wo_a else rows_list:
        x = jax.random.normal(jax.random.fold_in(key, m), (m, g, k), jnp.float32).astype(jnp.bfloat16)
        for impl in ("mma", "cuda"):
            if m > (ffi_ops.DEQUANT_GEMV_MAX_M if impl == "mma" else ffi_ops.DEQUANT_GEMV_CUDA_MAX_M):
                continue
            t = time_under({"DSV4_FFI_DEQUANT_GEMV": impl}, ffi_ops.dequant_bf16_gemv, x, w, s)
            row(f"wo_a {g * rpg} x {k} ({g} groups)", m, impl, t, g * rpg * k)
            for ks in args.ksplits.split(",") if impl == "mma" and args.ksplits else ():
                t = time_under({"DSV4_FFI_DEQUANT_GEMV": impl, "DSV4_FFI_GEMV_KSPLIT": ks}, ffi_ops.dequant_bf16_gemv,
                               x, w, s)  # fmt: skip
                row(f"wo_a {g * rpg} x {k} ({g} groups)", m, f"mma, K split {ks}", t, g * rpg * k)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
