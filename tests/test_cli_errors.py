"""What a new user hits on the command line (issue #13): relative and `~` paths, Ctrl-C and a full disk during
`convert`, unreadable or half-converted checkpoints, exit codes and flag names, `info` without a path, `--version`,
the restore progress bar. All in-process through `dsv4_jax.cli.main`, on a small model; nothing is compiled."""

from __future__ import annotations

import errno
import gc
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from ckpt_helpers import small_cfg

import dsv4_jax
from dsv4_jax.checkpoint import convert as convert_mod
from dsv4_jax.checkpoint.convert import convert
from dsv4_jax.checkpoint.layout import CheckpointError
from dsv4_jax.checkpoint.writer import write_native
from dsv4_jax.cli import generate as cli_generate
from dsv4_jax.cli import main
from dsv4_jax.cli.interrupt import ctrl_c_outside_gc

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return write_native(small_cfg(), tmp_path_factory.mktemp("src") / "native", seed=0, shards=2, values="random")


@pytest.fixture(scope="module")
def converted(native, tmp_path_factory):
    return convert(native, tmp_path_factory.mktemp("dst") / "orbax", progress=False)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---- 1. relative and ~ paths ---------------------------------------------------------------------------------------


def test_relative_and_home_paths_everywhere(native, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(native, "src")
    assert main(["convert", "src", "conv1", "--quiet"]) == 0  # relative SRC and DST
    assert (tmp_path / "conv1" / "dsv4_jax.json").is_file()
    cfg, _ = dsv4_jax.load("conv1")  # Orbax needs absolute paths: load makes them so
    assert cfg.n_layers == small_cfg().n_layers
    assert main(["info", "conv1"]) == 0
    state, folder, _ = cli_generate.load_model("conv1")  # what `generate --ckpt conv1` does
    assert folder == str(tmp_path / "conv1")

    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["convert", "~/src", "~/conv2", "--quiet"]) == 0  # `~` that no shell expanded (quoted)
    assert (tmp_path / "conv2" / "dsv4_jax.json").is_file()
    dsv4_jax.load("~/conv2")
    dsv4_jax.load("~/src")
    assert main(["info", "~/conv2"]) == 0
    assert write_native(small_cfg(), "~/nat3", values="random") == str(tmp_path / "nat3")
    capsys.readouterr()


# ---- 2. Ctrl-C -----------------------------------------------------------------------------------------------------


class _FailingCheckpointer:
    """Orbax's checkpointer that raises `exc` when asked to save item number `at` (0-based)."""

    def __init__(self, real, exc: BaseException, at: int):
        self.real, self.exc, self.at, self.calls = real, exc, at, 0

    def save(self, path, *a, **kw):
        self.calls += 1
        if self.calls > self.at:
            raise self.exc
        return self.real.save(path, *a, **kw)


def _fail_on_item(monkeypatch, exc: BaseException, at: int = 2):
    real = convert_mod._checkpointer
    monkeypatch.setattr(convert_mod, "_checkpointer", lambda compress: _FailingCheckpointer(real(compress), exc, at))


def test_ctrl_c_during_convert_keeps_the_partial_folder_and_says_how_to_resume(native, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "out"
    _fail_on_item(monkeypatch, KeyboardInterrupt())
    assert main(["convert", str(native), str(dst), "--quiet"]) == 130
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("dsv4-jax convert: interrupted; the partial conversion is kept in ")
    assert f"{dst}.partial" in line and f"re-run `dsv4-jax convert {native} {dst}` to resume" in line
    assert (tmp_path / "out.partial").is_dir() and not dst.exists()
    monkeypatch.undo()
    assert main(["convert", str(native), str(dst), "--quiet"]) == 0  # the command it printed finishes the job
    assert not (tmp_path / "out.partial").exists() and (dst / "dsv4_jax.json").is_file()


def test_ctrl_c_traceback_only_with_debug(native, tmp_path, monkeypatch, capsys):
    _fail_on_item(monkeypatch, KeyboardInterrupt(), at=0)
    assert main(["convert", str(native), str(tmp_path / "a"), "--quiet", "--debug"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("dsv4-jax convert: interrupted")
    monkeypatch.setenv("DSV4_JAX_DEBUG", "1")
    assert main(["convert", str(native), str(tmp_path / "b"), "--quiet"]) == 130
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_during_generate(monkeypatch, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_generate, "load_model", interrupted)
    assert main(["generate", "--prompt", "hi"]) == 130
    assert _one_line(capsys.readouterr().err) == "dsv4-jax generate: interrupted"


def test_ctrl_c_inside_a_gc_callback_is_not_lost():
    """Python swallows a KeyboardInterrupt raised in a gc callback (jax has one; convert collects after each item):
    the CLI delivers such a Ctrl-C again once the callback has returned."""
    armed, fired = [], []

    def callback(phase, info):
        # Only in the collection below: an automatic one (any thread) before the handler is in place would swallow
        # the signal and disarm the test.
        if phase == "start" and armed and not fired and threading.current_thread() is threading.main_thread():
            fired.append(True)
            signal.raise_signal(signal.SIGINT)
            sum(range(1000))  # the handler runs here, inside the callback

    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt), ctrl_c_outside_gc():
            armed.append(True)
            gc.collect()
            # Re-delivered after 50 ms by `_thread.interrupt_main`, which wakes no sleep: poll, for up to 20 s (the
            # margin is for a loaded machine: a single 2 s sleep once ended before the re-delivery).
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        gc.callbacks.remove(callback)
    assert fired


# ---- 3. a full disk ------------------------------------------------------------------------------------------------

_TENSORSTORE_ENOSPC = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "hc_attn_fn/0.0" in OCDBT database at local file "/x/": Failed to write '
    "23807 bytes to file 14: No space left on device [os_error_code='28']"
)


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left on device"), _TENSORSTORE_ENOSPC], ids=["OSError", "orbax"]
)
def test_disk_full_during_convert_is_one_line(native, tmp_path, monkeypatch, capsys, exc):
    dst = tmp_path / "out"
    _fail_on_item(monkeypatch, exc, at=2)
    assert main(["convert", str(native), str(dst), "--quiet"]) == 3
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"dsv4-jax convert: error: no space left on device while writing {dst}; ")
    assert f"the partial conversion is kept in {dst}.partial" in line and "re-run `dsv4-jax convert" in line
    partial = tmp_path / "out.partial"
    assert partial.is_dir() and (partial / "globals" / "part_0").is_dir()  # the finished items are kept
    with pytest.raises(OSError) as e:  # the library raises a plain ENOSPC, Orbax's error chained
        convert(native, dst, progress=False)
    assert e.value.errno == errno.ENOSPC and str(partial) in str(e.value)


# ---- 4. an Orbax item whose data files were deleted ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "cut"])
def test_damaged_item_data_names_the_item_and_the_file(converted, tmp_path, capsys, damage):
    """Found by the file list the conversion recorded, before Orbax reads anything (a read failing partway leaves
    TensorStore calling back into a closed event loop: a crashed test worker on CI)."""
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    item = broken / "layer_1" / "part_0"
    data = sorted(
        (p for p in item.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: str(p.relative_to(item))
    )
    assert data, "Orbax's OCDBT data files are expected under d/"
    if damage == "deleted":
        for d in {p.parent for p in data}:
            shutil.rmtree(d)
    else:
        with open(data[0], "r+b") as f:
            f.truncate(data[0].stat().st_size - 1)
    rel = data[0].relative_to(item)  # the first of the item's files in order is reported
    with pytest.raises(CheckpointError) as e:
        dsv4_jax.load(broken)
    msg = str(e.value)
    assert msg.startswith(f"{item}: data file {rel} ") and "\n" not in msg
    assert ("is missing" if damage == "deleted" else "the conversion wrote") in msg
    assert "layers.1." in msg and "re-run `dsv4-jax convert`" in msg
    assert main(["generate", "--ckpt", str(broken)]) == 3
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"dsv4-jax generate: error: {item}: data file ")


# ---- 5. --ckpt at a conversion that was interrupted -----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_interrupted_destination_says_how_to_resume(native, tmp_path, capsys):
    dst = tmp_path / "conv"
    with pytest.raises(KeyboardInterrupt):
        convert(native, dst, progress=False, _stop_after=2)
    assert (tmp_path / "conv.partial").is_dir() and not dst.exists()
    resume = f"an interrupted conversion ({dst}.partial) can be resumed with `dsv4-jax convert {native} {dst}`"
    for argv in (["generate", "--ckpt", str(dst)], ["info", str(dst)]):
        assert main(argv) == 3
        assert resume in _one_line(capsys.readouterr().err)
    with pytest.raises(CheckpointError, match="can be resumed"):
        dsv4_jax.load(dst)


# ---- 7. exit codes and flag names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
        (["generate", "--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
        (["generate", "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
        (["generate", "--top-k", "-2"], "--top-k -2 must be >= 0"),
        (["generate", "--prompt", "a", "--prompt-ids", "1"], "give --prompt or --prompt-ids, not both"),
        (["generate", "--max-len", "0"], "--max-len must be positive"),
        (["generate", "--prefill-chunk", "0"], "--prefill-chunk must be positive"),
        (["generate", "--kv-cache", "fp8", "--no-quant-sim"], "--kv-cache fp8 needs the FP8 simulation"),
        (["convert", "a", "b", "--part-gb", "0"], "--part-gb must be positive"),
        (["info", "x", "--preset", "tiny"], "give a checkpoint PATH or --preset, not both"),
    ],
)
def test_flag_errors_exit_2_and_name_the_flag(argv, needle, capsys):
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == f"dsv4-jax {argv[0]}: error: {needle}" or needle in line
    assert "=" not in line.split("error: ", 1)[1].split(" must")[0]  # a flag, not a `field=value`


def test_existing_destination_is_a_usage_error_in_cli_words(converted, native, capsys):
    assert main(["convert", str(native), str(converted), "--quiet"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.endswith("already exists (add --overwrite to replace it)") and "overwrite=True" not in line


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--top-p", "abc"])
    assert e.value.code == 2


def test_bad_data_exits_3(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 3
    assert "no such checkpoint folder" in _one_line(capsys.readouterr().err)


def test_unexpected_errors_exit_1_without_traceback(monkeypatch, capsys):
    def bug(*a, **kw):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli_generate, "load_model", bug)
    assert main(["generate"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("dsv4-jax generate: internal error: TypeError: unsupported operand") and "--debug" in line
    assert main(["generate", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys):
    for argv in (["--help"], ["convert", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "exit status:" in out and "130  interrupted" in out and "3    bad input data" in out


# ---- 9. --version and python -m dsv4_jax ---------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"dsv4-jax {dsv4_jax.__version__}\n"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{dsv4_jax.__version__}"' in pyproject  # one version, two places


def test_python_dash_m_dsv4_jax():
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "dsv4_jax", "--version"], capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == f"dsv4-jax {dsv4_jax.__version__}\n"


# ---- 10. restore progress for large checkpoints ---------------------------------------------------------------------


def test_restore_progress_above_the_threshold(converted, monkeypatch, capsys):
    cli_generate.load_model(str(converted))
    assert "restore" not in capsys.readouterr().err  # a small checkpoint: no bar
    monkeypatch.setattr(cli_generate, "PROGRESS_MIN_BYTES", 1000)
    cli_generate.load_model(str(converted))
    assert "restore orbax" in capsys.readouterr().err  # tqdm on stderr
    cli_generate.load_model(str(converted), progress=False)  # --no-progress
    assert "restore" not in capsys.readouterr().err


@pytest.mark.parametrize("mesh", ["expert=3", "experts=1", "expert=0"])
def test_generate_mesh_errors_are_usage_errors(mesh, capsys):
    """A mesh the devices cannot form, or a malformed one, is a usage error naming the flag (nothing is loaded)."""
    assert main(["generate", "--mesh", mesh, "--prompt-ids", "5"]) == 2
    assert "error: --mesh:" in _one_line(capsys.readouterr().err)
