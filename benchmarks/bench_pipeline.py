"""End-to-end pipeline throughput: synth:// frames (768x1024) -> detector (ONNX Runtime) -> decode + NMS
-> morphology -> annotate -> sink, with per-stage median latencies.

    python benchmarks/bench_pipeline.py [--models DIR] [--frames 40] [--sink null://] [--source synth://]
        [--no-morphology] [--overlap] [--detect-every 1|N|auto|async] [--variant efficientdet_lite0] [--size 768x1024]

Without ``--models`` the built-in demo models are used when installed; otherwise an *untrained*
detector of ``--variant`` (weights do not change the speed) is exported at ``--size`` into a temporary
folder first (needs the ``train`` extra: torch, timm, onnx). Untrained weights give few or no
detections, so decode + NMS and morphology costs then reflect an empty scene: use ``--models`` with a
trained export for representative figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path


def export_untrained(variant: str, size: tuple[int, int], work: Path) -> Path:
    """Export an untrained detector (bench_export.py's checkpoint recipe) to ``work/detector``."""
    spec = importlib.util.spec_from_file_location("bench_export", Path(__file__).with_name("bench_export.py"))
    bench_export = importlib.util.module_from_spec(spec)
    sys.modules["bench_export"] = bench_export  # dataclasses look their module up
    spec.loader.exec_module(bench_export)
    from smearsight.export.onnx_export import export_checkpoint
    from smearsight.train.checkpoint import save_checkpoint

    ckpt, _ = bench_export.detector_checkpoint(variant, size, "default")
    path = save_checkpoint(work / f"{variant}.pt", ckpt)
    export_checkpoint(path, work / "detector", image_size=size)
    return work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--source", default="synth://?seed=1")
    parser.add_argument("--sink", default="null://")
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--no-morphology", action="store_true")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | int8 (detector_int8/ of --models)")
    parser.add_argument("--morphology-every-frame", action="store_true",
                        help="judge every sperm on every frame (default: results carried with the stage)")
    parser.add_argument("--overlap", action="store_true", help="models one frame ahead on their own thread")
    parser.add_argument("--detect-every", default="1",
                        help="detector on every Nth frame, boxes carried with the stage between; auto: as "
                        "often as 10 FPS allows (smearsight run's default); async: on its own thread")
    parser.add_argument("--variant", default="efficientdet_lite0")
    parser.add_argument("--size", default="768x1024", help="HxW for an exported untrained detector")
    parser.add_argument("--out", type=Path, default=None, help="also write the stats JSON here")
    args = parser.parse_args(argv)

    from smearsight.errors import InputError
    from smearsight.runtime import pipeline as pl
    from smearsight.runtime.stage_motion import parse_detect_every

    models = args.models
    tmp = None
    if models is None:
        try:
            pl.find_models(None)
            label = "packaged demo models"
        except InputError:
            h, w = (int(v) for v in args.size.lower().split("x"))
            tmp = tempfile.TemporaryDirectory(prefix="bench_pipeline_")
            t0 = time.perf_counter()
            models = export_untrained(args.variant, (h, w), Path(tmp.name))
            label = f"untrained {args.variant} exported at {h}x{w} ({time.perf_counter() - t0:.0f} s)"
    else:
        label = str(models)
    pipe = pl.open_pipeline(models, args.backend, morphology=not args.no_morphology, precision=args.precision,
                            reuse_morphology=not args.morphology_every_frame,
                            detect_every=parse_detect_every(args.detect_every))
    try:
        if args.warmup:  # first runs pay for allocations and ORT's lazy initialisation
            pl.run(pl.RunConfig(source=args.source, sink="null://", headless=True, max_frames=args.warmup), pipe)
        cfg = pl.RunConfig(source=args.source, sink=args.sink, headless=True, max_frames=args.frames,
                           overlap=args.overlap)
        stats = pl.run(cfg, pipe)
    finally:
        pipe.close()
        if tmp is not None:
            tmp.cleanup()
    man = pipe.detector.manifest
    print(f"models: {label}; detector input {man.input.shape}, anchors {pipe.anchors.shape[0]:,}, "
          f"backend {stats['backend']} ({stats['precision']}), morphology {stats['morphology_parts'] or 'none'}"
          + (f" (carried: {stats['morphology_crops_judged']} crops judged)" if stats["morphology_reuse"] else ""))
    print(f"source {args.source} -> {args.sink}, {stats['frames']} frames ({stats['detector_runs']} detector runs, "
          f"{stats['detector_frames']} of them in the loop, detect every {stats['detect_every']}; boxes "
          f"{stats['boxes_age_ms']:.0f} ms old on average), Python {sys.version.split()[0]}")
    print(f"{'stage':>12} {'median ms':>10}")
    for stage, ms in stats["latency_ms"].items():
        print(f"{stage:>12} {ms:>10.2f}")
    print(f"{'end-to-end':>12} {1000.0 / stats['fps'] if stats['fps'] else float('nan'):>10.2f}  "
          f"({stats['fps']:.2f} FPS)")
    if args.out:
        args.out.write_text(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
