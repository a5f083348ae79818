"""The checkpoint layout as one declarative table, and the validation of a checkpoint against it.

`param_table(cfg)` lists every model parameter (path, shape, dtype, logical axes, the native tensors it is made of,
the on-disk dtype and shape, and the streaming group it belongs to). It is derived from `dsv4_jax.model.abstract`,
so the model definition is the single source of truth; the only rules added here are how the released format stores
each in-memory dtype (`DISK_DTYPE`) and how routed experts are split (one tensor per expert on disk, stacked in
memory). `validate` compares a checkpoint's tensor headers with that table and returns every problem at once:
missing, unexpected, wrong shape, wrong dtype, and config/tensor disagreements explained in words.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

from dsv4_jax.checkpoint.safetensors_io import DTYPES, SafetensorsError, TensorInfo, read_into, read_tensor
from dsv4_jax.config import Config

__all__ = ["CheckpointError", "ParamSpec", "DISK_DTYPE", "param_table", "tensor_table", "without_mtp", "validate",
           "check", "read_param", "check_values", "group_of", "assemble", "layer_sharding", "per_layer"]  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message lists every problem found."""


# In-memory dtype -> released on-disk dtype. Two conversions, both lossless: packed e2m1 bytes are I8 on disk and
# viewed as uint8; the hash-routing table tid2eid is I64 on disk and int32 in memory (values < n_routed_experts).
DISK_DTYPE: dict[np.dtype, str] = {
    np.dtype(np.uint8): "I8",
    np.dtype(np.int32): "I64",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e8m0fnu): "F8_E8M0",
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: tuple  # released parameter path, e.g. ("layers", 3, "ffn", "experts", "w1", "weight")
    shape: tuple[int, ...]  # in-memory shape of this layer's parameter (experts stacked on axis 0)
    dtype: np.dtype  # in-memory dtype
    axes: tuple  # logical axes
    names: tuple[str, ...]  # native tensor name(s): one per expert for routed experts
    disk_dtype: str  # safetensors dtype of each native tensor
    disk_shape: tuple[int, ...]  # shape of each native tensor
    group: str  # streaming group: "globals", "layer_{i}" or "mtp_{i}"
    state_path: tuple = ()  # where it lives in `ModelState.params` (main layers: a stack over layers, see
    layer_index: int | None = None  # `dsv4_jax.model.layer_groups`) and its index on the stack's axis 0, or None

    @property
    def stacked(self) -> bool:
        return len(self.names) > 1 or (len(self.path) >= 3 and self.path[-3] == "experts")

    @property
    def key(self) -> str:
        """The dotted parameter name (the native name, experts without their index)."""
        return ".".join(str(p) for p in self.path)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def without_mtp(cfg: Config) -> Config:
    """The same model without its MTP layer(s)."""
    if not cfg.n_mtp_layers:
        return cfg
    return cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[: cfg.n_layers])


def group_of(path: tuple) -> str:
    if path[0] == "layers":
        return f"layer_{path[1]}"
    if path[0] == "mtp":
        return f"mtp_{path[1]}"
    return "globals"


def _native(path: tuple, expert: int | None = None) -> str:
    parts = [str(p) for p in path]
    if expert is not None:
        parts.insert(parts.index("experts") + 1, str(expert))
    return ".".join(parts)


@functools.lru_cache(maxsize=16)
def param_table(cfg: Config) -> tuple[ParamSpec, ...]:
    """Every parameter of `cfg`'s model, in a stable order (globals, layers, MTP; within a block, by path)."""
    from flax import nnx

    from dsv4_jax.model import abstract, layer_groups

    groups = layer_groups(cfg)
    specs = []
    for state_path, var in nnx.to_flat_state(abstract(cfg).params):
        dtype = np.dtype(var.dtype)
        axes = tuple(var.get_metadata().get("logical_axes", (None,) * len(var.shape)))
        if state_path[0] == "groups":  # ("groups", g, u, *rest) stacked over the group's repeats
            grp, u, rest = groups[state_path[1]], state_path[2], state_path[3:]
            copies = [(("layers", grp.layer(u, r), *rest), r) for r in range(grp.repeats)]
            shape, axes = tuple(var.shape[1:]), axes[1:]
        else:
            copies, shape = [(state_path, None)], tuple(var.shape)
        for path, r in copies:
            if len(path) >= 3 and path[-3] == "experts":
                names, disk_shape = tuple(_native(path, e) for e in range(shape[0])), shape[1:]
            else:
                names, disk_shape = (_native(path),), shape
            specs.append(ParamSpec(path, shape, dtype, axes, names, DISK_DTYPE[dtype], disk_shape, group_of(path),
                                   state_path, r))  # fmt: skip
    order = {"globals": (0, 0), **{f"layer_{i}": (1, i) for i in range(cfg.n_layers)},
             **{f"mtp_{i}": (2, i) for i in range(cfg.n_mtp_layers)}}  # fmt: skip
    return tuple(sorted(specs, key=lambda s: (order[s.group], s.key)))


def tensor_table(cfg: Config) -> dict[str, tuple[ParamSpec, int | None]]:
    """Native tensor name -> (its ParamSpec, expert index or None)."""
    out = {}
    for spec in param_table(cfg):
        for e, name in enumerate(spec.names):
            out[name] = (spec, e if spec.stacked else None)
    return out


# ---- validation ------------------------------------------------------------------------------------------------

_EXPERT_RE = re.compile(r"^((?:layers|mtp)\.\d+)\.ffn\.experts\.(\d+)\.")
_BLOCK_RE = re.compile(r"^(layers|mtp)\.(\d+)\.")
_FOREIGN_RE = re.compile(r"(^model\.|\.self_attn\.|\.mlp\.|^lm_head\.|\.q_proj\.|\.weight_scale_inv$|^transformer\.)")


def _dropped_mtp(name: str) -> bool:
    """MTP copies of the embedding / head, which the released converter drops (they are shared)."""
    return name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight"))


def _ranges(ids: Iterable[int]) -> str:
    ids = sorted(set(ids))
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}..{x}")
            start = None
    return ",".join(out)


def _compact(names: Iterable[str]) -> list[str]:
    """Names with expert indices folded: `layers.3.ffn.experts.{8..255}.w1.weight`; every name stays represented."""
    folded: dict[str, list[int]] = defaultdict(list)
    plain = []
    for n in names:
        m = re.match(r"^(.*\.experts\.)(\d+)(\..*)$", n)
        if m:
            folded[m[1] + "{}" + m[3]].append(int(m[2]))
        else:
            plain.append(n)
    out = sorted(plain)
    for pat, ids in sorted(folded.items()):
        out.append(pat.replace("{}", "{" + _ranges(ids) + "}") if len(ids) > 1 else pat.replace("{}", str(ids[0])))
    return out


def validate(tensors: dict[str, TensorInfo], cfg: Config, *, mtp: bool | None = None) -> list[str]:
    """Every problem of a checkpoint (tensor headers) against `cfg`, as readable lines; [] if it matches.

    `mtp`: whether the MTP layer is wanted (default: if the config has one). Without it, `mtp.*` tensors are ignored;
    with it, their absence is an error that says how to load without MTP."""
    mtp = bool(cfg.n_mtp_layers) if mtp is None else mtp
    if mtp and not cfg.n_mtp_layers:
        return ["MTP was asked for but the config has num_nextn_predict_layers = 0"]
    model_cfg = cfg if mtp else without_mtp(cfg)
    table = tensor_table(model_cfg)
    problems: list[str] = []

    foreign = [n for n in tensors if _FOREIGN_RE.search(n)]
    if foreign:
        example = sorted(foreign)[0]
        problems.append(
            f"{len(foreign)} tensor names such as {example!r} are not DeepSeek-V4 native names: this is a checkpoint "
            "of another model type or naming (e.g. a HuggingFace export)"
        )

    present = {n for n in tensors if not _dropped_mtp(n) and (mtp or not n.startswith("mtp."))}
    missing = [n for n in table if n not in present]
    unexpected = sorted(n for n in present if n not in table and n not in foreign)

    # Config / tensor disagreements, explained.
    blocks: dict[tuple[str, int], set[str]] = defaultdict(set)
    experts: dict[str, set[int]] = defaultdict(set)
    for n in present:
        if m := _BLOCK_RE.match(n):
            blocks[(m[1], int(m[2]))].add(n[m.end() :])
        if m := _EXPERT_RE.match(n):
            experts[m[1]].add(int(m[2]))
    for prefix, ids in sorted(experts.items()):
        if max(ids) >= cfg.n_routed_experts:
            problems.append(f"{prefix} has routed experts {_ranges(ids)} but the config says n_routed_experts = "
                            f"{cfg.n_routed_experts}")  # fmt: skip
    layer_ids = sorted(i for k, i in blocks if k == "layers")
    if layer_ids and layer_ids[-1] >= cfg.n_layers:
        problems.append(f"the checkpoint has layers {_ranges(layer_ids)} but the config says n_layers = {cfg.n_layers}")
    mtp_ids = sorted(i for k, i in blocks if k == "mtp")
    if mtp and mtp_ids and mtp_ids[-1] >= cfg.n_mtp_layers:
        problems.append(f"the checkpoint has MTP layers {_ranges(mtp_ids)} but the config says "
                        f"num_nextn_predict_layers = {cfg.n_mtp_layers}")  # fmt: skip
    for (kind, i), rel in sorted(blocks.items()):
        if kind != "layers" or i >= cfg.n_layers:
            continue
        ratio, hashed = cfg.compress_ratios[i], cfg.is_hash_layer(i)
        has_comp, has_idx = "attn.compressor.ape" in rel, "attn.indexer.compressor.ape" in rel
        if has_comp and ratio == 0:
            problems.append(f"layers.{i} has a compressor but the config's compress_ratios[{i}] = 0")
        if has_idx and ratio != 4:
            problems.append(f"layers.{i} has an indexer (a ratio-4 layer) but compress_ratios[{i}] = {ratio}")
        if not has_comp and ratio:
            problems.append(f"layers.{i} has no compressor but compress_ratios[{i}] = {ratio}")
        if "ffn.gate.tid2eid" in rel and not hashed:
            problems.append(f"layers.{i} is hash-routed (ffn.gate.tid2eid) but the config says n_hash_layers = "
                            f"{cfg.n_hash_layers}")  # fmt: skip
        if "ffn.gate.bias" in rel and hashed:
            problems.append(f"layers.{i} is bias-routed (ffn.gate.bias) but the config makes it a hash layer "
                            f"(n_hash_layers = {cfg.n_hash_layers})")  # fmt: skip
    expert_dtypes = {tensors[n].dtype for n in present if _EXPERT_RE.match(n) and n.endswith(".weight")}
    want_expert = "I8" if cfg.expert_dtype == "fp4" else "F8_E4M3"
    if expert_dtypes and expert_dtypes != {want_expert}:
        problems.append(f"routed expert weights are {sorted(expert_dtypes)} but the config says expert_dtype = "
                        f"{cfg.expert_dtype!r} ({want_expert})")  # fmt: skip

    if missing:
        mtp_missing = [n for n in missing if n.startswith("mtp.")]
        rest = [n for n in missing if not n.startswith("mtp.")]
        if rest:
            problems.append(f"{len(rest)} missing tensors: " + ", ".join(_compact(rest)))
        if mtp_missing:
            all_mtp = len(mtp_missing) == sum(1 for n in table if n.startswith("mtp."))
            problems.append(
                (f"the MTP layer is missing (all {len(mtp_missing)} mtp.* tensors)" if all_mtp else
                 f"{len(mtp_missing)} missing MTP tensors: " + ", ".join(_compact(mtp_missing)))
                + "; MTP was asked for: load with mtp=False (CLI: --no-mtp) to use the model without it"
            )  # fmt: skip
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: " + ", ".join(_compact(unexpected)))

    bad = defaultdict(list)
    for n, (spec, _) in table.items():
        info = tensors.get(n)
        if info is None:
            continue
        if info.dtype != spec.disk_dtype:
            bad[f"dtype {info.dtype}, expected {spec.disk_dtype}"].append(f"{n} ({info.file})")
        elif tuple(info.shape) != spec.disk_shape:
            bad[f"shape {list(info.shape)}, expected {list(spec.disk_shape)}"].append(f"{n} ({info.file})")
    for what, names in sorted(bad.items()):
        problems.append(f"{what}: " + ", ".join(_compact(names)))
    return problems


def check(tensors: dict[str, TensorInfo], cfg: Config, *, mtp: bool | None = None, where: str = "") -> None:
    """`validate`, raising one `CheckpointError` listing every problem."""
    problems = validate(tensors, cfg, mtp=mtp)
    if problems:
        head = f"{where}: " if where else ""
        raise CheckpointError(f"{head}checkpoint does not match the config ({len(problems)} problems):\n  - "
                              + "\n  - ".join(problems))  # fmt: skip


# ---- reading ---------------------------------------------------------------------------------------------------


def check_values(info: TensorInfo, arr: np.ndarray, spec: ParamSpec, n_experts: int | None = None) -> None:
    """Content checks that headers cannot catch: NaN scale bytes (0xFF in UE8M0), tid2eid out of range."""
    if spec.disk_dtype == "F8_E8M0":
        nan = np.count_nonzero(arr.view(np.uint8) == 0xFF)
        if nan:
            raise CheckpointError(f"{info.file}: tensor {info.name!r}: {nan} scale bytes are 0xFF (NaN in UE8M0)")
    elif spec.disk_dtype == "I64" and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        top = np.iinfo(np.int32).max if n_experts is None else n_experts - 1
        if lo < 0 or hi > top:
            raise CheckpointError(f"{info.file}: tensor {info.name!r}: expert ids {lo}..{hi} outside [0, {top}] "
                                  f"(n_routed_experts = {n_experts})")  # fmt: skip


def read_param(tensors: dict[str, TensorInfo], spec: ParamSpec, n_experts: int | None = None) -> np.ndarray:
    """One parameter as a fresh numpy array in its in-memory dtype (experts stacked), read tensor by tensor straight
    into the result (one copy in memory; the file is not mapped). Content is checked (`check_values`)."""
    out = np.empty(spec.shape, spec.dtype)
    for e, name in enumerate(spec.names):
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor {name!r}")
        if info.dtype != spec.disk_dtype or tuple(info.shape) != spec.disk_shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} is {info.dtype}{list(info.shape)}, expected "
                                  f"{spec.disk_dtype}{list(spec.disk_shape)}")  # fmt: skip
        dst = out[e] if spec.stacked else out
        try:
            if spec.disk_dtype == "I64":
                raw = read_tensor(info)
                check_values(info, raw, spec, n_experts)
                dst[...] = raw
            else:
                view = dst.view(DTYPES[info.dtype])
                read_into(info, view)
                check_values(info, view, spec)
        except SafetensorsError as err:
            raise CheckpointError(str(err)) from None
    return out


# ---- from per-layer values to the stacked state ------------------------------------------------------------------


def layer_sharding(spec: ParamSpec, state_sharding):
    """The sharding of one layer's copy of a stacked parameter: the stack's sharding without its leading (layers)
    axis, which is never sharded."""
    import jax

    if spec.layer_index is None or not isinstance(state_sharding, jax.sharding.NamedSharding):
        return state_sharding
    return jax.sharding.NamedSharding(state_sharding.mesh, jax.sharding.PartitionSpec(*state_sharding.spec[1:]))


def per_layer(state) -> Iterator[tuple[ParamSpec, object]]:
    """(spec, value) of every parameter of a `ModelState` under its released per-layer name (`spec.path`): one
    layer's copy of a stacked parameter is sliced out of its stack (lazily: one at a time)."""
    from flax import nnx

    flat = dict(nnx.to_flat_state(state.params))
    for spec in param_table(state.config):
        value = flat[spec.state_path].get_value()
        yield spec, (value if spec.layer_index is None else value[spec.layer_index])


def assemble(ab, cfg: Config, values: dict, shardings: dict | None = None):
    """A `ModelState` from per-layer values keyed by released path (`ParamSpec.path`): the copies of a stacked
    parameter are stacked one parameter at a time (at most one stack is held twice), into `shardings[state_path]`
    when given. Raises `CheckpointError` listing every missing or mismatched value."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv4_jax.model import ModelState

    flat = dict(nnx.to_flat_state(ab.params))
    by_state: dict[tuple, list[ParamSpec]] = defaultdict(list)
    problems = []
    for spec in param_table(cfg):
        v = values.get(spec.path)
        if v is None:
            problems.append(f"{spec.key}: not restored")
        elif tuple(v.shape) != spec.shape or np.dtype(v.dtype) != spec.dtype:
            problems.append(f"{spec.key}: {np.dtype(v.dtype).name}{list(v.shape)}, expected {spec.dtype.name}"
                            f"{list(spec.shape)}")  # fmt: skip
        by_state[spec.state_path].append(spec)
    if problems:
        raise CheckpointError("restored parameters do not match the model:\n  " + "\n  ".join(problems))
    out = []
    for path, var in flat.items():
        specs = by_state[path]
        if specs[0].layer_index is None:
            value = values.pop(specs[0].path)
        else:
            parts = [values.pop(s.path) for s in sorted(specs, key=lambda s: s.layer_index)]
            target = None if shardings is None else shardings[path]
            value = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=target)(*parts)
            del parts
        out.append((path, var.replace(value)))
    return ModelState(ab.graphdef, nnx.from_flat_state(out), cfg)
