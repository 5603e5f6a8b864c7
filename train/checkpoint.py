"""Checkpoint files shared by the detector and morphology trainers, export and evaluation.

A checkpoint is a ``torch.save`` dict with at least::

    kind            "detector" | "morphology"
    format_version  int (CHECKPOINT_FORMAT)
    model_config    dict   (the model's StrictConfig.to_dict(); rebuilds the network)
    state_dict      dict   (the weights to export: EMA weights where training keeps an EMA)
    normalization   {"color": "rgb"|"gray", "mean": [...], "std": [...]}   (x = (pixel/255 - mean)/std)
    image_size      [H, W]

Detector checkpoints add ``class_names``, ``anchors`` (AnchorConfig dict) and ``thresholds``
({"score", "iou", "pre_nms_topk", "max_detections"}); morphology checkpoints add ``morphology``
({"part", "threshold", "mode"}). Trainers may store more (optimizer state, epoch, metrics, train_config).
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

from smearsight.errors import InputError, first_line, require
from smearsight.fileio import atomic_write_bytes

CHECKPOINT_FORMAT = 1
KINDS = ("detector", "morphology")
REQUIRED = ("kind", "format_version", "model_config", "state_dict", "normalization", "image_size")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Validate the required keys and write ``payload`` atomically (a kill never leaves half a file)."""
    torch = require("torch", "saving checkpoints")
    payload = {"format_version": CHECKPOINT_FORMAT, **payload}
    _validate(payload, str(path))
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, kind: str | None = None, map_location: str = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; ``kind`` restricts it to detector or morphology checkpoints."""
    torch = require("torch", "loading checkpoints")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:  # tensors and plain data only: a crafted file cannot run code on load
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        blocked = re.search(r"GLOBAL ([\w.]+)", str(exc))  # the weights-only unpickler names what it refused
        if blocked:
            raise InputError(
                f"{path}: not a SmearSight checkpoint: it holds a Python object ({blocked.group(1)}) besides tensors "
                "and plain data, and is not loaded (loading it could run code)"
            ) from None
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(payload, dict):
        raise InputError(f"{path}: not a SmearSight checkpoint (expected a dict, got {type(payload).__name__})")
    _validate(payload, str(path))
    if kind is not None and payload["kind"] != kind:
        raise InputError(f"{path}: is a {payload['kind']} checkpoint, expected a {kind} checkpoint")
    return payload


RUN_CHECKPOINTS = ("last.pt", "best.pt")


def refuse_training_run_folder(out: Path, writes: str) -> None:
    """InputError when the report folder ``out`` holds a training run (its checkpoints), whose metrics.json
    and other files a report writing ``writes`` could replace."""
    for name in RUN_CHECKPOINTS:
        if (out / name).exists():
            raise InputError(f"--out {out}: holds a training run ({name}); {writes} could replace its files, "
                             f"pick another folder (e.g. {out / 'report'})")


DETECTOR_THRESHOLDS = ("score", "iou", "pre_nms_topk", "max_detections")  # what training writes


def _validate(payload: dict[str, Any], source: str) -> None:
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise InputError(f"{source}: checkpoint lacks field(s) {', '.join(missing)}")
    if payload["kind"] not in KINDS:
        raise InputError(f"{source}: field 'kind' must be one of {KINDS}, got {payload['kind']!r}")
    if payload["format_version"] != CHECKPOINT_FORMAT:
        raise InputError(
            f"{source}: checkpoint format {payload['format_version']} is not supported (expected {CHECKPOINT_FORMAT})"
        )
    if payload["kind"] == "detector":
        for key in ("class_names", "anchors", "thresholds"):
            if key not in payload:
                raise InputError(f"{source}: detector checkpoint lacks field '{key}'")
        model_config = payload.get("model_config")
        classes = model_config.get("num_classes") if isinstance(model_config, dict) else None
        if isinstance(classes, int) and classes != len(payload["class_names"]):
            raise InputError(f"{source}: field 'class_names' lists {len(payload['class_names'])} classes but the "
                             f"network scores {classes} (model_config.num_classes)")
        thresholds = payload["thresholds"]
        for key in DETECTOR_THRESHOLDS:
            value = thresholds.get(key) if isinstance(thresholds, dict) else None
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InputError(f"{source}: field 'thresholds.{key}' must be a finite number, got {value!r}")
    else:
        morph = payload.get("morphology")
        if not isinstance(morph, dict):
            raise InputError(f"{source}: morphology checkpoint lacks field 'morphology' (a dict)")
        if not isinstance(morph.get("part"), str):
            raise InputError(f"{source}: field 'morphology.part' must be a part name, got {morph.get('part')!r}")
        threshold = morph.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise InputError(f"{source}: field 'morphology.threshold' must be a finite number, got {threshold!r}")
