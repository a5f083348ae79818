"""Parameters made ready for the kernels once, at load, instead of on every call.

    state = dsv4_jax.prepare_params(state, donate=True)   # after `load` / `init_random`, before `generate`

* The FP8 linears' UE8M0 block scales become the FP32 powers of two the SM90 GEMMs read (same shape; 4 bytes instead
  of 1 per 128x128 block, <0.01% of the weights).
* The MXFP4 routed experts' gate and up weights (w1, w3) go to the slab layout of the SM90 decode kernel
  (`quant.fp4_to_slabs`: the same bytes in another order, scales as uint32 words) where that kernel will run:
  `expert_layout="auto"`. The down weight (w2) stays as stored: on it the layout measured no faster at 1 and 8 tokens
  and 8% slower at 32 (BENCHMARKS.md, twelfth session); the kernels read either layout for every projection.

The reference computes the same from either form (`quant.e8m0_to_f32` passes FP32 through; the experts' reference
reads slabs back to the stored order), so a prepared state works with every backend.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax import quant
from dsv4_jax.model import ModelState

__all__ = ["prepare_params", "EXPERT_LAYOUTS", "slabs_by_default"]

EXPERT_LAYOUTS = ("auto", "slabs", "stored")
_SLAB_PATHS = (("w1",), ("w3",))  # the routed experts' gate and up projections, as the last step of a path


def slabs_by_default() -> bool:
    """`expert_layout="auto"`: the slab layout if every device is an SM90 GPU, where the MXFP4 decode kernel that reads
    it runs (the wgb kernel, unless DSV4_FFI_FP4_VARIANT names another)."""
    variant = os.environ.get("DSV4_FFI_FP4_VARIANT", "wgb")
    devices = jax.devices()
    return variant == "wgb" and all(getattr(d, "compute_capability", "").startswith("9.") for d in devices)


def _sharding_of(x):
    """A concrete array's sharding (kept by the conversion); None for a tracer (under `jax.eval_shape`)."""
    return None if isinstance(x, jax.core.Tracer) else x.sharding


def _weight_stack_slabs(w):
    """`quant.fp4_slab_bytes` of a stack `[L, ...]` one layer at a time into the (donated) buffer: a layer's copy in
    flight, not the whole stack's."""

    def body(i, w):
        layer = jax.lax.dynamic_index_in_dim(w, i, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(w, quant.fp4_slab_bytes(layer), i, 0)

    return jax.lax.fori_loop(0, w.shape[0], body, w)


def _to_slabs(w, s, donate: bool):
    """(w, s) of one routed-expert projection in the slab layout, keeping their shardings."""
    scales = jax.jit(quant.fp4_slab_words, out_shardings=_sharding_of(s))(s)
    fn = _weight_stack_slabs if donate and w.ndim == 4 else quant.fp4_slab_bytes
    weight = jax.jit(fn, out_shardings=_sharding_of(w), donate_argnums=(0,) if donate else ())(w)
    return weight, scales


def prepare_params(state: ModelState, *, expert_layout: str = "auto", donate: bool = False) -> ModelState:
    """A new `ModelState` with the FP8 linears' scales decoded to FP32 and the MXFP4 routed experts' gate/up weights in
    `expert_layout`: "slabs" (`quant.fp4_to_slabs`), "stored" (as loaded) or "auto" (slabs where `slabs_by_default()`).
    FP8 weight bytes stay as stored; MXFP4 bytes are permuted, never converted.

    `donate=True` lets the experts' new arrays reuse the old ones' memory (a full-size model cannot hold two copies of
    its experts): the input state's MXFP4 expert arrays are deleted, use the returned state. With `donate=False` the
    input stays valid and the slab layout costs a copy of the experts.
    """
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"prepare_params: expert_layout={expert_layout!r}; expected one of {EXPERT_LAYOUTS}")
    slabs = expert_layout == "slabs" or (expert_layout == "auto" and slabs_by_default())
    flat = dict(nnx.to_flat_state(state.params))
    new = {}
    for path, var in flat.items():
        weight = flat.get(path[:-1] + ("weight",))
        value = var.get_value()
        if path[-1] == "scale" and weight is not None and weight.get_value().dtype == jnp.float8_e4m3fn:
            new[path] = var.replace(quant.e8m0_to_f32(value))
        elif slabs and path[-1] == "weight" and path[-2:-1] in _SLAB_PATHS and value.dtype == jnp.uint8:
            scale = flat[path[:-1] + ("scale",)]
            if scale.get_value().dtype == jnp.uint32:
                continue  # already in slabs
            n, k = value.shape[-2], 2 * value.shape[-1]
            if n % quant.FP4_SLAB_ROWS or k % 128:
                continue  # a shape the kernels do not take either: left as stored
            w, s = _to_slabs(value, scale.get_value(), donate)
            new[path], new[path[:-1] + ("scale",)] = var.replace(w), scale.replace(s)
    out = [(path, new.get(path, var)) for path, var in flat.items()]
    return ModelState(state.graphdef, nnx.from_flat_state(out), state.config)
