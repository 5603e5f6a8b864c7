"""Morphology model size and CPU scoring throughput (PyTorch and ONNX Runtime).

Usage::

    python benchmarks/bench_morphology.py --weights /work/runs/morph_demo/best.pt [--threads 1] [--batches 1,64]
    python benchmarks/bench_morphology.py            # default MorphologyModelConfig, untrained student

Prints one table: parameters and FLOPs of teacher and student, then crops/s per backend and batch size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _rate(fn, batch: int, min_seconds: float = 2.0) -> float:
    fn()  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        fn()
        done += batch
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="morphology checkpoint (default: untrained default config)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "1000000000")
    import torch

    from smearsight.train.morphology.config import MorphologyModelConfig
    from smearsight.train.morphology.student import count_flops
    from smearsight.train.morphology.torch_model import build_from_checkpoint, build_model

    torch.set_num_threads(args.threads)
    if args.weights:
        from smearsight.train.checkpoint import load_checkpoint

        model = build_from_checkpoint(load_checkpoint(args.weights, kind="morphology"))
    else:
        model = build_model(MorphologyModelConfig()).eval()
    example = torch.zeros(1, 1, 64, 64)
    sizes = model.sizes()
    rows = [
        ("teacher", f"{model.cfg.teacher.name} layers {model.cfg.teacher.layers} @{model.cfg.teacher.input_size}px",
         f"{sizes['teacher_params']:,}", f"{count_flops(model.teacher, example) / 1e6:.1f} M"),
        ("student", f"widths {model.cfg.student.widths}", f"{sizes['student_params']:,}",
         f"{count_flops(model.student, example) / 1e6:.1f} M"),
    ]
    print(f"{'part':8} {'what':44} {'params':>12} {'FLOPs/crop':>12}")
    for row in rows:
        print(f"{row[0]:8} {row[1]:44} {row[2]:>12} {row[3]:>12}")
    print(f"ratio teacher/student params: {sizes['teacher_params'] / sizes['student_params']:.1f}x")

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "morph.onnx"
        torch.onnx.export(model, (example,), str(path), opset_version=17, input_names=["input"],
                          output_names=["scores"], dynamic_axes={"input": {0: "batch"}, "scores": {0: "batch"}},
                          dynamo=False)
        onnx_mb = path.stat().st_size / 1e6
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        print(f"ONNX (opset 17, fp32): {onnx_mb:.2f} MB")
        print(f"{'backend':14} {'batch':>6} {'threads':>8} {'crops/s':>10}")
        for batch in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(batch, 1, 64, 64)
            with torch.no_grad():
                rate = _rate(lambda x=x: model(x), batch, args.seconds)
            print(f"{'torch-cpu':14} {batch:>6} {args.threads:>8} {rate:>10.1f}")
            xn = x.numpy().astype(np.float32)
            rate = _rate(lambda xn=xn: session.run(None, {"input": xn}), batch, args.seconds)
            print(f"{'onnxruntime':14} {batch:>6} {args.threads:>8} {rate:>10.1f}")


if __name__ == "__main__":
    main()
