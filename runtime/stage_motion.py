"""The stage's motion between frames, and detections carried along with it.

A smear is fixed on its slide: between two camera frames only the stage moves (a translation), so the
cells seen on one frame are where they were, shifted by the stage. :class:`StageShift` measures that
shift by phase correlation of downscaled grayscale frames (OpenCV's ``phaseCorrelate``).
:class:`DetectionCarry` uses it to run the detector on key frames only (like DeepStream ``nvinfer``'s
``interval``): on the frames between, the key frame's detections are moved by the accumulated shift.
The morphology stage uses the same shift to keep each sperm's result (runtime/morphology_stage.py).
"""

from __future__ import annotations

import math

import numpy as np

from smearsight.errors import InputError, require
from smearsight.runtime.postprocess import EMPTY_ROW


class StageShift:
    """The stage's translation between consecutive frames, by phase correlation at 1/``downscale``.

    ``min_response`` is the weakest correlation peak trusted. On ``synth://`` slides, frames up to 24 px
    apart peaked at 0.90 or more at 768x1024 (0.64 or more at 384x512), while unrelated fields of the same
    slide peaked at up to 0.18 (0.37 at 384x512) with a wrong shift, often near zero (the camera's fixed
    vignetting): a jump must not pass for a small step, so the default sits between the two. On real
    blood-smear photographs (benchmarks/bench_stage_shift.py) steps of up to 24 px with defocus, motion blur or noise
    peaked at 0.56 or more and jumps at 0.39 or less.
    """

    def __init__(self, downscale: int = 4, min_response: float = 0.45) -> None:
        self.cv2 = require("cv2", "stage motion")
        self.downscale = max(int(downscale), 1)
        self.min_response = min_response
        self._prev: np.ndarray | None = None
        self._window: np.ndarray | None = None

    def reset(self) -> None:
        self._prev = None

    def __call__(self, gray: np.ndarray) -> tuple[float, float] | None:
        """Shift (dx, dy) in frame pixels that maps the previous frame's content onto ``gray``; None for the
        first frame, a frame of another size, or a correlation too weak to trust."""
        measured = self.measure(gray)
        if measured is None or not measured[2] >= self.min_response:
            return None
        return measured[0], measured[1]

    def measure(self, gray: np.ndarray) -> tuple[float, float, float] | None:
        """(dx, dy, peak response) against the previous frame, whatever the response; None for the first
        frame or a frame of another size. ``gray`` becomes the previous frame."""
        cv2 = self.cv2
        h, w = gray.shape[:2]
        small = cv2.resize(gray, (max(w // self.downscale, 8), max(h // self.downscale, 8)),
                           interpolation=cv2.INTER_AREA).astype(np.float32)
        prev, self._prev = self._prev, small
        if prev is None or prev.shape != small.shape:
            return None
        if self._window is None or self._window.shape != small.shape:
            self._window = cv2.createHanningWindow((small.shape[1], small.shape[0]), cv2.CV_32F)
        (dx, dy), response = cv2.phaseCorrelate(prev, small, self._window)
        return dx * w / small.shape[1], dy * h / small.shape[0], float(response)


class DetectionCarry:
    """Decides per frame whether the detector runs, and moves the last key frame's detections otherwise.

    The detector runs on a key frame, then the next ``detect_every - 1`` frames reuse its detections moved
    by the stage's shift. A key frame is forced whenever the shift is unknown (a jump, a focus change, an
    empty field: :class:`StageShift` returns None), the frame size changes, or the stage has travelled more
    than ``max_travel_px`` since the key frame (cells entering the field would go unboxed for too long).
    Cells that enter the field between key frames are boxed at the next one; boxes that leave it are
    clipped at the edge and dropped once less than ``min_side_px`` of them remains in view.

    ``detect_every=1`` detects on every frame. ``"auto"`` detects on every frame while that keeps up with
    ``target_fps``; when it does not, the interval is the smallest whose mean frame time, from the key and
    carried frame times reported to :meth:`observe`, meets the target, and ``max_auto`` when none does.
    Carrying stops again when a carried frame costs nearly as much as a key frame (nothing to gain) and
    once a key frame takes at most 90 % of the target (a margin, so that it does not flip every frame).
    """

    def __init__(self, detect_every: int | str = 1, *, target_fps: float = 10.0, max_auto: int = 4,
                 max_travel_px: float = 48.0, min_side_px: float = 2.0) -> None:
        self.auto = detect_every == "auto"
        if not self.auto and (isinstance(detect_every, bool) or not isinstance(detect_every, int)
                              or detect_every < 1):
            raise InputError(f"detect_every: expected 'auto' or a whole number of frames >= 1, got {detect_every!r}")
        if not target_fps > 0:
            raise InputError(f"target_fps: expected frames per second > 0, got {target_fps!r}")
        if not max_travel_px > 0:
            raise InputError(f"max_travel_px: expected a distance > 0 pixels, got {max_travel_px!r}")
        self.detect_every = 1 if self.auto else int(detect_every)
        self.target_s = 1.0 / float(target_fps)
        self.max_auto = max(int(max_auto), 1)
        self.max_travel_px = float(max_travel_px)
        self.min_side_px = float(min_side_px)
        self._boxes = np.zeros((0, 4), np.float32)  # key frame boxes moved so far, not clipped
        self._clipped = np.zeros((0, 4), np.float32)
        self._rows = np.zeros((0, 6), np.float32)  # key frame rows (score, class kept)
        self._count = 0
        self._frame_hw: tuple[int, int] | None = None
        self._since_key = 0
        self._travel = 0.0
        self._key_s: float | None = None  # smoothed whole-frame times (auto)
        self._carried_s: float | None = None

    @property
    def enabled(self) -> bool:
        """True when frames may be carried (an interval above 1 now or possibly later)."""
        return self.auto or self.detect_every > 1

    def observe(self, frame_seconds: float, detected: bool) -> None:
        """Report what a finished frame cost (its processing, drawing and showing; not the time spent waiting
        for the camera); with ``"auto"`` it sets the interval."""
        if not self.auto or not frame_seconds > 0:
            return
        if detected:
            self._key_s = _smoothed(self._key_s, frame_seconds)
        else:
            self._carried_s = _smoothed(self._carried_s, frame_seconds)
        key, carried, target = self._key_s, self._carried_s, self.target_s
        # back to every frame only with a margin, so that a key frame near the target does not flip it
        enough = target if self.detect_every == 1 else 0.9 * target
        if key is None or key <= enough:
            n = 1
        elif carried is None:
            n = 2  # carry one frame to learn what a carried frame costs
        elif carried >= 0.8 * key:
            n = 1  # carrying saves (almost) nothing
        elif carried >= target:
            n = self.max_auto
        else:  # the smallest n with (key + (n - 1) * carried) / n <= target
            n = max(math.ceil((key - carried) / (target - carried)), 2)
        self.detect_every = min(n, self.max_auto)

    def reset(self) -> None:
        """The next frame is a key frame."""
        self._frame_hw = None

    def should_detect(self, shift: tuple[float, float] | None, frame_hw: tuple[int, int]) -> bool:
        """True when this frame must go through the detector (call once per frame, before :meth:`carry`)."""
        if (self.detect_every == 1 or shift is None or self._frame_hw != tuple(frame_hw)
                or self._since_key + 1 >= self.detect_every
                or self._travel + math.hypot(*shift) > self.max_travel_px):
            return True
        return False

    def keyframe(self, detections: np.ndarray, count: int, frame_hw: tuple[int, int]) -> None:
        """Remember the detector's ``detections[:count]`` (frame pixels) of a key frame."""
        if self._rows.shape[0] < count:  # grown once to the largest count seen, then reused
            self._rows = np.empty((detections.shape[0], 6), np.float32)
            self._boxes = np.empty((detections.shape[0], 4), np.float32)
            self._clipped = np.empty_like(self._boxes)
        self._count = count
        self._rows[:count] = detections[:count]
        self._boxes[:count] = detections[:count, :4]
        self._frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
        self._since_key = 0
        self._travel = 0.0

    def carry(self, shift: tuple[float, float], out: np.ndarray) -> int:
        """Move the key frame's detections by ``shift`` (dx, dy) into ``out`` (``[max_det, 6]``, empty rows
        after the last); returns how many are still in view. Order (best score first) is kept."""
        dx, dy = float(shift[0]), float(shift[1])
        k = self._count
        moved = self._boxes[:k]
        moved[:, 0::2] += dx
        moved[:, 1::2] += dy
        self._since_key += 1
        self._travel += math.hypot(dx, dy)
        h, w = self._frame_hw  # type: ignore[misc]
        boxes = self._clipped[:k]
        np.clip(moved[:, 0::2], 0, w, out=boxes[:, 0::2])
        np.clip(moved[:, 1::2], 0, h, out=boxes[:, 1::2])
        keep = np.flatnonzero((boxes[:, 2] - boxes[:, 0] >= self.min_side_px)
                              & (boxes[:, 3] - boxes[:, 1] >= self.min_side_px))[: out.shape[0]]
        n = int(keep.size)
        out[:] = EMPTY_ROW
        out[:n, :4] = boxes[keep]
        out[:n, 4:6] = self._rows[keep, 4:6]
        return n


def parse_detect_every(text: str, what: str = "--detect-every") -> int | str:
    """``"auto"``, ``"async"`` or a whole number of frames >= 1 from the command line; InputError otherwise."""
    value = str(text).strip().lower()
    if value in ("auto", "async"):
        return value
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"{what}: expected auto, async or a whole number of frames >= 1, got '{text}'")
    return int(value)


def _smoothed(previous: float | None, sample: float) -> float:
    return sample if previous is None else 0.7 * previous + 0.3 * sample


__all__ = ["DetectionCarry", "StageShift", "parse_detect_every"]
