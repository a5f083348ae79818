"""Launch sweep of the register-fed tensor-core GEMV at decode sizes (the DSV4_FFI_GEMV_KSPLIT and DSV4_FFI_GEMV_WARPS
tuning knobs), next to the streaming variant, with the timing and ceilings of bench_kernels.py.

    python benchmarks/sweep_gemv.py
"""

from __future__ import annotations

import os

import jax
from bench_kernels import Rows, bench_dense, bench_grouped, ceilings

from dsv4_jax.kernels import ffi_ops


def main():
    mod, why = ffi_ops.load()
    assert mod is not None, why
    bw, fp8, _ = ceilings()
    print(f"device {jax.devices()[0].device_kind}: copy {bw / 1e12:.2f} TB/s")
    rows = Rows()
    mma = [("mma", w, k, "") for w, k in (("8", "auto"), ("8", "8"), ("4", "2"), ("4", "4"))]
    for impl, warps, ksplit, ring in [("stream", "8", "auto", "200"), ("stream", "8", "auto", "96")] + mma:
        os.environ["DSV4_FFI_GEMV"] = impl
        os.environ["DSV4_FFI_GEMV_WARPS"] = warps
        os.environ["DSV4_FFI_GEMV_KSPLIT"] = "" if ksplit == "auto" else ksplit
        os.environ["DSV4_FFI_GEMV_RING_KB"] = ring
        label = f" [stream, ring {ring} KB]" if impl == "stream" else f" [mma, {warps} warps, ksplit {ksplit}]"
        for t in (1, 2, 8):
            bench_grouped(rows, t, 2048, 4096, bw, fp8, "gemv", baseline=False, label=label)
        bench_grouped(rows, 1, 4096, 2048, bw, fp8, "gemv", baseline=False, label=label)
        bench_dense(rows, 1, 4096, 4096, bw, fp8, label=label)
        bench_dense(rows, 8, 32768, 1024, bw, fp8, label=label)


if __name__ == "__main__":
    main()
