"""Token input validation: every entry point (`forward`, `generate`, the streaming generator, `prefill`) refuses the
same mistakes with the same message, before anything is compiled.

The model here is `abstract(Config.tiny())`: shapes only, nothing allocated or compiled, which is enough because
every check runs on the host before the model is touched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv4_jax
from dsv4_jax import Config, Sampler
from dsv4_jax.generation import GenerationStream
from dsv4_jax.inputs import check_tokens

CFG = Config.tiny()  # vocab 512


@pytest.fixture(scope="module")
def state():
    return dsv4_jax.abstract(CFG)


def _forward(state, tokens):
    return dsv4_jax.forward(state, tokens)


def _generate(state, tokens):
    return dsv4_jax.generate(state, tokens, sampler=Sampler(max_new_tokens=2))


def _stream(state, tokens):
    return GenerationStream(state, tokens, sampler=Sampler(max_new_tokens=2))


ENTRY_POINTS = [_forward, _generate, _stream]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize(
    "tokens, needle",
    [
        (np.array([[5.7, 3.0]]), "must hold integer token ids, got dtype float64"),
        (np.array([[5, 3]], np.float32), "got dtype float32"),
        (np.array([[True, False]]), "got dtype bool"),
        (
            np.array([5, 6, 7]),
            r"tokens must be \[batch, seq\], got shape \(3,\); for a single prompt pass tokens\[None\]",
        ),
        (np.zeros((0, 4), np.int32), r"tokens is empty: shape \(0, 4\)"),
        (np.zeros((1, 0), np.int32), r"tokens is empty: shape \(1, 0\)"),
        ([[]], r"tokens is empty: shape \(1, 0\)"),
        (np.array([[1, 512]]), r"token id 512 is outside the vocabulary \[0, 512\) \(at tokens\[0, 1\]\)"),
        ([[3, 4], [5, -2]], r"token id -2 is outside the vocabulary \[0, 512\) \(at tokens\[1, 1\]\)"),
        ([[3, 4], [5]], "rows of different lengths"),
    ],
)
def test_every_entry_point_refuses_the_same_tokens(state, entry, tokens, needle):
    with pytest.raises(ValueError, match=needle):
        entry(state, tokens)


def test_forward_checks_mtp_tokens_before_the_cast(state):
    with pytest.raises(ValueError, match="got dtype float64"):
        dsv4_jax.forward_outputs(state, np.array([[1, 2]]), mtp_tokens=np.array([[2.5, 3.0]]))


def test_prefill_uses_the_same_check(state):
    # runner.check_prompts is what `prefill` calls; it delegates to inputs.check_tokens.
    from dsv4_jax.runner import check_prompts

    with pytest.raises(ValueError, match="got dtype float64"):
        check_prompts(CFG, np.array([[1.5]]), None, 8)
    with pytest.raises(ValueError, match=r"for a single prompt pass tokens\[None\]"):
        check_prompts(CFG, np.array([1, 2]), None, 8)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_new_tokens": 3.5}, r"max_new_tokens=3.5 must be an integer, got float"),
        ({"max_new_tokens": True}, r"max_new_tokens=True must be an integer, got bool"),
        ({"top_k": 2.0}, r"top_k=2.0 must be an integer, got float"),
        ({"max_new_tokens": 0}, "must be at least 1"),
    ],
)
def test_sampler_refuses_non_integer_counts(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Sampler(**kwargs)


def test_sampler_accepts_numpy_integers():
    assert Sampler(max_new_tokens=np.int64(4), top_k=np.int32(2)).max_new_tokens == 4


# ---- inputs.check_tokens directly --------------------------------------------------------------------------------


def test_valid_tokens_come_back_int32_with_padding_zeroed():
    toks, lengths = check_tokens(CFG, [[5, 6, 999], [7, 8, 9]], [2, 3], max_len=8)
    assert toks.dtype == np.int32 and lengths.dtype == np.int32
    np.testing.assert_array_equal(toks, [[5, 6, 0], [7, 8, 9]])  # 999 is padding: not checked, zeroed
    np.testing.assert_array_equal(lengths, [2, 3])
    toks, lengths = check_tokens(CFG, jnp.array([[1, 2]], jnp.int32))  # a jax array, default lengths
    assert isinstance(toks, np.ndarray) and lengths.tolist() == [2]
    toks, _ = check_tokens(CFG, np.array([[1, 2]], np.uint16))
    assert toks.dtype == np.int32


@pytest.mark.parametrize(
    "lengths, max_len, needle",
    [
        ([0, 2], None, r"empty prompt: lengths \[0, 2\]"),
        ([2, 4], None, "length 4 exceeds the padded prompt width 3 of tokens"),
        ([1, 2, 3], None, r"lengths has shape \(3,\), expected \(2,\)"),
        ([1.0, 2.0], None, "lengths must be integers, got dtype float64"),
        ([3, 3], 2, "prompt length 3 exceeds max_len=2"),
        ([3, 3], 2.5, r"max_len=2.5 must be a positive integer"),
        ([3, 3], 0, r"max_len=0 must be a positive integer"),
    ],
)
def test_lengths_and_max_len(lengths, max_len, needle):
    with pytest.raises(ValueError, match=needle):
        check_tokens(CFG, np.ones((2, 3), np.int32), lengths, max_len=max_len)


def test_sequence_longer_than_the_model():
    with pytest.raises(ValueError, match="sequence length 9 exceeds the configured maximum 8"):
        check_tokens(Config.tiny(max_seq_len=8), np.zeros((1, 9), np.int32))


def test_name_is_used_in_messages():
    with pytest.raises(ValueError, match=r"mtp_tokens must hold integer token ids"):
        check_tokens(CFG, np.array([[0.5]]), name="mtp_tokens")


def test_traced_tokens_are_checked_for_shape_and_dtype_only():
    seen = []

    def f(t):
        out, lengths = check_tokens(CFG, t)
        seen.append(lengths)
        return out

    assert jax.jit(f)(jnp.array([[1, 2]], jnp.int32)).shape == (1, 2)
    assert seen == [None]
    with pytest.raises(ValueError, match=r"got dtype float32"):
        jax.jit(f)(jnp.array([[1.0, 2.0]], jnp.float32))
