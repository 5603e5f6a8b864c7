"""Evaluate a morphology checkpoint on one split: metrics.json, ROC PNG, score histograms, localisation."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.errors import InputError
from smearsight.fileio import atomic_write_bytes, atomic_write_json, remove_stale_temp_files
from smearsight.train.checkpoint import refuse_training_run_folder
from smearsight.train.morphology.data import check_part, load_crops, require_two_classes
from smearsight.train.morphology.metrics import binary_metrics, roc_curve

REPORT_FILES = ("metrics.json", "roc.png", "score_hist.png")
PANEL_NAME = re.compile(r"\d{2,}_idx\d+_(ab)?normal\.png")  # the localisation panels written below
PANEL_GLOB = "*_idx*.png"  # what may be one of them


def load_model(weights: str | Path) -> tuple[Any, dict[str, Any]]:
    """The eval-mode morphology module and its checkpoint dict from a ``.pt`` file."""
    from smearsight.train.checkpoint import load_checkpoint
    from smearsight.train.morphology.torch_model import build_from_checkpoint

    ckpt = load_checkpoint(weights, kind="morphology")
    return build_from_checkpoint(ckpt), ckpt


def evaluate_morphology(
    weights: str | Path, data_dir: str | Path, part: str, split: str, out_dir: str | Path, n_localise: int = 8
) -> dict[str, Any]:
    """Score ``split`` with the checkpoint's threshold and write the report files into ``out_dir``."""
    from smearsight.train.morphology.localise import write_localisation_panels
    from smearsight.train.morphology.train_loop import score_crops

    check_part(part)
    out = Path(out_dir)
    refuse_training_run_folder(out, "the report (metrics.json)")
    if (out / "localisation").exists() and not (out / "localisation").is_dir():
        raise InputError(f"--out {out}: localisation is a file; the report writes its panels into a folder so named")
    model, ckpt = load_model(weights)
    trained_part = ckpt["morphology"].get("part")
    if trained_part != part:
        raise InputError(f"{weights}: checkpoint was trained for part '{trained_part}', not '{part}'")
    crops = load_crops(data_dir, part, split)
    require_two_classes(crops, "evaluation")
    threshold = float(ckpt["morphology"]["threshold"])
    started = time.perf_counter()
    scores = score_crops(model, crops.images)
    seconds = time.perf_counter() - started
    broken = ~np.isfinite(scores)
    if broken.any():  # every metric would be quietly wrong (NaN is never below the threshold: all 'abnormal')
        raise InputError(f"{weights}: the model scores {int(broken.sum())} of {len(scores)} '{split}' crops as NaN or "
                         f"infinity (first: crop {int(np.flatnonzero(broken)[0])}); its weights are broken, retrain it")
    metrics = binary_metrics(crops.labels, scores, threshold)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "part": part, "split": split, "mode": ckpt["morphology"].get("mode"), "n": len(crops),
        "n_abnormal": int(crops.labels.sum()), **metrics, "positive_class": "normal",
        "scoring_seconds": seconds, "crops_per_second": len(crops) / seconds if seconds > 0 else None,
        "weights": str(weights),
    }
    order = np.argsort(-scores)
    n_localise = min(n_localise, len(order))  # the most and least anomalous crops, each at most once
    pick = list(order[: n_localise // 2]) + list(order[::-1][: n_localise - n_localise // 2])
    names = [f"{rank:02d}_idx{idx}_{'abnormal' if crops.labels[idx] else 'normal'}" for rank, idx in enumerate(pick)]
    captions = [f"score {scores[i]:.3g} label {'abn' if crops.labels[i] else 'nor'}" for i in pick]
    try:
        _remove_report(out)  # an earlier report's files must not stay mixed with this one's
        _plots(out, crops.labels, scores, threshold, metrics["auc"], part, split)
        write_localisation_panels(model, crops.images[pick], names, out / "localisation", captions)
        atomic_write_json(out / "metrics.json", report)
    except BaseException:
        _remove_report(out)  # nothing of an unfinished report stays (a full disk, Ctrl-C)
        raise
    return report


def _remove_report(out: Path) -> None:
    """Delete what a report writes into ``out``: REPORT_FILES and the localisation panels (nothing else), and the
    temporary files of those that a kill -9 of an earlier evaluation left."""
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    remove_stale_temp_files(out, REPORT_FILES)
    remove_stale_temp_files(out / "localisation", [PANEL_GLOB])
    for panel in (out / "localisation").glob(PANEL_GLOB):
        if PANEL_NAME.fullmatch(panel.name):
            panel.unlink()


def _plots(out: Path, labels: np.ndarray, scores: np.ndarray, threshold: float, auc: float, part: str, split: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("false-positive rate (normal flagged)")
    ax.set_ylabel("true-positive rate (abnormal flagged)")
    ax.set_title(f"{part} / {split}")
    ax.legend(loc="lower right")
    _save(fig, out / "roc.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-9, 31)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="abnormal")
    ax.axvline(threshold, color="k", linestyle="--", label="threshold")
    ax.set_xlabel("anomaly score")
    ax.legend()
    _save(fig, out / "score_hist.png")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
