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
from flax import nnx

from dsv4_jax.checkpoint.safetensors_io import SafetensorsError, TensorInfo, read_header, read_tensor
from dsv4_jax.config import Config

__all__ = ["native_to_path", "path_to_native", "index_tensors", "load_native", "CheckpointError"]

_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message lists every problem found."""


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
    folder = os.fspath(folder)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no model.safetensors.index.json and no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    problems = []
    for fn in files:
        path = os.path.join(folder, fn)
        if not os.path.exists(path):
            problems.append(f"{index} names {fn}, which does not exist")
            continue
        try:
            hdr, _ = read_header(path)
        except SafetensorsError as e:
            problems.append(str(e))
            continue
        tensors.update(hdr)
    if weight_map is not None:
        for name, fn in weight_map.items():
            if name in tensors and os.path.basename(tensors[name].file) != fn:
                problems.append(f"{index}: {name} is listed in {fn} but found in {tensors[name].file}")
            elif name not in tensors and os.path.exists(os.path.join(folder, fn)):
                problems.append(f"{index}: {name} is listed in {fn} but that file does not hold it")
    if problems:
        raise CheckpointError("\n".join(problems))
    return tensors


def _convert(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.int8:
        return arr.view(np.uint8)
    if arr.dtype == np.int64:
        return arr.astype(np.int32)
    return arr


def iter_params(folder, cfg: Config) -> Iterator[tuple[tuple, np.ndarray]]:
    """(parameter path, numpy value) for every parameter of `cfg`'s model, experts stacked, read lazily."""
    from dsv4_jax.model import abstract

    tensors = index_tensors(folder)
    flat = nnx.to_flat_state(abstract(cfg).params)
    for path, var in flat:
        if len(path) >= 3 and path[-3] == "experts":
            vals = []
            for e in range(cfg.n_routed_experts):
                vals.append(_convert(read_tensor(tensors[path_to_native(path, e)])))
            yield path, np.stack(vals)
        else:
            yield path, _convert(read_tensor(tensors[path_to_native(path)]))


def load_native(folder: str | os.PathLike, cfg: Config | None = None):
    """A `ModelState` read directly from a released checkpoint folder (small models; `dsv4_jax.load` for large)."""
    from dsv4_jax.model import ModelState, abstract

    cfg = Config.from_hf(folder) if cfg is None else cfg
    ab = abstract(cfg)
    flat = dict(nnx.to_flat_state(ab.params))
    problems = []
    values = []
    try:
        it = dict(iter_params(folder, cfg))
    except KeyError as e:
        raise CheckpointError(f"{folder}: missing tensor {e}") from None
    for path, var in flat.items():
        v = it[path]
        if v.shape != var.shape or np.dtype(v.dtype) != np.dtype(var.dtype):
            problems.append(f"{path_to_native(path)}: {v.dtype}{list(v.shape)}, expected {var.dtype}{list(var.shape)}")
        values.append((path, var.replace(jnp.asarray(v))))
    if problems:
        raise CheckpointError(f"{folder}:\n" + "\n".join(problems))
    return ModelState(ab.graphdef, nnx.from_flat_state(values), cfg)
