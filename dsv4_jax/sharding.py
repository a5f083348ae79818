"""Logical-axis sharding: parameters name their axes (`logical_axes` metadata), `ShardingRules` maps names to mesh axes.

    mesh = make_mesh(expert=4, tensor=2)                      # axes ("data", "expert", "tensor")
    shardings = param_shardings(abstract(cfg), mesh)          # NamedSharding per parameter (same tree)
    cfg, state = dsv4_jax.checkpoint.restore.load(path, mesh)  # every leaf restored straight into its sharding

Presets for the expert-parallel meshes (`rules_preset("ep" | "ep-tp")`): `ShardingRules.expert_parallel()` splits
only the routed experts and replicates everything else (data-parallel attention); `expert_tensor_parallel()` also
splits the reference's tensor-parallel dimensions, by default over the same devices as the experts. Several logical
axes may name one mesh axis: a collision is two dimensions of *one* array on the same mesh axis, and no parameter has
both an expert dimension and a head / vocab / group dimension.

Default rules follow the reference's tensor parallelism (spec §5.3: embed/head on the vocab, wq_b and indexer wq_b
on heads, wo_a on groups (rows), wo_b on groups (columns), attn_sink and weights_proj on heads; everything else
replicated) and put routed experts on the `expert` axis. The `data` axis shards activations only.

Block scales carry their weight's axes. A dimension is sharded only if it divides evenly over the mesh axis for the
weight *and* its scale, with whole quantization blocks per shard (so that every shard dequantizes locally);
otherwise that dimension is replicated, and the fallback is reported (`param_shardings(..., report=[])`, and a
logging message).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["ShardingRules", "logical_to_spec", "param_shardings", "shard", "make_mesh", "rules_preset", "AXES",
           "RULE_PRESETS", "TENSOR_PARALLEL_AXES"]  # fmt: skip

log = logging.getLogger(__name__)

AXES = ("data", "expert", "tensor")
MeshAxes = str | tuple[str, ...] | None
# The logical axes the reference splits for tensor parallelism (spec §5.3): the vocabulary (embedding, head, hash
# table), attention heads (wq_b rows, attn_sink), indexer heads (wq_b rows, weights_proj) and the wo groups.
TENSOR_PARALLEL_AXES = ("vocab", "q_heads", "heads", "index_heads", "index_heads_w", "o_groups")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (a name, a tuple of names, or None = replicated)."""

    layers: MeshAxes = None  # the stacking axis of layers of one kind (never sharded: the layer scan walks it)
    vocab: MeshAxes = "tensor"
    embed: MeshAxes = None
    embed_out: MeshAxes = None
    q_lora: MeshAxes = None
    q_heads: MeshAxes = "tensor"
    kv_dim: MeshAxes = None
    kv_proj: MeshAxes = None
    o_groups: MeshAxes = "tensor"
    o_in: MeshAxes = None
    heads: MeshAxes = "tensor"
    index_heads: MeshAxes = "tensor"
    index_heads_w: MeshAxes = "tensor"
    expert: MeshAxes = "expert"
    expert_gate: MeshAxes = None
    expert_ffn: MeshAxes = None
    ffn: MeshAxes = None
    hc_mix: MeshAxes = None
    hc_embed: MeshAxes = None

    @classmethod
    def replicated(cls) -> ShardingRules:
        return cls(**{f.name: None for f in dataclasses.fields(cls)})

    @classmethod
    def expert_parallel(cls, expert: MeshAxes = "expert") -> ShardingRules:
        """Routed experts split over `expert`; every other weight replicated, so attention, the shared expert and
        the head run data-parallel (each device computes them for the rows it holds). On a (data=1, expert=2) mesh:
        half the experts per device plus a full copy of the rest."""
        return dataclasses.replace(cls.replicated(), expert=expert)

    @classmethod
    def expert_tensor_parallel(cls, expert: MeshAxes = "expert", tensor: MeshAxes = "expert") -> ShardingRules:
        """Routed experts over `expert`, and the tensor-parallel dimensions (`TENSOR_PARALLEL_AXES`: vocab, heads,
        indexer heads, wo groups) over `tensor`, by default the same devices: on a (data=1, expert=2) mesh each
        device holds half the experts and half of every head-split weight. For a mesh with its own tensor axis pass
        e.g. `tensor="tensor"` or `tensor=("expert", "tensor")`."""
        return dataclasses.replace(cls.expert_parallel(expert), **dict.fromkeys(TENSOR_PARALLEL_AXES, tensor))

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        try:
            v = getattr(self, logical)
        except AttributeError:
            known = [f.name for f in dataclasses.fields(self)]
            raise ValueError(f"unknown logical axis {logical!r}; known: {known}") from None
        return () if v is None else ((v,) if isinstance(v, str) else tuple(v))


def logical_to_spec(axes: tuple, rules: ShardingRules | None = None) -> PartitionSpec:
    """PartitionSpec of logical `axes`; raises if two dimensions would use the same mesh axis (a collision)."""
    rules = ShardingRules() if rules is None else rules
    used: dict[str, str] = {}
    out = []
    for a in axes:
        m = rules.mesh_axes(a)
        for x in m:
            if x in used:
                raise ValueError(f"sharding rules map logical axes {used[x]!r} and {a!r} of {axes} to the same mesh "
                                 f"axis {x!r}")  # fmt: skip
            used[x] = a
        out.append(None if not m else (m[0] if len(m) == 1 else m))
    return PartitionSpec(*out)


def _axis_size(mesh, names) -> int:
    if names is None:
        return 1
    names = (names,) if isinstance(names, str) else names
    return int(np.prod([mesh.shape[n] for n in names], dtype=np.int64))


def _fit(spec: PartitionSpec, shapes: list[tuple], mesh, where: str, report: list) -> PartitionSpec:
    """Drops (replicates) each dim of `spec` that does not divide evenly for every array in `shapes` (a weight and
    its scale: [w, s] with whole blocks per shard), or names mesh axes the mesh lacks."""
    out = list(spec) + [None] * (len(shapes[0]) - len(spec))
    for d, names in enumerate(out):
        if names is None:
            continue
        tup = (names,) if isinstance(names, str) else tuple(names)
        missing = [n for n in tup if n not in mesh.shape]
        if missing:
            report.append(f"{where}: dim {d} replicated: mesh has no axis {missing}")
            out[d] = None
            continue
        n = _axis_size(mesh, tup)
        if n == 1:
            continue
        dims = [s[d] for s in shapes]
        ok = all(x % n == 0 for x in dims)
        if ok and len(dims) == 2:  # weight + scale: whole blocks per shard
            ok = dims[0] % dims[1] == 0
        if not ok:
            report.append(f"{where}: dim {d} (sizes {dims}) replicated: not divisible over {names!r} ({n} devices)")
            out[d] = None
    return PartitionSpec(*out)


def param_shardings(abstract_state, mesh: Mesh, rules: ShardingRules | None = None, report: list | None = None):
    """NamedSharding for every parameter of a `ModelState` (or a params `nnx.State`), as an `nnx.State` tree of the
    same structure. Rules collisions anywhere raise one error listing all; non-divisible dims fall back to
    replication and are appended to `report` (and logged)."""
    from flax import nnx

    params = getattr(abstract_state, "params", abstract_state)
    rules = ShardingRules() if rules is None else rules
    report = [] if report is None else report
    flat = dict(nnx.to_flat_state(params))
    problems, specs = [], {}
    for path, var in flat.items():
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        try:
            specs[path] = logical_to_spec(tuple(axes), rules)
        except ValueError as e:
            problems.append(f"{'.'.join(map(str, path))}: {e}")
    if problems:
        raise ValueError("sharding rules collide:\n  " + "\n  ".join(problems))
    out = []
    for path, var in flat.items():
        where = ".".join(map(str, path))
        shapes = [tuple(var.shape)]
        if path[-1] in ("weight", "scale") and path[:-1] + ("scale",) in flat and path[:-1] + ("weight",) in flat:
            shapes = [tuple(flat[path[:-1] + ("weight",)].shape), tuple(flat[path[:-1] + ("scale",)].shape)]
            if path[-1] == "scale":
                where = None  # report once, on the weight
        spec = _fit(specs[path], shapes, mesh, where or "", report if where else [])
        out.append((path, NamedSharding(mesh, spec)))
    if report:
        log.info("sharding: %d dims replicated instead of sharded:\n  %s", len(report), "\n  ".join(report))
    return nnx.from_flat_state(out)


# name -> rules: the presets the CLI and scripts accept (`--rules`).
RULE_PRESETS = {
    "default": ShardingRules,
    "ep": ShardingRules.expert_parallel,
    "ep-tp": ShardingRules.expert_tensor_parallel,
    "replicated": ShardingRules.replicated,
}


def rules_preset(name: str) -> ShardingRules:
    """The `ShardingRules` of a preset name: "ep" (experts split, the rest replicated), "ep-tp" (experts and the
    tensor-parallel dims split over the expert axis), "default" (experts on "expert", tensor-parallel dims on
    "tensor") or "replicated"."""
    try:
        return RULE_PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown sharding rules preset {name!r}; known: {sorted(RULE_PRESETS)}") from None


def make_mesh(data: int = 1, expert: int | None = None, tensor: int = 1, devices=None) -> Mesh:
    """A ("data", "expert", "tensor") mesh; `expert` defaults to the devices left over. The same as
    `dsv4_jax.parallel.mesh.make_mesh` (which orders the devices of several processes), kept for its signature."""
    from dsv4_jax.parallel.mesh import make_mesh as _make_mesh

    return _make_mesh(expert, data, tensor, devices=devices)


def shard(x: jax.Array, axes: tuple, rules: ShardingRules | None = None) -> jax.Array:
    """Constrains `x` to the sharding of its logical `axes` when a mesh is set (`jax.set_mesh`); otherwise returns
    `x` unchanged, so model code runs with or without a mesh. Dims not divisible over their mesh axis stay
    replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = _fit(logical_to_spec(axes, rules), [tuple(x.shape)], mesh, "", [])
    explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
