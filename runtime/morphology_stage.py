"""Morphology on detections: sperm crops -> 64x64 grayscale -> one model per part -> per-sperm flags.

For every detection whose class is a sperm class (:data:`smearsight.catalog.SPERM_CLASS_NAMES`), a
square crop centred on the box (side ``crop_scale`` x the longer box side, at least ``min_side`` px,
edges replicated outside the frame) is converted to grayscale, resized to the model input and
normalised from the manifest. Crops are batched through each part's model; a part is abnormal when its
score is at or above ``manifest.morphology.threshold``.

Results use the format :func:`smearsight.runtime.annotate.annotate` and the session recorder read::

    {"det": row, "parts": {"head": {"score": 0.82, "abnormal": True}, ...}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from smearsight.catalog import SPERM_CLASS_NAMES
from smearsight.errors import InputError, require
from smearsight.runtime.backends.base import InferenceBackend


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


class MorphologyStage:
    """Judges the sperm detections of a frame with one morphology backend per part.

    Args:
        backends: opened morphology backends (kind "morphology"), one per part.
        class_names: the detector's class names (to find the sperm classes).
        max_batch: crops per inference call; ``max_sperm`` caps how many sperm a frame judges (the best
            scoring first), the rest get an "n/a" status.
    """

    def __init__(
        self,
        backends: Sequence[InferenceBackend],
        class_names: Sequence[str],
        *,
        crop_scale: float = 1.5,
        min_side: float = 16.0,
        max_batch: int = 64,
        max_sperm: int = 256,
    ) -> None:
        self.cv2 = require("cv2", "morphology crops")
        self.backends = list(backends)
        for b in self.backends:
            if b.manifest.kind != "morphology" or b.manifest.morphology is None:
                raise InputError(f"{b.model_dir}: not a morphology model (manifest kind '{b.manifest.kind}')")
            if b.manifest.input.color != "gray":
                raise InputError(f"{b.model_dir}: morphology models take grayscale crops (input.color 'gray')")
        self.parts = [b.manifest.morphology.part for b in self.backends]
        self.sperm_classes = np.array([i for i, n in enumerate(class_names) if n in SPERM_CLASS_NAMES], np.int64)
        self.crop_scale = crop_scale
        self.min_side = min_side
        self.max_batch = max_batch
        self.max_sperm = max_sperm
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

    def __call__(self, frame_rgb: np.ndarray, detections: np.ndarray, count: int) -> list[dict[str, Any]]:
        """Judge the sperm among ``detections[:count]`` (frame pixels) in ``frame_rgb``."""
        rows = self.sperm_rows(detections, count)
        if rows.size == 0 or not self.backends:
            return []
        judged, skipped = rows[: self.max_sperm], rows[self.max_sperm :]
        gray = self.cv2.cvtColor(frame_rgb, self.cv2.COLOR_RGB2GRAY)
        crops = [crop_square(gray, detections[r], self.crop_scale, self.min_side) for r in judged]
        results = [{"det": int(r), "parts": {}} for r in judged]
        for backend, part in zip(self.backends, self.parts, strict=True):
            scores = self._scores(backend, crops)
            threshold = float(backend.manifest.morphology.threshold)
            for res, s in zip(results, scores.tolist(), strict=True):
                res["parts"][part] = {"score": float(s), "abnormal": bool(s >= threshold)}
        results.extend({"det": int(r), "status": "n/a"} for r in skipped)
        return results

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
            scores[start : start + n] = out[:n]
        return scores
