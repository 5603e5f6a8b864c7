"""Morphology on detections: sperm crops -> 64x64 grayscale -> one model per part -> per-sperm flags.

For every detection whose class is a sperm class (:data:`smearsight.catalog.SPERM_CLASS_NAMES`), a
square crop centred on the box (side ``crop_scale`` x the longer box side, at least ``min_side`` px,
edges replicated outside the frame) is converted to grayscale, resized to the model input and
normalised from the manifest. Crops are batched through each part's model; a part is abnormal when its
score is at or above ``manifest.morphology.threshold``.

Results use the format :func:`smearsight.runtime.annotate.annotate` and the session recorder read::

    {"det": row, "parts": {"head": {"score": 0.82, "abnormal": True}, ...}, "tracked": 3}
    {"det": row, "status": "pending"}    # new this frame, judged on a later one (over max_new)

A smear is fixed on the slide: between frames only the stage moves. With ``reuse`` on, the stage's
shift since the previous frame is measured by phase correlation of downscaled grayscale frames, the
sperm judged on recent frames are moved by it, and a sperm detection overlapping one of them (same
cell: IoU >= ``match_iou``) keeps that cell's result (``tracked`` counts the frames it was carried)
instead of being judged again; a cell the detector missed for a few frames is still remembered. Only
sperm new to the view go through the models, at most ``max_new`` a frame; so the cost follows what
enters the field, not how many sperm it holds. When the shift cannot
be measured (a jump, a focus change, an empty field) every sperm counts as new and is judged
(no ``max_new`` cap on such a frame). A frame spends about ``budget_s`` on new sperm (the best scoring
first; at least one crop); the others are judged on the following frames. Only when the shift stays
unknown for a second frame in a row is the budget lifted: nothing carries then, and a budget would judge
the same sperm on every frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from smearsight.catalog import SPERM_CLASS_NAMES
from smearsight.errors import InputError, first_line, require
from smearsight.runtime.backends.base import InferenceBackend
from smearsight.runtime.stage_motion import StageShift

# Crop side / head box side that frames a head as the MHSMA training crops do: there a head's longer side
# is 26 px of 64 (median; quartiles 24-29), `python benchmarks/bench_morphology_framing.py`. The detector's
# sperm boxes cover the head only (train/datasets/synth_cells.py), so the crop is 2.5 x the box.
MHSMA_CROP_SCALE = 2.5

MEASURE = object()  # MorphologyStage(shift=...) default: measure the stage's shift itself
PROBE_CROPS = 2  # the first chunk judged when a crop's cost is not known yet


def crop_square(frame: np.ndarray, box: np.ndarray, scale: float, min_side: float) -> np.ndarray:
    """A square crop around ``box`` (xyxy), edges replicated where it leaves the frame."""
    cv2 = require("cv2", "morphology crops")
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    side = max(max(x2 - x1, y2 - y1) * scale, min_side)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    size = max(int(round(side)), 1)
    h, w = frame.shape[:2]
    l0, t0 = max(left, 0), max(top, 0)
    r0, b0 = min(left + size, w), min(top + size, h)
    if r0 <= l0 or b0 <= t0:
        return np.zeros((size, size) + frame.shape[2:], frame.dtype)
    crop = frame[t0:b0, l0:r0]
    pads = (t0 - top, top + size - b0, l0 - left, left + size - r0)
    if any(pads):
        crop = cv2.copyMakeBorder(crop, *pads, cv2.BORDER_REPLICATE)
    return crop


def check_morphology_model(backend: InferenceBackend) -> None:
    """Raise InputError (naming the model folder) unless ``backend`` is a morphology model this stage can feed:
    grayscale crops, input ``[batch, 1, H, W]``."""
    man = backend.manifest
    if man.kind != "morphology" or man.morphology is None:
        raise InputError(f"{backend.model_dir}: not a morphology model (manifest kind '{man.kind}')")
    if man.input.color != "gray":
        raise InputError(f"{backend.model_dir}: morphology models take grayscale crops (input.color 'gray')")
    shape = man.input.shape
    if len(shape) != 4 or shape[1] != 1 or min(shape[2:]) <= 0:
        raise InputError(f"{backend.model_dir}: morphology input must be [batch, 1, H, W], got {shape}")


class MorphologyStage:
    """Judges the sperm detections of a frame with one morphology backend per part.

    Args:
        backends: opened morphology backends (kind "morphology"), one per part.
        class_names: the detector's class names (to find the sperm classes).
        max_batch: crops per inference call; ``max_sperm`` caps how many sperm a frame judges (the best
            scoring first), the rest get an "n/a" status.
        reuse: carry results along with the stage's motion (module docstring); ``max_new`` sperm at most
            are judged per frame then, the others are "pending" until a later frame. A judged cell is
            remembered while unseen for up to ``memory_frames`` frames (the detector may miss it in one).
        budget_s: with ``reuse``, the time a frame may spend judging new sperm (None: no limit). Crops go
            through the models in chunks sized from the measured cost of a crop (a chunk that would not
            fit is not started, but every frame judges at least one crop); the rest wait as "pending" for
            later frames, so a heavy model fills the first field in over several frames instead of
            freezing the screen on it. ``clock`` measures it (seconds).
    """

    def __init__(
        self,
        backends: Sequence[InferenceBackend],
        class_names: Sequence[str],
        *,
        crop_scale: float = MHSMA_CROP_SCALE,
        min_side: float = 16.0,
        max_batch: int = 64,
        max_sperm: int = 256,
        reuse: bool = False,
        max_new: int = 48,
        match_iou: float = 0.5,
        memory_frames: int = 8,
        budget_s: float | None = 0.1,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.cv2 = require("cv2", "morphology crops")
        self.backends = list(backends)
        for b in self.backends:
            check_morphology_model(b)
        self.parts = [b.manifest.morphology.part for b in self.backends]
        self.failed: dict[str, str] = {}  # part -> why its model stopped (raised while judging crops)
        self.sperm_classes = np.array([i for i, n in enumerate(class_names) if n in SPERM_CLASS_NAMES], np.int64)
        self.crop_scale = crop_scale
        self.min_side = min_side
        self.max_batch = max_batch
        self.max_sperm = max_sperm
        self.reuse = reuse
        self.max_new = max(int(max_new), 1)
        self.match_iou = match_iou
        self.memory_frames = memory_frames
        if budget_s is not None and not budget_s > 0:
            raise InputError(f"morphology budget: expected seconds > 0 (or none), got {budget_s!r}")
        self.budget_s = budget_s
        self.clock = clock
        self._crop_seconds: float | None = None  # smoothed cost of one crop through every part's model
        self.shift: Any = None  # measures the stage's shift when the caller does not pass it (made on first use)
        self._untracked_run = 0  # frames in a row on which the stage could not be followed
        self._known_boxes = np.zeros((0, 4), np.float32)
        self._known: list[dict[str, Any]] = []  # {"parts", "tracked", "unseen"} per row of _known_boxes
        self.judged_last = 0  # crops that went through the models on the last call
        # one input buffer per distinct input spec (all MHSMA models share 1x64x64)
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for b in self.backends:
            spec = b.manifest.input
            h, w = int(spec.shape[2]), int(spec.shape[3])
            batch = spec.shape[0] if spec.shape[0] > 0 else max_batch
            pixels = np.arange(256, dtype=np.float64) / 255.0
            lut = ((pixels - spec.mean[0]) / spec.std[0]).astype(np.float32).reshape(256, 1)
            self._buffers[id(b)] = (np.empty((batch, 1, h, w), np.float32), lut)

    def sperm_rows(self, detections: np.ndarray, count: int) -> np.ndarray:
        """Rows of ``detections[:count]`` that are sperm classes (already sorted by score)."""
        if self.sperm_classes.size == 0 or count == 0:
            return np.zeros(0, np.int64)
        cls = detections[:count, 5].astype(np.int64)
        return np.flatnonzero(np.isin(cls, self.sperm_classes))

    def __call__(self, frame_rgb: np.ndarray, detections: np.ndarray, count: int, *,
                 gray: np.ndarray | None = None, shift: Any = MEASURE) -> list[dict[str, Any]]:
        """Judge the sperm among ``detections[:count]`` (frame pixels) in ``frame_rgb``.

        ``gray`` is the frame in grayscale when the caller has it; ``shift`` the stage's shift since the
        previous frame when the caller measured it (None: unknown), else it is measured here.
        """
        self.judged_last = 0
        if not self.backends:
            return []
        rows = self.sperm_rows(detections, count)
        tracking = False
        if self.reuse:
            if gray is None:
                gray = self.cv2.cvtColor(frame_rgb, self.cv2.COLOR_RGB2GRAY)
            if shift is MEASURE:
                if self.shift is None:
                    self.shift = StageShift()
                shift = self.shift(gray)
            tracking = self._follow_stage(shift, gray.shape[:2])
            self._untracked_run = 0 if tracking else self._untracked_run + 1
        rows, skipped = rows[: self.max_sperm], rows[self.max_sperm :]
        results: list[dict[str, Any]] = [{"det": int(r)} for r in rows]
        boxes = detections[rows, :4]
        carried = self._carry(boxes) if self.reuse else [-1] * len(rows)
        new = [i for i, j in enumerate(carried) if j < 0]
        # the max_new cap only while the stage is followed: without a shift nothing can be carried, so a
        # capped frame would leave the same cells pending on every frame (the time budget still holds)
        candidates = new[: self.max_new] if tracking else new
        for i, j in enumerate(carried):
            if j >= 0:
                entry = self._known[j]
                entry["tracked"] += 1
                results[i].update(parts=entry["parts"], tracked=entry["tracked"])
        judge: list[int] = []
        if candidates:
            if gray is None:
                gray = self.cv2.cvtColor(frame_rgb, self.cv2.COLOR_RGB2GRAY)
            # the budget holds on a followed stage and on the first frame it is lost (the first frame of all):
            # results carry to the next frame then. Lost for longer, nothing carries and a budget would
            # judge the same best-scoring sperm on every frame: all are judged
            budget = self.budget_s if self.reuse and self._untracked_run <= 1 else None
            judge = self._judge_within_budget(gray, detections, rows, candidates, results, budget)
        for i in new[len(judge):]:
            results[i]["status"] = "pending"
        if self.reuse:
            self._update_memory(boxes, carried, judge, results)
        results.extend({"det": int(r), "status": "n/a"} for r in skipped)
        return results

    def _judge_within_budget(self, gray: np.ndarray, detections: np.ndarray, rows: np.ndarray,
                             candidates: list[int], results: list[dict[str, Any]], budget: float | None) -> list[int]:
        """Judge ``candidates`` (indices into ``rows``) in order, in chunks, until ``budget`` seconds are spent
        (None: all; at least one chunk); returns those judged (a prefix of ``candidates``)."""
        clock = self.clock
        start = clock()
        done = 0
        while done < len(candidates):
            now = clock()
            left = None if budget is None else budget - (now - start)
            if left is not None and done and left <= 0:
                break
            if left is None:
                size = len(candidates) - done
            elif self._crop_seconds is None:
                size = PROBE_CROPS  # learn what a crop costs first
            else:
                # what fits in the time left (no more than are left: a budget of 1e305 s overflowed int())
                size = int(min(left / max(self._crop_seconds, 1e-9), len(candidates) - done))
                if size < 1:
                    if done:
                        break
                    size = 1  # at least one crop a frame, so that every sperm is judged in the end
            chunk = candidates[done : done + size]
            crops = [crop_square(gray, detections[rows[i]], self.crop_scale, self.min_side) for i in chunk]
            for i in chunk:
                results[i]["parts"] = {}
                if self.reuse:
                    results[i]["tracked"] = 0
            for backend, part in zip(self.backends, self.parts, strict=True):
                if part in self.failed:
                    continue
                try:
                    scores = self._scores(backend, crops)
                except Exception as exc:  # one broken model must not cost the frame its boxes
                    self.failed[part] = f"morphology model for the {part} stopped: {first_line(exc)}"  # run() says it
                    continue
                threshold = float(backend.manifest.morphology.threshold)
                for i, s in zip(chunk, scores.tolist(), strict=True):
                    results[i]["parts"][part] = {"score": float(s), "abnormal": bool(s >= threshold)}
            per_crop = (clock() - now) / len(chunk)
            self._crop_seconds = (per_crop if self._crop_seconds is None
                                  else 0.5 * self._crop_seconds + 0.5 * per_crop)
            done += len(chunk)
        self.judged_last = done
        return candidates[:done]

    def reset(self) -> None:
        """Forget carried results (a new slide or session)."""
        self._known_boxes = np.zeros((0, 4), np.float32)
        self._known = []
        self._untracked_run = 0
        if self.shift is not None:
            self.shift.reset()

    def _follow_stage(self, shift: tuple[float, float] | None, frame_hw: tuple[int, int]) -> bool:
        """Move the remembered cells with the stage (clipped to the frame, as detections are); forget them
        all when the shift is unknown (returns False then), and those unseen for more than
        ``memory_frames`` frames or gone out of view."""
        if shift is None:
            self._known_boxes, self._known = np.zeros((0, 4), np.float32), []
            return False
        if not self._known:
            return True
        h, w = frame_hw
        b = self._known_boxes + np.array([shift[0], shift[1], shift[0], shift[1]], np.float32)
        keep = [k for k, e in enumerate(self._known)
                if e["unseen"] <= self.memory_frames and b[k, 2] > 0 and b[k, 3] > 0 and b[k, 0] < w and b[k, 1] < h]
        b = b[keep]
        np.clip(b[:, 0::2], 0, w, out=b[:, 0::2])
        np.clip(b[:, 1::2], 0, h, out=b[:, 1::2])
        self._known_boxes = b
        self._known = [self._known[k] for k in keep]
        return True

    def _carry(self, boxes: np.ndarray) -> list[int]:
        """Index of the remembered cell each box is (greedy by IoU), -1 for a cell new to the view."""
        out = [-1] * len(boxes)
        if not self._known or not len(boxes):
            return out
        from smearsight.anchors import box_iou

        iou = box_iou(np.asarray(boxes, np.float32), self._known_boxes)
        pairs = np.argwhere(iou >= self.match_iou)
        taken: set[int] = set()
        for i, j in pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")].tolist():
            if out[i] < 0 and j not in taken:
                out[i] = j
                taken.add(j)
        return out

    def _update_memory(self, boxes: np.ndarray, carried: list[int], judged: list[int],
                       results: list[dict[str, Any]]) -> None:
        """Seen cells take this frame's box; unseen ones age; newly judged ones join."""
        for entry in self._known:
            entry["unseen"] += 1
        for i, j in enumerate(carried):
            if j >= 0:
                self._known_boxes[j] = boxes[i]
                self._known[j]["unseen"] = 0
        if judged:
            self._known_boxes = np.concatenate([self._known_boxes, np.asarray(boxes, np.float32)[judged]])
            self._known.extend({"parts": results[i]["parts"], "tracked": 0, "unseen": 0} for i in judged)

    def _scores(self, backend: InferenceBackend, crops: list[np.ndarray]) -> np.ndarray:
        cv2 = self.cv2
        buf, lut = self._buffers[id(backend)]
        fixed_batch = backend.manifest.input.shape[0] > 0
        h, w = buf.shape[2:]
        out_name = backend.manifest.morphology.score_output
        scores = np.empty(len(crops), np.float32)
        step = buf.shape[0]
        for start in range(0, len(crops), step):
            chunk = crops[start : start + step]
            for i, crop in enumerate(chunk):
                interp = cv2.INTER_AREA if crop.shape[0] > h else cv2.INTER_LINEAR
                cv2.LUT(cv2.resize(crop, (w, h), interpolation=interp), lut, dst=buf[i, 0])
            n = len(chunk)
            if fixed_batch:
                buf[n:] = 0.0
                x = buf
            else:
                x = buf[:n]
            out = np.asarray(backend.infer(x)[out_name], dtype=np.float32).reshape(-1)
            if out.size != x.shape[0]:  # one score a crop, or the scores would belong to other crops
                raise InputError(f"{backend.model_dir}: output '{out_name}' gave {out.size} values for "
                                 f"{x.shape[0]} crops")
            scores[start : start + n] = out[:n]
        return scores
