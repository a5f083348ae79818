"""The op registry: every op that has a kernel is registered once, with its pure-JAX reference twin, its kernel and
its kill switch side by side (the TransformerEngine-JAX pattern). This is the one place that decides, once per
trace, which implementation runs, and the one place that falls back.

    fp8_linear = register("fp8_linear", reference=_fp8_linear_reference,
                          kernel="dsv4_jax.kernels.gemm:fp8_linear", supports=_fp8_linear_supports)
    y = fp8_linear(x, w, s, opts=opts)

* `opts.backend == "reference"`, or no kernel registered: the reference.
* The kernel cannot run (extension not importable, not a CUDA SM90 device, killed by `DSV4_JAX_DISABLE_KERNELS`,
  or `supports(...)` names a reason for these arguments, e.g. a shape with no AOT instantiation):
  "auto" runs the reference (one log line per op and reason; silent where the default device is not a GPU, since
  there the reference is the implementation), "ffi" raises `KernelUnavailable` naming the op and the reason.
* Otherwise the kernel.

A kernel registered with `validated=False` (written, compiled, its GPU tests not yet passed on a GPU) runs under
"ffi" (so its GPU tests can run it) but "auto" takes it only where `DSV4_JAX_ENABLE_KERNELS` names it.

The registry key of an op is the name of the function it selects (`fp8_linear`, `moe_experts`, ...); the kill switch
takes those names: `DSV4_JAX_DISABLE_KERNELS=all` or `fp8_linear,moe_experts`. References receive the traced
arguments plus `quant_sim`; kernels receive the same arguments without it (they implement the quant_sim numerics;
`supports` refuses `quant_sim=False`). `record()` collects which implementation each op chose while tracing (the
CLI prints it; GPU tests assert it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
from collections.abc import Callable, Iterator

from dsv4_jax.options import Opts

__all__ = ["Op", "KernelUnavailable", "register", "ops", "disabled", "enabled", "record", "replay", "KILL_SWITCH",
           "OPT_IN"]  # fmt: skip

log = logging.getLogger("dsv4_jax.ops")

KILL_SWITCH = "DSV4_JAX_DISABLE_KERNELS"
OPT_IN = "DSV4_JAX_ENABLE_KERNELS"


class KernelUnavailable(RuntimeError):
    """`backend="ffi"` asked for a kernel that cannot run these arguments on this machine."""


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    reference: Callable
    kernel: str | None = None  # "module:function", imported lazily (the extension is optional)
    supports: Callable[..., str | None] | None = None  # why the kernel cannot run these arguments (None: it can)
    validated: bool = True  # False: its GPU tests have not yet passed on a GPU; "auto" needs the opt-in

    def load_kernel(self) -> Callable:
        module, func = self.kernel.split(":")
        return getattr(importlib.import_module(module), func)


_OPS: dict[str, Op] = {}
_LOGGED: set[tuple[str, str]] = set()
_RECORDERS: list[dict[str, str]] = []


def ops() -> dict[str, Op]:
    """Every registered op by name."""
    return dict(_OPS)


def disabled() -> set[str]:
    """Op names killed by `DSV4_JAX_DISABLE_KERNELS` (comma list; `all` kills every kernel)."""
    return {s.strip() for s in os.environ.get(KILL_SWITCH, "").split(",") if s.strip()}


def enabled() -> set[str]:
    """Op names whose not-yet-validated kernels "auto" may run (`DSV4_JAX_ENABLE_KERNELS`, a comma list)."""
    return {s.strip() for s in os.environ.get(OPT_IN, "").split(",") if s.strip()}


def _global_reason() -> tuple[str | None, bool]:
    """(why no kernel can run here or None, whether a fallback should be silent)."""
    from dsv4_jax import kernels

    why = kernels.unavailable()
    return why, why is not None and not kernels.default_device_is_gpu()


def _choose(op: Op, opts: Opts, args, kwargs) -> tuple[Callable, str]:
    if opts.backend == "reference":
        return op.reference, "reference"
    silent = False
    off = disabled()
    if op.kernel is None:
        why = "no kernel is implemented for this op"
        silent = True
    elif "all" in off or op.name in off:
        why = f"disabled by {KILL_SWITCH}"
    else:
        why, silent = _global_reason()
        if why is None and op.supports is not None:
            why = op.supports(*args, quant_sim=opts.quant_sim, **kwargs)
        if why is None and not op.validated and opts.backend == "auto" and op.name not in enabled():
            why = f"its kernel has not yet passed its GPU tests (opt in: {OPT_IN}={op.name})"
        if why is None:
            return op.load_kernel(), "kernel"
    if opts.backend == "ffi":
        raise KernelUnavailable(f"op {op.name!r}: backend='ffi' asks for its kernel, which cannot run: {why}")
    if not silent and (op.name, why) not in _LOGGED:
        _LOGGED.add((op.name, why))
        log.warning("dsv4_jax: op %s runs the reference: %s", op.name, why)
    return op.reference, "reference"


def register(name: str, reference: Callable, kernel: str | None = None,
             supports: Callable[..., str | None] | None = None, validated: bool = True) -> Callable:  # fmt: skip
    """Registers an op and returns its dispatching function `f(*args, opts=Opts(), **kwargs)`."""
    if name in _OPS:
        raise ValueError(f"op {name!r} is registered twice")
    op = Op(name, reference, kernel, supports, validated)
    _OPS[name] = op

    def call(*args, opts: Opts = Opts(), **kwargs):
        impl, which = _choose(op, opts, args, kwargs)
        _note(name, which)
        if which == "reference":
            return impl(*args, quant_sim=opts.quant_sim, **kwargs)
        return impl(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = reference.__doc__
    call.op = op
    return call


def _note(name: str, which: str) -> None:
    for rec in _RECORDERS:
        rec[name] = which if rec.get(name, which) == which else "mixed"


def replay(choices: dict[str, str]) -> None:
    """Feeds the open recorders the choices recorded when a program was compiled: a program loaded from
    `dsv4_jax.exec_cache` is not traced, so its ops do not report themselves."""
    for name, which in choices.items():
        _note(name, which)


@contextlib.contextmanager
def record() -> Iterator[dict[str, str]]:
    """Collects, for the code traced inside the block, which implementation each op ran: {name: "kernel" |
    "reference" | "mixed"}. Only tracing is seen: a program jax had already compiled in this process records nothing;
    one loaded from `dsv4_jax.exec_cache` replays what it recorded when it was compiled."""
    rec: dict[str, str] = {}
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:
        # by identity: nested recorders (the CLI's around the executable cache's) are often equal dicts, and
        # list.remove would take out the outer one
        del _RECORDERS[next(i for i, r in enumerate(_RECORDERS) if r is rec)]
