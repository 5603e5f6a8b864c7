"""Exported graphs: ONNX Runtime CPU latency against PyTorch CPU on the same inputs.

Detector variants (registered EfficientDet/Lite, untrained: weights do not change latency) per
768x1024 frame, and the morphology model (teacher + student + score) per batch of 64 crops. Each
model goes through the same path as ``smearsight export onnx``: a checkpoint dict saved with
``save_checkpoint`` and ``export_checkpoint``; PyTorch runs the module export builds from that
checkpoint. ONNX Runtime and PyTorch runs are interleaved (so both see the same background load) and
both use 2 threads. On a CUDA GPU, PyTorch FP16 on cuda is timed too, as a stand-in for the engine.

    python benchmarks/bench_export.py [--variants efficientdet_lite0 morphology] [--runs 5]
        [--size 768x1024] [--morph-batch 64] [--anchors default|p3p7] [--budget-s 120] [--out results.json]

glibc's allocator slows PyTorch down unless MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ are raised
before the process starts; the script re-executes itself with both set when they are missing. On a
shared, oversubscribed CPU, spinning thread pools wait for descheduled peers at every op (PyTorch with 2
OpenMP threads measured 10-20x slower than with 1 under load), so by default both runtimes wait passively:
OMP_WAIT_POLICY=PASSIVE for PyTorch and ``session.intra_op.allow_spinning=0`` for ONNX Runtime. Pass
``--spin`` on a dedicated machine to keep both libraries' default (spinning) waits.
"""

from __future__ import annotations

import os
import sys

from _torch_env import START_KEYS, reexec_with_torch_env  # noqa: E402

if __name__ == "__main__":
    reexec_with_torch_env(__file__)  # before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

DETECTOR_VARIANTS = [
    "efficientdet_lite0",
    "efficientdet_lite2",
    "efficientdet_d0",
    "efficientdet_d1",
    "efficientdet_d2",
    "efficientdet_d3",
]
MORPHOLOGY = "morphology"
THREADS = 2


@dataclass
class Row:
    """One model's figures (times in milliseconds per call: one frame, or one batch of crops)."""

    model: str
    input_shape: list[int]
    params_m: float
    onnx_mb: float
    onnx_fp16_mb: float | None
    ort_ms: float
    torch_ms: float
    ratio: float
    runs: int
    ort_min_ms: float
    torch_min_ms: float
    max_abs_diff: float
    export_s: float
    cuda_fp16_ms: float | None = None
    notes: list[str] = field(default_factory=list)


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {text!r}: expected HxW, e.g. 768x1024") from None
    return h, w


def detector_anchors(kind: str) -> Any:
    """``default``: the trainer's default_detector_anchors (P2-P6 x 6); ``p3p7``: EfficientDet's P3-P7 x 9."""
    from smearsight.anchors import AnchorConfig
    from smearsight.train.detector.config import default_detector_anchors

    return default_detector_anchors() if kind == "default" else AnchorConfig()


def detector_checkpoint(variant: str, size: tuple[int, int], anchors_kind: str) -> tuple[dict[str, Any], Any]:
    """An untrained detector checkpoint dict (train/checkpoint.py contract) and its module."""
    from smearsight.catalog import TPS_CLASS_NAMES
    from smearsight.train.backbones import backbone_normalization
    from smearsight.train.detector.torch_model import build_from_config, model_config_for

    anchors = detector_anchors(anchors_kind)
    cfg = model_config_for(variant, len(TPS_CLASS_NAMES), anchors.levels, anchors.anchors_per_location)
    model = build_from_config(cfg, pretrained=False).eval()
    mean, std = backbone_normalization(cfg.backbone)
    ckpt = {
        "kind": "detector",
        "model_config": cfg.to_dict(),
        "state_dict": model.state_dict(),
        "normalization": {"color": "rgb", "mean": list(mean), "std": list(std)},
        "image_size": list(size),
        "class_names": list(TPS_CLASS_NAMES),
        "anchors": anchors.to_dict(),
        "thresholds": {"score": 0.3, "iou": 0.5, "pre_nms_topk": 1000, "max_detections": 1000},
    }
    return ckpt, model


def morphology_checkpoint() -> tuple[dict[str, Any], Any]:
    """An untrained morphology checkpoint dict with the default model config (Lite0 teacher)."""
    from smearsight.train.morphology.config import MorphologyModelConfig
    from smearsight.train.morphology.torch_model import build_model

    cfg = MorphologyModelConfig()
    model = build_model(cfg, load_teacher_weights=False).eval()
    ckpt = {
        "kind": "morphology",
        "model_config": cfg.to_dict(),
        "state_dict": model.state_dict(),
        "normalization": {"color": "gray", "mean": [0.5], "std": [0.5]},
        "image_size": [64, 64],
        "morphology": {"part": "head", "threshold": 0.5, "mode": "unsupervised"},
    }
    return ckpt, model


def ort_session(onnx_path: Path, spin: bool) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def time_interleaved(
    fns: dict[str, Callable[[], Any]], runs: int, warmup: int, budget_s: float, min_runs: int = 3
) -> dict[str, list[float]]:
    """Run each function ``warmup`` times, then alternate them ``runs`` times (fewer, but at least
    ``min_runs``, once ``budget_s`` is spent); returns the per-call times in ms."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= min_runs and time.perf_counter() - start > budget_s:
            break
    return times


def time_cuda_fp16(model: Any, x: np.ndarray, runs: int, warmup: int) -> float:
    """Median ms of the PyTorch module in float16 on cuda (synchronised around each call)."""
    import copy

    import torch

    torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick its fastest kernels once
    gpu_model = copy.deepcopy(model).to("cuda", dtype=torch.float16).eval()
    xt = torch.from_numpy(x).to("cuda", dtype=torch.float16)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gpu_model(xt)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    del gpu_model, xt
    torch.cuda.empty_cache()
    return statistics.median(times)


def bench_one(name: str, size: tuple[int, int], args: argparse.Namespace, work: Path) -> Row:
    import torch

    from smearsight.export.onnx_export import build_exportable, export_checkpoint
    from smearsight.train.checkpoint import save_checkpoint

    notes: list[str] = []
    if name == MORPHOLOGY:
        ckpt, built = morphology_checkpoint()
        shape = [args.morph_batch, 1, 64, 64]
    else:
        ckpt, built = detector_checkpoint(name, size, args.anchors)
        shape = [1, 3, *size]
    params_m = sum(p.numel() for p in built.parameters()) / 1e6
    del built
    ckpt_path = save_checkpoint(work / f"{name}.pt", ckpt)
    t0 = time.perf_counter()
    result = export_checkpoint(ckpt_path, work / name, image_size=None if name == MORPHOLOGY else size)
    export_s = time.perf_counter() - t0
    onnx_path = result.directory / "model.onnx"
    onnx_mb = onnx_path.stat().st_size / 1e6
    if not result.simplified:
        notes.append("not simplified (onnxslim missing or failed)")
    onnx_fp16_mb = None
    try:
        from smearsight.export.parity import fp16_model

        onnx_fp16_mb = len(fp16_model(onnx_path).SerializeToString()) / 1e6
    except Exception as exc:  # size only; never block the timing
        notes.append(f"float16 conversion failed: {type(exc).__name__}: {exc}")

    module = build_exportable(ckpt)  # the module export_checkpoint traced, weights loaded
    del ckpt
    sess = ort_session(onnx_path, args.spin)
    input_name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    xt = torch.from_numpy(x)

    def run_ort() -> list[np.ndarray]:
        return sess.run(None, {input_name: x})

    def run_torch() -> Any:
        with torch.inference_mode():
            return module(xt)

    ort_out = run_ort()
    torch_out = run_torch()
    torch_out = torch_out if isinstance(torch_out, tuple | list) else (torch_out,)
    diff = max(float(np.max(np.abs(a - b.numpy()))) for a, b in zip(ort_out, torch_out, strict=True))

    runs = args.runs
    if name in args.capped and args.big_runs is not None:
        runs = min(runs, args.big_runs)
    times = time_interleaved({"ort": run_ort, "torch": run_torch}, runs, args.warmup, args.budget_s)
    ort_ms, torch_ms = statistics.median(times["ort"]), statistics.median(times["torch"])
    row = Row(
        model=name, input_shape=shape, params_m=params_m, onnx_mb=onnx_mb, onnx_fp16_mb=onnx_fp16_mb,
        ort_ms=ort_ms, torch_ms=torch_ms,
        ratio=torch_ms / ort_ms, runs=len(times["ort"]), ort_min_ms=min(times["ort"]),
        torch_min_ms=min(times["torch"]), max_abs_diff=diff, export_s=export_s, notes=notes,
    )
    if torch.cuda.is_available():
        row.cuda_fp16_ms = time_cuda_fp16(module, x, runs=max(args.runs, 20), warmup=5)
    return row


def print_table(rows: list[Row], title: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    cuda = any(r.cuda_fp16_ms is not None for r in rows)
    table = Table(title=title, box=box.MARKDOWN)
    for col in ("model", "input", "params (M)", "ONNX MB", "FP16 ONNX MB", "ORT median ms", "PyTorch median ms",
                "ratio PyTorch/ORT", "runs", "max |diff|"):
        table.add_column(col, justify="left" if col in ("model", "input") else "right")
    if cuda:
        table.add_column("CUDA FP16 ms", justify="right")
    for r in rows:
        cells = [r.model, "x".join(map(str, r.input_shape)), f"{r.params_m:.2f}", f"{r.onnx_mb:.1f}",
                 "-" if r.onnx_fp16_mb is None else f"{r.onnx_fp16_mb:.1f}",
                 f"{r.ort_ms:.1f}", f"{r.torch_ms:.1f}", f"{r.ratio:.2f}", str(r.runs), f"{r.max_abs_diff:.1e}"]
        if cuda:
            cells.append("-" if r.cuda_fp16_ms is None else f"{r.cuda_fp16_ms:.2f}")
        table.add_row(*cells)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=[*DETECTOR_VARIANTS, MORPHOLOGY],
                        help=f"registered detector variants and/or {MORPHOLOGY!r}")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", default="768x1024", help="detector input HxW (multiples of the max stride)")
    parser.add_argument("--morph-batch", type=int, default=64, help="crops per morphology batch")
    parser.add_argument("--anchors", choices=["default", "p3p7"], default="default",
                        help="default: P2-P6 x 6 (default_detector_anchors); p3p7: P3-P7 x 9 (EfficientDet)")
    parser.add_argument("--budget-s", type=float, default=120.0,
                        help="stop timing a model after this many seconds (at least 3 runs)")
    parser.add_argument("--big-runs", type=int, default=3, help="run cap for the models listed in --capped")
    parser.add_argument("--capped", nargs="*", default=["efficientdet_d2", "efficientdet_d3"])
    parser.add_argument("--spin", action="store_true",
                        help="keep spinning thread-pool waits (dedicated machine; see the module docstring)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    size = parse_size(args.size)

    import onnxruntime
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from smearsight.train.detector.registry import list_variants

    stride = detector_anchors(args.anchors).max_stride
    if any(v != MORPHOLOGY for v in args.variants) and (size[0] % stride or size[1] % stride):
        raise SystemExit(f"--size {args.size}: both sides must be multiples of {stride} ({args.anchors} anchors)")
    unknown = [v for v in args.variants if v != MORPHOLOGY and v not in list_variants()]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown} (known: {', '.join(list_variants())}, {MORPHOLOGY})")
    import warnings

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # export's tracing chatter
    warnings.filterwarnings("ignore", category=UserWarning, module="onnxconverter_common")  # fp16 truncation
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp, Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task("export + time", total=len(args.variants))
        for name in args.variants:
            progress.update(task, description=f"{name}")
            try:
                rows.append(bench_one(name, size, args, Path(tmp)))
            except Exception as exc:  # one broken model must not hide the others' figures
                progress.console.print(f"[red]{name}: failed: {type(exc).__name__}: {exc}")
            progress.advance(task)
    load_after = os.getloadavg()

    env = {
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": THREADS,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "start_env": {k: os.environ.get(k) for k in START_KEYS}, "spin": args.spin,
        "anchors": args.anchors, "detector_size": list(size), "morph_batch": args.morph_batch,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    waits = "spinning" if args.spin else "passive"
    title = (f"CPU latency, {THREADS} threads ({waits} waits), detector {size[0]}x{size[1]} ({args.anchors} anchors), "
             f"morphology batch {args.morph_batch}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print_table(rows, title)
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    by_name = {r.model: r for r in rows}
    if "efficientdet_lite0" in by_name and MORPHOLOGY in by_name:
        pair = [by_name["efficientdet_lite0"], by_name[MORPHOLOGY]]
        fp16 = "-" if any(r.onnx_fp16_mb is None for r in pair) else f"{sum(r.onnx_fp16_mb for r in pair):.1f}"
        print(f"demo pair efficientdet_lite0 + morphology: FP32 ONNX {sum(r.onnx_mb for r in pair):.1f} MB, "
              f"FP16 ONNX {fp16} MB (one part's morphology model)")
    for r in rows:
        for note in r.notes:
            print(f"note: {r.model}: {note}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0 if len(rows) == len(args.variants) else 1


if __name__ == "__main__":
    sys.exit(main())
