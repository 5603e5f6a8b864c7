"""Detector on every Nth frame, boxes carried with the stage between: cost and accuracy against the truth.

    python benchmarks/bench_carry.py [--models DIR] [--precision auto] [--every 1,2,3,4,async] [--frames 48]
        [--seed 0] [--speed 4] [--threads 2] [--fps 0]

Frames follow :class:`~smearsight.train.datasets.synth.SyntheticSlide`'s serpentine stage path (what
``synth://`` shows, 768x1024, ``--speed`` px per frame) with every cell's true box. For each ``--every``
N, the runtime's :class:`~smearsight.runtime.pipeline.Pipeline` (ONNX Runtime, no morphology) processes
the same frames with ``detect_every=N`` (or ``async``: the detector on its own thread); at the manifest's
operating score threshold it counts the share of shown boxes matching a labelled cell (same class,
IoU >= 0.5, one to one) and the share of labelled cells found, on all frames and on the carried frames
alone, and times ``Pipeline.process`` per frame (median and mean: the key frames are the slow ones).
``--fps`` hands the frames over no faster than a camera of that rate would (0: back to back); ``async``
needs it to mean anything, since its boxes' age depends on how many frames pass during one detection.
Needs the ``train`` extra (the slide generator).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def slide_frames(seed: int, frames: int, speed: float, size: tuple[int, int]) -> list:
    """(image, truth rows [n, 6] with score 1) along the stage path."""
    import numpy as np

    from smearsight.train.datasets.synth import SyntheticSlide

    slide = SyntheticSlide(seed, frame_size=size)
    out = []
    for _, (x, y) in zip(range(frames), slide.stage_path(speed_px_per_frame=speed), strict=False):
        image, boxes, labels = slide.frame_at(x, y, with_boxes=True)
        truth = np.concatenate([boxes, np.ones((len(boxes), 1), np.float32),
                                labels[:, None].astype(np.float32)], axis=1)
        out.append((image, truth))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=None, help="default: the packaged demo models")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | int8")
    parser.add_argument("--every", default="1,2,3,4", help="comma-separated detect_every values (N or async)")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="slide seed (synth:// shows seed 0)")
    parser.add_argument("--speed", type=float, default=4.0, help="stage speed, px per frame")
    parser.add_argument("--size", default="768x1024", help="frame HxW")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fps", type=float, default=0.0, help="camera rate the frames are paced at (0: none)")
    args = parser.parse_args(argv)

    from smearsight.export.quantize import match_detections
    from smearsight.manifest import load_manifest
    from smearsight.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from smearsight.runtime.pipeline import Pipeline, find_models
    from smearsight.runtime.stage_motion import parse_detect_every

    size = tuple(int(v) for v in args.size.lower().split("x"))
    every = [parse_detect_every(v, "--every") for v in args.every.split(",")]
    frames = slide_frames(args.seed, args.frames, args.speed, size)
    found = find_models(args.models, args.precision, "onnx")
    cells = sum(len(t) for _, t in frames)
    print(f"detector {found.detector}; {len(frames)} frames {size[0]}x{size[1]} of slide seed {args.seed} at "
          f"{args.speed:g} px/frame, {cells / len(frames):.0f} labelled cells per frame; {args.threads} threads; "
          + (f"paced at {args.fps:g} FPS" if args.fps > 0 else "frames back to back"))
    print("\n| detect every | detector runs | process ms median / mean | boxes age ms (mean) | boxes / frame | "
          "matching a labelled cell | cells found (all frames) | cells found (carried frames) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n_every in every:
        backend = OnnxRuntimeBackend(found.detector, load_manifest(found.detector), threads=args.threads)
        pipe = Pipeline(backend, detect_every=n_every)
        try:
            pipe.process(frames[0][0])  # warm-up
            pipe.reset()
            times, ages = [], []
            shown = matched = carried_cells = carried_matched = 0
            t_start = time.perf_counter()
            for i, (image, truth) in enumerate(frames):
                if args.fps > 0:  # the camera's next frame is not there before its time
                    time.sleep(max(0.0, t_start + i / args.fps - time.perf_counter()))
                t0 = time.perf_counter()
                dets, n, _, _ = pipe.process(image)
                times.append(time.perf_counter() - t0)
                ages.append(pipe.boxes_age_s)
                m = match_detections(truth, dets[:n])
                shown += n
                matched += m
                if not pipe.detected_last:
                    carried_cells += len(truth)
                    carried_matched += m
            if pipe.background is not None:
                pipe.background.drain()  # a run still going counts once it has finished
            runs = pipe.detector_runs - 1  # less the warm-up frame
        finally:
            pipe.close()
        carried = f"{carried_matched / carried_cells:.3f}" if carried_cells else "—"
        print(f"| {n_every} | {runs} / {len(frames)} | {1e3 * statistics.median(times):.1f} / "
              f"{1e3 * statistics.fmean(times):.1f} | {1e3 * statistics.fmean(ages):.0f} | {shown / len(frames):.0f} | "
              f"{matched / max(shown, 1):.3f} | {matched / cells:.3f} | {carried} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
