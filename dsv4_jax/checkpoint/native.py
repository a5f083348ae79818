"""The released checkpoint layout: native tensor names <-> model parameter paths, and a direct loader.

Native names have no `model.` prefix (spec §4). The parameter tree mirrors them: `layers.3.attn.wq_a.weight` is the
path `("layers", 3, "attn", "wq_a", "weight")`. Routed experts are stored one tensor per expert
(`layers.L.ffn.experts.E.w1.weight`) and held stacked (`("layers", L, "ffn", "experts", "w1", "weight")[E]`).
Dtype changes at load, both lossless: I8 packed e2m1 bytes are viewed as uint8, I64 `tid2eid` becomes int32.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from dsv4_jax.checkpoint.layout import CheckpointError, assemble, check, param_table, read_param, without_mtp
from dsv4_jax.checkpoint.safetensors_io import SafetensorsError, TensorInfo, read_header
from dsv4_jax.config import Config
from dsv4_jax.paths import user_path

__all__ = ["native_to_path", "path_to_native", "index_tensors", "iter_params", "load_native", "read_config",
           "CheckpointError"]  # fmt: skip

_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$")


def native_to_path(name: str) -> tuple[tuple, int | None]:
    """(parameter path, expert index or None) of a native tensor name."""
    expert = None
    if m := _EXPERT.match(name):
        name, expert = f"{m[1]}.{m[3]}.{m[4]}", int(m[2])
    parts = name.split(".")
    path = tuple(int(p) if p.isdigit() else p for p in parts)
    return path, expert


def path_to_native(path: tuple, expert: int | None = None) -> str:
    parts = [str(p) for p in path]
    if expert is not None:
        i = parts.index("experts")
        parts.insert(i + 1, str(expert))
    return ".".join(parts)


def index_tensors(folder: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a released checkpoint folder (via `model.safetensors.index.json`, or all `*.safetensors`)."""
    folder = user_path(folder)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        except OSError as e:
            raise CheckpointError(f"{index}: cannot read ({e.strerror or e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map is not a name -> file mapping")
        bad = sorted({v for v in weight_map.values() if os.path.basename(v) != v or not v.endswith(".safetensors")})
        if bad:
            raise CheckpointError(f"{index}: weight_map names files outside the folder or not .safetensors: {bad}")
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no model.safetensors.index.json and no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    problems, unreadable = [], set()
    for fn in files:
        path = os.path.join(folder, fn)
        if not os.path.exists(path):
            names = sorted(n for n, f in weight_map.items() if f == fn)
            problems.append(f"{index} names {fn} (holding {len(names)} tensors, e.g. {names[0]!r}), which does not "
                            f"exist in {folder}")  # fmt: skip
            continue
        try:
            hdr, _ = read_header(path)
        except SafetensorsError as e:
            problems.append(str(e))
            unreadable.add(fn)
            continue
        tensors.update(hdr)
    if weight_map is not None:
        for name, fn in weight_map.items():
            if name in tensors and os.path.basename(tensors[name].file) != fn:
                problems.append(f"{index}: {name} is listed in {fn} but found in {tensors[name].file}")
            elif name not in tensors and fn not in unreadable and os.path.exists(os.path.join(folder, fn)):
                problems.append(f"{index}: {name} is listed in {fn} but that file does not hold it")
    if problems:
        raise CheckpointError("\n".join(problems))
    return tensors


def read_config(folder: str | os.PathLike) -> Config:
    """The `Config` of a released checkpoint folder (its HF-style `config.json`, else `inference/config.json`)."""
    folder = user_path(folder)
    for rel in ("config.json", os.path.join("inference", "config.json")):
        if os.path.exists(os.path.join(folder, rel)):
            return Config.from_hf(os.path.join(folder, rel))
    raise CheckpointError(f"{folder}: no config.json (nor inference/config.json)")


def iter_params(folder, cfg: Config, *, mtp: bool | None = None, tensors: dict | None = None
                ) -> Iterator[tuple[tuple, np.ndarray]]:  # fmt: skip
    """(parameter path, numpy value) for every parameter of `cfg`'s model (without MTP if `mtp=False`), experts
    stacked, one parameter in memory at a time. Validates the whole checkpoint first (`layout.check`)."""
    tensors = index_tensors(folder) if tensors is None else tensors
    check(tensors, cfg, mtp=mtp, where=os.fspath(folder))
    model_cfg = cfg if (cfg.n_mtp_layers and mtp is not False) else without_mtp(cfg)
    for spec in param_table(model_cfg):
        yield spec.path, read_param(tensors, spec, cfg.n_routed_experts)


def load_native(folder: str | os.PathLike, cfg: Config | None = None, *, mtp: bool | None = None):
    """A `ModelState` read directly from a released checkpoint folder on the default device (small models; use
    `dsv4_jax.checkpoint.restore.load` for sharding or large models). `mtp=False` drops the MTP layer."""
    from dsv4_jax.model import abstract

    cfg = read_config(folder) if cfg is None else cfg
    model_cfg = cfg if (cfg.n_mtp_layers and mtp is not False) else without_mtp(cfg)
    values = {path: jnp.asarray(v) for path, v in iter_params(folder, cfg, mtp=mtp)}
    return assemble(abstract(model_cfg), model_cfg, values)
