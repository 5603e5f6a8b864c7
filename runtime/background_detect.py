"""The detector on its own thread, always on the latest frame (``smearsight run --detect-every async``).

On a CPU-only device the detector takes several frame times. Detecting on key frames in the loop
(:class:`~smearsight.runtime.stage_motion.DetectionCarry`) then makes the screen uneven: one slow key
frame, then a few quick carried ones. :class:`BackgroundDetector` instead runs the detector on a thread
of its own: the loop offers it every frame (the latest one wins; it is copied), never waits for it, and
takes a result whenever one is ready. The pipeline moves that result's boxes by the stage's shift from
the frame they were found on to the frame on screen, so every frame shows boxes and costs about the same
(apart from a jump, which is detected in the loop), and the boxes are as fresh as the detector allows:
one to two detector runs old when the detector is slower than the frames.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from smearsight.runtime.postprocess import EMPTY_ROW

log = logging.getLogger("smearsight.runtime")

# how long the loop waits for a background run before detecting itself: well below the runtime service's
# systemd WatchdogSec (30 s, deploy/systemd/smearsight-runtime.service), which a stuck loop must still meet
DRAIN_TIMEOUT_S = 10.0


@dataclass
class DetectorResult:
    """What the detector found on an offered frame."""

    detections: np.ndarray  # [max_det, 6] frame pixels; rows after ``count`` are empty
    count: int
    tag: Any  # what was offered with the frame
    times: dict[str, float]  # the detector's stages (seconds)
    error: Exception | None = None  # the detection failed (``detections`` is then all empty rows)


class BackgroundDetector:
    """Run ``detect(frame, out, times) -> count`` on a thread, on the most recent frame offered.

    ``detect`` writes ``[max_det, 6]`` detections into ``out`` and its stage times into ``times`` (as
    :meth:`~smearsight.runtime.pipeline.Pipeline._detect` does). Frames offered while the thread is busy
    replace each other; only the last one is detected next. :meth:`take` returns the newest finished
    result once (None if there is none yet). :meth:`drain` drops what is pending and waits for the frame
    in progress, after which ``detect`` may be called on the caller's thread (it is then not in use).
    """

    def __init__(self, detect: Callable[[np.ndarray, np.ndarray, dict[str, float]], int], max_det: int) -> None:
        self._detect = detect
        self._max_det = int(max_det)
        self._cond = threading.Condition()
        self._pending: np.ndarray | None = None  # buffer the caller copies offered frames into
        self._pending_tag: Any = None
        self._has_pending = False
        self._busy = False
        self._result: DetectorResult | None = None
        self._stop = False
        self.results = 0  # finished detections (taken or not)
        self._thread = threading.Thread(target=self._run, name="detector", daemon=True)
        self._thread.start()

    def offer(self, frame: np.ndarray, tag: Any) -> None:
        """Copy ``frame`` for the detector (replacing an offered frame it has not started on)."""
        with self._cond:
            buf = self._pending
            if buf is None or buf.shape != frame.shape or buf.dtype != frame.dtype:
                buf = self._pending = np.empty_like(frame)
            np.copyto(buf, frame)
            self._pending_tag = tag
            self._has_pending = True
            self._cond.notify_all()

    def take(self) -> DetectorResult | None:
        """The newest finished result, once; None when none has finished since the last call."""
        with self._cond:
            result, self._result = self._result, None
            return result

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Drop the pending frame and any result, and wait until no detection is running (True) or
        ``timeout`` seconds have passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._has_pending = False
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._result = None
            return True

    @property
    def alive(self) -> bool:
        """False once the thread has ended (closed, or killed by an error outside the detection)."""
        return self._thread.is_alive()

    @property
    def busy(self) -> bool:
        """True while a detection is running or a frame waits for one."""
        with self._cond:
            return self._busy or self._has_pending

    def _run(self) -> None:
        work: np.ndarray | None = None
        while True:
            with self._cond:
                while not self._has_pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                work, self._pending = self._pending, work  # the caller copies the next frame into the other buffer
                tag = self._pending_tag
                self._has_pending = False
                self._busy = True
            out = np.empty((self._max_det, 6), np.float32)
            times: dict[str, float] = {}
            result = None
            try:
                count = self._detect(work, out, times)  # type: ignore[arg-type]
                result = DetectorResult(out, count, tag, times)
            except Exception as exc:  # handed to the caller with the result
                log.debug("background detection failed", exc_info=True)
                out[:] = EMPTY_ROW
                result = DetectorResult(out, 0, tag, times, exc)
            finally:
                with self._cond:
                    self._busy = False
                    if result is not None:
                        self.results += 1
                        self._result = result
                    self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the thread after the frame it is on; True once it has ended. Idempotent."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the detector thread did not stop within %.0f s", timeout)
            return False
        return True


__all__ = ["DRAIN_TIMEOUT_S", "BackgroundDetector", "DetectorResult"]
