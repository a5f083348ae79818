"""Tokenizers: a HuggingFace `tokenizer.json` (through the `tokenizers` package) for released checkpoints, and a
byte-level tokenizer for the embedded tiny model.

Byte-level mapping (vocab 512): id 0 = BOS, id 1 = EOS (the model's special ids stay special), ids 2..257 = the
UTF-8 bytes 0..255 (`id = byte + 2`), ids 258..511 are unused and decode to nothing. Decoding drops special and
unused ids and replaces invalid UTF-8 with U+FFFD.
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "BYTE_OFFSET"]

BYTE_OFFSET = 2


class ByteTokenizer:
    """UTF-8 bytes shifted by `BYTE_OFFSET` so that BOS (0) and EOS (1) keep their ids."""

    def __init__(self, vocab_size: int = 512, bos_id: int = 0, eos_id: int = 1):
        if vocab_size < 256 + BYTE_OFFSET:
            raise ValueError(f"a byte tokenizer needs vocab_size >= {256 + BYTE_OFFSET}, got {vocab_size}")
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        data = bytes(int(i) - BYTE_OFFSET for i in ids if BYTE_OFFSET <= int(i) < 256 + BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes of one id (empty for special/unused ids): for streaming output."""
        return bytes([i - BYTE_OFFSET]) if BYTE_OFFSET <= i < 256 + BYTE_OFFSET else b""


class HFTokenizer:
    """A HuggingFace fast tokenizer from a `tokenizer.json` file."""

    def __init__(self, path: str | os.PathLike, bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer

        self.path = pathlib.Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id if bos_id is not None else self._find(["<｜begin▁of▁sentence｜>", "<s>", "<bos>"])
        self.eos_id = eos_id if eos_id is not None else self._find(["<｜end▁of▁sentence｜>", "</s>", "<eos>"])

    def _find(self, names) -> int | None:
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return i
        return None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else list(ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike | None = None, config=None) -> ByteTokenizer | HFTokenizer:
    """`path`: a `tokenizer.json` or a folder holding one (e.g. the checkpoint folder). Without a tokenizer file,
    the byte-level tokenizer (needs `config.vocab_size >= 258`, e.g. the tiny model). Raises ValueError if `path`
    is a file or folder without a tokenizer and the vocabulary is too small for bytes."""
    bos = getattr(config, "bos_token_id", 0)
    eos = getattr(config, "eos_token_id", 1)
    if path is not None:
        p = pathlib.Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if p.is_file():
            return HFTokenizer(p)
        if pathlib.Path(path).suffix == ".json":
            raise ValueError(f"tokenizer file {str(path)!r} does not exist")
    vocab = getattr(config, "vocab_size", 512)
    if vocab > 4096:
        raise ValueError(f"no tokenizer.json found (looked at {str(path)!r}) and a byte tokenizer does not fit a "
                         f"vocabulary of {vocab}; pass --tokenizer PATH/tokenizer.json")  # fmt: skip
    return ByteTokenizer(vocab, bos, eos)
