"""Writes a checkpoint in exactly the released DeepSeek-V4 layout, for any `Config` and seed.

    write_native(Config.tiny(), "ckpt/tiny", seed=0)               # init_random weights (a working model)
    write_native(state, "ckpt/mine", shards=4)                       # the weights of a ModelState
    write_native(Config.flash(...), "big", values="random")          # random bytes, streamed (any size)

Output: `model-0000K-of-0000N.safetensors` shards (native names, tensors laid out as `safetensors.torch` does:
larger dtypes first, then by name; `__metadata__ = {"format": "pt"}`), `model.safetensors.index.json` (tensors in
the released order: per layer hc, attention, norms, shared experts, routed experts w1/w3 then w2, gate), an HF-style
`config.json` and `inference/config.json`. Tensors are produced and written one at a time, and the folder appears
only when complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib

import numpy as np

from dsv4_jax.checkpoint.layout import ParamSpec, tensor_table, without_mtp
from dsv4_jax.checkpoint.safetensors_io import DTYPES, data_order, write_safetensors
from dsv4_jax.config import Config
from dsv4_jax.paths import user_path

__all__ = ["write_native", "native_order", "shard_plan", "hf_config"]

# Order of a block's tensors in the released index ({e}: routed experts, all w1/w3 first, then all w2).
_BLOCK_ORDER = [
    "hc_attn_base", "hc_ffn_base", "hc_attn_fn", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_scale", "attn.attn_sink",
    "attn.wq_a.weight", "attn.wq_a.scale", "attn.wq_b.weight", "attn.wq_b.scale", "attn.q_norm.weight",
    "attn.wo_a.weight", "attn.wo_a.scale", "attn.wkv.weight", "attn.wkv.scale", "attn.kv_norm.weight",
    "attn.wo_b.weight", "attn.wo_b.scale", "attn.compressor.ape", "attn.compressor.wkv.weight",
    "attn.compressor.wgate.weight", "attn.compressor.norm.weight", "attn.indexer.wq_b.weight",
    "attn.indexer.wq_b.scale", "attn.indexer.weights_proj.weight", "attn.indexer.compressor.ape",
    "attn.indexer.compressor.wkv.weight", "attn.indexer.compressor.wgate.weight", "attn.indexer.compressor.norm.weight",
    "attn_norm.weight", "ffn_norm.weight", "ffn.shared_experts.w1.weight", "ffn.shared_experts.w1.scale",
    "ffn.shared_experts.w3.weight", "ffn.shared_experts.w3.scale", "ffn.shared_experts.w2.weight",
    "ffn.shared_experts.w2.scale", "EXPERTS_W13", "EXPERTS_W2", "ffn.gate.bias", "ffn.gate.tid2eid", "ffn.gate.weight",
    "e_proj.weight", "e_proj.scale", "h_proj.weight", "h_proj.scale", "enorm.weight", "hnorm.weight", "norm.weight",
    "hc_head_base", "hc_head_fn", "hc_head_scale",
]  # fmt: skip
_RANK = {k: i for i, k in enumerate(_BLOCK_ORDER)}
_SUFFIX = {"weight": 0, "scale": 1}
_BLOCK = re.compile(r"^(layers|mtp)\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")


def _unit_and_key(name: str):
    """(file unit, sort key) of a native name: units are embed, each layer, the head group, each MTP layer."""
    m = _BLOCK.match(name)
    if not m:
        return ("embed" if name == "embed.weight" else "head"), (0, 0, 0, name)
    unit = (m[1], int(m[2]))
    rel = m[3]
    if e := _EXPERT.match(rel):
        w13 = e[2] != "w2"
        return unit, (_RANK["EXPERTS_W13" if w13 else "EXPERTS_W2"], int(e[1]), (e[2] == "w3") * 2 + _SUFFIX[e[3]], "")
    return unit, (_RANK.get(rel, len(_RANK)), 0, 0, rel)


def native_order(names) -> list[list[str]]:
    """Native names grouped into file units (embed, layers.0, ..., head/norm/hc_head, mtp.0, ...), each in the
    released index order."""
    units: dict = {}
    for n in names:
        unit, key = _unit_and_key(n)
        units.setdefault(unit, []).append((key, n))
    rank = {"embed": (0, 0), "head": (2, 0)}

    def unit_rank(u):
        if isinstance(u, tuple):
            return (1, u[1]) if u[0] == "layers" else (3, u[1])
        return rank[u]

    return [[n for _, n in sorted(units[u])] for u in sorted(units, key=unit_rank)]


def shard_plan(units: list[list[str]], sizes: dict[str, int], shards: int | None) -> list[list[str]]:
    """Files: one per unit (`shards=None`, as released), or `shards` contiguous groups of about equal bytes."""
    if shards is None:
        return units
    flat = [n for u in units for n in u]
    if not 1 <= shards <= len(flat):
        raise ValueError(f"shards={shards}: must be between 1 and the number of tensors ({len(flat)})")
    total = sum(sizes[n] for n in flat)
    out: list[list[str]] = [[] for _ in range(shards)]
    acc, k = 0, 0
    for i, n in enumerate(flat):
        left_tensors, left_files = len(flat) - i, shards - k
        if out[k] and (acc >= total * (k + 1) / shards or left_tensors == left_files - 1) and k + 1 < shards:
            k += 1
        out[k].append(n)
        acc += sizes[n]
    while out and not out[-1]:  # cannot happen with the rule above, kept for safety
        out.pop()
    return out


# ---- value sources ---------------------------------------------------------------------------------------------


def _to_disk(arr: np.ndarray, spec: ParamSpec) -> np.ndarray:
    if spec.disk_dtype == "I64":
        return arr.astype(np.int64)
    return arr.view(DTYPES[spec.disk_dtype])


class _StateSource:
    def __init__(self, state):
        from flax import nnx

        self.flat = {p: v for p, v in nnx.to_flat_state(state.params)}
        self.cached = (None, None)

    def __call__(self, name, spec: ParamSpec, expert):
        if self.cached[0] != spec.path:
            value = self.flat[spec.state_path].get_value()
            value = value if spec.layer_index is None else value[spec.layer_index]
            self.cached = (spec.path, np.asarray(value))
        arr = self.cached[1]
        return _to_disk(arr[expert] if expert is not None else arr, spec)


class _RandomSource:
    """Random bytes in each format's valid range (finite e4m3, scales 2^-9..2^0, small bf16/f32), seeded per tensor
    by name: any tensor can be produced alone, in any order, without holding the model."""

    def __init__(self, seed: int, n_experts: int):
        self.seed, self.n_experts = seed, n_experts

    def __call__(self, name, spec: ParamSpec, expert):
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        shape, dt = spec.disk_shape, spec.disk_dtype
        n = int(np.prod(shape, dtype=np.int64))
        if dt == "I64":
            return rng.integers(0, self.n_experts, shape, dtype=np.int64)
        if dt == "F8_E8M0":
            return rng.integers(118, 128, shape, dtype=np.uint8).view(DTYPES[dt])
        if dt == "F8_E4M3":
            b = np.frombuffer(rng.bytes(n), np.uint8).copy()
            b[(b & 0x7F) == 0x7F] &= 0xFE  # no NaN codes
            return b.view(DTYPES[dt]).reshape(shape)
        if dt == "I8":
            return np.frombuffer(rng.bytes(n), np.int8).reshape(shape)
        if dt == "BF16":  # sign + exponent 2^-10..2^-3 + random mantissa
            bits = np.frombuffer(rng.bytes(2 * n), np.uint16) & np.uint16(0x807F)
            bits = bits | (rng.integers(117, 125, n, dtype=np.uint16) << np.uint16(7))
            return bits.view(DTYPES[dt]).reshape(shape)
        if dt == "F32":
            return (rng.standard_normal(shape, np.float32) * np.float32(0.02)).astype(np.float32)
        raise AssertionError(dt)


# ---- writer ----------------------------------------------------------------------------------------------------


def hf_config(cfg: Config) -> dict:
    """`cfg.to_hf()` completed to the released `config.json` (keys in the released order)."""
    hf = cfg.to_hf()
    # The released file has these too; vocab_size is needed to read the config back.
    extra = {"attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "vocab_size": cfg.vocab_size}
    out = {**hf, **{k: v for k, v in extra.items() if k not in hf}}
    first = [k for k in _HF_ORDER if k in out]
    return {k: out[k] for k in first + sorted(k for k in out if k not in first)}


_HF_ORDER = [
    "architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "expert_dtype", "hc_eps",
    "hc_mult", "hc_sinkhorn_iters", "head_dim", "hidden_act", "hidden_size", "index_head_dim", "index_n_heads",
    "index_topk", "initializer_range", "max_position_embeddings", "model_type", "moe_intermediate_size",
    "n_routed_experts", "n_shared_experts", "norm_topk_prob", "num_attention_heads", "num_experts_per_tok",
    "num_hidden_layers", "num_hash_layers", "num_key_value_heads", "num_nextn_predict_layers", "o_groups",
    "o_lora_rank", "q_lora_rank", "qk_rope_head_dim", "quantization_config", "rms_norm_eps", "rope_scaling",
    "rope_theta", "routed_scaling_factor", "scoring_func", "sliding_window", "swiglu_limit", "tie_word_embeddings",
    "topk_method", "torch_dtype", "transformers_version", "use_cache", "vocab_size", "compress_rope_theta",
    "compress_ratios",
]  # fmt: skip


def replace_dir(tmp: str, folder: str, overwrite: bool) -> None:
    """Moves the finished directory `tmp` to `folder`; an existing `folder` is swapped out first, then removed."""
    if os.path.exists(folder):
        if not overwrite:
            raise FileExistsError(f"{folder} already exists (use overwrite=True)")
        old = f"{folder}.old-{os.getpid()}"
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old)
    else:
        os.rename(tmp, folder)


def write_native(
    state_or_cfg,
    folder: str | os.PathLike,
    seed: int = 0,
    shards: int | None = None,
    *,
    values: str = "init",
    mtp: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Writes a released-format checkpoint folder and returns its path.

    Args:
      state_or_cfg: a `ModelState` (its weights are written) or a `Config`.
      folder: destination; must not exist unless `overwrite`.
      seed: for a `Config`: the `init_random` seed (`values="init"`) or the random-bytes seed (`values="random"`).
      shards: number of safetensors files; None = one per unit as released (embed, each layer, head group, MTP).
      values: "init" (`init_random(cfg, seed)`: a working model, needs the model in memory) or "random" (random
        bytes of the right formats, generated per tensor: any size, e.g. full-size layers for benchmarks).
      mtp: False leaves out the `mtp.*` tensors (the config still declares the MTP layer).
    """
    from dsv4_jax.model import ModelState, init_random

    if isinstance(state_or_cfg, ModelState):
        cfg, source = state_or_cfg.config, _StateSource(state_or_cfg)
    elif isinstance(state_or_cfg, Config):
        cfg = state_or_cfg
        if values == "init":
            source = _StateSource(init_random(cfg, seed))
        elif values == "random":
            source = _RandomSource(seed, cfg.n_routed_experts)
        else:
            raise ValueError(f"values={values!r}: expected 'init' or 'random'")
    else:
        raise TypeError(f"expected a ModelState or a Config, got {type(state_or_cfg).__name__}")

    table = tensor_table(cfg if mtp else without_mtp(cfg))
    sizes = {n: int(np.prod(s.disk_shape, dtype=np.int64)) * DTYPES[s.disk_dtype].itemsize
             for n, (s, _) in table.items()}  # fmt: skip
    files = shard_plan(native_order(table), sizes, shards)
    folder = user_path(folder)
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(f"{folder} already exists (use overwrite=True)")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(folder)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "inference"))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=f"write {os.path.basename(folder)}")
    try:
        weight_map = {}
        n_files = len(files)
        for k, names in enumerate(files):
            fn = f"model-{k + 1:05d}-of-{n_files:05d}.safetensors"
            entries = data_order([(n, table[n][0].disk_dtype, table[n][0].disk_shape) for n in names])

            def get(name):
                spec, expert = table[name]
                arr = source(name, spec, expert)
                if bar is not None:
                    bar.update(sizes[name])
                return arr

            write_safetensors(os.path.join(tmp, fn), entries, get, metadata={"format": "pt"})
            weight_map.update({n: fn for n in names})
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(cfg), f, indent=2)
        with open(os.path.join(tmp, "inference", "config.json"), "w") as f:
            json.dump(cfg.to_inference(), f, indent=4)
        replace_dir(tmp, folder, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return folder
