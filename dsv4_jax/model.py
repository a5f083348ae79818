"""The DeepSeek-V4 model: blocks with mHC, the MTP block, the transformer, and the functional API.

Use it functionally (the flax Gemma sampler pattern): `ModelState` holds `nnx.split` of a `Transformer` (static graph
definition + parameter state); `forward` is a jitted pure function of that state.

Parameter names mirror the released checkpoint (`layers.{L}.attn.wq_a.weight` is
`state.params["layers"][L]["attn"]["wq_a"]["weight"]`); routed experts are stacked over a leading expert axis
(`layers.{L}.ffn.experts.w1.weight` is `[E, out, in/2]`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax import mhc, nn, ops
from dsv4_jax.attention import Attention
from dsv4_jax.config import Config
from dsv4_jax.moe import MoE
from dsv4_jax.rounding import to_bf16

__all__ = ["Block", "MTPBlock", "Transformer", "ModelState", "Output", "init_random", "abstract", "forward",
           "forward_outputs"]  # fmt: skip

BF16, F32 = jnp.bfloat16, jnp.float32


def _hc_params(cfg: Config, n_out: int, rngs: nnx.Rngs, pre_only: bool = False):
    """(fn, scale, base) of one hyper-connection, initialised so that pre averages the streams, post is 1 and comb
    is near-uniform: the residual stream then stays O(1) however deep the model."""
    n, d = cfg.hc_mult, cfg.dim
    fn = nn.param(nn.normal(rngs, (n_out, n * d), 0.1 * (n * d) ** -0.5), ("hc_mix", "hc_embed"))
    base = jnp.zeros((n_out,), F32).at[:n].set(math.log(1.0 / (n - 1)))  # sigmoid -> 1/n
    scale = nn.param(jnp.ones((1 if pre_only else 3,), F32), (None,))
    return fn, scale, nn.param(base, ("hc_mix",))


class Block(nnx.Module):
    """One decoder layer: attention and MoE sublayers, each wrapped by hc_pre / hc_post."""

    def __init__(self, cfg: Config, layer_id: int, *, rngs: nnx.Rngs):
        self.cfg, self.layer_id = cfg, layer_id
        n_mix = (2 + cfg.hc_mult) * cfg.hc_mult
        self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base = _hc_params(cfg, n_mix, rngs)
        self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base = _hc_params(cfg, n_mix, rngs)
        self.attn_norm = nn.RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = nn.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_id, rngs=rngs)
        self.ffn = MoE(cfg, layer_id, rngs=rngs)

    def hc_pre(self, X_btnd, which: str):
        fn, scale, base = (getattr(self, f"hc_{which}_{p}")[...] for p in ("fn", "scale", "base"))
        c = self.cfg
        return mhc.hc_pre(X_btnd, fn, scale, base, iters=c.hc_sinkhorn_iters, eps=c.hc_eps, norm_eps=c.norm_eps)

    def ffn_sublayer(self, X_btnd, tokens_bt, opts, rec=None, valid_bt=None):
        x, post, comb = self.hc_pre(X_btnd, "ffn")
        x = self.ffn_norm(x)
        y = self.ffn(x, tokens_bt, opts, rec, valid_bt)
        if rec is not None:
            rec["ffn_in"], rec["ffn_out"] = x, y
        return mhc.hc_post(y, X_btnd, post, comb)

    def attn_sublayer(self, X_btnd, attend, rec: dict | None = None):
        """hc_pre, attn_norm, `attend(x) -> (y, aux)`, hc_post -> `(X, aux)`; `attend` is the full-sequence
        attention, its cache-writing variant, or one decode step."""
        x, post, comb = self.hc_pre(X_btnd, "attn")
        x = self.attn_norm(x)
        y, aux = attend(x)
        if rec is not None:
            rec["attn_in"], rec["attn_out"] = x, y
        X_btnd = mhc.hc_post(y, X_btnd, post, comb)
        if rec is not None:
            rec["mid"] = X_btnd
        return X_btnd, aux

    def __call__(self, X_btnd, tokens_bt, opts: ops.Opts, rec: dict | None = None, valid_bt=None):
        X_btnd, _ = self.attn_sublayer(X_btnd, lambda x: (self.attn(x, opts, rec), None), rec)
        return self.ffn_sublayer(X_btnd, tokens_bt, opts, rec, valid_bt)


class MTPBlock(Block):
    """The multi-token-prediction layer: mixes the main residual stream of position p with the embedding of the token
    at p+1 and runs one more (sliding-window, bias-routed) block; its own hc_head and norm, the shared head."""

    def __init__(self, cfg: Config, layer_id: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, layer_id, rngs=rngs)
        d = cfg.dim
        self.e_proj = nn.Fp8Linear(d, d, ("embed_out", "embed"), rngs=rngs, std=0.5 * d**-0.5)
        self.h_proj = nn.Fp8Linear(d, d, ("embed_out", "embed"), rngs=rngs, std=0.5 * d**-0.5)
        self.enorm = nn.RMSNorm(d, cfg.norm_eps)
        self.hnorm = nn.RMSNorm(d, cfg.norm_eps)
        self.norm = nn.RMSNorm(d, cfg.norm_eps)
        self.hc_head_fn, self.hc_head_scale, self.hc_head_base = _hc_params(cfg, cfg.hc_mult, rngs, pre_only=True)

    def mix_inputs(self, X_main_btnd, emb_btd, opts):
        e = self.enorm(emb_btd)
        h = self.hnorm(X_main_btnd)
        return to_bf16(self.h_proj(h, opts).astype(F32) + self.e_proj(e, opts).astype(F32)[:, :, None, :])


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.weight = nn.param(nn.normal(rngs, (vocab, dim), 1.0, BF16), ("vocab", "embed"))

    def __call__(self, tokens):
        return jnp.take(self.weight[...], tokens, axis=0)


class Head(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.weight = nn.param(nn.normal(rngs, (vocab, dim), dim**-0.5, BF16), ("vocab", "embed"))

    def __call__(self, x_btd):
        return ops.f32_linear(x_btd, self.weight[...])


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.dim, rngs=rngs)
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.norm = nn.RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Head(cfg.vocab_size, cfg.dim, rngs=rngs)
        self.hc_head_fn, self.hc_head_scale, self.hc_head_base = _hc_params(cfg, cfg.hc_mult, rngs, pre_only=True)
        self.mtp = nnx.List([MTPBlock(cfg, cfg.n_layers + i, rngs=rngs) for i in range(cfg.n_mtp_layers)])

    def head_logits(self, X_btnd, owner) -> jax.Array:
        """hc_head collapse (with `owner`'s hc_head params), final RMSNorm (`owner.norm`), fp32 logits."""
        c = self.cfg
        y = mhc.hc_head(X_btnd, owner.hc_head_fn[...], owner.hc_head_scale[...], owner.hc_head_base[...],
                        eps=c.hc_eps, norm_eps=c.norm_eps)  # fmt: skip
        return self.head(owner.norm(y))

    def streams(self, tokens_bt):
        """Embedding repeated over the hc_mult residual streams `[b, s, n, d]`."""
        h = self.embed(tokens_bt)
        return jnp.broadcast_to(h[:, :, None, :], (*h.shape[:2], self.cfg.hc_mult, h.shape[-1]))

    def __call__(self, tokens_bt, opts: ops.Opts, mtp_tokens_bt=None, capture: bool = False) -> Output:
        caps: dict[str, Any] = {}
        X = self.streams(tokens_bt)
        for i, layer in enumerate(self.layers):
            rec = {} if capture else None
            X = layer(X, tokens_bt, opts, rec)
            if capture:
                rec["block_out"] = X
                caps[f"layer{i}"] = rec
        logits = self.head_logits(X, self)
        mtp_logits = None
        if mtp_tokens_bt is not None and len(self.mtp):
            mtp = self.mtp[0]
            rec = {} if capture else None
            Xm = mtp(mtp.mix_inputs(X, self.embed(mtp_tokens_bt), opts), mtp_tokens_bt, opts, rec)
            mtp_logits = self.head_logits(Xm, mtp)
            if capture:
                caps["mtp"] = rec
        return Output(logits=logits, mtp_logits=mtp_logits, hidden=X, captures=caps if capture else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Output:
    """logits `[b,s,V]` fp32; mtp_logits `[b,s,V]` or None; hidden: residual streams before hc_head `[b,s,n,d]`;
    captures: per-layer activations when asked for."""

    logits: jax.Array
    mtp_logits: jax.Array | None = None
    hidden: jax.Array | None = None
    captures: dict | None = None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["graphdef", "config"])
@dataclasses.dataclass(frozen=True)
class ModelState:
    """`nnx.split` of a `Transformer`: the static graph definition, the parameter state and the config."""

    graphdef: Any
    params: Any
    config: Config

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)

    @classmethod
    def from_model(cls, model: Transformer) -> ModelState:
        graphdef, params = nnx.split(model)
        return cls(graphdef, params, model.cfg)


def _graphdef(cfg: Config):
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def abstract(cfg: Config) -> ModelState:
    """Shapes and dtypes of every parameter (`jax.ShapeDtypeStruct` leaves, each Param carrying `logical_axes`),
    without allocating: works for the full-size models on any machine."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return ModelState(graphdef, params, cfg)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(cfg: Config, key: jax.Array):
    # Module level, so one compilation per config serves every call (a config is hashable and static).
    return nnx.state(Transformer(cfg, rngs=nnx.Rngs(key)))


def init_random(cfg: Config, key: jax.Array | int = 0) -> ModelState:
    """Random weights in the storage formats (FP8 + UE8M0, MXFP4, bf16, fp32)."""
    key = jax.random.key(key) if isinstance(key, int) else key
    return ModelState(_graphdef(cfg), _init_params(cfg, key), cfg)


def _check_tokens(cfg: Config, tokens) -> None:
    # One validation for every entry point (dtype, rank, empty batch, vocabulary): dsv4_jax.inputs.check_tokens.
    from dsv4_jax.inputs import check_tokens

    check_tokens(cfg, tokens)


@functools.partial(jax.jit, static_argnames=("opts", "capture"))
def _forward(state: ModelState, tokens, mtp_tokens, opts: ops.Opts, capture: bool) -> Output:
    return state.model()(tokens, opts, mtp_tokens, capture)


def forward_outputs(state: ModelState, tokens, *, mtp_tokens=None, capture: bool = False, quant_sim: bool = True,
                    backend: str = "reference") -> Output:  # fmt: skip
    """Full-sequence forward from position 0 with everything: logits, MTP logits (if `mtp_tokens` — the token at
    p+1 for each position p — is given), the final residual streams and, with `capture`, per-layer activations
    (sublayer inputs/outputs, block outputs, router choices and weights, indexer selections, KV rows and indices)."""
    _check_tokens(state.config, tokens)  # before the int32 cast, which would truncate float ids
    tokens = jnp.asarray(tokens, jnp.int32)
    if mtp_tokens is not None:
        _check_tokens(state.config, mtp_tokens)
        mtp_tokens = jnp.asarray(mtp_tokens, jnp.int32)
        if mtp_tokens.shape != tokens.shape:
            raise ValueError(f"mtp_tokens shape {mtp_tokens.shape} differs from tokens shape {tokens.shape}")
    return _forward(state, tokens, mtp_tokens, ops.Opts(quant_sim=quant_sim, backend=backend), capture)


def forward(state: ModelState, tokens, *, quant_sim: bool = True, backend: str = "reference") -> jax.Array:
    """Logits `[B, S, V]` fp32 for `tokens [B, S]` (positions 0..S-1), jitted."""
    return forward_outputs(state, tokens, quant_sim=quant_sim, backend=backend).logits
