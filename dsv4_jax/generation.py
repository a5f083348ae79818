"""Text generation: prefill, then decode steps in one compiled `lax.while_loop` (or a streaming Python loop).

    sampler = Sampler(max_new_tokens=32, temperature=0.7, top_p=0.9)
    out = generate(state, tokens, lengths, sampler=sampler, key=0)     # out.tokens [B, N], out.logprobs [B, N]

`Sampler` is a frozen (hashable) dataclass and a static argument: calls with the same sampler and the same shapes
reuse one compiled program. Per row, generation stops after the EOS token (included in the output) or after
`max_new_tokens`; later positions hold `pad_id` (log-prob 0, MTP logits 0); `num_tokens[b]` counts the real ones.

Step i emits token `i` of each row: step 0 samples from the prefill logits; step i >= 1 decodes token i-1 at
position `length + i - 1`. Only what is asked for runs: with `Sampler(mtp=True)` each step also runs the MTP layer on
the main stream of the position just decoded and the token just sampled (`mtp_logits[:, i]` is the draft
distribution of token i+1); greedy sampling takes an argmax, top-k / top-p find their thresholds by bisection over
the float ordering (32 passes over the vocabulary, no sort). `opts` selects numerics and kernels as everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import exec_cache, runner
from dsv4_jax.cache import Cache, init_cache
from dsv4_jax.model import ModelState
from dsv4_jax.options import Opts

__all__ = ["Sampler", "GenerateOutput", "generate", "generate_stream", "GenerationStream", "sample_logits",
           "capacity_needed"]  # fmt: skip

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static generation settings (hashable: a jit cache key).

    temperature 0 is greedy (argmax); otherwise sample from `softmax(logits / temperature)` restricted to the
    `top_k` most likely tokens (0 = all) and to the smallest set whose probability reaches `top_p` (1 = all).
    `eos_id` None never stops early. `mtp` also runs the MTP layer and returns its draft logits of each step;
    `logits` keeps the logits each token was sampled from (both `[B, N, V]` fp32: off by default).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = 1
    pad_id: int = 1
    mtp: bool = False
    logits: bool = False

    def __post_init__(self):
        for field in ("max_new_tokens", "top_k"):  # 3.5 would otherwise be accepted and truncated inside jit
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise ValueError(f"{field}={v!r} must be an integer, got {type(v).__name__}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filter)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    def static(self) -> Sampler:
        """The settings that shape the program (the jit key); the others are passed as traced scalars."""
        return dataclasses.replace(self, temperature=0.0, top_k=0, top_p=1.0, eos_id=None)

    def knobs(self) -> dict:
        eos = -1 if self.eos_id is None else self.eos_id
        return {"temperature": jnp.float32(self.temperature), "top_k": jnp.int32(self.top_k),
                "top_p": jnp.float32(self.top_p), "eos": jnp.int32(eos)}  # fmt: skip


def _order_keys(x):
    """uint32 keys with the order of the float32 values `x` (negatives below positives)."""
    bits = jax.lax.bitcast_convert_type(x.astype(F32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key_where(keys, pred):
    """The largest uint32 `t` with `pred(t)` False, for `pred` monotone (False below some key, True above), built
    bit by bit from the top: 32 passes, each one reduction over the keys. `pred(t) -> [B, 1] bool`."""

    def bit(i, ans):
        cand = ans | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(pred(cand), ans, cand)

    return jax.lax.fori_loop(0, 32, bit, jnp.zeros((keys.shape[0], 1), jnp.uint32))


def _sample(logits, key, temperature, top_k, top_p):
    v = logits.shape[-1]
    lg = logits / jnp.maximum(temperature, F32(1e-6))
    keys = _order_keys(lg)
    # top-k: keep values >= the k-th largest (ties with it kept): the largest key t with count(keys >= t) >= k.
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v).astype(jnp.int32)
    kth = _largest_key_where(keys, lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True) < k)
    lg = jnp.where(keys >= kth, lg, -jnp.inf)
    # top-p: keep token i if the probability of the strictly more likely tokens is < top_p (the first is always
    # kept; ties are kept together): keys above the largest key t whose strictly-greater mass still reaches top_p.
    p = jax.nn.softmax(lg, axis=-1)
    pkeys = _order_keys(p)
    cut = _largest_key_where(pkeys, lambda t: jnp.sum(jnp.where(pkeys > t, p, 0.0), -1, keepdims=True) < top_p)
    lg = jnp.where((top_p < 1) & (pkeys <= cut), -jnp.inf, lg)
    return jax.random.categorical(key, lg, axis=-1).astype(jnp.int32)


def sample_logits(logits_bv: jax.Array, key: jax.Array, temperature=0.0, top_k=0, top_p=1.0) -> jax.Array:
    """Token ids `[B]` from logits `[B, V]`. The settings may be traced scalars (one program serves them all):
    temperature 0 = argmax (nothing else runs); else sample `softmax(logits / temperature)` over the `top_k`
    largest logits (0 = all; ties with the k-th are kept) further cut to the smallest most-likely set whose
    probability reaches `top_p`. No full-vocabulary sort: the thresholds are found by bisection."""
    logits = logits_bv.astype(F32)
    temperature, top_k, top_p = jnp.asarray(temperature, F32), jnp.asarray(top_k), jnp.asarray(top_p, F32)
    return jax.lax.cond(
        temperature == 0,
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
        lambda: _sample(logits, key, temperature, top_k, top_p),
    )


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "logprobs", "mtp_logits", "num_tokens", "logits"],
                   meta_fields=[])  # fmt: skip
@dataclasses.dataclass
class GenerateOutput:
    """tokens `[B, N]` int32 (pad after a row's end); logprobs `[B, N]` fp32: log-probability of each token under
    the model (temperature 1, before filtering); mtp_logits `[B, N, V]` fp32 or None; num_tokens `[B]` int32;
    logits `[B, N, V]` fp32: the distribution each token was sampled from (only with `Sampler(logits=True)`)."""

    tokens: jax.Array
    logprobs: jax.Array
    mtp_logits: jax.Array | None
    num_tokens: jax.Array
    logits: jax.Array | None = None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["cache", "step", "last", "done", "key", "out", "knobs"], meta_fields=[])  # fmt: skip
@dataclasses.dataclass
class _Loop:
    cache: Cache
    step: jax.Array  # scalar int32: the index of the next token to emit
    last: jax.Array  # [B] the last emitted token
    done: jax.Array  # [B] bool
    key: jax.Array
    out: GenerateOutput
    knobs: dict  # traced sampling settings: temperature, top_k, top_p, eos (-1 = none)


def _logprob(logits, tok):
    return jnp.take_along_axis(jax.nn.log_softmax(logits.astype(F32), axis=-1), tok[:, None], axis=-1)[:, 0]


def _emit(sampler: Sampler, loop: _Loop, i, tok, logits, mtp_logits, active) -> _Loop:
    out = loop.out
    tokens = out.tokens.at[:, i].set(jnp.where(active, tok, sampler.pad_id))
    logprobs = out.logprobs.at[:, i].set(jnp.where(active, _logprob(logits, tok), 0.0))
    mtp = out.mtp_logits
    if mtp is not None:
        mtp = mtp.at[:, i].set(jnp.where(active[:, None], mtp_logits, 0.0))
    kept = out.logits
    if kept is not None:
        kept = kept.at[:, i].set(jnp.where(active[:, None], logits.astype(F32), 0.0))
    done = loop.done | ~active | (tok == loop.knobs["eos"])
    done = done | (i + 1 >= sampler.max_new_tokens)
    out = GenerateOutput(tokens, logprobs, mtp, out.num_tokens + active.astype(jnp.int32), kept)
    # int32, not weakly typed: the start program (i = 0, a Python int) and the step program give one loop type.
    step = jnp.asarray(i + 1, jnp.int32)
    return dataclasses.replace(loop, step=step, last=jnp.where(active, tok, loop.last), done=done, out=out)


def _sample_knobs(loop_knobs, logits, key):
    return sample_logits(logits, key, loop_knobs["temperature"], loop_knobs["top_k"], loop_knobs["top_p"])


def _start(state: ModelState, tokens, lengths, key, knobs, sampler: Sampler, max_len: int, opts: Opts) -> _Loop:
    """Prefill, sample token 0, MTP over the prompt."""
    b, s = tokens.shape
    n, v = sampler.max_new_tokens, state.config.vocab_size
    cache = init_cache(state.config, b, max_len, opts.cache_layout)
    use_mtp = sampler.mtp and state.config.n_mtp_layers > 0
    # MTP input at p: token p+1; at the last prompt position that is the token sampled from the prefill's logits
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
    if runner.chunked(opts, s):
        logits, X_last, cache = runner._prefill_chunks(state, cache, tokens, lengths, opts, nxt if use_mtp else None)
    else:
        logits, hidden, cache = runner._prefill(state, cache, tokens, lengths, opts)
    key, sub = jax.random.split(key)
    tok = _sample_knobs(knobs, logits, sub)
    mtp_logits = None
    if use_mtp and runner.chunked(opts, s):  # the chunks ran MTP on all but each row's last prompt position
        one = jnp.ones((b,), jnp.int32)
        mtp_logits, cache = runner._mtp_extend(state, cache, X_last, tok[:, None], one, opts)
        mtp_logits = mtp_logits[:, 0]
    elif use_mtp:
        nxt = jnp.where(jnp.arange(s)[None, :] == (lengths - 1)[:, None], tok[:, None], nxt)
        mtp_logits, cache = runner._mtp_prefill(state, cache, hidden, nxt, opts)
    out = GenerateOutput(
        tokens=jnp.full((b, n), sampler.pad_id, jnp.int32),
        logprobs=jnp.zeros((b, n), F32),
        mtp_logits=jnp.zeros((b, n, v), F32) if use_mtp else None,
        num_tokens=jnp.zeros((b,), jnp.int32),
        logits=jnp.zeros((b, n, v), F32) if sampler.logits else None,
    )
    loop = _Loop(cache, jnp.int32(0), tok, jnp.zeros((b,), bool), key, out, knobs)
    return _emit(sampler, loop, 0, tok, logits, mtp_logits, jnp.ones((b,), bool))


def _step(state: ModelState, loop: _Loop, sampler: Sampler, opts: Opts) -> _Loop:
    """Decode the last token of every unfinished row, sample the next one, run MTP on it."""
    active = ~loop.done
    logits, hidden, cache = runner._decode(state, loop.cache, loop.last, opts, active)
    key, sub = jax.random.split(loop.key)
    tok = _sample_knobs(loop.knobs, logits, sub)
    mtp_logits = None
    if loop.out.mtp_logits is not None:
        mtp_logits, cache = runner._mtp_decode(state, cache, hidden, tok, opts, active)
    loop = dataclasses.replace(loop, cache=cache, key=key)
    return _emit(sampler, loop, loop.step, tok, logits, mtp_logits, active)


TRACE_COUNT = {"generate": 0}  # incremented each time the whole-generation program is traced (tests use it)


@functools.partial(jax.jit, static_argnames=("sampler", "max_len", "opts"))
def _generate(state: ModelState, tokens, lengths, key, knobs, sampler: Sampler, max_len: int,
              opts: Opts) -> GenerateOutput:  # fmt: skip
    TRACE_COUNT["generate"] += 1
    loop = _start(state, tokens, lengths, key, knobs, sampler, max_len, opts)
    loop = jax.lax.while_loop(
        lambda lp: (lp.step < sampler.max_new_tokens) & ~jnp.all(lp.done),
        lambda lp: _step(state, lp, sampler, opts),
        loop,
    )
    return loop.out


_start_jit = jax.jit(_start, static_argnames=("sampler", "max_len", "opts"))
_step_jit = jax.jit(_step, static_argnames=("sampler", "opts"), donate_argnames=("loop",))


def capacity_needed(prompt_len: int, sampler: Sampler) -> int:
    """Cache positions a row of `prompt_len` tokens needs: the last generated token is never fed back."""
    return prompt_len + sampler.max_new_tokens - 1


def _prepare(state, tokens, lengths, sampler, key, max_len):
    # The shared validation (dsv4_jax.inputs): a 1-D prompt is refused as in `forward`, not made batch 1.
    tokens, lengths = runner.check_prompts(state.config, tokens, lengths, max_len)
    width = tokens.shape[1]
    max_len = width + sampler.max_new_tokens if max_len is None else int(max_len)
    if width > max_len:
        raise ValueError(f"padded prompt width {width} exceeds max_len={max_len}")
    need = capacity_needed(int(lengths.max()), sampler)
    if need > max_len:
        raise ValueError(f"max_new_tokens={sampler.max_new_tokens} with a {int(lengths.max())}-token prompt needs "
                         f"{need} cache positions, past max_len={max_len}")  # fmt: skip
    if max_len > state.config.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={state.config.max_seq_len}")
    key = jax.random.key(key) if isinstance(key, int) else key
    return jnp.asarray(tokens), jnp.asarray(lengths), key, max_len


def generate(state: ModelState, tokens, lengths=None, *, sampler: Sampler = Sampler(), key: jax.Array | int = 0,
             max_len: int | None = None, opts: Opts = Opts()) -> GenerateOutput:  # fmt: skip
    """Generates up to `sampler.max_new_tokens` tokens for each right-padded prompt of `tokens [B, S]` (`lengths
    [B]`, default all S). One compiled program (prefill + `lax.while_loop`) per (shapes, sampler, max_len, opts);
    the cache holds `max_len` positions (default S + max_new_tokens). Same key, same output."""
    tokens, lengths, key, max_len = _prepare(state, tokens, lengths, sampler, key, max_len)
    args = (state, tokens, lengths, key, sampler.knobs())
    # Static arguments by name in both paths: one entry in jit's trace cache serves both.
    static = {"sampler": sampler.static(), "max_len": max_len, "opts": opts}
    if exec_cache.folder() is None:
        return _generate(*args, **static)
    return exec_cache.compiled("generate", _generate, args, static)(*args)


def _shapes(out_info):
    """The loop state's shapes from the start program's output info (what `jax.eval_shape` gives, without tracing
    `_start` a second time): shardings and layouts dropped, so the step program is lowered as from `eval_shape`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.weak_type), out_info)


class GenerationStream:
    """Streaming generation: a Python loop over the jitted start (prefill + token 0) and decode step. Iterating
    yields `(tokens [B], active [B])` per step as soon as it is computed (`active[b]` False: row b had already
    finished and its token is padding); afterwards `output` holds the `GenerateOutput`. Same key, same tokens as
    `generate`. `compile()` compiles both programs ahead of time and returns the seconds it took; `prefill_s` and
    `decode_s` time the runs (prefill includes sampling token 0 and the MTP pass over the prompt)."""

    def __init__(self, state: ModelState, tokens, lengths=None, *, sampler: Sampler = Sampler(),
                 key: jax.Array | int = 0, max_len: int | None = None, opts: Opts = Opts()):  # fmt: skip
        self.state, self.sampler, self.opts = state, sampler.static(), opts
        self.tokens, self.lengths, self.key, self.max_len = _prepare(state, tokens, lengths, sampler, key, max_len)
        self.key = (self.key, sampler.knobs())
        self._start = functools.partial(_start_jit, sampler=self.sampler, max_len=self.max_len, opts=opts)
        self._step = functools.partial(_step_jit, sampler=self.sampler, opts=opts)
        self.output: GenerateOutput | None = None
        self.compile_s = self.prefill_s = self.decode_s = 0.0
        self.decode_steps = 0

    def compile(self) -> float:
        t0 = time.perf_counter()
        args = (self.state, self.tokens, self.lengths, *self.key)
        static = {"sampler": self.sampler, "opts": self.opts}
        start = exec_cache.compiled("generation_start", _start_jit, args, {**static, "max_len": self.max_len})
        step = exec_cache.compiled("generation_step", _step_jit, (self.state, _shapes(start.out_info)), static)
        self._start, self._step = start, lambda st, lp: step(st, lp)
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        t0 = time.perf_counter()
        loop = jax.block_until_ready(self._start(self.state, self.tokens, self.lengths, *self.key))
        self.prefill_s = time.perf_counter() - t0
        n = self.sampler.max_new_tokens
        for i in range(n):
            yield np.asarray(loop.out.tokens[:, i]), np.asarray(loop.out.num_tokens) > i
            if i + 1 >= n or bool(np.all(np.asarray(loop.done))):
                break
            t0 = time.perf_counter()
            loop = jax.block_until_ready(self._step(self.state, loop))
            self.decode_s += time.perf_counter() - t0
            self.decode_steps += 1
        self.output = loop.out


def generate_stream(state: ModelState, tokens, lengths=None, *, sampler: Sampler = Sampler(), key: jax.Array | int = 0,
                    max_len: int | None = None, opts: Opts = Opts()) -> GenerationStream:  # fmt: skip
    """A `GenerationStream` (iterate it for tokens as they arrive)."""
    return GenerationStream(state, tokens, lengths, sampler=sampler, key=key, max_len=max_len, opts=opts)
