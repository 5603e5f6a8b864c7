"""Where the detector's CPU time goes: ONNX Runtime's own profile, split by part of the network.

    python benchmarks/bench_detector_profile.py [--models DIR ...] [--runs 8] [--threads 2] [--by part|op]

For each model folder (default: the packaged demo detector and its int8 version) the script opens an
ONNX Runtime session with the runtime's own options (``session_options``: all graph optimisations,
``--threads`` intra-op threads, no spinning unless ``SMEARSIGHT_ORT_SPIN=1``), runs ``--runs`` frames of
the manifest's input size after two warm-up runs, and reads the session's profile
(``SessionOptions.enable_profiling``). Kernel time is summed per part of the network: the exported
module path's first component (``backbone``, ``fpn``, ``class_net``, ``box_net``), or for nodes ONNX
Runtime inserted itself (layout reorders) the operator type. It prints mean ms per frame and the share
of each part, beside the median wall time of ``session.run``. ``--by op`` sums by operator type instead,
convolutions split into depthwise (``:dw``), 1x1 and other kernels, read from the graph ONNX Runtime
optimised (needs onnx too): it shows which operators int8 speeds up. Needs onnxruntime only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

WARMUP = 2
MODELS = Path(__file__).resolve().parents[1] / "smearsight" / "models"


def part_of(node_name: str, op_type: str) -> str:
    """The network part a profiled node belongs to: ``/backbone/...`` -> ``backbone``; else its op type."""
    if node_name.startswith("/") and "/" in node_name[1:]:
        return node_name.split("/")[1]
    return op_type


def conv_kinds(optimized_onnx: Path) -> dict[str, str]:
    """Node name -> op type, convolutions tagged ``:dw`` (grouped), ``:1x1`` or their kernel size."""
    import onnx

    kinds = {}
    for node in onnx.load(str(optimized_onnx), load_external_data=False).graph.node:
        kind = node.op_type
        if "Conv" in kind:
            attrs = {a.name: a for a in node.attribute}
            kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else None
            if "group" in attrs and attrs["group"].i > 1:
                kind += ":dw"
            elif kernel == [1, 1]:
                kind += ":1x1"
            elif kernel:
                kind += ":" + "x".join(map(str, kernel))
        kinds[node.name] = kind
    return kinds


def profile_model(model_dir: Path, runs: int, threads: int, by: str = "part") -> tuple[float, Counter]:
    """(median wall ms of ``session.run``, mean kernel ms per frame by part or operator) for one model."""
    import onnxruntime as ort

    from smearsight.manifest import load_manifest
    from smearsight.runtime.backends.onnxruntime import session_options

    manifest = load_manifest(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        if by == "op":
            opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(str(model_dir / manifest.onnx_file), opts, providers=["CPUExecutionProvider"])
        meta = session.get_inputs()[0]
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in manifest.input.shape]
        dtype = np.uint8 if "uint8" in meta.type else np.float32
        frame = np.random.default_rng(0).uniform(0, 1, shape).astype(dtype)
        walls = []
        for i in range(WARMUP + runs):
            start = time.perf_counter()
            session.run(None, {meta.name: frame})
            if i >= WARMUP:
                walls.append((time.perf_counter() - start) * 1000)
        events = json.loads(Path(session.end_profiling()).read_text())
        kinds = conv_kinds(Path(opts.optimized_model_filepath)) if by == "op" else {}
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[WARMUP:]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
               and any(lo <= e["ts"] <= hi for lo, hi in windows)]
    parts: Counter = Counter()
    for event in kernels:
        name = event["name"][: -len("_kernel_time")]
        op_type = event["args"].get("op_name", "?")
        group = kinds.get(name, op_type) if by == "op" else part_of(name, op_type)
        parts[group] += event["dur"] / 1000 / runs
    return statistics.median(walls), parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, default=[MODELS / "detector", MODELS / "detector_int8"])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--by", choices=["part", "op"], default="part")
    args = parser.parse_args()
    results = [(d, *profile_model(d, args.runs, args.threads, args.by)) for d in args.models]
    names = sorted({p for _, _, parts in results for p in parts}, key=lambda p: -results[0][2].get(p, 0))
    print(f"| model | run() median ms | kernels ms | {' | '.join(names)} |")
    print("| --- " * (3 + len(names)) + "|")
    for model_dir, wall, parts in results:
        total = sum(parts.values())
        cells = [f"{parts.get(p, 0):.1f} ({100 * parts.get(p, 0) / total:.0f} %)" for p in names]
        print(f"| {model_dir.name} | {wall:.1f} | {total:.1f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
