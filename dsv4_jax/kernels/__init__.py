"""The FFI kernels of the optional extension `dsv4_jax_ffi` (`ffi/`, BUILD.md): loading and device checks here, the
JAX wrappers in `ffi_ops`, the kernel side of each op in `gemm` and `moe_fp8`.

Kernels are plain functions of arrays. They never import model code and know nothing of `Opts`: which op runs a
kernel, and the fallback to the pure-JAX reference, is decided in one place, `dsv4_jax.ops.registry`.
"""

from __future__ import annotations

import functools

import jax

__all__ = ["unavailable", "default_device_is_gpu"]


@functools.cache
def _unavailable() -> str | None:
    from dsv4_jax.kernels import ffi_ops

    mod, why = ffi_ops.load()
    if mod is None:
        return why
    return ffi_ops.device_problem()


def unavailable() -> str | None:
    """Why no kernel can run in this process (extension not importable, default device not a CUDA SM90 GPU), or
    None. Cached: the answer does not change within a process."""
    return _unavailable()


def default_device_is_gpu() -> bool:
    try:
        return jax.devices()[0].platform == "gpu"
    except RuntimeError:
        return False
