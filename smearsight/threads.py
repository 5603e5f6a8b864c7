"""Helpers shared by the threads that hand frames on (the capture thread, the inference thread)."""

from __future__ import annotations

import queue
import threading
from typing import Any


def put_until_stopped(q: queue.Queue[Any], item: Any, stop: threading.Event, poll_s: float = 0.1) -> bool:
    """Put ``item`` into the bounded queue ``q``, waiting for room, unless ``stop`` is set first.

    Returns True when the item was put. The wait is re-checked every ``poll_s`` seconds, so a consumer
    that stops reading never leaves the producer blocked.
    """
    while not stop.is_set():
        try:
            q.put(item, timeout=poll_s)
            return True
        except queue.Full:
            continue
    return False
