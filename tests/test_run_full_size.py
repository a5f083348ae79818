"""`scripts/run_full_size.py`: the full-size run's script, exercised at tiny size on 8 simulated CPU devices (a
subprocess), its reduced-depth configs and its exit codes (in-process, nothing compiled)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from multiproc import REPO, env_for

from dsv4_jax.config import Config
from dsv4_jax.model import layer_groups
from dsv4_jax.parallel.plan import weight_bytes

SCRIPT = REPO / "scripts" / "run_full_size.py"


def _script():
    spec = importlib.util.spec_from_file_location("run_full_size", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_on_8_devices(tmp_path):
    out = tmp_path / "run.json"
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--mesh", "expert=8", "--values", "bytes",
           "--max-new-tokens", "4", "--long-context", "200", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=env_for(8), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "RUN OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    want = weight_bytes(Config.tiny(), {"expert": 8}, prepared_scales=True)["per_device"]  # after prepare_params
    assert res["plan"]["weights"] == want and res["plan"]["fits"]
    assert sorted(map(int, res["param_bytes"])) == list(range(8)) and set(res["param_bytes"].values()) == {want}
    assert len(res["generated"]) == 4 and all(0 <= t < 512 for t in res["generated"])
    assert "mesh data=1 x expert=8 x tensor=1" in r.stdout and "generate: compile" in r.stdout
    assert "prepare_params:" in r.stdout and "MXFP4 experts as stored" in r.stdout  # slabs on SM90 GPUs only
    # decode at position 200 of a synthetically filled cache, the cache replicated on the mesh
    assert res["long_context"]["context"] == 200 and res["long_context"]["step_ms"] > 0
    assert res["long_context"]["cache_bytes"] > 200 * Config.tiny().n_layers * 584 // 128


def test_reduced_depth_keeps_the_layer_pattern():
    truncated = _script().truncated
    pro = truncated(Config.pro(), 7)
    assert pro.n_layers == 7 and pro.compress_ratios == (128, 128, 4, 128, 4, 128, 4, 0) and pro.n_hash_layers == 3
    assert [(len(g.unit), g.repeats) for g in layer_groups(pro)] == [(1, 2), (1, 1), (2, 2)]  # as the full Pro
    flash = truncated(Config.flash(), 2)
    assert flash.compress_ratios == (0, 0, 0) and flash.n_hash_layers == 2
    assert truncated(Config.flash(), None) == Config.flash()
    with pytest.raises(ValueError, match="--layers 44 must be in 1..43"):
        truncated(Config.flash(), 44)


def test_exit_codes(monkeypatch, capsys):
    main = _script().main
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # main sets it only where unset
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.95")
    assert main(["--preset", "tiny", "--mesh", "expert=2"]) == 2  # this process has one device
    assert "there are 1" in capsys.readouterr().err
    assert main(["--preset", "flash", "--mesh", "expert=1"]) == 3  # 149 GiB of weights on one H200: stop early
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_cli_generate_with_a_mesh_on_2_devices():
    """`dsv4-jax generate --mesh expert=2` (V4-Flash's 2 x H200 layout): the embedded tiny checkpoint restored into
    the expert-parallel shardings and generated from with the mesh in context (2 simulated CPU devices; 8 are
    `test_tiny_on_8_devices`'s); a mesh the devices cannot form is a usage error naming the flag."""
    cmd = [sys.executable, "-m", "dsv4_jax", "generate", "--mesh", "expert=2", "--prompt-ids", "5,6,7",
           "--max-new-tokens", "3", "--no-compile-cache"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=env_for(2), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mesh data=1, expert=2, tensor=1, rules ep" in r.stderr and "generated 3 tokens" in r.stderr, r.stderr
