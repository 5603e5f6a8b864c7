"""A virtual null-modem cable: two pseudo-terminals whose traffic is cross-connected.

Like ``socat -d -d pty,raw,echo=0 pty,raw,echo=0``, in-process: open :attr:`VirtualNullModem.a` with one
program (say ``smearsight device panel-sim``) and :attr:`VirtualNullModem.b` with another (the runtime
or ``smearsight device serial-monitor``). Used by the tests; handy for trying the panel tools without
hardware. Linux/macOS only (``os.openpty``).
"""

from __future__ import annotations

import os
import select
import threading
import tty
from collections.abc import Callable


class VirtualNullModem:
    """Cross-connects two ptys. ``tap(direction, data)`` sees every chunk (``"a>b"`` or ``"b>a"``)."""

    def __init__(self, tap: Callable[[str, bytes], None] | None = None) -> None:
        self._tap = tap
        self._master_a, self._slave_a = os.openpty()
        self._master_b, self._slave_b = os.openpty()
        # Raw from the start (no echo, no line editing) even before a program opens and configures them;
        # keeping our own slave descriptors open also keeps the masters readable when nobody else is.
        tty.setraw(self._slave_a)
        tty.setraw(self._slave_b)
        self.a = os.ttyname(self._slave_a)
        self.b = os.ttyname(self._slave_b)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, name="null-modem", daemon=True)

    def start(self) -> VirtualNullModem:
        self._thread.start()
        return self

    def inject(self, into: str, data: bytes) -> None:
        """Deliver ``data`` to the program that opened port ``into`` (``"a"`` or ``"b"``), as line noise would."""
        master = self._master_a if into == "a" else self._master_b
        with self._lock:
            _write_all(master, data)

    def _pump(self) -> None:
        route = {self._master_a: (self._master_b, "a>b"), self._master_b: (self._master_a, "b>a")}
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(list(route), [], [], 0.05)
            except (OSError, ValueError):
                return
            for src in ready:
                try:
                    data = os.read(src, 4096)
                except OSError:
                    continue
                dst, direction = route[src]
                if self._tap is not None:
                    self._tap(direction, data)
                with self._lock:
                    _write_all(dst, data)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        for fd in (self._master_a, self._master_b, self._slave_a, self._slave_b):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> VirtualNullModem:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
