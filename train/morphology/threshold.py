"""Decision threshold on the validation split: maximise F0.5 with normal as the positive class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smearsight.errors import InputError
from smearsight.train.morphology.metrics import confusion, fbeta


@dataclass
class ThresholdChoice:
    """The chosen threshold, how it was chosen, its validation F0.5 (if any) and a note for the report."""

    threshold: float
    method: str  # "max_f05" | "normal_quantile"
    f05: float | None
    note: str


def choose_threshold(scores: np.ndarray, labels: np.ndarray, fallback_quantile: float = 0.95) -> ThresholdChoice:
    """Pick the threshold (abnormal when score >= t) maximising F0.5 (normal positive) on ``scores``.

    Candidates are midpoints between consecutive distinct scores plus one above the maximum (flag nothing);
    a threshold at or below the minimum (flag everything) is never chosen. Without abnormal samples the
    threshold is the ``fallback_quantile`` of the normal scores, and ``note`` says so.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if scores.shape != labels.shape or scores.ndim != 1 or scores.size == 0:
        raise InputError(f"threshold: need matching non-empty 1-D scores/labels, got {scores.shape} and {labels.shape}")
    if not np.all(np.isfinite(scores)):
        raise InputError("threshold: scores contain NaN or infinity")
    normal = scores[labels == 0]
    if normal.size == 0:
        raise InputError("threshold: the validation split holds no normal sample; cannot choose a threshold")
    if np.all(labels == 0):
        # just above the quantile: scores tied with it stay normal, so at most 1 - quantile of them is flagged
        value = float(np.nextafter(np.quantile(normal, fallback_quantile), np.inf))
        note = (
            f"validation holds no abnormal sample: threshold = {fallback_quantile:.2f} quantile of normal scores "
            "(F0.5 cannot be optimised)"
        )
        return ThresholdChoice(value, "normal_quantile", None, note)
    distinct = np.unique(scores)
    candidates = np.concatenate([(distinct[:-1] + distinct[1:]) / 2.0, [np.nextafter(distinct[-1], np.inf)]])
    best_t, best_f = float(candidates[-1]), -1.0
    for t in candidates:
        c = confusion(labels, scores, float(t))
        precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
        recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
        f = fbeta(precision, recall, 0.5)
        if f > best_f + 1e-12:
            best_t, best_f = float(t), f
    return ThresholdChoice(best_t, "max_f05", best_f, f"threshold maximises F0.5 (normal positive) = {best_f:.4f}")
