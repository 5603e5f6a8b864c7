"""Binary metrics with *normal as the positive class* (MHSMA's convention), in NumPy.

``labels``: 0 normal, 1 abnormal; ``scores``: higher = more abnormal; a crop is called abnormal when
``score >= threshold``. AUC is threshold-free (normal positive with -score equals abnormal positive with score).
"""

from __future__ import annotations

import math

import numpy as np


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts with normal as positive: tp = normal called normal, fp = abnormal called normal."""
    labels = np.asarray(labels).astype(np.int64)
    # in float64: a float32 array would round the threshold onto a score (numpy casts the Python float down)
    called_normal = np.asarray(scores, dtype=np.float64) < threshold
    normal = labels == 0
    return {
        "tp": int(np.sum(called_normal & normal)),
        "fp": int(np.sum(called_normal & ~normal)),
        "tn": int(np.sum(~called_normal & ~normal)),
        "fn": int(np.sum(~called_normal & normal)),
    }


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half): P(score of an abnormal > score of a normal); NaN when a class is
    missing or a score is NaN."""
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(np.sum(labels == 1)), int(np.sum(labels == 0))
    if n_pos == 0 or n_neg == 0 or np.isnan(scores).any():
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) with abnormal as the detected class, for plotting: one point
    per distinct score (tied scores move both rates at once, so the curve's area is the AUC)."""
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    ordered, hits = scores[order], labels[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1] if len(ordered) else []
    tpr = np.concatenate([[0.0], np.cumsum(hits)[last_of_each_score] / max(1, hits.sum())])
    fpr = np.concatenate([[0.0], np.cumsum(1 - hits)[last_of_each_score] / max(1, (1 - hits).sum())])
    return fpr, tpr


def fbeta(precision: float, recall: float, beta: float) -> float:
    """F-beta score (0 when precision and recall are both 0)."""
    b2 = beta * beta
    denom = b2 * precision + recall
    return 0.0 if denom == 0 else (1 + b2) * precision * recall / denom


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | int]:
    """accuracy, precision, recall, f05, gmean, auc, mcc (normal = positive) plus the confusion counts."""
    c = confusion(labels, scores, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    specificity = tn / (tn + fp) if tn + fp else 0.0
    denom = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "accuracy": (tp + tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f05": fbeta(precision, recall, 0.5),
        "gmean": math.sqrt(recall * specificity),
        "auc": roc_auc(labels, scores),
        "mcc": (tp * tn - fp * fn) / denom if denom else 0.0,
        "threshold": float(threshold),
        **c,
    }
