"""`dsv4-jax generate`: runs end to end on the embedded tiny checkpoint; a bad flag exits 2 naming the flag;
`dsv4-jax info` without a path describes that same embedded checkpoint."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from multiproc import cache_env

from dsv4_jax.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt_cache(default_ckpt_cache):
    return default_ckpt_cache  # built once per session (the quickstart notebook uses it too)


def test_generate_runs(ckpt_cache):
    env = {**os.environ, "DSV4_JAX_CACHE": ckpt_cache, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **cache_env()}
    cmd = [sys.executable, "-m", "dsv4_jax.cli", "generate", "--prompt", "Hello", "--max-new-tokens", "8"]
    r = subprocess.run(cmd, capture_output=True, env=env, timeout=900)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "generated 8 tokens" in err or "generated" in err
    assert "prefill 6 tokens" in err and "tok/s" in err and "compile" in err
    ids = err.split("generated ")[1].split("tokens: ")[1].splitlines()[0]
    assert 1 <= len(eval(ids)) <= 8  # noqa: S307 - our own printed list


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt-ids", "5, 600"], "--prompt-ids: token id 600"),
        (["--prompt", "hello world", "--max-len", "4"], "12 tokens, more than --max-len 4"),
        (["--prompt", "hi", "--max-new-tokens", "100", "--max-len", "16"], "--max-new-tokens 100"),
        (["--prompt", "hi", "--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
    ],
)
def test_bad_flag_exits_2(argv, needle, capsys, ckpt_cache, monkeypatch):
    monkeypatch.setenv("DSV4_JAX_CACHE", ckpt_cache)
    assert main(["generate", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_info_without_a_path_describes_the_embedded_checkpoint(capsys, ckpt_cache, monkeypatch):
    monkeypatch.setenv("DSV4_JAX_CACHE", ckpt_cache)  # built by the tests above: generate's default
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("checkpoint: embedded tiny checkpoint (the default of `dsv4-jax generate`; random weights)")
    assert os.path.join(ckpt_cache, "orbax") in out and "parameters:" in out


def test_generated_control_bytes_are_escaped():
    from dsv4_jax.cli.generate import _printable

    assert _printable(b"ok\x1b[2J\x08\n\t\xc3\xa9") == b"ok\\x1b[2J\\x08\n\t\xc3\xa9"
