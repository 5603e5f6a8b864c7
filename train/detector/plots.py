"""Training curves, PR curves, confusion matrix and example images (matplotlib Agg / OpenCV)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smearsight.fileio import atomic_write_bytes


def _save(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss per epoch and validation mAP@0.5 / mAP per evaluated epoch."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ep = [h["epoch"] for h in history]
    for key in ("loss", "cls_loss", "box_loss", "giou_loss"):
        if history and key in history[0]:
            axes[0].plot(ep, [h[key] for h in history], label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("training loss")
    ev = [h for h in history if h.get("map50") is not None]
    axes[1].plot([h["epoch"] for h in ev], [h["map50"] for h in ev], "o-", label="mAP@0.5")
    axes[1].plot([h["epoch"] for h in ev], [h["map"] for h in ev], "o-", label="mAP@[.5:.95]")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    axes[1].set_title("validation (EMA weights)")
    _save(fig, path)
    plt.close(fig)


def pr_curves(raw: dict[str, Any], path: Path) -> None:
    """Precision-recall at IoU 0.5 per class, from pycocotools' accumulated precision."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    if raw.get("precision") is not None:
        for k, name in enumerate(raw["names"]):
            p = raw["precision"][0, :, k]
            if (p > -1).any():
                ax.plot(raw["rec_thrs"], np.clip(p, 0, None), label=f"{name} AP50={p[p > -1].mean():.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left")
    else:  # no detection scored against ground truth: an empty plot that says so (and no empty-legend warning)
        ax.text(0.5, 0.5, "no detections to score", ha="center", va="center")
    ax.set_title("PR curve (IoU 0.5)")
    _save(fig, path)
    plt.close(fig)


def confusion(matrix: np.ndarray, names: list[str], path: Path) -> None:
    """Save the confusion matrix (rows true class + background, columns predicted + missed) as a PNG."""
    plt = _plt()
    labels = [*names, "background"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.0 * len(labels) + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), [*names, "missed"], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8)
    ax.set_title("confusion matrix (IoU 0.5)")
    _save(fig, path)
    plt.close(fig)


def draw(image: np.ndarray, dets: np.ndarray, names: list[str], score_threshold: float,
         gt_boxes: np.ndarray | None = None) -> np.ndarray:
    """Predictions in class colours (with score); ground truth, when given, as thin white boxes."""
    import cv2

    from smearsight.catalog import class_color

    out = np.ascontiguousarray(image.copy())
    if gt_boxes is not None:
        for b in gt_boxes.astype(int):
            cv2.rectangle(out, (b[0], b[1]), (b[2], b[3]), (255, 255, 255), 1)
    for d in dets[dets[:, 4] >= score_threshold]:
        k = int(d[5])
        b, g, r = class_color(names[k], k)
        color = (int(r), int(g), int(b))  # the catalog gives BGR; this image is RGB
        x1, y1, x2, y2 = (int(round(v)) for v in d[:4])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
        cv2.putText(out, f"{names[k]} {d[4]:.2f}", (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1)
    return out


def example_image(image: np.ndarray, dets: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                  names: list[str], score_threshold: float, path: Path) -> None:
    """Save ``image`` as a JPEG with detections above ``score_threshold`` and the ground-truth boxes drawn."""
    import cv2

    out = draw(image, dets, names, score_threshold, gt_boxes)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR))
    if ok:
        atomic_write_bytes(path, buf.tobytes())
