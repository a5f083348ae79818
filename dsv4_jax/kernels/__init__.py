"""Kernel switch: which ops run as FFI custom calls instead of their pure-JAX reference twins.

`select(op, backend)` returns the kernel implementation of `op` or None (use the reference):
  * backend "reference": always None.
  * backend "auto": the kernel when the FFI extension imports, the device is CUDA SM90 and the op is not killed.
  * backend "ffi": the kernel, or a clear error saying why it is unavailable.
Kill switch: `DSV4_JAX_DISABLE_KERNELS=all` or a comma list of op names (e.g. `fp8_gemm,act_quant`).
"""

from __future__ import annotations

import os

__all__ = ["select", "disabled_ops", "available"]


def disabled_ops() -> set[str]:
    raw = os.environ.get("DSV4_JAX_DISABLE_KERNELS", "")
    return {s.strip() for s in raw.split(",") if s.strip()}


def _registry() -> tuple[dict, str | None]:
    """(op -> kernel callable, reason it is empty). Imported lazily: the extension is optional."""
    try:
        from dsv4_jax.kernels import ffi_ops
    except ImportError as e:
        return {}, f"the dsv4_jax FFI extension is not importable ({e})"
    return ffi_ops.kernels()


def available() -> dict:
    return _registry()[0]


def select(op: str, backend: str):
    if backend == "reference":
        return None
    off = disabled_ops()
    if "all" in off or op in off:
        if backend == "ffi":
            raise RuntimeError(f"kernel {op!r} is disabled by DSV4_JAX_DISABLE_KERNELS but backend='ffi' asks for it")
        return None
    table, why = _registry()
    if op in table:
        return table[op]
    if backend == "ffi":
        raise RuntimeError(f"no FFI kernel for op {op!r}: {why or 'not implemented for this device'}")
    return None
