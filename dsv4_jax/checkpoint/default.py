"""The embedded default checkpoint: the tiny model (`Config.tiny()`, seed 0), written in the released layout and
converted to Orbax on first use, cached.

    path = ensure_default_checkpoint()      # ~/.cache/dsv4_jax/tiny/orbax (or $DSV4_JAX_CACHE/orbax)
    cfg, state = dsv4_jax.checkpoint.restore.load(path)

Safe under concurrency and interruption: a file lock serializes writers, the native folder and the Orbax folder
each appear only when complete (temporary name + rename), and a half-built cache is rebuilt on the next call.
"""

from __future__ import annotations

import fcntl
import os
import shutil

from dsv4_jax.checkpoint.convert import FORMAT_VERSION, is_orbax_checkpoint, read_meta
from dsv4_jax.paths import user_path

__all__ = ["ensure_default_checkpoint", "default_cache_dir", "DEFAULT_SEED"]

DEFAULT_SEED = 0


def default_cache_dir() -> str:
    return os.environ.get("DSV4_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv4_jax", "tiny")


def _valid(orbax: str) -> bool:
    if not is_orbax_checkpoint(orbax):
        return False
    try:
        return read_meta(orbax)["format_version"] == FORMAT_VERSION
    except ValueError:
        return False


def ensure_default_checkpoint(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of the default (tiny, seed 0) Orbax checkpoint, building it on first use.

    `cache_dir` (default `$DSV4_JAX_CACHE` or `~/.cache/dsv4_jax/tiny`) holds `native/` (the released-format
    folder) and `orbax/` (returned)."""
    from dsv4_jax.checkpoint.convert import convert
    from dsv4_jax.checkpoint.writer import write_native
    from dsv4_jax.config import Config

    cache = user_path(cache_dir if cache_dir is not None else default_cache_dir())
    orbax, native = os.path.join(cache, "orbax"), os.path.join(cache, "native")
    if _valid(orbax):
        return orbax
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then re-check
        try:
            if _valid(orbax):
                return orbax
            if os.path.exists(orbax):  # stale (older format version or damaged): rebuild
                shutil.rmtree(orbax)
            if not os.path.isfile(os.path.join(native, "model.safetensors.index.json")):
                shutil.rmtree(native, ignore_errors=True)
                write_native(Config.tiny(), native, DEFAULT_SEED)
            convert(native, orbax, progress=False)
            return orbax
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
