"""Sampling, EOS handling, reproducibility and compile reuse of `dsv4_jax.generation`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.generation import Sampler, sample_logits

N, WIDTH, MAX_LEN = 12, 160, 320  # shapes shared with test_decode (its compiled prefill/decode are reused)


# ---- the sampling function on synthetic logits ------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_logits():
    return jax.random.normal(jax.random.key(0), (4, 64)) * 3.0


def _draws(logits, n, **kw):
    f = jax.jit(jax.vmap(lambda k: sample_logits(logits, k, **kw)))
    return np.asarray(f(jax.random.split(jax.random.key(1), n)))  # [n, B]


def test_greedy_is_argmax(synth_logits):
    got = np.asarray(sample_logits(synth_logits, jax.random.key(0), 0.0, top_k=5, top_p=0.5))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(synth_logits), -1))


def test_top_k_never_emits_excluded(synth_logits):
    draws = _draws(synth_logits, 400, temperature=1.5, top_k=3)
    lg = np.asarray(synth_logits)
    for b in range(lg.shape[0]):
        allowed = set(np.argsort(-lg[b])[:3].tolist())
        assert set(draws[:, b].tolist()) <= allowed
        assert len(set(draws[:, b].tolist())) > 1  # it does sample


def test_top_p_never_emits_outside_nucleus(synth_logits):
    top_p = 0.6
    draws = _draws(synth_logits, 400, temperature=1.0, top_p=top_p)
    lg = np.asarray(synth_logits, np.float64)
    for b in range(lg.shape[0]):
        order = np.argsort(-lg[b])
        p = np.exp(lg[b, order] - lg[b].max())
        p /= p.sum()
        before = np.cumsum(p) - p
        nucleus = set(order[before < top_p].tolist())
        assert set(draws[:, b].tolist()) <= nucleus
    # top-k and top-p together: within both sets
    draws = _draws(synth_logits, 200, temperature=1.0, top_k=2, top_p=0.99)
    for b in range(lg.shape[0]):
        assert set(draws[:, b].tolist()) <= set(np.argsort(-lg[b])[:2].tolist())


def test_sampler_is_hashable_and_validates():
    assert hash(Sampler(temperature=0.5)) == hash(Sampler(temperature=0.5))
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            Sampler(**bad)


# ---- whole generation on the official tiny checkpoint ------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(oracle):
    rng = np.random.default_rng(5)
    toks = np.zeros((2, WIDTH), np.int32)
    toks[0] = oracle["prompt_tokens"][0]
    toks[1, :100] = rng.integers(2, 512, 100)
    return toks, np.array([160, 100], np.int32)


@pytest.fixture(scope="module")
def greedy(official_state, prompts):
    from dsv4_jax import generation as G

    toks, lengths = prompts
    out = G.generate(
        official_state, toks, lengths, sampler=Sampler(max_new_tokens=N, eos_id=None, mtp=True), max_len=MAX_LEN
    )
    return jax.tree.map(np.asarray, out)


def test_greedy_tokens_are_argmax_of_decode(official_state, oracle, prompts, greedy):
    from dsv4_jax import cache as C
    from dsv4_jax import runner as D

    toks, lengths = prompts
    assert greedy.tokens.shape == (2, N) and (greedy.num_tokens == N).all()
    assert (
        greedy.mtp_logits.shape == (2, N, official_state.config.vocab_size)
        and np.abs(greedy.mtp_logits).min(axis=-1).max() > 0
    )
    # Teacher-force the generated tokens through prefill + decode_step: each token is the argmax of the logits
    # it was sampled from (up to near-ties), and its log-prob is the model's.
    cache = C.init_cache(official_state.config, 2, MAX_LEN)
    logits, _, cache = D.prefill(official_state, cache, toks, lengths)
    steps = [np.asarray(logits)]
    for i in range(N - 1):
        # capture=True: test_decode's decode program (its captures go unused here); one decode compile fewer
        lg, _, cache, _ = D.decode_step(official_state, cache, greedy.tokens[:, i], capture=True)
        steps.append(np.asarray(lg))
    steps = np.stack(steps, 1)  # [2, N, V]
    chosen = np.take_along_axis(steps, greedy.tokens[..., None], -1)[..., 0]
    gap = steps.max(-1) - chosen
    assert (gap <= 1e-3 * np.abs(steps).max()).all(), gap
    assert np.mean(greedy.tokens == steps.argmax(-1)) > 0.9
    logp = jax.nn.log_softmax(jnp.asarray(steps), -1)
    want = np.take_along_axis(np.asarray(logp), greedy.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(greedy.logprobs, want, atol=0.05)
    # the official greedy run starts the same way (noise floor aside, its first tokens agree)
    assert greedy.tokens[0, 0] == oracle["generated_tokens"][0, 0]


def test_eos_stops_rows_at_different_steps_without_recompiling(official_state, prompts, greedy):
    from dsv4_jax import generation as G

    toks, lengths = prompts
    traces = G.TRACE_COUNT["generate"]
    # an EOS id that row 0 emits first at step f0; row 1 emits it later or never
    cands = [t for t in greedy.tokens[0, 1:] if t not in greedy.tokens[1, :3]]
    eos = int(cands[0])
    first = [int(np.argmax(greedy.tokens[b] == eos)) if (greedy.tokens[b] == eos).any() else None for b in range(2)]
    sampler = Sampler(max_new_tokens=N, eos_id=eos, mtp=True)  # pad_id (static) as in `greedy`
    out = jax.tree.map(np.asarray, G.generate(official_state, toks, lengths, sampler=sampler, max_len=MAX_LEN))
    for b in range(2):
        n = N if first[b] is None else first[b] + 1
        assert out.num_tokens[b] == n
        np.testing.assert_array_equal(out.tokens[b, :n], greedy.tokens[b, :n])
        assert (out.tokens[b, n:] == sampler.pad_id).all() and (out.logprobs[b, n:] == 0).all()
        assert (out.mtp_logits[b, n:] == 0).all()
    assert out.num_tokens[0] != out.num_tokens[1]
    assert G.TRACE_COUNT["generate"] == traces  # the EOS id is a traced setting: same program


def test_seeds_reproduce_and_second_call_does_not_recompile(official_state, prompts, greedy):
    from dsv4_jax import generation as G

    toks, lengths = prompts
    traces, size = G.TRACE_COUNT["generate"], G._generate._cache_size()
    s = Sampler(max_new_tokens=N, eos_id=None, temperature=1.0, top_k=8, mtp=True)
    a = np.asarray(G.generate(official_state, toks, lengths, sampler=s, key=3, max_len=MAX_LEN).tokens)
    b = np.asarray(G.generate(official_state, toks, lengths, sampler=s, key=3, max_len=MAX_LEN).tokens)
    c = np.asarray(G.generate(official_state, toks, lengths, sampler=s, key=4, max_len=MAX_LEN).tokens)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy.tokens).any()
    assert G.TRACE_COUNT["generate"] == traces and G._generate._cache_size() == size


def test_with_the_executable_cache_generate_runs_the_same_program(official_state, prompts, greedy, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    # The program `greedy` compiled, taken from jax's in-process cache: a fresh compile for the executable cache
    # would cost ~40 s here (test_exec_cache stores and loads programs). What this checks is `generate`'s call.
    from dsv4_jax import exec_cache
    from dsv4_jax import generation as G

    monkeypatch.setattr(exec_cache, "_LOADED", {})
    monkeypatch.setattr(exec_cache, "_fresh", lambda lowered: lowered.compile())
    monkeypatch.setattr(exec_cache, "_write", lambda path, entry: None)
    toks, lengths = prompts
    traces = G.TRACE_COUNT["generate"]
    exec_cache.enable(str(tmp_path))
    try:
        sampler = Sampler(max_new_tokens=N, eos_id=None, mtp=True)
        out = G.generate(official_state, toks, lengths, sampler=sampler, max_len=MAX_LEN)
    finally:
        exec_cache.disable()
    assert exec_cache.COUNTS["compiled"] >= 1 and G.TRACE_COUNT["generate"] == traces
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, out), greedy)


def test_generate_rejects_bad_input(official_state):
    from dsv4_jax import generation as G

    with pytest.raises(ValueError, match="600"):
        G.generate(official_state, [[5, 600, 7]], sampler=Sampler(max_new_tokens=2))
    with pytest.raises(ValueError, match="empty prompt"):
        G.generate(official_state, [[5, 6]], [0], sampler=Sampler(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_len=8"):
        G.generate(official_state, [[5, 6, 7]], sampler=Sampler(max_new_tokens=10), max_len=8)
    with pytest.raises(ValueError, match="exceeds max_len"):
        G.generate(official_state, [list(range(2, 12))], sampler=Sampler(max_new_tokens=1), max_len=8)
