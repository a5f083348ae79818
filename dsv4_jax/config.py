"""Model configuration: a frozen, hashable dataclass with the released presets.

Field names follow DeepSeek's inference code (`inference/config.json`); `Config.from_hf` also reads the HuggingFace
`config.json` names. Values of the presets are those of spec §1 (`shared/design/dsv4-architecture.md`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["Config", "ConfigError"]


class ConfigError(ValueError):
    """A config.json (or keyword) that does not describe a DeepSeek-V4 model."""


def _flash_ratios() -> tuple[int, ...]:
    # Layers 0,1 sliding-only; then CSA (4) on even, HCA (128) on odd layers; the MTP layer (last entry) is ratio 0.
    return (0, 0) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 43)) + (0,)


def _pro_ratios() -> tuple[int, ...]:
    return (128, 128) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 61)) + (0,)


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters of a DeepSeek-V4 model. Frozen and hashable, so it can be a static jit argument."""

    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_mtp_layers: int = 1
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple[int, ...] = dataclasses.field(default_factory=_flash_ratios)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    max_seq_len: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    n_hash_layers: int = 3
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    expert_dtype: str = "fp4"
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self):
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        problems = []
        if len(self.compress_ratios) != self.n_layers + self.n_mtp_layers:
            problems.append(
                f"compress_ratios has {len(self.compress_ratios)} entries, expected n_layers + n_mtp_layers = "
                f"{self.n_layers + self.n_mtp_layers}"
            )
        if bad := sorted({r for r in self.compress_ratios if r not in (0, 4, 128)}):
            problems.append(f"compress_ratios may hold only 0, 4 and 128, got {bad}")
        if self.n_mtp_layers and self.compress_ratios and self.compress_ratios[-1] != 0:
            problems.append(f"the MTP layer must be sliding-only (ratio 0), got {self.compress_ratios[-1]}")
        if self.n_heads % self.o_groups:
            problems.append(f"n_heads={self.n_heads} is not divisible by o_groups={self.o_groups}")
        if self.score_func != "sqrtsoftplus":
            problems.append(f"score_func={self.score_func!r} is not supported (DeepSeek-V4 uses 'sqrtsoftplus')")
        if self.expert_dtype not in ("fp4", "fp8"):
            problems.append(f"expert_dtype={self.expert_dtype!r}; expected 'fp4' or 'fp8'")
        if self.head_dim <= self.rope_head_dim or self.rope_head_dim % 2:
            problems.append(
                f"rope_head_dim={self.rope_head_dim} must be even and smaller than head_dim={self.head_dim}"
            )
        if self.index_head_dim != 128 and 4 in self.compress_ratios:
            problems.append(f"index_head_dim={self.index_head_dim}: the indexer's Hadamard rotation is 128-wide")
        if self.n_activated_experts > self.n_routed_experts:
            problems.append(
                f"n_activated_experts={self.n_activated_experts} exceeds n_routed_experts={self.n_routed_experts}"
            )
        if self.n_hash_layers > self.n_layers:
            problems.append(f"n_hash_layers={self.n_hash_layers} exceeds n_layers={self.n_layers}")
        if problems:
            raise ConfigError("invalid DeepSeek-V4 config: " + "; ".join(problems))

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def n_blocks(self) -> int:
        """Main layers plus MTP layers: every decoder block that has its own weights."""
        return self.n_layers + self.n_mtp_layers

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        # MTP layers have layer ids >= n_layers and are never hash-routed.
        return layer < self.n_hash_layers

    # ---- presets --------------------------------------------------------------------------------------------
    @classmethod
    def flash(cls, **overrides) -> Config:
        """DeepSeek-V4-Flash (284 B + MTP)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def pro(cls, **overrides) -> Config:
        """DeepSeek-V4-Pro (1.6 T)."""
        base = cls(
            dim=7168,
            n_layers=61,
            n_heads=128,
            q_lora_rank=1536,
            o_groups=16,
            o_lora_rank=1024,
            compress_ratios=_pro_ratios(),
            index_topk=1024,
            n_routed_experts=384,
            moe_inter_dim=3072,
            route_scale=2.5,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def tiny(cls, **overrides) -> Config:
        """A small model that keeps every structural feature: ratios 0/4/128, hash and bias routing, MTP, and an
        index_topk smaller than the visible compressed entries once a prompt passes 32 tokens."""
        base = cls(
            vocab_size=512,
            dim=256,
            n_layers=6,
            n_heads=8,
            q_lora_rank=128,
            o_groups=2,
            o_lora_rank=64,
            compress_ratios=(0, 0, 4, 128, 4, 128, 0),
            index_n_heads=16,
            index_topk=8,
            n_routed_experts=8,
            n_activated_experts=2,
            moe_inter_dim=128,
            n_hash_layers=2,
            max_seq_len=4096,
        )
        return dataclasses.replace(base, **overrides)

    def replace(self, **overrides) -> Config:
        return dataclasses.replace(self, **overrides)

    # ---- config.json ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any]) -> Config:
        """Reads a DeepSeek-V4 `config.json`: a path to the file, to a checkpoint folder, or the parsed dict.

        Both the HuggingFace names (`hidden_size`, `num_hidden_layers`, ...) and the inference-code names (`dim`,
        `n_layers`, ...) are accepted. Unknown keys, another `model_type` or contradictory values raise `ConfigError`
        naming them, all at once.
        """
        where = "config"
        if isinstance(source, Mapping):
            raw = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            try:
                with open(path) as f:
                    raw = json.load(f)
            except FileNotFoundError as e:
                raise ConfigError(f"{path}: no such config file") from e
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        return _parse(raw, where)

    def to_hf(self) -> dict[str, Any]:
        """The HuggingFace-style `config.json` dict of this config (the released checkpoint's naming)."""
        return {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "expert_dtype": self.expert_dtype,
            "hc_eps": self.hc_eps,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.dim,
            "index_head_dim": self.index_head_dim,
            "index_n_heads": self.index_n_heads,
            "index_topk": self.index_topk,
            "max_position_embeddings": self.max_seq_len,
            "moe_intermediate_size": self.moe_inter_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "norm_topk_prob": True,
            "num_attention_heads": self.n_heads,
            "num_experts_per_tok": self.n_activated_experts,
            "num_hidden_layers": self.n_layers,
            "num_hash_layers": self.n_hash_layers,
            "num_key_value_heads": 1,
            "num_nextn_predict_layers": self.n_mtp_layers,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "q_lora_rank": self.q_lora_rank,
            "qk_rope_head_dim": self.rope_head_dim,
            "quantization_config": {
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "scale_fmt": "ue8m0",
                "weight_block_size": [128, 128],
            },
            "rms_norm_eps": self.norm_eps,
            "rope_scaling": {
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "type": "yarn",
            },
            "rope_theta": self.rope_theta,
            "routed_scaling_factor": self.route_scale,
            "scoring_func": self.score_func,
            "sliding_window": self.window_size,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16",
            "vocab_size": self.vocab_size,
            "compress_rope_theta": self.compress_rope_theta,
            "compress_ratios": list(self.compress_ratios),
        }

    def to_inference(self) -> dict[str, Any]:
        """The `inference/config.json` dict (DeepSeek inference-code naming)."""
        return {
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "moe_inter_dim": self.moe_inter_dim,
            "n_layers": self.n_layers,
            "n_hash_layers": self.n_hash_layers,
            "n_heads": self.n_heads,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "n_activated_experts": self.n_activated_experts,
            "score_func": self.score_func,
            "route_scale": self.route_scale,
            "swiglu_limit": self.swiglu_limit,
            "q_lora_rank": self.q_lora_rank,
            "head_dim": self.head_dim,
            "rope_head_dim": self.rope_head_dim,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "window_size": self.window_size,
            "original_seq_len": self.original_seq_len,
            "rope_theta": self.rope_theta,
            "rope_factor": self.rope_factor,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "dtype": "fp8",
            "scale_fmt": "ue8m0",
            "expert_dtype": self.expert_dtype,
            "compress_rope_theta": self.compress_rope_theta,
            "compress_ratios": list(self.compress_ratios),
        }


# HF name -> Config field. Inference-code names equal the field names, except where listed in _INFERENCE_ALIASES.
_HF_NAMES = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_nextn_predict_layers": "n_mtp_layers",
    "num_attention_heads": "n_heads",
    "qk_rope_head_dim": "rope_head_dim",
    "sliding_window": "window_size",
    "max_position_embeddings": "max_seq_len",
    "moe_intermediate_size": "moe_inter_dim",
    "num_experts_per_tok": "n_activated_experts",
    "num_hash_layers": "n_hash_layers",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "rms_norm_eps": "norm_eps",
}
_FIELDS = {f.name for f in dataclasses.fields(Config)}

# Keys that carry no information for the forward pass (or are fixed for V4); accepted and checked where they matter.
_IGNORED = {
    "architectures", "attention_dropout", "initializer_range", "torch_dtype", "transformers_version", "use_cache",
    "hidden_act", "tie_word_embeddings", "attention_bias", "topk_method", "norm_topk_prob", "num_key_value_heads",
    "quantization_config", "rope_scaling", "model_type", "dtype", "scale_fmt", "auto_map", "max_batch_size",
    "_name_or_path", "layer_types", "pad_token_id", "kv_lora_rank", "partial_rotary_factor", "rope_parameters",
}  # fmt: skip


def _parse(raw: dict[str, Any], where: str) -> Config:
    problems: list[str] = []
    model_type = raw.get("model_type")
    if model_type is not None and model_type != "deepseek_v4":
        problems.append(f"model_type is {model_type!r}, expected 'deepseek_v4'")
    archs = raw.get("architectures")
    if archs is not None and "DeepseekV4ForCausalLM" not in archs:
        problems.append(f"architectures is {archs!r}, expected ['DeepseekV4ForCausalLM']")

    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _IGNORED:
            continue
        field = _HF_NAMES.get(key, key)
        if field not in _FIELDS:
            problems.append(f"unknown key {key!r}")
            continue
        if field in kw and kw[field] != value:
            problems.append(f"{key!r}={value!r} contradicts another name for {field!r} ({kw[field]!r})")
            continue
        kw[field] = value

    # Values that are fixed in V4 but must agree when given.
    def expect(key, want):
        if key in raw and raw[key] != want:
            problems.append(f"{key}={raw[key]!r} is not supported (DeepSeek-V4 has {want!r})")

    expect("num_key_value_heads", 1)
    expect("tie_word_embeddings", False)
    expect("hidden_act", "silu")
    expect("dtype", "fp8")
    expect("scale_fmt", "ue8m0")
    for absent in ("kv_lora_rank", "n_group", "topk_group", "first_k_dense_replace"):
        if raw.get(absent) not in (None, 0):
            problems.append(f"{absent}={raw[absent]!r}: DeepSeek-V4 has no such feature")
    quant = raw.get("quantization_config")
    if quant is not None:
        if quant.get("quant_method", "fp8") != "fp8" or quant.get("weight_block_size", [128, 128]) != [128, 128]:
            problems.append(f"quantization_config {quant!r}: expected fp8 with weight_block_size [128, 128]")
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        if scaling.get("type", scaling.get("rope_type")) not in ("yarn", None):
            problems.append(f"rope_scaling type {scaling.get('type')!r}: expected 'yarn'")
        for src, dst in (("factor", "rope_factor"), ("original_max_position_embeddings", "original_seq_len"),
                         ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):  # fmt: skip
            if src in scaling:
                kw.setdefault(dst, scaling[src])
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    try:
        return Config(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
