"""Bridge from a `dsv4_jax` model state to the DeepSeek-V4 implementation of HF `transformers` (torch, CPU).

`hf_config(cfg)` builds a `DeepseekV4Config` from our `Config`; `hf_state_dict(state)` dequantizes our storage
formats (FP8 e4m3 + UE8M0 128x128 block scales, packed MXFP4 experts) to float32 and renames them to transformers'
parameter names (spec §6.2, checked against `modeling_deepseek_v4.py`); `build_hf_model(state)` returns a float32
`DeepseekV4ForCausalLM` holding exactly those weights (the MTP layer, which transformers does not implement, is
left out).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from dsv4_jax import Config, quant

__all__ = ["hf_config", "native_float_tensors", "hf_state_dict", "build_hf_model", "to_bf16_like_hf"]

# Native-name prefix rules inside one layer (`layers.L.` stripped), first match wins.
_LAYER_RULES = [
    (r"attn_norm\.weight", "input_layernorm.weight"),
    (r"ffn_norm\.weight", "post_attention_layernorm.weight"),
    (r"hc_attn_(fn|base|scale)", r"attn_hc.\1"),
    (r"hc_ffn_(fn|base|scale)", r"ffn_hc.\1"),
    (r"attn\.attn_sink", "self_attn.sinks"),
    (r"attn\.wq_a\.weight", "self_attn.q_a_proj.weight"),
    (r"attn\.q_norm\.weight", "self_attn.q_a_norm.weight"),
    (r"attn\.wq_b\.weight", "self_attn.q_b_proj.weight"),
    (r"attn\.wkv\.weight", "self_attn.kv_proj.weight"),
    (r"attn\.kv_norm\.weight", "self_attn.kv_norm.weight"),
    (r"attn\.wo_a\.weight", "self_attn.o_a_proj.weight"),
    (r"attn\.wo_b\.weight", "self_attn.o_b_proj.weight"),
    (r"attn\.compressor\.wkv\.weight", "self_attn.compressor.kv_proj.weight"),
    (r"attn\.compressor\.wgate\.weight", "self_attn.compressor.gate_proj.weight"),
    (r"attn\.compressor\.ape", "self_attn.compressor.position_bias"),
    (r"attn\.compressor\.norm\.weight", "self_attn.compressor.kv_norm.weight"),
    (r"attn\.indexer\.wq_b\.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    (r"attn\.indexer\.weights_proj\.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    (r"attn\.indexer\.compressor\.wkv\.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    (r"attn\.indexer\.compressor\.wgate\.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    (r"attn\.indexer\.compressor\.ape", "self_attn.compressor.indexer.position_bias"),
    (r"attn\.indexer\.compressor\.norm\.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    (r"ffn\.gate\.weight", "mlp.gate.weight"),
    (r"ffn\.gate\.bias", "mlp.gate.e_score_correction_bias"),
    (r"ffn\.gate\.tid2eid", "mlp.gate.tid2eid"),
    (r"ffn\.shared_experts\.w1\.weight", "mlp.shared_experts.gate_proj.weight"),
    (r"ffn\.shared_experts\.w3\.weight", "mlp.shared_experts.up_proj.weight"),
    (r"ffn\.shared_experts\.w2\.weight", "mlp.shared_experts.down_proj.weight"),
    (r"ffn\.experts\.w2\.weight", "mlp.experts.down_proj"),
]
_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}


def hf_config(cfg: Config) -> DeepseekV4Config:
    """A float32, eager-attention `DeepseekV4Config` with the values of `cfg` (our `Config.to_hf()` dict, adapted:
    no FP8 `quantization_config` since we hand over dequantized weights, the YaRN parameters under
    `rope_parameters` with attention_factor 1 (no mscale), main layers only). transformers warns that the YaRN
    factor differs from max_position_embeddings / original_max_position_embeddings; it uses the explicit factor, as
    the reference does, so the tables agree (checked by the test)."""
    d = cfg.to_hf()
    for key in ("quantization_config", "expert_dtype", "rope_scaling", "torch_dtype", "topk_method", "architectures"):
        d.pop(key)
    d["compress_ratios"] = list(cfg.compress_ratios[: cfg.n_layers])
    d["vocab_size"] = cfg.vocab_size
    d["rope_parameters"] = {
        "rope_type": "yarn",
        "factor": cfg.rope_factor,
        "original_max_position_embeddings": cfg.original_seq_len,
        "beta_fast": cfg.beta_fast,
        "beta_slow": cfg.beta_slow,
        "attention_factor": 1.0,
    }
    hf = DeepseekV4Config(**d)
    hf._attn_implementation = "eager"
    hf.use_cache = False
    return hf


def native_float_tensors(state) -> dict[str, np.ndarray]:
    """Every parameter of `state` under its native name, dequantized to float32 numpy (FP8 128x128-block and MXFP4
    weights through `dsv4_jax.quant`); routed experts stay stacked (`layers.L.ffn.experts.w1.weight` `[E, out, in]`)
    and `tid2eid` stays integer."""
    from dsv4_jax.checkpoint.layout import per_layer

    flat = {spec.key: v for spec, v in per_layer(state)}
    out = {}
    for name, v in flat.items():
        if name.endswith(".scale") and name[: -len("scale")] + "weight" in flat:
            continue
        if name.endswith(".weight") and (sname := name[: -len("weight")] + "scale") in flat:
            s = flat[sname]
            if v.dtype == jnp.uint8:  # MXFP4, [E, out, in/2] packed
                v = quant.dequant_fp4_weight(v, s)
            elif v.ndim == 3:  # FP8 experts (expert_dtype fp8)
                v = jnp.stack([quant.dequant_fp8_weight(v[e], s[e]) for e in range(v.shape[0])])
            else:
                v = quant.dequant_fp8_weight(v, s)
        out[name] = np.asarray(v) if v.dtype == jnp.int32 else np.asarray(v.astype(jnp.float32))
    return out


def hf_state_dict(state, tensors: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """transformers' state dict (float32; `tid2eid` int64) for the main layers of `state` (MTP dropped)."""
    cfg = state.config
    tensors = native_float_tensors(state) if tensors is None else tensors
    sd: dict[str, torch.Tensor] = {}
    pending_up: dict[int, dict[str, np.ndarray]] = {}
    for name, v in tensors.items():
        if name.startswith("mtp."):
            continue
        if name in _GLOBAL:
            sd[_GLOBAL[name]] = torch.from_numpy(np.array(v))
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.*)", name)
        if m is None:
            raise KeyError(f"no transformers name for {name}")
        layer, rest = int(m[1]), m[2]
        pre = f"model.layers.{layer}."
        if rest in ("ffn.experts.w1.weight", "ffn.experts.w3.weight"):
            pending_up.setdefault(layer, {})[rest[12:14]] = v
            continue
        for pat, repl in _LAYER_RULES:
            if re.fullmatch(pat, rest):
                hf_name = pre + re.sub(pat, repl, rest)
                break
        else:
            raise KeyError(f"no transformers name for {name}")
        t = torch.from_numpy(np.array(v))
        sd[hf_name] = t.long() if rest.endswith("tid2eid") else t
    for layer, ws in pending_up.items():  # merged [E, 2I, d], w1 (gate) first, then w3 (up)
        sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.from_numpy(np.concatenate([ws["w1"], ws["w3"]], 1))
    if len(pending_up) != cfg.n_layers:
        raise KeyError(f"routed experts found for {sorted(pending_up)} of {cfg.n_layers} layers")
    return sd


def build_hf_model(state, tensors: dict[str, np.ndarray] | None = None) -> DeepseekV4ForCausalLM:
    """A float32 `DeepseekV4ForCausalLM` in eval mode holding `state`'s weights; every parameter and persistent
    buffer of the model must be covered (and nothing else given)."""
    cfg = state.config
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(hf_config(cfg)).float().eval()
    sd = hf_state_dict(state, tensors)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}, wrong shapes "
                       f"{[(k, tuple(sd[k].shape), tuple(expected[k].shape)) for k in wrong]}")  # fmt: skip
    model.load_state_dict(sd, strict=True)
    return model


# transformers keeps these in float32 even in a bf16 model (`_keep_in_fp32_modules_strict`); rotary tables too.
_KEEP_FP32 = re.compile(
    r"(attn_hc|ffn_hc|hc_head|sinks|position_bias|e_score_correction_bias|q_a_norm|kv_norm|input_layernorm|"
    r"post_attention_layernorm|model\.norm|inv_freq)"
)


def to_bf16_like_hf(model: DeepseekV4ForCausalLM) -> DeepseekV4ForCausalLM:
    """Casts `model` in place to the dtype layout transformers loads a bf16 checkpoint in: bf16 weights, the
    `_keep_in_fp32_modules_strict` modules (mHC, norms, sinks, compressor position bias, router bias) and the RoPE
    tables in float32."""
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.is_floating_point() and not _KEEP_FP32.search(name):
                p.data = p.data.to(torch.bfloat16)
    return model
