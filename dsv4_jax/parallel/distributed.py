"""Joining several processes (one per host, or one per GPU group) into one JAX program.

    from dsv4_jax.parallel import distributed, make_mesh
    distributed.initialize()          # before any other JAX call; a no-op for a single process
    mesh = make_mesh(expert=8)        # every process's devices

Settings come from the arguments or, when those are None, from the environment:

| variable | meaning |
|---|---|
| `DSV4_JAX_COORDINATOR` | `host:port` of process 0's coordinator service (every process gives the same) |
| `DSV4_JAX_NUM_PROCESSES` | how many processes take part |
| `DSV4_JAX_PROCESS_ID` | this process's index, `0 .. N-1` |

With one process (N unset or 1) nothing is initialised and `jax.devices()` is the local devices, so the same script
runs on one host unchanged. Every process runs the same program: the same jitted calls on the same global arrays, in
the same order; printing and file writes should be left to process 0 (`jax.process_index() == 0`).
"""

from __future__ import annotations

import os

import jax

__all__ = ["initialize", "settings", "is_main_process"]

ENV_COORDINATOR = "DSV4_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "DSV4_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DSV4_JAX_PROCESS_ID"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> tuple[str | None, int, int]:  # fmt: skip
    """(coordinator, num_processes, process_id) from the arguments, else the `DSV4_JAX_*` variables; checked."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR, "").strip() or None
    num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
    n = 1 if num_processes is None else num_processes
    if n < 1:
        raise ValueError(f"num_processes={n} must be at least 1")
    if n == 1:
        if process_id not in (None, 0):
            raise ValueError(f"process_id={process_id} given for a single process")
        return coordinator, 1, 0
    if coordinator is None:
        raise ValueError(f"{n} processes need a coordinator address host:port (argument or {ENV_COORDINATOR})")
    if process_id is None or not 0 <= process_id < n:
        raise ValueError(f"process_id={process_id} must be in 0..{n - 1} (argument or {ENV_PROCESS_ID})")
    return coordinator, n, process_id


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 300) -> bool:  # fmt: skip
    """Starts `jax.distributed` for several processes; returns whether it did (False: a single process, nothing to
    do). Must run before anything touches a device. Calling it again after it succeeded does nothing."""
    coordinator, n, pid = settings(coordinator, num_processes, process_id)
    if n == 1:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid,
                               initialization_timeout=timeout_s)  # fmt: skip
    return True


def is_main_process() -> bool:
    """Whether this is process 0 (the one that prints and writes files)."""
    return jax.process_index() == 0
