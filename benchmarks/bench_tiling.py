"""Camera frames larger than the detector's input: shrunk to fit against detected in tiles.

    python benchmarks/bench_tiling.py [--model DIR] [--sizes 1080x1920,1200x1600,768x1024] [--frames 3]
        [--threads 2]

Synthetic smears rendered at each frame size (cells at the size the demo detector learned them; seed 777,
which neither its training nor its calibration used) go through the runtime's pipeline twice: with
``tile=False`` (shrunk to the input, the ``--shrink`` behaviour) and ``tile=True`` (the default). For each:
the tiles per frame, the share of labelled cells boxed (IoU >= 0.5, any class: the boxes the technician sees),
detections per labelled cell, the share of cells boxed twice, and the median time of the detector stages
(pre-processing + inference + decode/NMS) per frame. Default model: the packaged fp32 demo detector.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        h, w = part.lower().split("x")
        sizes.append((int(h), int(w)))
    return sizes


def measure(pipe, frames: list) -> dict[str, float]:
    import numpy as np

    from smearsight.anchors import box_iou

    truth = boxed = twice = found = 0
    times = []
    for image, boxes in frames:
        dets, n, _, stage = pipe.process(image)
        times.append(1000 * (stage["preprocess"] + stage["infer"] + stage["decode_nms"]))
        iou = box_iou(boxes, dets[:n, :4]) if n else np.zeros((len(boxes), 1), np.float32)
        truth += len(boxes)
        found += n
        boxed += int((iou.max(axis=1) >= 0.5).sum())
        twice += int(((iou >= 0.5).sum(axis=1) > 1).sum())
    return {"tiles": pipe.tiles_last, "recall": boxed / truth, "per_cell": found / truth, "twice": twice / truth,
            "ms": statistics.median(times)}


def main() -> None:
    from smearsight.manifest import load_manifest
    from smearsight.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from smearsight.runtime.pipeline import Pipeline, packaged_models_root
    from smearsight.train.datasets.synth import SmearSynthesizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=packaged_models_root() / "detector")
    ap.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1080x1920,1200x1600,768x1024"))
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    manifest = load_manifest(args.model)
    pipes = {tile: Pipeline(OnnxRuntimeBackend(args.model, manifest, threads=args.threads), [], tile=tile)
             for tile in (False, True)}
    print(f"model {args.model} (input {manifest.image_size[0]}x{manifest.image_size[1]}, resize "
          f"{manifest.input.resize}), {args.frames} frames a size, overlap {pipes[True].tile_overlap} px")
    print("| frame | mode | tiles | cells boxed | boxes per cell | cells boxed twice | detector ms / frame |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        synth = SmearSynthesizer(seed=777, size=size)
        frames = [synth.render(i)[:2] for i in range(args.frames)]
        for tile, mode in ((False, "shrink"), (True, "tile")):
            pipes[tile].process(frames[0][0])  # warm-up at this size
            r = measure(pipes[tile], frames)
            print(f"| {size[0]}x{size[1]} | {mode} | {r['tiles']} | {r['recall']:.3f} | {r['per_cell']:.3f} | "
                  f"{r['twice']:.3f} | {r['ms']:.0f} |")
    for pipe in pipes.values():
        pipe.close()


if __name__ == "__main__":
    main()
