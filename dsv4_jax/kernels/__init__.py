"""Kernel switch: which ops run as FFI custom calls instead of their pure-JAX reference twins.

`select(op, backend)` returns the kernel implementation of `op` or None (use the reference):
  * backend "reference": always None.
  * backend "auto": the kernel when the FFI extension imports, the device is CUDA SM90 and the op is not killed.
  * backend "ffi": the kernel, or a clear error saying why it is unavailable.
Kill switch: `DSV4_JAX_DISABLE_KERNELS=all` or a comma list of op names (e.g. `fp8_gemm,act_quant`).
"""

from __future__ import annotations

import os

__all__ = ["select", "disabled_ops", "available", "prepare_params"]


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


def prepare_params(state):
    """The FP8 linears' UE8M0 block scales decoded once to the FP32 powers of two the SM90 GEMMs read (same shape,
    K-major), instead of on every call. FP8 weight bytes, MXFP4 experts and their 1x32 scales stay as stored. The
    reference computes the same with either form (`quant.e8m0_to_f32` passes FP32 through). Returns a new
    `ModelState`; the scales grow from 1 to 4 bytes per 128x128 block (<0.01% of the weights)."""
    import jax.numpy as jnp
    from flax import nnx

    from dsv4_jax import quant
    from dsv4_jax.model import ModelState

    flat = dict(nnx.to_flat_state(state.params))
    out = []
    for path, var in flat.items():
        weight = flat.get(path[:-1] + ("weight",))
        if path[-1] == "scale" and weight is not None and weight.dtype == jnp.float8_e4m3fn:
            var = var.replace(quant.e8m0_to_f32(var[...]))
        out.append((path, var))
    return ModelState(state.graphdef, nnx.from_flat_state(out), state.config)
