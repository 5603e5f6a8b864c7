"""Float32 vs int8 detector on the CPU: ONNX Runtime latency and accuracy on held-out synthetic smears.

    python benchmarks/bench_int8.py [--float DIR] [--int8 DIR] [--frames 12] [--runs 10] [--threads 2]

Both models (default: the packaged demo detector and its ``smearsight export int8`` version) run through
the runtime's own pipeline (pre-processing, ONNX Runtime, NumPy decode + NMS) on ``--frames`` synthetic
768x1024 smears from a seed neither the training nor the calibration used; detections are scored with
pycocotools (score threshold 0.01, maxDets 1000). Latency is the ``infer`` stage alone on one frame, the
two models timed alternately, median and best of ``--runs``. Needs the ``train`` extra (pycocotools).
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


def open_model(model_dir: Path, threads: int | None, score_threshold: float):
    from smearsight.manifest import load_manifest
    from smearsight.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from smearsight.runtime.pipeline import Pipeline

    pipe = Pipeline(OnnxRuntimeBackend(model_dir, load_manifest(model_dir), threads=threads))
    pipe.spec = pipe.spec.model_copy(update={"score_threshold": score_threshold})  # AP needs low scores too
    return pipe


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
    args = parser.parse_args()

    pipes = {"fp32": open_model(args.float_dir, args.threads, 0.01),
             "int8": open_model(args.int8_dir, args.threads, 0.01)}
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
        pipe.close()
    ratio = statistics.median(times["fp32"]) / statistics.median(times["int8"])
    print(f"\nint8 speed-up (median infer): {ratio:.2f}x on {args.frames} held-out frames of {size[0]}x{size[1]} "
          f"(seed {args.seed}), ground-truth boxes {ds.num_boxes}")


if __name__ == "__main__":
    main()
