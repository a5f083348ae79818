"""The executable cache (`dsv4_jax.exec_cache`): a fresh process loads the generation programs another one compiled,
without tracing, and streams the same tokens; a changed static argument or shape is another program; a damaged entry
is compiled again and replaced; switched off, nothing is written.

The key, loading and fallback are shown on a small jitted function (milliseconds); the model's programs in two
processes that stream from the tiny random model with the shapes of the CLI test (`test_cli.py`: one 6-token prompt
padded to 64, 8 new tokens, max_len 128) and its cache folder, so that one compile serves both tests."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multiproc import cache_env

from dsv4_jax import exec_cache
from dsv4_jax.cli import compile_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "exec_cache_worker.py"


@functools.partial(jax.jit, static_argnames=("n",), donate_argnums=(0,))
def _scaled(x, y, *, n: int):
    return {"sum": x * n + y, "n": jnp.int32(n)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache on in a fresh folder, with an empty in-process table (each test starts as a new process would)."""
    monkeypatch.setattr(exec_cache, "_LOADED", {})
    monkeypatch.setattr(exec_cache, "COUNTS", dict.fromkeys(exec_cache.COUNTS, 0))
    exec_cache.enable(str(tmp_path / "executables"))
    yield tmp_path / "executables"
    exec_cache.disable()


def _run(n=2, shape=(4,)):
    x, y = jnp.ones(shape, jnp.float32), jnp.full(shape, 3.0, jnp.float32)
    out = exec_cache.compiled("scaled", _scaled, (x, y), {"n": n})(x, y)
    assert x.is_deleted()  # the donation survives the trip through the disk
    return jax.tree.map(np.asarray, out)


def _as_new_process():
    exec_cache._LOADED.clear()


def test_a_second_process_loads_and_a_changed_program_compiles(cache):
    first = _run()
    _as_new_process()
    again = _run()
    assert exec_cache.COUNTS == {"compiled": 1, "stored": 1, "loaded": 1}
    np.testing.assert_array_equal(again["sum"], first["sum"])
    np.testing.assert_array_equal(again["sum"], np.full(4, 5.0))
    _as_new_process()
    _run(n=3)  # another static argument
    _run(shape=(5,))  # another shape
    assert exec_cache.COUNTS["compiled"] == 3 and len(list(cache.iterdir())) == 3


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not_an_executable"])
def test_a_damaged_entry_is_compiled_again_and_replaced(cache, damage):
    _run()
    (entry,) = cache.iterdir()
    data = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        entry.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    else:  # intact on disk, but what it holds does not load
        exec_cache._write(str(entry), {"executable": b"junk", "out_tree": None, "platform": "cpu", "devices": [0],
                                        "ops": {}})  # fmt: skip
    _as_new_process()
    np.testing.assert_array_equal(_run()["sum"], np.full(4, 5.0))
    assert exec_cache.COUNTS["compiled"] == 2 and exec_cache.COUNTS["loaded"] == 0
    _as_new_process()
    _run()
    assert exec_cache.COUNTS["loaded"] == 1  # the rewritten entry loads


def test_a_program_that_cannot_be_serialized_is_only_compiled(cache):
    @jax.jit
    def calls_back(x):  # a host callback is a Python function: an executable holding one is not serialized
        return jax.pure_callback(lambda v: np.asarray(v) + 1, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    x = jnp.zeros(3, jnp.float32)
    np.testing.assert_array_equal(exec_cache.compiled("calls_back", calls_back, (x,), {})(x), np.ones(3))
    assert not cache.exists() or not list(cache.iterdir())


def test_the_cli_switch_turns_it_on_beside_the_compilation_cache_and_off(tmp_path, monkeypatch):
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # this session's compilation cache stays as it is
    monkeypatch.setattr(exec_cache, "_LOADED", {})
    monkeypatch.setenv("DSV4_JAX_COMPILE_CACHE", str(tmp_path / "cc"))
    try:
        assert compile_cache.enable() == str(tmp_path / "cc")
        assert exec_cache.folder() == str(tmp_path / "cc" / "executables")
        monkeypatch.setenv("DSV4_JAX_COMPILE_CACHE", "0")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert compile_cache.enable() is None and exec_cache.folder() is None
        _run()
        assert not (tmp_path / "cc" / "executables").exists() and not (tmp_path / "xdg").exists()
    finally:
        exec_cache.disable()


def _worker(*args: str, **env: str) -> dict:
    # The environment of test_cli's `generate` (no device-count flag: XLA flags are part of the compilation key).
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **cache_env(), **env}
    r = subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_an_executable_from_jaxs_persistent_cache_is_compiled_afresh_for_storing(tmp_path):
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    _worker("small", str(tmp_path / "first"), **env)  # fills JAX's cache
    second = _worker("small", str(tmp_path / "second"), **env)  # JAX's cache hits; the executable cache misses
    assert second == {"equal": True, "counts": {"loaded": 1, "compiled": 1, "stored": 1}}


def test_a_fresh_process_streams_from_the_cached_programs(tmp_path):
    # The CLI's folder in this test session (test_cli.py's `generate` fills it with the same two programs).
    folder = os.path.join(cache_env().get("DSV4_JAX_COMPILE_CACHE", str(tmp_path)), "executables")
    first = _worker("stream", folder)
    assert first["counts"]["loaded"] + first["counts"]["stored"] == 2  # loaded, or compiled and stored
    again = _worker("stream", folder)
    assert again["counts"] == {"loaded": 2, "compiled": 0, "stored": 0}  # nothing traced, nothing compiled
    assert again["tokens"] == first["tokens"] and len(first["tokens"]) == 8
    assert again["ran"] == first["ran"] and again["ran"]  # the ops' choices, replayed from the entries
