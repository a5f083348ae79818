"""Expert parallelism: the routed experts of a layer split over the mesh's `expert` axis, inside a `jax.shard_map`.

The tokens (and everything but the routed experts: attention, dense linears, the shared expert, the head) are
replicated over the `expert` axis, so `dispatch` is the same on every device and needs no collective: each device
keeps the dispatched rows of its own experts (their rows are contiguous, the rows being sorted by expert), runs the
grouped-experts op on them (reference or kernel: `ops.moe_experts`, which sees only local experts), and a `psum`
over the axis brings every row back. Every row has exactly one nonzero contributor, so the psum is exact and the
combine that follows adds the same bf16 rows in the same order as on one device: expert parallelism gives the same
bits as one device.

Communication per MoE layer: the rows `[T * k, d]` in bf16 (48 KB per token at V4-Flash widths), once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv4_jax import ops
from dsv4_jax.layer_view import LayerSlice

__all__ = ["expert_axis_size", "routed_experts"]

AXIS = "expert"


def expert_axis_size() -> int:
    """The size of the `expert` axis of the mesh in context (`jax.set_mesh`), 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[AXIS])


def _spec(w) -> object:
    """The in_spec of an expert weight: its expert axis (axis 0, or 1 on a layer stack) over the mesh axis."""
    if isinstance(w, LayerSlice):
        return LayerSlice(P(None, AXIS), P())
    return P(AXIS)


def routed_experts(x_rd, expert_r, weight_r, group_sizes_e, weights, limit: float, opts):
    """`ops.moe_experts` with the experts split over the mesh's `expert` axis (same contract: rows sorted by
    expert, bf16 `[R, d]` out)."""
    n = expert_axis_size()
    n_experts = group_sizes_e.shape[0]
    if n_experts % n:
        raise ValueError(f"{n_experts} routed experts do not split over an expert axis of {n} devices")
    local = n_experts // n

    def shard(x, expert, weight, group_sizes, ws):
        lo = jax.lax.axis_index(AXIS) * local
        gs = jax.lax.dynamic_slice_in_dim(group_sizes, lo, local)
        first = jnp.sum(jnp.where(jnp.arange(n_experts) < lo, group_sizes, 0))  # this device's first row
        # Rows of this device's experts first (a roll: they are contiguous), others marked -1 (zeros).
        x, expert, weight = (jnp.roll(a, -first, axis=0) for a in (x, expert, weight))
        mine = (expert >= lo) & (expert < lo + local)
        y = ops.moe_experts(x, jnp.where(mine, expert - lo, -1), weight, gs, ws, limit, opts=opts)
        return jax.lax.psum(jnp.roll(y, first, axis=0), AXIS)

    specs = (P(), P(), P(), P(), tuple(_spec(w) for w in weights))
    return jax.shard_map(shard, in_specs=specs, out_specs=P(), check_vma=False)(
        x_rd, expert_r, weight_r, group_sizes_e, tuple(weights)
    )
