"""systemd's notify protocol (``sd_notify``) without dependencies: one datagram on ``$NOTIFY_SOCKET``.

The runtime service (``Type=notify`` with ``WatchdogSec=``) sends ``READY=1`` once its models are
loaded and then ``WATCHDOG=1`` from its frame loop; :class:`Watchdog` rate-limits the pings so that
calling :meth:`Watchdog.ping` on every frame costs nothing.
"""

from __future__ import annotations

import os
import socket
import time


def notify(message: str, socket_path: str | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; False when not run under systemd."""
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode("utf-8"))
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects a ``WATCHDOG=1`` ping, or None when no watchdog applies."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Pings the systemd watchdog at half its interval, however often :meth:`ping` is called."""

    def __init__(self, interval: float | None = None, socket_path: str | None = None):
        self.interval = interval if interval is not None else watchdog_interval()
        self.socket_path = socket_path
        self._last = float("-inf")

    def ping(self, now: float | None = None) -> bool:
        """Send ``WATCHDOG=1`` when due; True when a ping was sent."""
        if not self.interval:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last < self.interval / 2:
            return False
        self._last = now
        return notify("WATCHDOG=1", self.socket_path)

    def ready(self, status: str = "") -> bool:
        """Tell systemd the service is up (``READY=1`` plus an optional status line)."""
        return notify("READY=1" + (f"\nSTATUS={status}" if status else ""), self.socket_path)

    def status(self, text: str) -> bool:
        """Show ``text`` in ``systemctl status``."""
        return notify(f"STATUS={text}", self.socket_path)
