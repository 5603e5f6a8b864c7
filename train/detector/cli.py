"""CLI: ``smearsight train detector``, ``eval detector``, ``predict detector``, ``data anchors``.

Import-light: torch and friends are imported inside the commands.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from smearsight.cli_app import data_app, eval_app, predict_app, train_app
from smearsight.errors import InputError
from smearsight.fileio import check_output_dir
from smearsight.train.checkpoint import refuse_training_run_folder

FORMATS = ("coco", "voc", "yolo")
SUMMARY_STEM = "detections"  # predict detector: OUT/detections.json beside OUT/<image stem>.json


def _fmt(fmt: str) -> str:
    if fmt.lower() not in FORMATS:
        raise InputError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt.lower()


def _parse_size(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise InputError(f"--image-size: expected HxW like 384x512, got {text!r}") from None
    from smearsight.train.detector.config import MIN_IMAGE_SIDE

    if h <= 0 or w <= 0:
        raise InputError(f"--image-size: sizes must be positive, got {text!r}")
    if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
        raise InputError(f"--image-size: each side must be at least {MIN_IMAGE_SIDE} px, got {text!r}")
    return [h, w]


def _setup_torch(threads: int | None) -> None:
    import os

    from smearsight.errors import require

    torch = require("torch", "the detector")
    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("KMP_WARNINGS", "0")


def _check_device(device: str | None) -> None:
    """One-line InputError for a --device torch cannot parse or a CUDA device this machine lacks."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device: {device!r} is not a torch device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: {device!r} requested but no CUDA GPU is available to torch here")


@train_app.command("detector")
def train_detector_cmd(
    data: Path = typer.Option(
        ..., "--data", help="Dataset root (or one COCO JSON file, named after its split: train.json)."
    ),
    fmt: str = typer.Option(..., "--format", help="coco | voc | yolo"),
    train_split: str = typer.Option("train", "--train-split"),
    val_split: str = typer.Option("val", "--val-split", help="Validation split ('none' to skip)."),
    out: Path = typer.Option(..., "--out", help="Run folder: best.pt, last.pt, metrics.json, curves.png."),
    config: Path | None = typer.Option(None, "--config", help="YAML training recipe (TrainConfig fields)."),
    variant: str | None = typer.Option(None, "--variant", help="Registered variant, e.g. efficientdet_lite0."),
    backbone: str | None = typer.Option(None, "--backbone", help="Backbone override (timm name)."),
    backbone_weights: Path | None = typer.Option(None, "--backbone-weights", help="Backbone weights file."),
    random_init: bool = typer.Option(False, "--random-init", help="Do not load pretrained backbone weights."),
    image_size: str | None = typer.Option(None, "--image-size", help="HxW input size (default: from the data)."),
    epochs: int | None = typer.Option(None, "--epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr"),
    time_budget: float | None = typer.Option(None, "--time-budget", min=0.0, help="Minutes (0 = none)."),
    threads: int | None = typer.Option(None, "--threads", min=0, help="torch CPU threads (0: torch's default)."),
    device: str | None = typer.Option(None, "--device", help="cpu | cuda (default: cuda when available)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from last.pt with its saved recipe (--threads may change)."
    ),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Train the EfficientDet cell detector (the default recipe is tuned to work without extra flags)."""
    from smearsight.train.detector.config import TrainConfig

    check_output_dir(out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    _setup_torch(threads)
    _check_device(device)
    base = TrainConfig.from_yaml(config) if config else TrainConfig()
    updates = {
        "variant": variant, "backbone": backbone,
        "backbone_weights": str(backbone_weights) if backbone_weights else None,
        "image_size": _parse_size(image_size), "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "threads": threads,
    }
    data_dict = base.to_dict()
    explicit = set(base.model_fields_set) | {k for k, v in updates.items() if v is not None}
    data_dict.update({k: v for k, v in updates.items() if v is not None})
    if random_init:
        data_dict["pretrained"] = False
        explicit.add("pretrained")
    if time_budget is not None:
        data_dict["time_budget_min"] = time_budget if time_budget > 0 else None
        explicit.add("time_budget_min")
    if not data_dict["pretrained"] and data_dict["backbone_weights"]:
        raise InputError(f"--random-init (pretrained: false) and --backbone-weights {data_dict['backbone_weights']}: "
                         "pick one (random weights, or those of the file)")
    cfg = TrainConfig.from_dict(data_dict, source=str(config) if config else "options")
    from smearsight.train.detector.train_loop import train_detector

    summary = train_detector(
        data, _fmt(fmt), train_split, None if val_split.lower() == "none" else val_split, out, cfg,
        resume=resume, explicit_fields=explicit, progress=not no_progress, device=device,
    )
    val = summary.get("val")
    msg = f"done: {summary['epochs_done']} epochs in {summary['train_minutes']} min"
    if val:
        msg += f"; val mAP@0.5 {val['map50']:.4f}, mAP {val['map']:.4f}, recall {val['recall']:.4f}"
    typer.echo(msg + f"; weights in {out / 'best.pt'}")


def _load(weights: Path) -> dict:
    from smearsight.train.checkpoint import load_checkpoint

    return load_checkpoint(weights, kind="detector")


def _evaluation_caps(ckpt: dict[str, Any], max_dets: int, pre_nms_topk: int | None) -> dict[str, int]:
    """The checkpoint's training run's evaluation caps (train/detector/config.py) for ``max_dets``."""
    from smearsight.train.detector.config import DEFAULT_MATCHER_TOPK, evaluation_caps

    trained = ckpt.get("train_config", {})
    return evaluation_caps(ckpt["thresholds"]["pre_nms_topk"],
                           trained.get("matcher", {}).get("topk", DEFAULT_MATCHER_TOPK), max_dets,
                           len(ckpt["class_names"]), pre_nms_topk or trained.get("eval_pre_nms_topk"))


@eval_app.command("detector")
def eval_detector_cmd(
    weights: Path = typer.Option(..., "--weights", help="Detector checkpoint (best.pt)."),
    data: Path = typer.Option(..., "--data"),
    fmt: str = typer.Option(..., "--format", help="coco | voc | yolo"),
    split: str = typer.Option("val", "--split"),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, PR curve, confusion matrix, examples."),
    max_dets: int = typer.Option(1000, "--max-dets", min=1, help="COCO maxDets: detections kept per image and class."),
    score_threshold: float = typer.Option(0.01, "--score-threshold", min=0.0, max=1.0,
                                          help="Lowest score kept for AP."),
    pre_nms_topk: int | None = typer.Option(
        None, "--pre-nms-topk", min=1,
        help="Candidates per class before NMS (default: the training run's evaluation cap, room for "
             "--max-dets cells with the matcher's top-K anchors each).",
    ),
    examples: int = typer.Option(4, "--examples", min=0, help="Example images to draw."),
    threads: int | None = typer.Option(None, "--threads", min=0),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Evaluate a detector checkpoint: COCO mAP@[.5:.95], mAP@0.5, recall per class (pycocotools)."""
    check_output_dir(out)
    refuse_training_run_folder(out, "the report (metrics.json)")
    _setup_torch(threads)
    _check_device(device)
    from smearsight.train.detector.data import check_class_names, load_split
    from smearsight.train.detector.evaluate import run_evaluation
    from smearsight.train.detector.predictor import Predictor

    ckpt = _load(weights)
    ds = load_split(data, _fmt(fmt), split)
    check_class_names(ckpt["class_names"], ds.class_names, f"{data} [{split}]", f"{weights}'s")
    if ds.num_boxes == 0:
        raise InputError(f"{data}: split {split!r} holds no boxes (no ground truth to score mAP against)")
    pred = Predictor.from_checkpoint(ckpt, score_threshold=score_threshold, device=device,
                                     **_evaluation_caps(ckpt, max_dets, pre_nms_topk))
    metrics = run_evaluation(pred, ds, out, max_dets=max_dets, examples=examples,
                             plot_score_threshold=ckpt["thresholds"]["score"])
    per = ", ".join(f"{n} {v['ap50']:.3f}" for n, v in metrics["per_class"].items())
    typer.echo(f"mAP@0.5 {metrics['map50']:.4f}  mAP {metrics['map']:.4f}  recall {metrics['recall']:.4f}  "
               f"AP50 per class: {per}  -> {out / 'metrics.json'}")


@predict_app.command("detector")
def predict_detector_cmd(
    images: list[Path] = typer.Argument(..., help="Image files (or folders of images)."),
    weights: Path = typer.Option(..., "--weights"),
    out: Path = typer.Option(..., "--out"),
    score_threshold: float | None = typer.Option(None, "--score-threshold", help="Default: the checkpoint's."),
    resize: str = typer.Option("letterbox", "--resize", help="letterbox (as trained) | pad (native, stride pad)."),
    threads: int | None = typer.Option(None, "--threads", min=0),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Detect cells in images; writes annotated images and one JSON per image (plus detections.json)."""
    check_output_dir(out)
    refuse_training_run_folder(out, "the per-image JSON files (an image named metrics.jpg, say)")
    _setup_torch(threads)
    _check_device(device)
    import cv2

    from smearsight.fileio import atomic_write_bytes, atomic_write_json
    from smearsight.train.datasets.images import IMAGE_SUFFIXES, read_image_rgb
    from smearsight.train.detector.plots import draw
    from smearsight.train.detector.predictor import Predictor

    if resize not in ("letterbox", "pad"):
        raise InputError(f"--resize: expected letterbox or pad, got {resize!r}")
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
        raise InputError(f"--score-threshold {score_threshold}: must lie in [0, 1]")
    files: list[Path] = []
    for p in images:
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such image file or folder")
    if not files:
        raise InputError("no images given (folders held no image files)")
    by_stem: dict[str, Path] = {}
    for f in files:  # outputs are named after the stem: two inputs must not write the same files
        if f.stem == SUMMARY_STEM:
            raise InputError(f"{f}: its results would overwrite the summary {SUMMARY_STEM}.json; rename the image")
        if f.stem in by_stem and by_stem[f.stem] != f:
            raise InputError(f"{f}: same file name stem as {by_stem[f.stem]}; their outputs would overwrite each other")
        by_stem[f.stem] = f
    ckpt = _load(weights)
    for f in files:  # every image decodes before anything is written (read again below, one at a time)
        read_image_rgb(f)
    names = list(ckpt["class_names"])
    # Offline, no frame budget: the evaluation's candidate cap, so that a crowded field is not clipped.
    topk = _evaluation_caps(ckpt, ckpt["thresholds"]["max_detections"], None)["pre_nms_topk"]
    pred = Predictor.from_checkpoint(ckpt, score_threshold=score_threshold, resize=resize, pre_nms_topk=topk,
                                     device=device)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for f in files:
        img = read_image_rgb(f)
        det = pred.predict_batch([img])[0]
        items = [{"box": [round(float(v), 2) for v in d[:4]], "score": round(float(d[4]), 4),
                  "class": names[int(d[5])], "class_id": int(d[5])} for d in det]
        record = {"image": str(f), "width": img.shape[1], "height": img.shape[0], "detections": items,
                  "counts": {n: sum(1 for it in items if it["class"] == n) for n in names},
                  "score_threshold": pred.score_threshold, "pre_nms_topk": pred.pre_nms_topk}
        atomic_write_json(out / f"{f.stem}.json", record)
        vis = draw(img, det, names, pred.score_threshold)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(vis, cv2.COLOR_RGB2BGR))
        if ok:
            atomic_write_bytes(out / f"{f.stem}_pred.jpg", buf.tobytes())
        summary.append({"image": str(f), "detections": len(items)})
    atomic_write_json(out / f"{SUMMARY_STEM}.json", summary)
    typer.echo(f"{len(files)} image(s), {sum(s['detections'] for s in summary)} detection(s) -> {out}")


@data_app.command("anchors")
def data_anchors_cmd(
    path: Path = typer.Argument(..., help="Dataset root (or COCO JSON)."),
    fmt: str = typer.Option(..., "--format", help="coco | voc | yolo"),
    split: str | None = typer.Option(None, "--split"),
    config: Path | None = typer.Option(
        None, "--config", help="Training recipe (TrainConfig YAML with 'anchors') or the anchors alone (AnchorConfig)."
    ),
    image_size: str | None = typer.Option(
        None, "--image-size", help="HxW model input (default: the recipe's, else from the data)."
    ),
    positive_iou: float = typer.Option(0.5, "--positive-iou", help="IoU a box's best anchor must reach."),
    variant: str | None = typer.Option(None, "--variant", help="Default: the recipe's (efficientdet_lite0)."),
) -> None:
    """Per box-size bucket, the fraction of boxes whose best anchor reaches the positive IoU threshold.

    Shows the given anchors (--config; default: the detector's TPS default), P3-P7 effdet defaults, and the
    layout the training recipe would pick from this data. A recipe given as --config is validated whole
    (a misspelt setting is an error) and lends its variant, image size and matcher to the report.
    """
    from rich.console import Console
    from rich.table import Table

    from smearsight.anchors import AnchorConfig
    from smearsight.config import read_yaml
    from smearsight.train.detector.anchor_stats import coverage_report
    from smearsight.train.detector.config import TrainConfig, default_detector_anchors
    from smearsight.train.detector.data import auto_image_size, load_split, scaled_boxes
    from smearsight.train.detector.registry import variant_settings
    from smearsight.train.detector.train_loop import resolve_recipe

    if not 0 < positive_iou <= 1:  # also refuses nan
        raise InputError(f"--positive-iou: expected a number in (0, 1], got {positive_iou:g}")
    layouts: list[tuple[str, AnchorConfig]] = []
    recipe = TrainConfig()
    if config:
        data = read_yaml(config)
        if "anchors" in data:  # a training recipe, validated whole: a misspelt setting is an error, not ignored
            recipe = TrainConfig.from_dict(data, source=str(config))
            if isinstance(recipe.anchors, AnchorConfig):
                layouts.append((f"{config}", recipe.anchors))
        else:
            layouts.append((f"{config}", AnchorConfig.from_dict(data, source=str(config))))
    if not layouts:  # no --config, or a recipe with anchors: auto / default
        layouts.append(("detector default (P2-P6, 8 px)", default_detector_anchors()))
    if variant is not None:
        recipe = recipe.model_copy(update={"variant": variant})
    settings = variant_settings(recipe.variant)
    ds = load_split(path, _fmt(fmt), split)
    if ds.num_boxes == 0:
        what = f"split {split!r}" if split else "the dataset"
        raise InputError(f"{path}: {what} holds no boxes (nothing to measure anchors against)")
    size = _parse_size(image_size) or recipe.image_size or auto_image_size(ds, max(settings["image_size"]))
    hw = (size[0], size[1])
    boxes = scaled_boxes(ds, hw)
    layouts.append(("effdet P3-P7 x4", AnchorConfig()))
    # What training picks for "anchors: auto" at this input size (its own IoU rule, whatever --positive-iou says).
    auto = resolve_recipe(recipe.model_copy(update={"image_size": list(hw), "anchors": "auto"}), ds)[1]
    layouts.append(("recipe auto", auto))
    console = Console(markup=False)  # paths and class names are shown literally
    console.print(f"{path} [{split}]: {len(ds)} images, {len(boxes)} boxes at model input {hw[0]}x{hw[1]} "
                  f"(positive IoU {positive_iou})")
    for name, cfg in layouts:
        bases = [round(cfg.base_size(i), 1) for i in range(len(cfg.levels))]
        table = Table(title=f"{name}: levels {cfg.levels}, base {bases}, {cfg.num_anchors(hw)} anchors")
        for col in ("box size px", "boxes", "covered", "median best IoU"):
            table.add_column(col, justify="right")
        for row in coverage_report(boxes, hw, cfg, positive_iou):
            if row["count"] == 0:
                continue
            table.add_row(row["bucket"], str(row["count"]), f"{row['covered']:.3f}", f"{row['median_iou']:.3f}")
        console.print(table)
