"""The device mesh: axes ("data", "expert", "tensor") over every device of every process.

    mesh = make_mesh(expert=2)                  # 2 x H200: routed experts split in two
    mesh = make_mesh(expert=8)                  # 8 x H200 (V4-Pro), or 2 hosts x 4 devices under jax.distributed
    mesh = make_mesh(**parse_mesh("expert=4,tensor=2"))

After `jax.distributed.initialize` (`dsv4_jax.parallel.distributed.initialize`) `jax.devices()` lists the devices
of all processes, and one mesh covers them all. Within a process devices share fast links (NVLink); between
processes the links are slower, so the processes split the axes that need the least bandwidth first: "data" (no
traffic in the forward pass), then "expert" (two all-to-alls per MoE layer), "tensor" last (an all-reduce per
linear). Each process's devices then form a contiguous block of the mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from dsv4_jax.sharding import AXES

__all__ = ["make_mesh", "parse_mesh", "mesh_shape", "describe_mesh"]

# The order in which the processes (the slow, outer network) take over mesh axes: least communication first.
_OUTER_ORDER = ("data", "expert", "tensor")


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"mesh axis {name}={value!r} must be a positive integer")
    return int(value)


def _outer_split(sizes: dict[str, int], n_proc: int) -> dict[str, int]:
    """How many processes each axis spans: `n_proc` factored over the axes in `_OUTER_ORDER`, each taking the
    largest share that divides both its size and what is left. Always complete when the sizes' product is a multiple
    of `n_proc`: each prime power of `n_proc` divides that product, so the axes together hold it."""
    out, left = {}, n_proc
    for name in _OUTER_ORDER:
        share = math.gcd(sizes[name], left)
        out[name] = share
        left //= share
    assert left == 1, (sizes, n_proc)
    return out


def make_mesh(expert: int | None = None, data: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A ("data", "expert", "tensor") `Mesh` over `devices` (default: `jax.devices()`, every process's devices).

    Args:
      expert: devices the routed experts are split over; None = all devices left after `data` and `tensor`.
      data: replicas of the model, each serving its own batch rows.
      tensor: devices that split the tensor-parallel dimensions when the rules put them on "tensor" (see
        `ShardingRules.expert_tensor_parallel` to put them on "expert" instead).
      devices: the devices to use, all of them (default: `jax.devices()`).

    Raises:
      ValueError: a non-positive size, a shape whose product is not the number of devices, or processes with
        unequal numbers of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, tensor = _check_size("data", data), _check_size("tensor", tensor)
    if expert is None:
        if len(devices) % (data * tensor):
            raise ValueError(f"{len(devices)} devices do not divide into data={data} x tensor={tensor}")
        expert = len(devices) // (data * tensor)
    expert = _check_size("expert", expert)
    sizes = {"data": data, "expert": expert, "tensor": tensor}
    if data * expert * tensor != len(devices):
        raise ValueError(f"mesh data={data} x expert={expert} x tensor={tensor} = {data * expert * tensor} devices, "
                         f"but there are {len(devices)} (devices: {_kinds(devices)})")  # fmt: skip
    shape = tuple(sizes[a] for a in AXES)
    per_proc: dict[int, int] = {}
    for d in devices:
        per_proc[d.process_index] = per_proc.get(d.process_index, 0) + 1
    if len(per_proc) == 1:
        return Mesh(mesh_utils.create_device_mesh(shape, devices), AXES)
    if len(set(per_proc.values())) != 1:
        raise ValueError(f"processes hold different numbers of devices {per_proc}: a mesh needs equal blocks")
    outer = _outer_split(sizes, len(per_proc))
    inner = tuple(sizes[a] // outer[a] for a in AXES)
    arr = mesh_utils.create_hybrid_device_mesh(inner, tuple(outer[a] for a in AXES), devices, process_is_granule=True)
    return Mesh(arr, AXES)


def _kinds(devices) -> str:
    kinds: dict[str, int] = {}
    for d in devices:
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in kinds.items())


def parse_mesh(text: str) -> dict[str, int]:
    """`"expert=2,tensor=1"` -> `{"expert": 2, "tensor": 1}` (axes from `AXES`; each at most once)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise ValueError(f"mesh {text!r}: expected AXIS=N[,AXIS=N] with AXIS one of {AXES}, got {part!r}")
        if name in out:
            raise ValueError(f"mesh {text!r}: axis {name!r} given twice")
        try:
            out[name] = _check_size(name, int(value))
        except ValueError:
            raise ValueError(f"mesh {text!r}: {name}={value.strip()!r} must be a positive integer") from None
    if not out:
        raise ValueError(f"mesh {text!r}: expected AXIS=N[,AXIS=N], e.g. expert=2")
    return out


def mesh_shape(mesh_or_sizes) -> dict[str, int]:
    """`{"data": d, "expert": e, "tensor": t}` of a `Mesh`, an `AbstractMesh` or a partial dict (missing axes 1)."""
    sizes = dict(getattr(mesh_or_sizes, "shape", mesh_or_sizes))
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {AXES}")
    return {a: _check_size(a, sizes.get(a, 1)) for a in AXES}


def describe_mesh(mesh: Mesh) -> str:
    """One line: the shape and, per process, which devices it holds."""
    shape = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
    procs: dict[int, list[int]] = {}
    for d in mesh.devices.flat:
        procs.setdefault(d.process_index, []).append(d.id)
    where = "; ".join(f"process {p}: devices {ids}" for p, ids in sorted(procs.items()))
    return f"mesh {shape} ({_kinds(list(mesh.devices.flat))}); {where}"
