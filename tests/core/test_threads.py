"""put_until_stopped: a producer waits for room in a bounded queue, but never past a stop request."""

from __future__ import annotations

import queue
import threading
import time

from smearsight.threads import put_until_stopped


def test_waits_for_room_then_puts():
    q: queue.Queue[int] = queue.Queue(maxsize=1)
    q.put(1)
    stop = threading.Event()
    threading.Timer(0.2, q.get).start()  # the consumer takes the first item a moment later
    t0 = time.perf_counter()
    assert put_until_stopped(q, 2, stop, poll_s=0.05)
    assert time.perf_counter() - t0 >= 0.15
    assert q.get_nowait() == 2


def test_gives_up_when_stopped_and_puts_nothing():
    q: queue.Queue[int] = queue.Queue(maxsize=1)
    q.put(1)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    t0 = time.perf_counter()
    assert not put_until_stopped(q, 2, stop, poll_s=0.05)
    assert 0.15 <= time.perf_counter() - t0 < 2.0
    assert q.get_nowait() == 1 and q.empty()
    assert not put_until_stopped(queue.Queue(), 3, stop)  # already stopped: not even an empty queue is used
