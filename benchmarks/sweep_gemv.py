"""Launch sweep of the register-fed tensor-core GEMV at decode sizes (the DSV4_FFI_GEMV_KSPLIT and DSV4_FFI_GEMV_WARPS
tuning knobs), with the timing and ceilings of bench_kernels.py.

    python benchmarks/sweep_gemv.py
"""

from __future__ import annotations

import os

import jax
from bench_kernels import Rows, bench_grouped, ceilings

from dsv4_jax.kernels import ffi_ops


def main():
    mod, why = ffi_ops.load()
    assert mod is not None, why
    bw, fp8, _ = ceilings()
    print(f"device {jax.devices()[0].device_kind}: copy {bw / 1e12:.2f} TB/s")
    rows = Rows()
    configs = [("8", "auto"), ("8", "8"), ("4", "1"), ("4", "2"), ("4", "4")]
    os.environ["DSV4_FFI_GEMV"] = "mma"
    for rep in range(3):  # interleaved repeats: run-to-run noise at T = 1 is about +-2 us
        for warps, ksplit in configs:
            os.environ["DSV4_FFI_GEMV_WARPS"] = warps
            os.environ["DSV4_FFI_GEMV_KSPLIT"] = "" if ksplit == "auto" else ksplit
            label = f" [mma, {warps} warps, ksplit {ksplit}, rep {rep}]"
            for t, n, k in ((1, 2048, 4096), (1, 4096, 2048), (2, 2048, 4096)):
                bench_grouped(rows, t, n, k, bw, fp8, "gemv", baseline=False, label=label)


if __name__ == "__main__":
    main()
