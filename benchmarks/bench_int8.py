"""Float32 vs int8 detector on the CPU: ONNX Runtime latency and accuracy on held-out synthetic smears.

    python benchmarks/bench_int8.py [--float DIR] [--int8 DIR] [--frames 12] [--runs 10] [--threads 2]
        [--pre-nms-topk N]

Both models (default: the packaged demo detector and its ``smearsight export int8`` version) run through
the runtime's own pipeline (pre-processing, ONNX Runtime, NumPy decode + NMS) on ``--frames`` synthetic
768x1024 smears from a seed neither the training nor the calibration used; detections are scored with
pycocotools (score threshold 0.01, maxDets 1000). Latency is the ``infer`` stage alone on one frame, the
two models timed alternately, median and best of ``--runs``. A second table counts, at each manifest's own
operating score threshold, the detections per frame, the share matching a labelled cell and the share of
cells found. Needs the ``train`` extra (pycocotools).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def held_out(size: tuple[int, int], frames: int, seed: int):
    """Synthetic frames with their ground truth, as an in-memory detection dataset."""
    from smearsight.train.datasets.records import DetectionDataset, ImageRecord
    from smearsight.train.datasets.synth import TPS_CLASS_NAMES, SmearSynthesizer

    synth = SmearSynthesizer(seed=seed, size=size)
    images, records = [], []
    for i in range(frames):
        image, boxes, labels = synth.render(i)
        images.append(image)
        records.append(ImageRecord(Path(f"heldout_{i:03d}.png"), size[1], size[0], boxes, labels, image_id=i + 1))
    return images, DetectionDataset(list(TPS_CLASS_NAMES), records)


def open_model(model_dir: Path, threads: int | None, score_threshold: float, pre_nms_topk: int | None = None):
    """The runtime's pipeline at ``score_threshold`` (AP needs low scores too); returns it and the manifest's
    own operating threshold."""
    from smearsight.manifest import load_manifest
    from smearsight.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from smearsight.runtime.pipeline import Pipeline

    pipe = Pipeline(OnnxRuntimeBackend(model_dir, load_manifest(model_dir), threads=threads))
    operating = pipe.spec.score_threshold
    update = {"score_threshold": score_threshold}
    if pre_nms_topk is not None:
        update["pre_nms_topk"] = pre_nms_topk
    pipe.spec = pipe.spec.model_copy(update=update)
    return pipe, operating


def operating_point(dataset, detections: list, threshold: float) -> tuple[float, float, float]:
    """Detections per frame, share of them matching a labelled cell (same class, IoU >= 0.5, one to one)
    and share of labelled cells found, counting only detections scored above ``threshold``."""
    import numpy as np

    from smearsight.export.quantize import match_detections

    matched = shown = 0
    for record, dets in zip(dataset.images, detections, strict=True):
        dets = dets[dets[:, 4] > threshold]
        truth = np.concatenate([record.boxes, np.ones((len(record.boxes), 1), np.float32),
                                record.labels[:, None].astype(np.float32)], axis=1)
        matched += match_detections(truth, dets)
        shown += len(dets)
    return shown / len(detections), matched / max(shown, 1), matched / max(dataset.num_boxes, 1)


def main() -> None:
    from smearsight.runtime.pipeline import packaged_models_root
    from smearsight.train.detector.evaluate import coco_evaluate

    root = packaged_models_root()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float", dest="float_dir", type=Path, default=root / "detector")
    parser.add_argument("--int8", dest="int8_dir", type=Path, default=root / "detector_int8")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pre-nms-topk", type=int, default=None, help="replace the manifests' cap per class")
    args = parser.parse_args()

    opened = {"fp32": open_model(args.float_dir, args.threads, 0.01, args.pre_nms_topk),
              "int8": open_model(args.int8_dir, args.threads, 0.01, args.pre_nms_topk)}
    pipes = {name: pipe for name, (pipe, _) in opened.items()}
    size = pipes["fp32"].image_size
    images, ds = held_out(size, args.frames, args.seed)
    x = pipes["fp32"].preprocess(images[0])[0].copy()
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for pipe in pipes.values():
        pipe.detector.infer(x)  # warm-up
    for _ in range(args.runs):
        for name, pipe in pipes.items():
            t = time.perf_counter()
            pipe.detector.infer(x)
            times[name].append((time.perf_counter() - t) * 1e3)

    small = ("elongated_spermatid", "immature_sperm", "mature_sperm")
    print(f"| model | ONNX MB | infer median ms | best ms | mAP@0.5 | mAP | recall | "
          f"{' | '.join(f'{c} AP50 / recall' for c in small)} |")
    print("| --- " * (7 + len(small)) + "|")
    at_point = {}
    for name, pipe in pipes.items():
        detections = []
        for image in images:
            dets, n, _, _ = pipe.process(image)
            detections.append(dets[:n].copy())
        metrics, _ = coco_evaluate(ds, detections, max_dets=1000)
        per = metrics["per_class"]
        model_dir = args.float_dir if name == "fp32" else args.int8_dir
        mb = (model_dir / pipe.detector.manifest.onnx_file).stat().st_size / 1e6
        print(f"| {name} | {mb:.1f} | {statistics.median(times[name]):.1f} | {min(times[name]):.1f} | "
              f"{metrics['map50']:.3f} | {metrics['map']:.3f} | {metrics['recall']:.3f} | "
              + " | ".join(f"{per[c]['ap50']:.3f} / {per[c]['recall']:.3f}" for c in small) + " |")
        threshold = opened[name][1]
        at_point[name] = (threshold, *operating_point(ds, detections, threshold))
        pipe.close()
    print("\n| model | operating score threshold (manifest) | detections / frame | matching a labelled cell "
          "| cells found |")
    print("| --- | --- | --- | --- | --- |")
    for name, (threshold, per_frame, precision, found) in at_point.items():
        print(f"| {name} | {threshold:.2f} | {per_frame:.0f} | {precision:.3f} | {found:.3f} |")
    ratio = statistics.median(times["fp32"]) / statistics.median(times["int8"])
    print(f"\nint8 speed-up (median infer): {ratio:.2f}x on {args.frames} held-out frames of {size[0]}x{size[1]} "
          f"(seed {args.seed}), ground-truth boxes {ds.num_boxes}, {ds.num_boxes / args.frames:.0f} per frame"
          + (f"; pre-NMS cap {args.pre_nms_topk} per class" if args.pre_nms_topk else ""))


if __name__ == "__main__":
    main()
