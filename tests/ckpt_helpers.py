"""Helpers shared by the checkpoint tests: small configs, byte-level comparison, shard rewriting."""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from dsv4_jax.checkpoint.safetensors_io import data_order, read_header, read_tensor, write_safetensors
from dsv4_jax.config import Config


def small_cfg(**kw) -> Config:
    """A fast model with every structural feature: sliding, CSA (indexer), HCA, hash and bias routing, MTP."""
    base = dict(n_layers=3, compress_ratios=(0, 4, 128, 0), n_hash_layers=1, n_routed_experts=4)
    base.update(kw)
    return Config.tiny(**base)


def flat_bytes(state) -> dict:
    """param path -> (dtype name, shape, raw bytes) of a ModelState."""
    out = {}
    for path, var in nnx.to_flat_state(state.params):
        a = np.asarray(var.get_value())
        out[path] = (a.dtype.name, a.shape, a.tobytes())
    return out


def assert_same_params(a, b) -> None:
    fa, fb = flat_bytes(a), flat_bytes(b)
    assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))[:5]
    bad = [p for p in fa if fa[p] != fb[p]]
    assert not bad, f"{len(bad)} parameters differ, e.g. {bad[:3]}"


def rewrite_shard(folder, fn: str, mutate) -> None:
    """Rewrites one shard: `mutate(dict name -> array)` edits the tensors in place (add, drop, replace); the index is
    updated to match."""
    path = os.path.join(folder, fn)
    hdr, meta = read_header(path)
    tensors = {n: read_tensor(i) for n, i in hdr.items()}
    mutate(tensors)
    from dsv4_jax.checkpoint.safetensors_io import NAMES

    entries = data_order([(n, NAMES[a.dtype], a.shape) for n, a in tensors.items()])
    write_safetensors(path, entries, lambda n: tensors[n], meta)
    idx_path = os.path.join(folder, "model.safetensors.index.json")
    with open(idx_path) as f:
        idx = json.load(f)
    wm = {n: f for n, f in idx["weight_map"].items() if f != fn or n in tensors}
    wm.update({n: fn for n in tensors})
    idx["weight_map"] = wm
    with open(idx_path, "w") as f:
        json.dump(idx, f, indent=2)


def shard_of(folder, name: str) -> str:
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][name]


def edit_config(folder, **changes) -> None:
    p = os.path.join(folder, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f, indent=2)
