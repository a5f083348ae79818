"""dsv4_jax_ffi: the compiled XLA FFI CUDA kernels of dsv4_jax (SM90 FP8 GEMMs, small-M FP8 and MXFP4 GEMVs, FP8
activation quantization).

`registrations()` maps handler names to FFI capsules; `instantiations()` lists the AOT-compiled GEMM shapes.
Registration with JAX and the Python wrappers live in `dsv4_jax.kernels.ffi_ops`.
"""

from dsv4_jax_ffi._ffi import (
    cuda_archs,
    deepgemm_source,
    fp4_ksplit,
    fp4_segment_rows,
    fp4_uses_bit_conversion,
    fp4_variant,
    fp4_variants,
    gemv_ksplit,
    gemv_max_m,
    instantiations,
    registrations,
    xla_ffi_api_version,
)

__all__ = [
    "registrations",
    "instantiations",
    "cuda_archs",
    "deepgemm_source",
    "xla_ffi_api_version",
    "gemv_max_m",
    "gemv_ksplit",
    "fp4_segment_rows",
    "fp4_ksplit",
    "fp4_uses_bit_conversion",
    "fp4_variant",
    "fp4_variants",
]
