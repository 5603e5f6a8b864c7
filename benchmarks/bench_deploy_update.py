"""Field-update timings: bundle, publish, update (local directory and HTTP), health check, rollback.

Uses a synthetic detector with real-sized tensors (768x1024 input, 147,312 anchors x 6 classes, so the
expected outputs and weights are as large as the real model's outputs) and a 64x64 morphology model.
Needs the ``onnx`` package (``pip install 'smearsight[train]'``) to build the synthetic models.

    python benchmarks/bench_deploy_update.py [--workdir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("SMEARSIGHT_COMPUTE_CAPABILITY", "none")
os.environ.setdefault("SMEARSIGHT_TENSORRT_VERSION", "none")


def make_models(base: Path, seed: int) -> list[Path]:
    from onnx import TensorProto, helper, numpy_helper

    from smearsight.anchors import AnchorConfig, generate_anchors
    from smearsight.fileio import sha256_file
    from smearsight.manifest import DetectorSpec, InputSpec, Manifest, MorphologySpec, TensorSpec

    hw, classes, cfg = (768, 1024), 6, AnchorConfig()
    n = len(generate_anchors(hw, cfg))
    rng = np.random.default_rng(seed)
    det = base / f"det{seed}"
    det.mkdir(parents=True)
    inits = [numpy_helper.from_array(rng.normal(size=(3, n * classes)).astype(np.float32), "w_cls"),
             numpy_helper.from_array(rng.normal(size=(3, n * 4)).astype(np.float32) * 0.1, "w_box"),
             numpy_helper.from_array(np.array([1, n, classes], np.int64), "cls_shape"),
             numpy_helper.from_array(np.array([1, n, 4], np.int64), "box_shape")]
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w_cls"], ["c"]), helper.make_node("Reshape", ["c", "cls_shape"],
                                                                                 ["class_logits"]),
             helper.make_node("MatMul", ["f", "w_box"], ["b"]), helper.make_node("Reshape", ["b", "box_shape"],
                                                                                 ["box_regression"])]
    graph = helper.make_graph(nodes, "bench_detector",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *hw])],
                              [helper.make_tensor_value_info("class_logits", TensorProto.FLOAT, [1, n, classes]),
                               helper.make_tensor_value_info("box_regression", TensorProto.FLOAT, [1, n, 4])], inits)
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(det / "model.onnx"))
    Manifest(kind="detector", name="bench", model_version=str(seed), created="2026-01-01T00:00:00+00:00",
             input=InputSpec(name="images", shape=[1, 3, *hw], mean=[0.5] * 3, std=[0.5] * 3),
             outputs=[TensorSpec(name="class_logits", shape=[1, n, classes]),
                      TensorSpec(name="box_regression", shape=[1, n, 4])],
             detector=DetectorSpec(class_names=list("abcdef"), anchors=cfg),
             onnx_sha256=sha256_file(det / "model.onnx")).save(det)
    morph = base / f"head{seed}"
    morph.mkdir()
    g = helper.make_graph([helper.make_node("ReduceMean", ["crops"], ["scores"], axes=[1, 2, 3], keepdims=0)],
                          "bench_morph", [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["B", 1, 64, 64])],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B"])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(morph / "model.onnx"))
    Manifest(kind="morphology", name="head", model_version="1", created="2026-01-01T00:00:00+00:00",
             input=InputSpec(name="crops", shape=[-1, 1, 64, 64], color="gray", mean=[0.5], std=[0.5]),
             outputs=[TensorSpec(name="scores", shape=[-1])], morphology=MorphologySpec(part="head", threshold=0.3),
             onnx_sha256=sha256_file(morph / "model.onnx")).save(morph)
    return [det, morph]




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from smearsight.deploy.bundle import build_bundle
    from smearsight.deploy.health import health_check
    from smearsight.deploy.install import Device, provision
    from smearsight.deploy.repository import FileRepository, make_server
    from smearsight.deploy.updater import update

    work = args.workdir or Path(tempfile.mkdtemp(prefix="smearsight-bench-"))
    rows: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def clock(name: str):
        start = time.perf_counter()
        yield
        rows.setdefault(name, []).append(time.perf_counter() - start)

    bundles = []
    for rep in range(args.repeat):
        base = work / f"run{rep}"
        models = make_models(base / "models", seed=rep)
        a, b = base / "a.tar.gz", base / "b.tar.gz"
        with clock("bundle build (2 models, ref. outputs)"):
            build_bundle(models, f"1.{rep}", a)
        build_bundle(models, f"1.{rep}", b)
        assert a.read_bytes() == b.read_bytes(), "bundle not reproducible"
        bundles.append(a)
        with clock("repo init (4 Ed25519 keys)"):
            repo = FileRepository.init(base / "repo")
        with clock("repo publish"):
            repo.publish(a)
        dev = base / "dev"
        provision(dev, repo.meta_dir / "1.root.json")
        with clock("update from directory (first install)"):
            update(dev, str(repo.dir))
        newer = make_models(base / "models2", seed=100 + rep)
        build_bundle(newer, f"2.{rep}", base / "c.tar.gz")
        repo.publish(base / "c.tar.gz")
        server = make_server(repo.dir)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with clock("update over HTTP (switch 1.x -> 2.x)"):
            update(dev, url)
        with clock("update over HTTP (already up to date)"):
            update(dev, url)
        server.shutdown()
        server.server_close()
        with clock("health-check (verify + smoke test)"):
            health_check(dev)
        with clock("health-check --quick (verify only)"):
            health_check(dev, quick=True)
        with clock("rollback (verify previous + switch)"):
            Device(dev).rollback()

    table = Table(title=f"smearsight deploy timings ({args.repeat} runs, median; bundle "
                        f"{bundles[0].stat().st_size / 1e6:.1f} MB, reproducible: yes)")
    table.add_column("step")
    table.add_column("median s", justify="right")
    table.add_column("min s", justify="right")
    for name, values in rows.items():
        table.add_row(name, f"{statistics.median(values):.3f}", f"{min(values):.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
