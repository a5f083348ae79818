"""Lazy reading of safetensors files with every dtype DeepSeek-V4 uses.

The `safetensors` package's numpy backend cannot return F8_E4M3, F8_E8M0 or BF16 tensors (numpy has no such
dtypes), so this module parses the (documented, simple) header itself and maps each tensor's byte range with
`numpy.memmap`, viewed through `ml_dtypes`. Nothing is read until a tensor is asked for, and a whole shard is never
materialised. Only the header JSON and raw bytes are interpreted: no code from a checkpoint is ever executed.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = ["DTYPES", "TensorInfo", "SafetensorsError", "read_header", "read_tensor"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    name: str
    dtype: str  # safetensors dtype name, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensor name -> TensorInfo, `__metadata__`) of one file; validates offsets against the file size."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: truncated file ({size} bytes), no safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{path}: corrupted header (header length {n} > file size {size})")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupted header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    problems = []
    for name, ent in header.items():
        try:
            dtype, shape, (a, b) = ent["dtype"], tuple(int(d) for d in ent["shape"]), ent["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"tensor {name!r}: malformed header entry {ent!r}")
            continue
        if dtype not in DTYPES:
            problems.append(f"tensor {name!r}: unsupported dtype {dtype}")
            continue
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if b - a != want or a < 0:
            problems.append(f"tensor {name!r}: {b - a} bytes for {dtype} {list(shape)} (expected {want})")
            continue
        if base + b > size:
            problems.append(f"tensor {name!r}: data ends at byte {base + b} beyond the file size {size} (truncated)")
            continue
        out[name] = TensorInfo(path, name, dtype, shape, base + a, b - a)
    if problems:
        raise SafetensorsError(f"{path}: " + "; ".join(problems))
    return out, meta


def read_tensor(info: TensorInfo, copy: bool = True) -> np.ndarray:
    """The tensor's values (a private copy by default; `copy=False` returns a read-only memmap view)."""
    dt = DTYPES[info.dtype]
    if info.nbytes == 0:
        return np.zeros(info.shape, dt)
    mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.nbytes,))
    arr = mm.view(dt).reshape(info.shape)
    return np.array(arr) if copy else arr
