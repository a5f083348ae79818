"""Ctrl-C that is not lost inside a garbage-collection callback.

Python runs the SIGINT handler in whatever Python code is executing, and a KeyboardInterrupt raised inside a `gc`
callback is swallowed ("Exception ignored in: <function _xla_gc_callback>"): jax registers one, and `convert`
collects after every item, so a Ctrl-C during a conversion was often lost and the conversion ran on. While
`ctrl_c_outside_gc()` is active, a SIGINT that lands in a gc callback is delivered again a moment later instead.
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import signal
import threading

_RETRY_S = 0.05


def _in_gc_callback(frame) -> bool:
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _handler(signum, frame):
    if _in_gc_callback(frame):
        threading.Timer(_RETRY_S, _thread.interrupt_main, (signal.SIGINT,)).start()
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_outside_gc():
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
        signal.SIG_IGN,
        None,
    ):
        yield  # signal handlers can only be set from the main thread; an ignored SIGINT stays ignored
        return
    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
