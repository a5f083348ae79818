"""Launching a script as several JAX processes on this machine (loopback only), for the multi-host tests.

Each process gets `JAX_PLATFORMS=cpu`, its own fake CPU devices (`--xla_force_host_platform_device_count`) and the
`DSV4_JAX_COORDINATOR / NUM_PROCESSES / PROCESS_ID` variables that `dsv4_jax.parallel.distributed.initialize`
reads. The run is bounded: past the deadline, or as soon as one process fails, every process still running is killed
(by its own pid) and the outputs are returned for the assertion message.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Result:
    returncodes: list[int | None]
    outputs: list[str]
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    def report(self, tail: int = 4000) -> str:
        parts = [f"timed out: {self.timed_out}; return codes {self.returncodes}"]
        for i, out in enumerate(self.outputs):
            lines = [ln for ln in out.splitlines() if not ln.startswith("[Gloo]")]  # one line per connection
            parts.append(f"--- process {i} ---\n" + "\n".join(lines)[-tail:])
        return "\n".join(parts)


def cache_env() -> dict:
    """The variables that point a JAX subprocess at the test session's persistent compilation cache (`conftest.py`),
    every program kept, and the CLI's cache setting at the same folder; empty when the cache is off."""
    import jax

    cache = jax.config.jax_compilation_cache_dir
    if not cache:
        return {}
    return {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "DSV4_JAX_COMPILE_CACHE": cache}  # fmt: skip


def env_for(devices: int, **extra: str) -> dict:
    """The environment of one CPU process with `devices` fake devices, this checkout first on the path, and the
    test session's persistent compilation cache (`cache_env`), so that re-runs and later tests skip the compiles."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    for key, value in cache_env().items():
        env.setdefault(key, value)
    for key in ("DSV4_JAX_COORDINATOR", "DSV4_JAX_NUM_PROCESSES", "DSV4_JAX_PROCESS_ID"):
        env.pop(key, None)
    env.update(extra)
    return env


def launch(args: list[str], n_processes: int, devices_per_process: int, timeout_s: float, cwd=REPO) -> Result:
    """Runs `python args...` as `n_processes` cooperating processes (a single plain process when 1)."""
    port = free_port()
    procs, logs = [], []
    for i in range(n_processes):
        extra = {}
        if n_processes > 1:
            extra = {"DSV4_JAX_COORDINATOR": f"127.0.0.1:{port}", "DSV4_JAX_NUM_PROCESSES": str(n_processes),
                     "DSV4_JAX_PROCESS_ID": str(i)}  # fmt: skip
        log = tempfile.NamedTemporaryFile("w+", prefix=f"dsv4_jax_proc{i}_", suffix=".log", delete=False)
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=env_for(devices_per_process, **extra),
                                      stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                break
            if any(p.poll() not in (None, 0) for p in procs):  # one failed: the others would wait for it forever
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
        os.unlink(log.name)
    return Result([p.returncode for p in procs], outputs, timed_out)
