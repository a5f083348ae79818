"""`extend` (k new tokens per row on top of a cache: chunked prefill, speculative verification) against k decode
steps and against the full-sequence `forward`, on the official tiny checkpoint; MTP through `mtp_extend`.

Rows have different lengths and different numbers of real tokens per chunk (the rest padding), chunks cross the
window edge (128), CSA blocks (4) and an HCA block (128). quant_sim is off (the exact-arithmetic model), so the
three paths differ only by reduction order (matmul shapes), which the bf16 roundings amplify to at most the model's
own noise floor (~0.7% rel-RMS for a one-ulp input nudge).

Every call has batch 2 and max_len 320, and a chunk is 5 or 65 tokens wide (`WIDTHS`; the real tokens of each row
first, then padding), so the three tests share a handful of compiled programs (a new width is a new compile; on 2
CPU cores each costs ~10 s). Width 1 is `decode_step` itself. The prefill (a 160-wide padded prompt), the decode
step and `forward_outputs` have test_decode's shapes and options, so those programs come from the persistent
compilation cache when test_decode compiled them first.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_rms

B, TOTAL, MAX_LEN = 2, 150, 320
PREFILL_WIDTH, FORWARD_WIDTH = 160, 303  # test_decode's prefill and forward widths
CHUNKS = [17, 1, 40, 3, 64, 5]  # after a 20-token prefill: positions 20..149
WIDTHS = (5, 65)  # a chunk's array: the narrowest of these that holds its longest row


def _width(n: int) -> int:
    return min(w for w in WIDTHS if w >= n)


def _prefilled(state, toks, opts):
    import dsv4_jax

    cache = dsv4_jax.init_cache(state.config, B, MAX_LEN, opts.cache_layout)  # bf16: quant_sim is off
    prompt = np.zeros((B, PREFILL_WIDTH), np.int32)
    prompt[:, :20] = toks[:, :20]
    return dsv4_jax.prefill(state, cache, prompt, np.full(B, 20), opts=opts)


@pytest.fixture(scope="module")
def runs(official_state):
    import dsv4_jax

    opts = dsv4_jax.Opts(quant_sim=False)
    rng = np.random.default_rng(7)
    toks = rng.integers(2, 512, (B, TOTAL)).astype(np.int32)
    wide = np.concatenate([toks, np.full((B, FORWARD_WIDTH - TOTAL), 5, np.int32)], 1)  # causal: changes nothing
    fwd = np.asarray(dsv4_jax.forward_outputs(official_state, wide, opts=opts, capture=True).logits)[:, :TOTAL]

    # decode steps, one token at a time
    logits, _, cache = _prefilled(official_state, toks, opts)
    dec = [np.asarray(logits)]
    for p in range(20, TOTAL - 1):
        lg, _, cache = dsv4_jax.decode_step(official_state, cache, toks[:, p], opts=opts)
        dec.append(np.asarray(lg))
    dec = np.stack(dec, 1)  # logits predicting positions 20 .. TOTAL-1, i.e. at positions 19 .. TOTAL-2

    # extend in chunks; row 1 takes one token fewer in odd chunks (padding), and catches up in the next
    logits, _, cache = _prefilled(official_state, toks, opts)
    ext = {b: {19: np.asarray(logits)[b]} for b in range(B)}
    pos = np.array([20, 20])
    for i, k in enumerate(CHUNKS):
        n_new = np.array([k, k - 1 if i % 2 else k + (1 if i else 0)])
        n_new = np.minimum(np.maximum(n_new, 0), TOTAL - pos)
        width = _width(int(n_new.max()))
        chunk = np.zeros((B, width), np.int32)
        for b in range(B):
            chunk[b, : n_new[b]] = toks[b, pos[b] : pos[b] + n_new[b]]
        lg, _, cache = dsv4_jax.extend(official_state, cache, chunk, n_new, opts=opts)
        lg = np.asarray(lg)
        for b in range(B):
            for j in range(n_new[b]):
                ext[b][int(pos[b] + j)] = lg[b, j]
        pos = pos + n_new
    return toks, fwd, dec, ext, cache, pos


def test_extend_equals_decode_steps_and_forward(runs):
    toks, fwd, dec, ext, cache, pos = runs
    errs_dec, errs_fwd = [], []
    for b in range(B):
        for p, lg in ext[b].items():
            if p == 19:
                continue
            if p - 19 < dec.shape[1]:  # decode steps stop one position earlier (the last token is not fed)
                errs_dec.append(rel_rms(lg, dec[b, p - 19]))
            errs_fwd.append(rel_rms(lg, fwd[b, p]))
    errs_dec, errs_fwd = np.array(errs_dec), np.array(errs_fwd)
    assert len(errs_dec) > 200
    # the rare position whose indexer top-k flips at a near-tie (other matmul shapes) may reach ~7%; which one
    # flips depends on the CPU's reduction order
    assert errs_dec.mean() < 0.012 and np.percentile(errs_dec, 99) < 0.05 and errs_dec.max() < 0.1, (
        errs_dec.mean(), np.percentile(errs_dec, 99), errs_dec.max())  # fmt: skip
    assert errs_fwd.mean() < 0.012 and np.percentile(errs_fwd, 99) < 0.05 and errs_fwd.max() < 0.1, (
        errs_fwd.mean(), np.percentile(errs_fwd, 99), errs_fwd.max())  # fmt: skip
    agree = np.mean([ext[b][p].argmax() == fwd[b, p].argmax() for b in range(B) for p in ext[b] if p > 19])
    assert agree > 0.95
    np.testing.assert_array_equal(np.asarray(cache.lengths), pos)  # rows advanced by their real tokens only


def test_extend_padding_is_never_written(official_state, runs):
    """A row's padding tokens leave no trace: the cache after a padded chunk does not depend on what the padding
    holds (same program, so bit for bit), and it matches the same rows extended without padding (another chunk
    width is another program: equal up to reduction order, which differs between CPUs)."""
    import dsv4_jax

    toks = runs[0]
    opts = dsv4_jax.Opts(quant_sim=False)
    n_new = np.array([WIDTHS[0], WIDTHS[0]])

    def run(chunk):
        _, _, cache = _prefilled(official_state, toks, opts)
        lg, _, cache = dsv4_jax.extend(official_state, cache, chunk, n_new, opts=opts)
        return np.asarray(lg), cache

    real = toks[:, 20 : 20 + WIDTHS[0]]
    pad = WIDTHS[1] - WIDTHS[0]
    lg_a, ca = run(real)
    lg_b, cb = run(np.concatenate([real, np.full((B, pad), 7, np.int32)], axis=1))
    lg_c, cc = run(np.concatenate([real, toks[:, 80 : 80 + pad]], axis=1))
    fields = ("window", "comp_kv", "comp_score", "entries", "idx_kv", "idx_score", "idx_keys")
    for g_a, g_b, g_c in zip(ca.groups, cb.groups, cc.groups, strict=True):
        for la, lb, lc in zip(g_a, g_b, g_c, strict=True):
            for f in fields:
                if getattr(la, f) is None:
                    continue
                a, b, c = (np.asarray(getattr(x, f)).astype(np.float32) for x in (la, lb, lc))
                np.testing.assert_array_equal(b, c, f)
                np.testing.assert_array_equal((a != 0).any(-1), (b != 0).any(-1), f)  # untouched slots stay empty
                assert (not a.any() and not b.any()) or rel_rms(b, a) < 0.01, (f, rel_rms(b, a))
    np.testing.assert_array_equal(np.asarray(cb.lengths), np.asarray(cc.lengths))
    np.testing.assert_array_equal(np.asarray(ca.lengths), np.asarray(cb.lengths))
    np.testing.assert_array_equal(lg_b[:, : WIDTHS[0]], lg_c[:, : WIDTHS[0]])
    assert rel_rms(lg_b[:, : WIDTHS[0]], lg_a) < 0.02


def test_mtp_extend_equals_mtp_decode_steps(official_state, runs):
    import dsv4_jax

    opts = dsv4_jax.Opts(quant_sim=False)
    toks, k = runs[0], WIDTHS[0]

    def prefilled():  # each path gets its own cache: steps donate theirs
        _, hidden, cache = _prefilled(official_state, toks, opts)
        mtp_toks = np.zeros((B, PREFILL_WIDTH), np.int32)  # as the prompt: 20 real tokens, then padding
        mtp_toks[:, :20] = toks[:, 1:21]
        return dsv4_jax.mtp_prefill(official_state, cache, hidden, mtp_toks, opts=opts)[1]

    _, hid_e, c_e = dsv4_jax.extend(official_state, prefilled(), toks[:, 20 : 20 + k], opts=opts)
    mtp_e, _ = dsv4_jax.mtp_extend(official_state, c_e, hid_e, toks[:, 21 : 21 + k], opts=opts)
    steps = []
    c = prefilled()
    for i in range(k):
        _, h, c = dsv4_jax.decode_step(official_state, c, toks[:, 20 + i], opts=opts)
        m, c = dsv4_jax.mtp_decode_step(official_state, c, h, toks[:, 21 + i], opts=opts)
        steps.append(np.asarray(m))
    errs = [rel_rms(np.asarray(mtp_e)[b, i], steps[i][b]) for b in range(B) for i in range(k)]
    assert max(errs) < 0.05 and np.mean(errs) < 0.012, errs


def _whole_prompt_greedy(state, toks, lengths, n, opts):
    """What `generate` computes for the right-padded prompts without `prefill_chunk` (greedy, MTP on, no EOS), step
    by step through the programs of the tests above: prefill (of PREFILL_WIDTH, capacity MAX_LEN), MTP over the
    prompt with the sampled token at each row's last position, then decode and MTP decode steps. -> (tokens [B, n],
    logits [B, n, V], MTP logits [B, n, V])."""
    import dsv4_jax

    cache = dsv4_jax.init_cache(state.config, B, MAX_LEN, opts.cache_layout)
    prompt = np.zeros((B, PREFILL_WIDTH), np.int32)
    prompt[:, : toks.shape[1]] = toks
    logits, hidden, cache = dsv4_jax.prefill(state, cache, prompt, lengths, opts=opts)
    tok = np.asarray(logits).argmax(-1).astype(np.int32)
    nxt = np.concatenate([prompt[:, 1:], np.zeros((B, 1), np.int32)], 1)  # MTP input at p: the token at p + 1
    nxt[np.arange(B), lengths - 1] = tok
    mtp, cache = dsv4_jax.mtp_prefill(state, cache, hidden, nxt, opts=opts)
    out = [(tok, np.asarray(logits), np.asarray(mtp))]
    for _ in range(n - 1):
        logits, hidden, cache = dsv4_jax.decode_step(state, cache, tok, opts=opts)
        tok = np.asarray(logits).argmax(-1).astype(np.int32)
        mtp, cache = dsv4_jax.mtp_decode_step(state, cache, hidden, tok, opts=opts)
        out.append((tok, np.asarray(logits), np.asarray(mtp)))
    return tuple(np.stack(x, 1) for x in zip(*out, strict=True))


def test_chunked_prefill_in_generate_equals_whole_prompt(official_state):
    """`Opts(prefill_chunk=...)`: `generate` prefills a long prompt chunk by chunk (the extend step in a loop, MTP on
    each chunk and then on the last prompt position with the sampled token). Rows of different lengths (one ends
    inside a chunk, the other in the last, partly padded chunk); the greedy tokens, their logits and the MTP logits
    equal whole-prompt prefill's within the reduction-order noise of the extend test above. The whole-prompt side is
    `generate`'s computation step by step (`_whole_prompt_greedy`, through the prefill, decode and MTP programs this
    module has compiled already: a second `generate` program cost ~40 s on 2 CPU cores); it gave the tokens, logits
    and MTP logits of `generate` without `prefill_chunk` bit for bit when written (test_generate checks `generate`
    against the decode steps)."""
    import dsv4_jax

    rng = np.random.default_rng(11)
    toks = rng.integers(2, 512, (B, 140)).astype(np.int32)
    lengths = np.array([140, 97], np.int32)
    opts = dsv4_jax.Opts(quant_sim=False)
    tokens, logits, mtp_logits = _whole_prompt_greedy(official_state, toks, lengths, 5, opts)
    sampler = dsv4_jax.Sampler(max_new_tokens=5, eos_id=None, mtp=True, logits=True)
    chunks = dsv4_jax.generate(official_state, toks, lengths, sampler=sampler, max_len=MAX_LEN,
                               opts=dsv4_jax.Opts(quant_sim=False, prefill_chunk=48))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(chunks.tokens), tokens)
    for b in range(B):
        for i in range(5):
            assert rel_rms(np.asarray(chunks.logits)[b, i], logits[b, i]) < 0.03, (b, i)
            assert rel_rms(np.asarray(chunks.mtp_logits)[b, i], mtp_logits[b, i]) < 0.03, (b, i)
    with pytest.raises(ValueError, match="prefill_chunk"):
        dsv4_jax.Opts(prefill_chunk=0)
