"""Token input validation shared by every entry point (`forward`, `prefill`, `generate`, the streaming generator).

    tokens, lengths = check_tokens(cfg, tokens, lengths, max_len=max_len)

One function so that the same mistake gets the same answer everywhere: float ids are refused instead of truncated
(5.7 would silently become 5), a 1-D prompt is refused with the fix (`tokens[None]`) instead of being batch 1 in one
place and an error in another, and an empty batch says so instead of failing inside a numpy reduction.
"""

from __future__ import annotations

import numbers

import jax
import numpy as np

__all__ = ["check_tokens"]


def _check_layout(shape: tuple[int, ...], dtype, name: str) -> None:
    """The checks that need no values (they also hold for a traced array inside `jax.jit`)."""
    if len(shape) != 2:
        hint = f"; for a single prompt pass {name}[None]" if len(shape) == 1 else ""
        raise ValueError(f"{name} must be [batch, seq], got shape {tuple(shape)}{hint}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(shape)} (need at least one prompt of at least one token)")
    dtype = np.dtype(dtype)
    if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {dtype} (ids are not rounded: convert "
                         f"with np.asarray({name}, np.int32) if the values are whole numbers)")  # fmt: skip


def _as_array(x, name: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except ValueError as e:  # numpy 2 refuses ragged nested lists
        raise ValueError(f"{name} has rows of different lengths: right-pad them to one width and pass "
                         f"lengths ({e})") from e  # fmt: skip


def _check_max_len(max_len) -> int:
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1:
        raise ValueError(f"max_len={max_len!r} must be a positive integer")
    return int(max_len)


def check_tokens(cfg, tokens, lengths=None, *, max_len: int | None = None, name: str = "tokens"):
    """Validates right-padded token ids `[batch, seq]` on the host -> (`tokens` int32, `lengths [batch]` int32).

    Args:
      cfg: the model's `Config` (`vocab_size`, `max_seq_len`).
      tokens: integer ids `[batch, seq]` (a list, numpy or jax array); rows are right-padded when `lengths` is
        given. Padding positions are not checked and come back as 0.
      lengths: each row's prompt length (default: all `seq`); integers in `[1, seq]`.
      max_len: cache capacity; the longest prompt must fit in it (None: not checked).
      name: how the messages call `tokens` (e.g. "mtp_tokens").

    Raises ValueError naming the argument and the offending value. A traced `tokens` (inside `jax.jit`) is only
    checked for shape and dtype (its values are unknown) and is returned as is, with `lengths` None.
    """
    if max_len is not None:
        max_len = _check_max_len(max_len)
    if isinstance(tokens, jax.core.Tracer):
        _check_layout(tokens.shape, tokens.dtype, name)
        return tokens, None
    tokens = _as_array(tokens, name)
    _check_layout(tokens.shape, tokens.dtype, name)
    b, s = tokens.shape
    if s > cfg.max_seq_len:
        raise ValueError(f"sequence length {s} exceeds the configured maximum {cfg.max_seq_len}")
    if lengths is None:
        lengths = np.full((b,), s, np.int64)
    else:
        lengths = _as_array(lengths, "lengths")
        if lengths.dtype == np.bool_ or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
        if lengths.size != b:
            raise ValueError(f"lengths has shape {lengths.shape}, expected ({b},): one length per row of {name}")
        lengths = lengths.reshape(b).astype(np.int64)
        if int(lengths.min()) < 1:
            raise ValueError(f"empty prompt: lengths {lengths.tolist()} (every prompt needs at least one token)")
        if int(lengths.max()) > s:
            raise ValueError(f"length {int(lengths.max())} exceeds the padded prompt width {s} of {name}")
    if max_len is not None and int(lengths.max()) > max_len:
        raise ValueError(f"prompt length {int(lengths.max())} exceeds max_len={max_len}")
    valid = np.arange(s)[None, :] < lengths[:, None]
    bad = valid & ((tokens < 0) | (tokens >= cfg.vocab_size))
    if bad.any():
        r, c = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"token id {int(tokens[r, c])} is outside the vocabulary [0, {cfg.vocab_size}) "
                         f"(at {name}[{r}, {c}])")  # fmt: skip
    return np.where(valid, tokens, 0).astype(np.int32), lengths.astype(np.int32)
