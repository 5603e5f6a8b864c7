"""The models one frame ahead of the screen: source + :class:`~smearsight.runtime.pipeline.Pipeline` on a thread.

:func:`smearsight.runtime.pipeline.run` reads :class:`Processed` frames from an :class:`InferenceWorker`
and draws, shows and records them on its own (the main) thread, so windows and sinks stay on one thread.
Threaded (``smearsight run --overlap``), the next frame is pre-processed, inferred and decoded while this
one is drawn and encoded, so that with the detector on a GPU the CPU work overlaps the engine (not yet
measured: no GPU so far). On a CPU-only device ONNX Runtime already keeps every core busy and overlapping
gained nothing (docs/benchmarks.md); by default the worker runs sequentially, each frame processed inside
``next()``. Threaded, at most two frames are in flight (one being shown, one waiting): the picture is at
most one frame later than sequentially.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smearsight.errors import first_line
from smearsight.threads import put_until_stopped

log = logging.getLogger("smearsight.runtime")

_END = object()


@dataclass
class Processed:
    """One frame from the source and, unless it was passed through, what the models found in it."""

    frame: Any  # smearsight.device.sources.Frame
    wait_s: float  # time spent waiting for the source
    detections: np.ndarray | None = None  # [n, 6] frame pixels (a copy); None = not processed
    morphology: list[dict[str, Any]] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    judged: int = 0  # morphology crops judged on this frame
    detected: bool = False  # went through the detector (else its detections were carried from a key frame)
    boxes_age_s: float = 0.0  # how much earlier the frame the boxes were found on came in (Pipeline.boxes_age_s)
    error: str = ""  # plain words when the frame could not be processed
    warning: str = ""  # plain words when it was, but its detections may be incomplete (Pipeline.cap_warning)
    held: bool = False  # passed through unprocessed because the screen holds a frozen field
    generation: int = 0  # morphology resets applied before this frame (see InferenceWorker.reset_morphology)


class InferenceWorker:
    """Iterate over ``source`` on a thread and run ``pipeline.process`` on every frame.

    Stale frames (a lost camera) and frames that arrive while :attr:`hold` is set (a frozen field on the
    screen) are passed through unprocessed. The worker stops at the end of the source or on :meth:`close`
    (which the consumer calls when it has had enough frames). ``threaded=False`` processes each frame
    inside ``next()`` instead (the sequential loop, which ``smearsight run`` uses unless ``--overlap``).
    ``min_interval_s`` reads frames on a schedule of that interval: no read before its time, so the mean
    rate never beats the target, though a read after a slightly late one comes sooner to catch up; a read
    late by a whole interval restarts the schedule (``--detect-every async``: the CPU left over goes to the
    detector's thread). A camera that keeps only its latest frame drops the ones in between.
    An exception other than a failing frame ends the iteration and is raised again in the consumer.
    """

    def __init__(self, pipeline: Any, source: Iterable[Any], *, threaded: bool = True,
                 min_interval_s: float = 0.0) -> None:
        self.pipeline = pipeline
        self.min_interval_s = float(min_interval_s)
        self._next_read: float | None = None
        self.hold = threading.Event()
        self.generation = 0  # resets asked for (consumer side)
        self._applied = 0  # resets applied (worker side)
        self._camera_lost = False
        self._source = iter(source)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
            self._thread.start()

    @property
    def threaded(self) -> bool:
        """True when the models run on their own thread (one frame ahead)."""
        return self._thread is not None

    def reset_morphology(self) -> None:
        """Forget carried morphology results and detections before the next frame (a new slide or session).

        Frames already in flight were judged with the old memory: their :attr:`Processed.generation` is
        below :attr:`generation`, and the consumer drops them.
        """
        self.generation += 1

    def _put(self, item: Any) -> bool:
        return put_until_stopped(self._queue, item, self._stop)

    def _step(self) -> Processed | None:
        """Read and process one frame; None at the end of the source."""
        pipe = self.pipeline
        if self.min_interval_s > 0:  # on a fixed schedule, so that the mean rate is the target
            now = time.perf_counter()
            due = self._next_read if self._next_read is not None else now
            if due > now:
                time.sleep(due - now)
            # a read late by a whole interval or more restarts the schedule instead of catching up
            now, nxt = time.perf_counter(), due + self.min_interval_s
            self._next_read = nxt if now < nxt else now + self.min_interval_s
        t0 = time.perf_counter()
        try:
            frame = next(self._source)
        except StopIteration:
            return None
        item = Processed(frame, time.perf_counter() - t0)
        wanted = self.generation
        if wanted != self._applied:
            pipe.reset()
            self._applied = wanted
        item.generation = self._applied
        if frame.stale:  # the camera is lost: what comes back may show anything, nothing carries over
            self._camera_lost = True
            return item
        if self.hold.is_set():
            item.held = True
            return item
        if self._camera_lost:
            pipe.reset()
            self._camera_lost = False
        try:
            dets, n, item.morphology, item.times = pipe.process(frame.image)
        except Exception as exc:  # a corrupt or odd frame must not stop the device
            # one line, the same for every frame failing the same way (the problems are counted by message)
            item.error = f"frame skipped: {first_line(exc)}"
            log.debug("frame %d failed", frame.index, exc_info=True)
        else:
            item.detections = dets[:n].copy()  # the pipeline reuses its array next frame
            item.judged = pipe.morphology.judged_last if pipe.morphology is not None else 0
            item.detected = pipe.detected_last
            item.boxes_age_s = pipe.boxes_age_s
            item.warning = pipe.cap_warning()
        return item

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._step()
                if item is None or not self._put(item):
                    break
        except BaseException as exc:  # handed to the consumer, which raises it on its own thread
            self._failure = exc
        finally:
            self._put(_END)

    def __iter__(self) -> InferenceWorker:
        return self

    def __next__(self) -> Processed:
        if self._thread is None:  # sequential: the frame is processed here, on the consumer's thread
            item = None if self._stop.is_set() else self._step()
            if item is None:
                raise StopIteration
            return item
        while True:
            try:
                item = self._queue.get(timeout=0.2)
                break
            except queue.Empty:
                if not self._thread.is_alive() or self._stop.is_set():
                    raise StopIteration from None
        if item is _END:
            self._queue.put(_END)  # later calls end too
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            raise StopIteration
        return item

    def stop(self) -> None:
        """Ask the thread to stop after the frame it is on (returns at once); :meth:`close` waits for it."""
        self._stop.set()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the thread and wait for it; True once it has ended (always without a thread). Idempotent."""
        self._stop.set()
        self._drain()  # unblocks a put in progress
        if self._thread is None:
            return True
        self._thread.join(timeout)
        self._drain()  # what that put delivered
        if self._thread.is_alive():
            log.warning("the inference thread did not stop within %.0f s", timeout)
            return False
        return True

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


__all__ = ["InferenceWorker", "Processed"]
