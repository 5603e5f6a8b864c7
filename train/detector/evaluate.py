"""COCO-style evaluation through pycocotools (no hand-written AP), confusion matrix and example images.

``metrics.json`` keys: ``map50`` (AP at IoU 0.5), ``map`` (AP over IoU 0.50:0.95), ``recall`` (recall at IoU
0.5 with up to ``max_dets`` detections per image, mean over classes with ground truth), ``ar`` (COCO AR),
``per_class`` {name: {ap50, ap, recall, gt}}, ``max_dets``, ``images``; :func:`run_evaluation` adds the
predictor's ``score_threshold`` and ``pre_nms_topk``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.anchors import box_iou
from smearsight.errors import require
from smearsight.train.datasets.records import DetectionDataset

REPORT_FILES = ("metrics.json", "pr_curve.png", "confusion_matrix.png")  # beside EXAMPLE_PREFIX*.jpg
EXAMPLE_PREFIX = "example_"


def coco_evaluate(
    ds: DetectionDataset, detections: list[np.ndarray], max_dets: int = 1000
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score per-image detections ``[K, 6]`` against ``ds``; returns (metrics, raw arrays for plots)."""
    require("pycocotools", "COCO evaluation")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = list(ds.class_names)
    images, annotations, results = [], [], []
    ann_id = 1
    for i, rec in enumerate(ds.images):
        images.append({"id": i + 1, "width": int(rec.width), "height": int(rec.height), "file_name": rec.file_name})
        for box, label in zip(rec.boxes, rec.labels, strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({
                "id": ann_id, "image_id": i + 1, "category_id": int(label) + 1,
                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0,
            })
            ann_id += 1
        for det in detections[i]:
            results.append({
                "image_id": i + 1, "category_id": int(det[5]) + 1,
                "bbox": [float(det[0]), float(det[1]), float(det[2] - det[0]), float(det[3] - det[1])],
                "score": float(det[4]),
            })
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    counts = ds.boxes_per_class()
    per_class = {n: {"ap50": 0.0, "ap": 0.0, "recall": 0.0, "gt": int(counts[k])} for k, n in enumerate(names)}
    metrics: dict[str, Any] = {"map50": 0.0, "map": 0.0, "recall": 0.0, "ar": 0.0, "per_class": per_class,
                               "max_dets": max_dets, "images": len(ds.images), "detections": len(results)}
    raw: dict[str, Any] = {"precision": None, "names": names}
    if not results or not annotations:
        return metrics, raw
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = sorted({1, 100, int(max_dets)})  # pycocotools sorts them itself
        at = ev.params.maxDets.index(int(max_dets))
        ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:1], ev.params.areaRngLbl[:1]  # "all" only
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, at]  # [T, R, K] at area=all, maxDets=max_dets
    recall = ev.eval["recall"][:, :, 0, at]  # [T, K]
    has_gt = counts > 0

    def mean_valid(a: np.ndarray) -> float:
        a = a[a > -1]
        return float(a.mean()) if a.size else 0.0

    for k, n in enumerate(names):
        if not has_gt[k]:
            continue
        per_class[n]["ap50"] = mean_valid(precision[0, :, k])
        per_class[n]["ap"] = mean_valid(precision[:, :, k])
        per_class[n]["recall"] = float(max(recall[0, k], 0.0))
    valid = [n for k, n in enumerate(names) if has_gt[k]]
    metrics["map50"] = float(np.mean([per_class[n]["ap50"] for n in valid]))
    metrics["map"] = float(np.mean([per_class[n]["ap"] for n in valid]))
    metrics["recall"] = float(np.mean([per_class[n]["recall"] for n in valid]))
    metrics["ar"] = mean_valid(recall[:, has_gt])
    raw["precision"] = precision
    raw["rec_thrs"] = ev.params.recThrs
    return metrics, raw


def confusion_matrix(
    ds: DetectionDataset, detections: list[np.ndarray], score_threshold: float, iou_threshold: float = 0.5
) -> np.ndarray:
    """``[C+1, C+1]`` counts, rows = true class (last = background), columns = predicted (last = missed)."""
    c = len(ds.class_names)
    m = np.zeros((c + 1, c + 1), dtype=np.int64)
    for rec, det in zip(ds.images, detections, strict=True):
        det = det[det[:, 4] >= score_threshold]
        det = det[np.argsort(-det[:, 4], kind="stable")]
        used = np.zeros(len(rec.boxes), dtype=bool)
        iou = box_iou(det[:, :4], rec.boxes) if len(det) and len(rec.boxes) else np.zeros((len(det), len(rec.boxes)))
        for i in range(len(det)):
            cand = np.where(~used & (iou[i] >= iou_threshold))[0] if iou.shape[1] else np.array([], int)
            if cand.size:
                j = cand[np.argmax(iou[i, cand])]
                used[j] = True
                m[rec.labels[j], int(det[i, 5])] += 1
            else:
                m[c, int(det[i, 5])] += 1
        for j in np.where(~used)[0]:
            m[rec.labels[j], c] += 1
    return m


def run_evaluation(
    predictor: Any,
    ds: DetectionDataset,
    out_dir: Path | None = None,
    *,
    max_dets: int = 1000,
    examples: int = 4,
    plot_score_threshold: float = 0.3,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every image of ``ds``, score it, and (with ``out_dir``) write metrics.json and the plots.

    An earlier report in ``out_dir`` is removed first (its example images would mix with these) and metrics.json
    is written last: a folder that holds metrics.json holds one evaluation's whole report.
    """
    from smearsight.fileio import atomic_write_json, remove_stale_temp_files
    from smearsight.train.datasets.images import read_image_rgb
    from smearsight.train.detector.progress import make_progress

    detections: list[np.ndarray] = []
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("evaluating", total=len(ds.images))
        for i in range(0, len(ds.images), batch_size):
            recs = ds.images[i : i + batch_size]
            detections.extend(predictor.predict_batch([read_image_rgb(r.path) for r in recs]))
            bar.advance(task, len(recs))
    metrics, raw = coco_evaluate(ds, detections, max_dets=max_dets)
    metrics.update(score_threshold=predictor.score_threshold, pre_nms_topk=predictor.pre_nms_topk)
    if out_dir is not None:
        from smearsight.train.detector import plots

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        old = [out_dir / n for n in REPORT_FILES] + sorted(out_dir.glob(f"{EXAMPLE_PREFIX}*.jpg"))
        for path in old:  # metrics.json first: a report without it is known to be incomplete
            path.unlink(missing_ok=True)
        remove_stale_temp_files(out_dir, [*REPORT_FILES, f"{EXAMPLE_PREFIX}*.jpg"])  # left by a kill -9
        plots.pr_curves(raw, out_dir / "pr_curve.png")
        cm = confusion_matrix(ds, detections, plot_score_threshold)
        plots.confusion(cm, list(ds.class_names), out_dir / "confusion_matrix.png")
        for k, rec in enumerate(ds.images[:examples]):
            plots.example_image(
                read_image_rgb(rec.path), detections[k], rec.boxes, rec.labels, list(ds.class_names),
                plot_score_threshold, out_dir / f"{EXAMPLE_PREFIX}{k:02d}_{Path(rec.file_name).stem}.jpg",
            )
        atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
