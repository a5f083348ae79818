"""The notebooks run top to bottom on CPU and draw their figures: the quickstart, and the full-size notebook at
`SIZE = "tiny"` on 8 simulated CPU devices (its kernel is a subprocess that gets the XLA flag)."""

from __future__ import annotations

import ast
import os
import pathlib

import pytest
from multiproc import cache_env

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.py"
FULL_SIZE = NOTEBOOK.with_name("full_size.py")


def test_quickstart_notebook_executes(tmp_path, monkeypatch, default_ckpt_cache):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    fig = tmp_path / "routing.png"
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("QUICKSTART_FIG", str(fig))
    monkeypatch.setenv("DSV4_JAX_CACHE", default_ckpt_cache)  # built once per session (test_cli uses it too)
    for key, value in cache_env().items():  # the session's persistent compilation cache (conftest.py)
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")]))
    nb = jupytext.read(NOTEBOOK)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "generated ids:" in text and "random weights" not in text.split("generated ids:")[0]
    logprobs = ast.literal_eval(text.split("log-probs: ")[1].splitlines()[0])
    assert logprobs and all(x <= 0 and len(repr(x).split(".")[1]) <= 3 for x in logprobs)  # rounded, no fp32 noise
    assert fig.exists() and fig.stat().st_size > 5000


def test_quickstart_has_no_silent_fallback():
    """A checkpoint that cannot be restored is an error the reader sees, not a switch to other weights."""
    source = NOTEBOOK.read_text()
    assert "except" not in source and "init_random" not in source


@pytest.mark.parametrize("notebook", [NOTEBOOK, FULL_SIZE], ids=["quickstart", "full_size"])
def test_paired_ipynb_is_in_sync_and_stripped(notebook):
    jupytext = pytest.importorskip("jupytext")
    ipynb = jupytext.read(notebook.with_suffix(".ipynb"))
    py = jupytext.read(notebook)
    assert [c.source for c in ipynb.cells] == [c.source for c in py.cells]
    assert all(not c.get("outputs") for c in ipynb.cells if c.cell_type == "code")


def test_full_size_notebook_executes_tiny_on_8_devices(tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    fig = tmp_path / "decode.png"
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("FULL_SIZE_FIG", str(fig))
    monkeypatch.setenv("DSV4_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    for key, value in cache_env().items():  # the session's persistent compilation cache (conftest.py)
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")]))
    nb = jupytext.read(FULL_SIZE)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert text.startswith("8 devices: cpu")
    assert "memory plan per device: mesh data=1, expert=8, tensor=1 (8 devices)" in text and ": fits" in text
    placed = [line for line in text.splitlines() if line.startswith("device ") and "of parameters" in line]
    assert len(placed) == 8 and all(line.split()[2] == line.split("plan: ")[1].rstrip(")") for line in placed)
    assert "P(None, 'expert', None, None)" in text  # the routed experts split over the mesh
    new = ast.literal_eval(text.split("generated ids: ")[1].split(" (")[0])
    steps = ast.literal_eval(text.split("decode steps (ms): ")[1].splitlines()[0])
    assert len(new) == 8 and len(steps) == 8 and all(t > 0 for t in steps)
    assert fig.exists() and fig.stat().st_size > 5000
