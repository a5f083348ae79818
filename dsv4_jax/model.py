"""The DeepSeek-V4 model: blocks with mHC, the MTP block, the transformer with its layers stacked by kind, and the
parameter state.

Use it functionally (the flax Gemma sampler pattern): `ModelState` holds `nnx.split` of a `Transformer` (static graph
definition + parameter state); every model function (`dsv4_jax.runner`) is a jitted pure function of that state.

Layers of the same structure are stored stacked and run under one `lax.scan` (`dsv4_jax.runner`), so a program
compiles a handful of layer bodies, not 43 (Pro: 61). `layer_groups(cfg)` splits the layers into runs of a repeating
unit of layer kinds (ratio, hash routing): V4-Flash is `[window, hash] x 2`, `[CSA, hash] x 1`, `[HCA, CSA] x 20`;
Pro `[HCA, hash] x 2`, `[CSA, hash] x 1`, `[HCA, CSA] x 29`. Layer L's parameters are
`state.params["groups"][g][u][...]` at index r of the leading (`"layers"`) axis, `(g, u, r) = layer_slot(cfg, L)`;
`state.block(L)` gives that layer as a `Block`. Checkpoints keep the released per-layer names
(`layers.{L}.attn.wq_a.weight`, `dsv4_jax.checkpoint.layout`); routed experts are stacked over an expert axis
(`...ffn.experts.w1.weight` is `[E, out, in/2]`).
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
from dsv4_jax.options import Opts
from dsv4_jax.rounding import to_bf16

__all__ = ["Block", "MTPBlock", "Transformer", "ModelState", "LayerKind", "LayerGroup", "layer_groups", "layer_slot",
           "init_random", "abstract"]  # fmt: skip

BF16, F32 = jnp.bfloat16, jnp.float32


# ---- layer kinds and groups ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What makes two layers structurally different: the compression ratio and hash routing."""

    ratio: int
    hash_routed: bool


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Layers `first ..` made of `repeats` copies of the unit `unit` (consecutive layer kinds)."""

    first: int
    unit: tuple[LayerKind, ...]
    repeats: int

    def layer(self, u: int, r: int) -> int:
        return self.first + r * len(self.unit) + u

    @property
    def n_layers(self) -> int:
        return len(self.unit) * self.repeats


def layer_kinds(cfg: Config) -> tuple[LayerKind, ...]:
    return tuple(LayerKind(cfg.compress_ratios[i], cfg.is_hash_layer(i)) for i in range(cfg.n_layers))


@functools.lru_cache(maxsize=32)
def layer_groups(cfg: Config, max_unit: int = 4) -> tuple[LayerGroup, ...]:
    """Greedy split of the layers into repeated units: at each layer, the unit (of up to `max_unit` kinds) whose
    repeats cover the most layers, the shortest unit on ties."""
    kinds = layer_kinds(cfg)
    groups, i = [], 0
    while i < len(kinds):
        best = (1, 1)  # (layers covered, unit length)
        for u in range(1, max_unit + 1):
            unit = kinds[i : i + u]
            if len(unit) < u:
                break
            r = 1
            while kinds[i + r * u : i + (r + 1) * u] == unit:
                r += 1
            if (u == 1 or r > 1) and r * u > best[0]:  # a longer unit only counts if it repeats
                best = (r * u, u)
        covered, u = best
        groups.append(LayerGroup(i, kinds[i : i + u], covered // u))
        i += covered
    return tuple(groups)


def layer_slot(cfg: Config, layer: int) -> tuple[int, int, int]:
    """(group, position in the unit, repeat) of main layer `layer`."""
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} is outside 0..{cfg.n_layers - 1}")
    for g, grp in enumerate(layer_groups(cfg)):
        if layer < grp.first + grp.n_layers:
            r, u = divmod(layer - grp.first, len(grp.unit))
            return g, u, r
    raise AssertionError("unreachable")


# ---- blocks ----------------------------------------------------------------------------------------------------


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

    def __init__(self, cfg: Config, kind: LayerKind, *, rngs: nnx.Rngs):
        self.cfg, self.kind = cfg, kind
        n_mix = (2 + cfg.hc_mult) * cfg.hc_mult
        self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base = _hc_params(cfg, n_mix, rngs)
        self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base = _hc_params(cfg, n_mix, rngs)
        self.attn_norm = nn.RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = nn.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, kind.ratio, rngs=rngs)
        self.ffn = MoE(cfg, kind.hash_routed, rngs=rngs)

    def hc_pre(self, X_btnd, which: str, opts: Opts, norm: nn.RMSNorm):
        """(x, post, comb) of the sublayer `which`, x through the sublayer's `norm` (the kernel fuses the norm)."""
        # get_value(): in the layer scan a LayerSlice of the stacked parameter, which the kernel reads in place
        fn, scale, base = (getattr(self, f"hc_{which}_{p}").get_value() for p in ("fn", "scale", "base"))
        c = self.cfg
        return mhc.hc_pre(X_btnd, fn, scale, base, iters=c.hc_sinkhorn_iters, eps=c.hc_eps, norm_eps=c.norm_eps,
                          opts=opts, x_norm_w=norm.weight.get_value(), x_norm_eps=norm.eps)  # fmt: skip

    def ffn_sublayer(self, X_btnd, tokens_bt, opts: Opts, rec=None, valid_bt=None):
        with jax.named_scope("mhc"):
            x, post, comb = self.hc_pre(X_btnd, "ffn", opts, norm=self.ffn_norm)
        with jax.named_scope("moe"):
            y = self.ffn(x, tokens_bt, opts, rec, valid_bt)
        if rec is not None:
            rec.ffn_in, rec.ffn_out = x, y
        with jax.named_scope("mhc"):
            return mhc.hc_post(y, X_btnd, post, comb)

    def step(self, X_bknd, tokens_bk, start_b, n_new_b, lc, opts: Opts, fresh: bool, rec=None):
        """k new tokens per row on top of the layer cache `lc` (see `Attention.step`) -> (streams, LayerUpdate).
        Tokens past a row's `n_new` (padding) get no routed experts."""
        with jax.named_scope("mhc"):
            x, post, comb = self.hc_pre(X_bknd, "attn", opts, norm=self.attn_norm)
        with jax.named_scope("attention"):
            y, upd = self.attn.step(x, start_b, n_new_b, lc, opts, fresh, rec)
        if rec is not None:
            rec.attn_in, rec.attn_out = x, y
        with jax.named_scope("mhc"):
            X_bknd = mhc.hc_post(y, X_bknd, post, comb)
        if rec is not None:
            rec.mid = X_bknd
        valid = jnp.arange(tokens_bk.shape[1])[None, :] < n_new_b[:, None]
        return self.ffn_sublayer(X_bknd, tokens_bk, opts, rec, valid), upd

    def __call__(self, X_btnd, tokens_bt, opts: Opts = Opts(), rec=None):
        """The whole sequence from position 0, no cache (for studying one block)."""
        b, s = tokens_bt.shape
        zero = jnp.zeros((b,), jnp.int32)
        return self.step(X_btnd, tokens_bt, zero, zero + s, None, opts, True, rec)[0]


class MTPBlock(Block):
    """The multi-token-prediction layer: mixes the main residual stream of position p with the embedding of the token
    at p+1 and runs one more (sliding-window, bias-routed) block; its own hc_head and norm, the shared head."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, LayerKind(cfg.compress_ratios[cfg.n_layers], False), rngs=rngs)
        d = cfg.dim
        self.e_proj = nn.Fp8Linear(d, d, ("embed_out", "embed"), rngs=rngs, std=0.5 * d**-0.5)
        self.h_proj = nn.Fp8Linear(d, d, ("embed_out", "embed"), rngs=rngs, std=0.5 * d**-0.5)
        self.enorm = nn.RMSNorm(d, cfg.norm_eps)
        self.hnorm = nn.RMSNorm(d, cfg.norm_eps)
        self.norm = nn.RMSNorm(d, cfg.norm_eps)
        self.hc_head_fn, self.hc_head_scale, self.hc_head_base = _hc_params(cfg, cfg.hc_mult, rngs, pre_only=True)

    def mix_inputs(self, X_main_btnd, emb_btd, opts: Opts):
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


def _with_layer_axis(state):
    return jax.tree.map(lambda v: v.replace(logical_axes=("layers", *v.get_metadata()["logical_axes"])), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))  # fmt: skip


def stacked_block(cfg: Config, kind: LayerKind, repeats: int, key: jax.Array) -> Block:
    """A `Block` whose every parameter is stacked over `repeats` layers (leading logical axis "layers"), each layer
    initialised from its own key, one after the other (`lax.map`: one layer's temporaries at a time)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, kind, rngs=nnx.Rngs(0))))
    one = lambda k: nnx.state(nn.pooled(lambda rngs: Block(cfg, kind, rngs=rngs), k))  # noqa: E731
    keys = jax.random.split(key, repeats)
    # Random bytes need no fp32 temporaries, so all layers are drawn at once (vmap); normal draws + quantization
    # would hold every layer's fp32 weights at once, so those go one layer at a time (lax.map, whose stacked output
    # XLA then copies: a stack's worth of temporaries).
    states = jax.vmap(one)(keys) if nn.init_kind() == "bytes" else jax.lax.map(one, keys)
    return nnx.merge(graphdef, _with_layer_axis(states))


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.dim, rngs=rngs)
        self.groups = nnx.List(
            [nnx.List([stacked_block(cfg, kind, grp.repeats, rngs.params()) for kind in grp.unit])
             for grp in layer_groups(cfg)]
        )  # fmt: skip
        self.norm = nn.RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Head(cfg.vocab_size, cfg.dim, rngs=rngs)
        self.hc_head_fn, self.hc_head_scale, self.hc_head_base = _hc_params(cfg, cfg.hc_mult, rngs, pre_only=True)
        self.mtp = nnx.List([MTPBlock(cfg, rngs=rngs) for _ in range(cfg.n_mtp_layers)])

    def head_logits(self, X_btnd, owner) -> jax.Array:
        """hc_head collapse (with `owner`'s hc_head params), final RMSNorm (`owner.norm`), fp32 logits."""
        c = self.cfg
        with jax.named_scope("head"):
            y = mhc.hc_head(X_btnd, owner.hc_head_fn[...], owner.hc_head_scale[...], owner.hc_head_base[...],
                            eps=c.hc_eps, norm_eps=c.norm_eps)  # fmt: skip
            return self.head(owner.norm(y))

    def streams(self, tokens_bt):
        """Embedding repeated over the hc_mult residual streams `[b, s, n, d]`."""
        h = self.embed(tokens_bt)
        return jnp.broadcast_to(h[:, :, None, :], (*h.shape[:2], self.cfg.hc_mult, h.shape[-1]))


# ---- the parameter state ---------------------------------------------------------------------------------------


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

    def block(self, layer: int) -> Block:
        """Main layer `layer` as a `Block` of its own (its parameters sliced out of the stacks), for studying it."""
        g, u, r = layer_slot(self.config, layer)
        graphdef, params = nnx.split(self.model().groups[g][u])
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[r], params))


def _graphdef(cfg: Config):
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def abstract(cfg: Config) -> ModelState:
    """Shapes and dtypes of every parameter (`jax.ShapeDtypeStruct` leaves, each Param carrying `logical_axes`),
    without allocating: works for the full-size models on any machine."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return ModelState(graphdef, params, cfg)


@functools.lru_cache(maxsize=8)
def _init_fn(cfg: Config, values: str, shardings_key):
    """The jitted init of `cfg` (one compilation per config, value kind and placement)."""
    mesh_rules, shardings = shardings_key if shardings_key is not None else (None, None)

    def init(key):
        with nn.init_values(values):
            return nnx.state(nn.pooled(lambda rngs: Transformer(cfg, rngs=rngs), key))

    return jax.jit(init, out_shardings=shardings)


def init_random(cfg: Config, key: jax.Array | int = 0, *, mesh=None, rules=None, values: str = "normal") -> ModelState:
    """Random weights in the storage formats (FP8 + UE8M0, MXFP4, bf16, fp32), created where they live.

    Args:
      mesh: place every parameter by `dsv4_jax.sharding.param_shardings(abstract(cfg), mesh, rules)`: each device
        draws only its own shards (abstract -> shardings -> init); the model never exists on one device or the host.
      values: "normal" (normal draws, quantized: a well-behaved random model) or "bytes" (random bytes in the
        storage formats, block scales set for the same standard deviation: no fp32 copy and no quantization pass;
        for speed runs of the full-size models).
    """
    key = jax.random.key(key) if isinstance(key, int) else key
    shardings_key = None
    if mesh is not None:
        from dsv4_jax.sharding import param_shardings

        shardings_key = ((mesh, rules), param_shardings(abstract(cfg), mesh, rules))
    fn = _init_fn(cfg, values, _Hashable(shardings_key) if shardings_key else None)
    return ModelState(_graphdef(cfg), fn(key), cfg)


class _Hashable:
    """Hashes the (mesh, rules) that determine a shardings tree, and unpacks to (key, shardings)."""

    def __init__(self, item):
        self.key, self.value = item

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self.key == other.key

    def __iter__(self):
        return iter((self.key, self.value))
