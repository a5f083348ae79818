"""Shared test settings. The official fixture is read in place from one setting:
`DSV4_FIXTURES` (default: `../shared/fixtures` beside the repository)."""

from __future__ import annotations

import gc
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("DSV4_FIXTURES", REPO.parent / "shared" / "fixtures"))
OFFICIAL_TINY = FIXTURES / "official-tiny"


def pytest_configure(config):
    # Compiles dominate this suite's time on 2 cores; a persistent cache makes re-runs (and subprocess tests that
    # compile the same programs) cheap. Set DSV4_JAX_TEST_CACHE="" to disable. Every program is kept, however fast
    # its compile: loading a checkpoint compiles ~120 small stacking programs (~0.05 s each, ~10 s per load of the
    # tiny model) afresh on every call, and with the cache a later load (any process, any test) reads them back.
    cache = os.environ.get("DSV4_JAX_TEST_CACHE", str(pathlib.Path.home() / ".cache" / "dsv4_jax" / "jax-test-cache"))
    if cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # A CLI run in this process (`main(["generate", ...])`) points its caches at DSV4_JAX_COMPILE_CACHE: this
    # session's folder, never the user's.
    os.environ["DSV4_JAX_COMPILE_CACHE"] = cache or "0"

    if log := os.environ.get("DSV4_JAX_COMPILE_LOG"):  # where the suite's time goes: compiles per test
        _log_compiles(log)


def _log_compiles(path: str) -> None:
    """Appends `time  test  event  seconds  function` per trace, lowering and XLA compile to PATH.<worker> (through
    jax.monitoring, not jax_log_compiles: its log records would reach the tests that check a run is silent)."""
    import time

    import jax

    out = open(f"{path}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", "a", buffering=1)  # noqa: SIM115

    def listener(event: str, seconds: float, fun_name: str = "?", **_) -> None:
        if event.startswith("/jax/core/compile/"):
            test = os.environ.get("PYTEST_CURRENT_TEST", "-").split(" ")[0]
            out.write(f"{time.time():.3f}\t{test}\t{event.rsplit('/', 1)[1]}\t{seconds:.3f}\t{fun_name}\n")

    jax.monitoring.register_event_duration_secs_listener(listener)


_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")  # fmt: skip


@pytest.fixture(autouse=True)
def _compile_caches_kept():
    # A CLI run in this process also keeps only the programs that took a second to compile and turns the executable
    # cache on (`compile_cache.enable()`): put back after each test, for the tests after it in this worker.
    import jax

    from dsv4_jax import exec_cache

    options, folder = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}, exec_cache.folder()
    yield
    for name, value in options.items():
        if getattr(jax.config, name) != value:
            jax.config.update(name, value)
    if folder is None:
        exec_cache.disable()
    else:
        exec_cache.enable(folder)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # At the first test of each file: collect what the previous files left, then freeze every surviving object
    # (gc.freeze: the cyclic collector skips them from then on). A worker accumulates hundreds of thousands of
    # objects (jax's tracing and compilation caches) and a full collection walks them all, ~0.5 s a time; convert
    # collects after every item and the CLI after every failed command: ~40-70 s per worker in all, now ~10.
    if item.path != _FROZEN_AT[0]:
        _FROZEN_AT[0] = item.path
        gc.unfreeze()
        gc.collect()
        gc.freeze()


_FROZEN_AT = [None]


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


# The order in which the xdist workers get the test files (pyproject: `--dist loadfile --no-loadscope-reorder`):
# the slowest first (about in this order: seconds on the 2-core CI box, cold cache, from ~200 down to ~45), so that
# the two workers finish together; xdist's own order (most tests first) left the single-test subprocess files for
# the end, where one worker ran them alone. Producers of a compiled program that a later file reuses through the
# persistent cache come first (the 8-device tiny init: test_notebook before test_run_full_size). Files not listed
# follow in alphabetical order; a file missing here only starts later.
SLOWEST_FIRST = (
    "test_notebook.py",
    "test_decode.py",
    "test_pro_mesh.py",
    "test_generate.py",
    "test_official.py",
    "test_extend.py",
    "test_expert_parallel.py",
    "test_memory_plan.py",
    "test_model.py",
    "test_checkpoint_convert.py",
    "test_multihost.py",
    "test_cli.py",
    "test_cli_errors.py",
    "test_moe_units.py",
    "test_transformers_crosscheck.py",
    "test_run_full_size.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests stay in order
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_ckpt_cache(tmp_path_factory) -> str:
    """`DSV4_JAX_CACHE` for the tests that use the embedded default checkpoint (the CLI's `generate`, the
    quickstart): the variable when set, else one folder for the whole session, shared by the xdist workers, so that
    the checkpoint is built once (`ensure_default_checkpoint` locks: a second builder waits, then finds it)."""
    if env := os.environ.get("DSV4_JAX_CACHE"):
        return env
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder; each worker's own is a subfolder
    path = root / "dsv4_jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def official_dir() -> pathlib.Path:
    if not (OFFICIAL_TINY / "oracle.npz").exists():
        pytest.skip(f"official fixture not found at {OFFICIAL_TINY} (set DSV4_FIXTURES)")
    return OFFICIAL_TINY


@pytest.fixture(scope="session")
def oracle(official_dir):
    return dict(np.load(official_dir / "oracle.npz"))


@pytest.fixture(scope="session")
def official_state(official_dir):
    from dsv4_jax.checkpoint.native import load_native

    return load_native(official_dir / "checkpoint")


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def gpu_report(line: str, capsys) -> None:
    """Prints a measured figure of a GPU test and appends it to the file DSV4_GPU_REPORT names (pytest-xdist
    workers do not forward prints; scripts/gpu_session.sh collects the file)."""
    with capsys.disabled():
        print("\n" + line)
    if report := os.environ.get("DSV4_GPU_REPORT"):
        with open(report, "a") as f:
            f.write(line + "\n")


def poison(nbytes: int = 1 << 30) -> None:
    """Fills freed device memory with 0xFF (NaN in bf16, f32 and e4m3): XLA's allocator then hands a kernel poisoned
    output buffers, so an element the kernel fails to write shows up."""
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jnp.full((nbytes // 4,), 0xFFFFFFFF, jnp.uint32)).delete()


@pytest.fixture(scope="module")
def ffi():
    """The FFI wrappers, after loading the extension (GPU tests: fails, not skips, if the extension is missing)."""
    from dsv4_jax.kernels import ffi_ops

    mod, why = ffi_ops.load()
    if mod is None:
        pytest.fail(f"GPU present but the FFI extension is unavailable: {why}")
    return ffi_ops


def command_buffer_probe(probe: pathlib.Path, *args: str, timeout: int) -> None:
    """Runs the script `probe` (its last stdout line a JSON object: `captured`, whether a dsv4 custom call was
    recorded in an XLA command buffer; `digests` of its results; `replays_agree`) in fresh processes (XLA_FLAGS apply
    at start-up), once with command buffers for fusions and custom calls at any graph size and once without, and
    asserts that the kernels were recorded in the first and not in the second, with bit-identical results."""
    import json
    import subprocess
    import sys

    outs = {}
    for mode, flags in (
        ("graphs", "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"),
        ("stream", "--xla_gpu_enable_command_buffer="),
    ):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
        }
        env.update(XLA_FLAGS=flags, XLA_CLIENT_MEM_FRACTION="0.2")  # jaxlib 0.11 refuses both names set together
        try:
            r = subprocess.run(
                [sys.executable, str(probe), *args], env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(
                f"{mode}: probe timed out after {timeout} s\nstdout: {e.stdout}\nstderr: {str(e.stderr)[-3000:]}"
            )
        assert r.returncode == 0, f"{mode}: probe failed\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        outs[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    assert outs["graphs"]["captured"], f"no dsv4 custom call was recorded in a command buffer: {outs['graphs']}"
    assert not outs["stream"]["captured"]
    assert outs["graphs"]["digests"] == outs["stream"]["digests"]
    assert outs["graphs"]["replays_agree"]
