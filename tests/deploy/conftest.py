"""Fixtures for the field-update tests: tiny real ONNX models with valid manifests, bundles, a real
TUF repository on disk and a provisioned device root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smearsight.anchors import AnchorConfig, generate_anchors
from smearsight.fileio import sha256_file
from smearsight.manifest import DetectorSpec, EngineSpec, InputSpec, Manifest, MorphologySpec, TensorSpec

DET_HW = (16, 16)
DET_ANCHORS = AnchorConfig(levels=[3])
NUM_CLASSES = 2


def _save(model, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_detector(directory: Path, seed: int = 0, engine: dict | None = None, name: str = "detector") -> Path:
    """A real ONNX detector graph: global average pool -> matmul -> [1, A, C] logits and [1, A, 4] boxes."""
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    n_anchors = len(generate_anchors(DET_HW, DET_ANCHORS))
    rng = np.random.default_rng(seed)
    w_cls = rng.normal(size=(3, n_anchors * NUM_CLASSES)).astype(np.float32)
    w_box = rng.normal(size=(3, n_anchors * 4)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w_cls"], ["cls_flat"]),
        helper.make_node("Reshape", ["cls_flat", "cls_shape"], ["class_logits"]),
        helper.make_node("MatMul", ["flat", "w_box"], ["box_flat"]),
        helper.make_node("Reshape", ["box_flat", "box_shape"], ["box_regression"]),
    ]
    inits = [
        numpy_helper.from_array(w_cls, "w_cls"),
        numpy_helper.from_array(w_box, "w_box"),
        numpy_helper.from_array(np.array([1, n_anchors, NUM_CLASSES], np.int64), "cls_shape"),
        numpy_helper.from_array(np.array([1, n_anchors, 4], np.int64), "box_shape"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *DET_HW])],
        [helper.make_tensor_value_info("class_logits", TensorProto.FLOAT, [1, n_anchors, NUM_CLASSES]),
         helper.make_tensor_value_info("box_regression", TensorProto.FLOAT, [1, n_anchors, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _save(model, directory / "model.onnx")
    engine_spec = None
    if engine is not None:
        (directory / "model.engine").write_bytes(b"fake serialized engine " + bytes([seed % 256]) * 64)
        engine_spec = EngineSpec(sha256=sha256_file(directory / "model.engine"), **engine)
    Manifest(
        kind="detector", name=name, model_version=f"0.{seed}", created="2026-01-01T00:00:00+00:00",
        input=InputSpec(name="images", shape=[1, 3, *DET_HW], mean=[0.5] * 3, std=[0.5] * 3),
        outputs=[TensorSpec(name="class_logits", shape=[1, n_anchors, NUM_CLASSES]),
                 TensorSpec(name="box_regression", shape=[1, n_anchors, 4])],
        detector=DetectorSpec(class_names=["a", "b"], anchors=DET_ANCHORS),
        onnx_sha256=sha256_file(directory / "model.onnx"),
        precision="fp32" if engine is None else "fp16",
        engine=engine_spec,
    ).save(directory)
    return directory


def make_morphology(directory: Path, scale: float = 2.0) -> Path:
    """A real ONNX morphology graph: per-crop mean times ``scale`` -> scores [B]."""
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    nodes = [
        helper.make_node("ReduceMean", ["crops"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["m", "scale"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_morphology",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["B", 1, 64, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B"])],
        [numpy_helper.from_array(np.array(scale, np.float32), "scale")],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
          directory / "model.onnx")
    Manifest(
        kind="morphology", name="head", model_version="1", created="2026-01-01T00:00:00+00:00",
        input=InputSpec(name="crops", shape=[-1, 1, 64, 64], color="gray", mean=[0.5], std=[0.5]),
        outputs=[TensorSpec(name="scores", shape=[-1])],
        morphology=MorphologySpec(part="head", threshold=0.3),
        onnx_sha256=sha256_file(directory / "model.onnx"),
    ).save(directory)
    return directory


@pytest.fixture(autouse=True)
def _no_gpu_device(monkeypatch):
    """Tests decide the device profile themselves (subprocesses inherit it)."""
    monkeypatch.setenv("SMEARSIGHT_COMPUTE_CAPABILITY", "none")
    monkeypatch.setenv("SMEARSIGHT_TENSORRT_VERSION", "none")
    monkeypatch.delenv("SMEARSIGHT_DEPLOY_CRASH_AT", raising=False)
    monkeypatch.delenv("SMEARSIGHT_DEPLOY_FAIL_WRITE_AFTER", raising=False)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """Three ONNX-only bundles (versions 1.0, 1.1, 1.2) of a detector + a morphology model."""
    from smearsight.deploy.bundle import build_bundle

    base = tmp_path_factory.mktemp("bundles")
    morph = make_morphology(base / "models" / "head")
    out = {}
    for seed, version in enumerate(["1.0", "1.1", "1.2"]):
        det = make_detector(base / "models" / f"det{seed}", seed=seed)
        out[version] = base / f"smearsight-{version}.tar.gz"
        build_bundle([det, morph], version, out[version])
    return out


@pytest.fixture
def repo(tmp_path):
    from smearsight.deploy.repository import FileRepository

    return FileRepository.init(tmp_path / "repo")


@pytest.fixture
def device_root(tmp_path, repo):
    from smearsight.deploy.install import provision

    root = tmp_path / "device"
    provision(root, repo.meta_dir / "1.root.json")
    return root


@pytest.fixture(scope="session")
def factory():
    """The model builders (test modules cannot import conftest under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(detector=make_detector, morphology=make_morphology)


@pytest.fixture
def serve():
    """Start a real HTTP server on 127.0.0.1 for a repository directory; returns its URL."""
    import threading

    from smearsight.deploy.repository import make_server

    servers = []

    def start(repo_dir) -> str:
        server = make_server(repo_dir)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
