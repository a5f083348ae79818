"""`load(path, mesh=None, rules=None)` -> (Config, ModelState) from a converted Orbax folder or a released folder.

Each parameter is restored straight into its target sharding: Orbax reads only the shards a device owns from a
sharded `ShapeDtypeStruct` tree (no gather through one device), one item (a layer part, <= 1 GiB by default) at a
time with a bounded concurrent read budget. A released (native safetensors) folder is read directly the same way
(`jax.make_array_from_callback` reads each device's slice from the file), fine for small models; convert large ones.
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import numpy as np

from dsv4_jax.checkpoint.convert import META, is_orbax_checkpoint, item_files, item_key, partial_dir, read_meta
from dsv4_jax.checkpoint.layout import (
    CheckpointError,
    ParamSpec,
    assemble,
    check,
    check_values,
    layer_sharding,
    param_table,
    read_param,
    without_mtp,
)
from dsv4_jax.checkpoint.native import index_tensors, read_config
from dsv4_jax.checkpoint.safetensors_io import read_tensor
from dsv4_jax.config import Config
from dsv4_jax.paths import user_path

__all__ = ["load", "detect_format", "checkpoint_nbytes"]

log = logging.getLogger(__name__)


def detect_format(path: str | os.PathLike) -> str:
    """'orbax' (a `dsv4-jax convert` output) or 'native' (released safetensors); raises otherwise."""
    path = user_path(path)
    if path.endswith(".partial") and os.path.isdir(path):
        raise CheckpointError(_interrupted(path[: -len(".partial")]))
    if not os.path.isdir(path):
        if os.path.isdir(partial_dir(path)):  # convert writes DST.partial and renames it to DST when complete
            raise CheckpointError(_interrupted(path))
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if is_orbax_checkpoint(path):
        return "orbax"
    names = os.listdir(path)
    if "model.safetensors.index.json" in names or any(n.endswith(".safetensors") for n in names):
        return "native"
    raise CheckpointError(f"{path}: neither a converted checkpoint ({META}) nor safetensors files")


def _interrupted(dst: str) -> str:
    """The message for a conversion that was interrupted: what exists, and the command that finishes it."""
    src = "SRC"
    try:  # convert records the source in DST.partial/progress.json
        with open(os.path.join(partial_dir(dst), "progress.json")) as f:
            src = json.load(f)["fingerprint"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return (f"{dst}: not converted yet: an interrupted conversion ({partial_dir(dst)}) can be resumed with "
            f"`dsv4-jax convert {src} {dst}`")  # fmt: skip


def checkpoint_nbytes(path: str | os.PathLike) -> int:
    """Bytes of the parameters a checkpoint folder holds (from its config and metadata; no array is read)."""
    path = user_path(path)
    cfg = Config.from_hf(read_meta(path)["config"]) if detect_format(path) == "orbax" else read_config(path)
    return sum(s.nbytes for s in param_table(cfg))


def _shardings(cfg: Config, mesh, rules):
    from flax import nnx

    from dsv4_jax.model import abstract

    ab = abstract(cfg)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return ab, {p: dev for p, _ in nnx.to_flat_state(ab.params)}
    from dsv4_jax.sharding import param_shardings

    return ab, dict(nnx.to_flat_state(param_shardings(ab, mesh, rules)))


def _want_mtp(cfg: Config, mtp: bool | None) -> bool:
    return bool(cfg.n_mtp_layers) if mtp is None else bool(mtp)


def _load_orbax(path: str, mesh, rules, mtp: bool | None, concurrent_gb: int, progress: bool):
    import orbax.checkpoint as ocp

    meta = read_meta(path)
    cfg = Config.from_hf(meta["config"])
    want = _want_mtp(cfg, mtp)
    if want and not cfg.n_mtp_layers:
        raise CheckpointError(f"{path}: MTP was asked for, but this checkpoint was converted without the MTP layer "
                              "(re-run `dsv4-jax convert` without --no-mtp, or load with mtp=False)")  # fmt: skip
    model_cfg = cfg if want else without_mtp(cfg)
    ab, shardings = _shardings(model_cfg, mesh, rules)
    specs = param_table(model_cfg)
    by_item: dict[str, list[ParamSpec]] = {}
    problems = []
    for s in specs:
        m = meta["params"].get(s.key)
        if m is None:
            problems.append(f"{s.key}: not in {META}")
            continue
        if tuple(m["shape"]) != s.shape or m["dtype"] != s.dtype.name:
            problems.append(
                f"{s.key}: {m['dtype']}{m['shape']} in {META}, the model needs {s.dtype.name}{list(s.shape)}"
            )
        by_item.setdefault(m["item"], []).append(s)
    missing = [i for i in by_item if not os.path.isdir(os.path.join(path, i))]
    if missing:
        problems.append(f"item folders missing: {missing}")
    if problems:
        raise CheckpointError(
            f"{path}: the converted checkpoint does not match its config:\n  " + "\n  ".join(problems)
        )
    for item, item_specs in by_item.items():
        _check_item_files(os.path.join(path, item), meta.get("item_files", {}).get(item), item_specs)

    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=concurrent_gb))
    values = {}
    items = list(by_item.items())
    it = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc=f"restore {os.path.basename(path)}", unit="item")
    logging.getLogger("absl").setLevel(logging.WARNING)
    for item, item_specs in it:
        target, restore_args = {}, {}
        for s in item_specs:
            key = item_key(s)
            sharding = layer_sharding(s, shardings[s.state_path])
            sds = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
            d, r = target, restore_args
            for k in key[:-1]:
                d, r = d.setdefault(k, {}), r.setdefault(k, {})
            d[key[-1]] = sds
            r[key[-1]] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=s.shape, dtype=s.dtype)
        try:
            out = ckptr.restore(
                os.path.join(path, item), args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
            )
        except Exception as e:  # Orbax raises a bare Exception (TensorStore details) for unreadable data files
            raise CheckpointError(_unreadable(os.path.join(path, item), item_specs, e)) from e
        for s in item_specs:
            v = out
            for k in item_key(s):
                v = v[k]
            values[s.path] = v
        del out
    return model_cfg, assemble(ab, model_cfg, values, shardings)


def _check_item_files(folder: str, written: dict[str, int] | None, specs: list[ParamSpec]) -> None:
    """Every file the conversion wrote for this item is there at the size it wrote (a stat, no read): Orbax failing
    partway through an item leaves its other TensorStore reads calling back into a closed event loop, which can
    crash the process. Checkpoints converted before the file list was recorded are not checked."""
    if written is None:
        return
    found = item_files(folder)
    for rel, size in sorted(written.items()):
        if found.get(rel) != size:
            what = "is missing" if rel not in found else f"is {found[rel]} bytes, the conversion wrote {size}"
            keys = [s.key for s in specs]
            listed = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            raise CheckpointError(f"{folder}: data file {rel} {what}, so the item's parameters cannot be read "
                                  f"({len(keys)}: {listed}); re-run `dsv4-jax convert` into a new folder")  # fmt: skip


def _unreadable(folder: str, specs: list[ParamSpec], e: BaseException) -> str:
    """One line naming the item folder and the parameter(s) that could not be read.

    TensorStore names the array inside the item (`Error reading "attn.wkv.weight/0.0" in OCDBT database ...`);
    that name is the parameter's `item_key`, mapped back to its full key. Without such a name, every parameter
    of the item is listed."""
    by_name = {".".join(item_key(s)): s.key for s in specs}
    names, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names += [by_name[n] for n in re.findall(r'"([^"/]+)/[^"]*"', str(e)) if n in by_name]
        e = e.__cause__ or e.__context__
    keys = list(dict.fromkeys(names)) or [s.key for s in specs]
    what = "cannot read parameter" if len(keys) == 1 else "cannot read one of the parameters"
    return (f"{folder}: {what} {', '.join(keys)}: its data files are missing or damaged (re-run `dsv4-jax convert` "
            "into a new folder)")  # fmt: skip


def _native_array(tensors, spec: ParamSpec, sharding, n_experts: int) -> jax.Array:
    """A jax.Array of one parameter where each device reads only its own slice from the safetensors files."""
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return jax.device_put(read_param(tensors, spec, n_experts), sharding)
    infos = [tensors[n] for n in spec.names]
    for info in infos:
        if info.dtype != spec.disk_dtype or tuple(info.shape) != spec.disk_shape:
            raise CheckpointError(f"{info.file}: tensor {info.name!r} is {info.dtype}{list(info.shape)}, expected "
                                  f"{spec.disk_dtype}{list(spec.disk_shape)}")  # fmt: skip

    def view(info, idx):
        raw = read_tensor(info, copy=False)[idx]
        check_values(info, raw, spec, n_experts)
        return raw.astype(spec.dtype) if spec.disk_dtype == "I64" else np.asarray(raw).view(spec.dtype)

    def cb(index):
        if spec.stacked:
            experts = range(spec.shape[0])[index[0]]
            return np.stack([view(infos[e], tuple(index[1:])) for e in experts])
        return np.ascontiguousarray(view(infos[0], tuple(index)))

    return jax.make_array_from_callback(spec.shape, sharding, cb)


def _load_native(path: str, mesh, rules, mtp: bool | None, progress: bool):
    cfg = read_config(path)
    want = _want_mtp(cfg, mtp)
    tensors = index_tensors(path)
    check(tensors, cfg, mtp=want, where=path)
    model_cfg = cfg if want else without_mtp(cfg)
    ab, shardings = _shardings(model_cfg, mesh, rules)
    specs = param_table(model_cfg)
    it = specs
    if progress:
        from tqdm import tqdm

        it = tqdm(specs, desc=f"load {os.path.basename(path)}", unit="param")
    values = {s.path: _native_array(tensors, s, layer_sharding(s, shardings[s.state_path]), cfg.n_routed_experts)
              for s in it}  # fmt: skip
    return model_cfg, assemble(ab, model_cfg, values, shardings)


def load(
    path: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    *,
    mtp: bool | None = None,
    concurrent_gb: int = 2,
    progress: bool = False,
):
    """(Config, ModelState) from a `dsv4-jax convert` folder or a released safetensors folder (detected by the
    files present).

    Args:
      mesh: place every parameter by `dsv4_jax.sharding.param_shardings(..., mesh, rules)`; None = default device.
      rules: `dsv4_jax.sharding.ShardingRules` (default: experts over "expert", heads/vocab over "tensor").
      mtp: load the MTP layer (default: if the checkpoint has one); False drops it (the config then has none).
      concurrent_gb: Orbax read budget in flight (host memory bound while restoring).
    """
    path = user_path(path)
    if detect_format(path) == "orbax":
        return _load_orbax(path, mesh, rules, mtp, concurrent_gb, progress)
    return _load_native(path, mesh, rules, mtp, progress)
