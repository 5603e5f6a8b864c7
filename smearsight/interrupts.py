"""Ctrl-C and SIGTERM as KeyboardInterrupt, and remembered.

Python raises KeyboardInterrupt wherever the main thread is when it handles the signal. Where that is a
finalizer or a weakref callback (a figure or a tensor being freed), the interpreter prints "Exception
ignored" and carries on, so a training run could go on for hours after one Ctrl-C. The handlers installed
by :func:`signals_as_interrupt` also remember the request, and long loops call
:func:`raise_if_interrupted` once per step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_requested = threading.Event()


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGINT and the first SIGTERM raise KeyboardInterrupt and are remembered (later
    SIGTERMs are ignored while cleaning up). SIGINT is left alone where it is ignored (``nohup``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    terminated = False

    def _on_int(signum: int, frame: object) -> None:
        _requested.set()
        raise KeyboardInterrupt

    def _on_term(signum: int, frame: object) -> None:
        nonlocal terminated
        if not terminated:
            terminated = True
            _requested.set()
            raise KeyboardInterrupt("SIGTERM")

    previous_term = signal.signal(signal.SIGTERM, _on_term)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_int)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)
        _requested.clear()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C or SIGTERM arrived since the command started (even if the first
    KeyboardInterrupt was swallowed by a finalizer)."""
    if _requested.is_set():
        raise KeyboardInterrupt("interrupted earlier")
