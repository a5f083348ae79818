"""Exit codes of `dsv4-jax` and how an exception becomes one line on stderr.

A script can tell what went wrong from the code alone: its own flags (2), the data it pointed at (3), Ctrl-C (130),
or a bug (1, the only case where a traceback helps, shown with --debug).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import sys
import threading

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_INTERRUPTED = 130

EPILOG = """exit status:
  0    success
  1    unexpected internal error (a bug; --debug or DSV4_JAX_DEBUG=1 shows the traceback)
  2    usage error: a bad flag or flag value
  3    bad input data: a checkpoint, tokenizer or config that cannot be used, a missing file, a full disk
  130  interrupted (Ctrl-C)"""


class CLIError(Exception):
    """An error the command has already put into words; `code` is the exit status."""

    code = EXIT_INTERNAL

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(CLIError):
    code = EXIT_USAGE


class DataError(CLIError):
    code = EXIT_DATA


class Interrupted(CLIError):
    code = EXIT_INTERRUPTED


def flag_message(message: str, fields: dict[str, str]) -> str:
    """Rewrites the library's `field=value` wording as the CLI's `--flag value` (`top_p=0.0 must be in (0, 1]` ->
    `--top-p 0.0 must be in (0, 1]`); `fields` maps field names to flags."""
    for field, flag in fields.items():
        message = re.sub(rf"\b{re.escape(field)}=", f"{flag} ", message)
    return message


@contextlib.contextmanager
def quiet_background_errors(debug: bool):
    """Around an Orbax save or restore: a failed write or read is reported by each of Orbax's worker threads (absl
    ERROR records with tracebacks), by asyncio for the abandoned tasks, and by TensorStore's callbacks into closed
    event loops (printed through `sys.excepthook`): up to hundreds of lines for one problem, which the command
    reports itself in one line. The loggers are disabled rather than raised in level because `convert` and `load`
    set absl's level themselves. With `debug`, nothing is hidden."""
    if debug:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "orbax", "jax")]
    disabled = [lg.disabled for lg in loggers]
    hooks = sys.excepthook, threading.excepthook
    for lg in loggers:
        lg.disabled = True
    sys.excepthook = lambda *a: None
    threading.excepthook = lambda a: None
    try:
        yield
    finally:
        for lg, d in zip(loggers, disabled, strict=True):
            lg.disabled = d
        sys.excepthook, threading.excepthook = hooks


def describe(e: BaseException) -> tuple[int, str]:
    """(exit status, message after `dsv4-jax CMD: `) for an exception that ended a command."""
    from dsv4_jax.checkpoint.layout import CheckpointError
    from dsv4_jax.config import ConfigError

    if isinstance(e, Interrupted):
        return e.code, str(e)
    if isinstance(e, CLIError):
        return e.code, f"error: {e}"
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(e, CheckpointError | ConfigError):
        return EXIT_DATA, f"error: {e}"
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return EXIT_DATA, f"error: {e.strerror or 'no space left on device'}"
        return EXIT_DATA, f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    if isinstance(e, ValueError):  # the library's own checks of what it was given (tokenizer, config, ids)
        return EXIT_DATA, f"error: {e}"
    return EXIT_INTERNAL, (f"internal error: {type(e).__name__}: {e} (this is a bug; --debug or DSV4_JAX_DEBUG=1 "
                           "shows the traceback)")  # fmt: skip
