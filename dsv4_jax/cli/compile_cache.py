"""The persistent caches of the CLI: compiled programs are kept on disk, so a second `dsv4-jax generate` with the
same model and shapes skips compiling. Two caches in one folder: JAX's persistent compilation cache (keyed on the
lowered program, so a process still traces and lowers first) and, in `executables/`, the executables themselves
(`dsv4_jax.exec_cache`: keyed before tracing, so a hit neither traces nor lowers). On by default in a user cache
directory; off with `--no-compile-cache` or `DSV4_JAX_COMPILE_CACHE=0`; `DSV4_JAX_COMPILE_CACHE=/some/dir` moves
it."""

from __future__ import annotations

import os

__all__ = ["cache_dir", "enable", "describe"]

ENV = "DSV4_JAX_COMPILE_CACHE"


def cache_dir() -> str | None:
    """The cache folder, or None when switched off."""
    raw = os.environ.get(ENV, "")
    if raw.lower() in ("0", "off", "false", "no"):
        return None
    if raw and raw.lower() not in ("1", "on", "true", "yes"):
        return os.path.abspath(os.path.expanduser(raw))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dsv4_jax", "jax-compile-cache")


def describe() -> str:
    where = cache_dir()
    return f"{ENV}=0 turns it off; now: {where}" if where else f"off ({ENV}=0)"


def enable() -> str | None:
    """Points JAX's persistent compilation cache at `cache_dir()` (every program worth a second, and the
    autotuning results) and `dsv4_jax.exec_cache` at its `executables/`; returns the folder, or None when off."""
    from dsv4_jax import exec_cache

    where = cache_dir()
    if where is None:
        exec_cache.disable()
        return None
    import jax

    os.makedirs(where, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    exec_cache.enable(os.path.join(where, "executables"))
    return where
