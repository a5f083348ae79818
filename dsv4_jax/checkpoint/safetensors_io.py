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

__all__ = ["DTYPES", "NAMES", "TensorInfo", "SafetensorsError", "read_header", "read_tensor", "read_into",
           "encode_header", "data_order", "write_safetensors"]  # fmt: skip

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
    """The tensor's values (a private copy by default; `copy=False` returns a read-only memmap view).

    The copy is read with `readinto` straight into its final buffer: the file is never mapped, so the process holds
    exactly one copy of the tensor (a mapped file would add its resident pages to RSS)."""
    dt = DTYPES[info.dtype]
    if info.nbytes == 0:
        return np.zeros(info.shape, dt)
    if copy:
        out = np.empty(info.shape, dt)
        read_into(info, out)
        return out
    mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.nbytes,))
    return mm.view(dt).reshape(info.shape)


def read_into(info: TensorInfo, out: np.ndarray, chunk: int = 64 << 20) -> np.ndarray:
    """Reads the tensor's bytes into `out` (C-contiguous, `info.nbytes` bytes, any dtype of that size: a slice of a
    stacked array works). Raises `SafetensorsError` naming the file and tensor if the file is shorter than its
    header says (truncated after the header was read) or cannot be read."""
    if not out.flags.c_contiguous or out.nbytes != info.nbytes:
        raise ValueError(f"{info.name}: destination of {out.nbytes} bytes (contiguous={out.flags.c_contiguous}) "
                         f"for a tensor of {info.nbytes} bytes")  # fmt: skip
    buf = memoryview(out.reshape(-1).view(np.uint8))
    try:
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            done = 0
            while done < info.nbytes:
                n = f.readinto(buf[done : done + min(chunk, info.nbytes - done)])
                if not n:
                    end, want = info.start + done, info.start + info.nbytes
                    raise SafetensorsError(f"{info.file}: tensor {info.name!r}: file ends after {end} bytes, the "
                                           f"header says {want} (truncated)")  # fmt: skip
                done += n
    except OSError as e:
        raise SafetensorsError(f"{info.file}: tensor {info.name!r}: cannot read ({e.strerror or e})") from e
    return out


# ---- writing ---------------------------------------------------------------------------------------------------


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
    """(header bytes incl. the 8-byte length, [(name, offset, nbytes)]) for tensors in the given data order.

    Layout as `safetensors`/torch writes it: compact JSON, `__metadata__` first, then tensors in data order, the
    JSON padded with spaces so that the data starts 8-byte aligned."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offsets = []
    pos = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [pos, pos + nbytes]}
        offsets.append((name, pos, nbytes))
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


# The `safetensors` (Rust) Dtype enum order; files it writes hold tensors by dtype, descending, then by name.
_RUST_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
               "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]  # fmt: skip


def data_order(entries: list[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The order `safetensors.torch.save_file` lays tensors out: by dtype (its enum order, descending), then name."""
    return sorted(entries, key=lambda e: (-_RUST_ORDER.index(e[1]), e[0]))


def write_safetensors(path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]], get,
                      metadata: dict[str, str] | None = None) -> int:  # fmt: skip
    """Writes one safetensors file, streaming: `get(name)` returns each tensor's array (of the declared dtype and
    shape) only when it is written, so at most one tensor is in memory. `entries` are (name, safetensors dtype,
    shape) in data order. Atomic: written to a temporary name in the same folder and renamed. Returns the size."""
    path = os.fspath(path)
    head, offsets = encode_header(entries, metadata)
    tmp = f"{path}.tmp-{os.getpid()}"
    want = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for name, _, _nbytes in offsets:
                arr = np.ascontiguousarray(get(name))
                dtype, shape = want[name]
                if arr.dtype != DTYPES[dtype] or arr.shape != shape:
                    raise ValueError(f"{path}: tensor {name!r} is {arr.dtype}{list(arr.shape)}, declared "
                                     f"{DTYPES[dtype]}{list(shape)}")  # fmt: skip
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
                del arr
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(head) + sum(n for _, _, n in offsets)
