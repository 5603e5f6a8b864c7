"""Tiny real ONNX models (built with onnx.helper, no torch) + manifests for the runtime tests.

Loaded by path by the ``tiny`` fixture (tests/runtime/conftest.py), so no package import is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smearsight.anchors import AnchorConfig
from smearsight.fileio import sha256_file
from smearsight.manifest import DetectorSpec, InputSpec, Manifest, MorphologySpec, TensorSpec

TINY_ANCHORS = AnchorConfig(levels=[3], base_sizes=[12.0], scales=[1.0], aspect_ratios=[1.0])


def _save(model, out_dir: Path, manifest: Manifest) -> Path:
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_dir / "model.onnx"))
    manifest.onnx_sha256 = sha256_file(out_dir / "model.onnx")
    manifest.save(out_dir)
    return out_dir


def detector_weights(num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    wc = rng.normal(0, 4.0, size=(num_classes, 3)).astype(np.float32)
    bc = rng.normal(-2.5, 0.5, size=num_classes).astype(np.float32)
    wb = rng.normal(0, 0.2, size=(4, 3)).astype(np.float32)
    bb = np.zeros(4, np.float32)
    return wc, bc, wb, bb


def build_detector(out_dir: Path, image_size=(64, 96), class_names=None, seed: int = 0,
                   score_threshold: float = 0.3, max_detections: int = 50, resize: str = "letterbox") -> Path:
    """A stride-8 'detector': 8x8 average pool, then 1x1 convs to class logits and box deltas.

    One anchor per stride-8 cell (``TINY_ANCHORS``), outputs ``[1, A, C]`` and ``[1, A, 4]``.
    """
    from onnx import TensorProto, helper, numpy_helper

    class_names = list(class_names or ["sertoli", "spermatocyte", "round_spermatid", "elongated_spermatid",
                                       "immature_sperm", "mature_sperm"])
    c = len(class_names)
    h, w = image_size
    a = (h // 8) * (w // 8)
    wc, bc, wb, bb = detector_weights(c, seed)
    inits = [
        numpy_helper.from_array(wc.reshape(c, 3, 1, 1), "wc"), numpy_helper.from_array(bc, "bc"),
        numpy_helper.from_array(wb.reshape(4, 3, 1, 1), "wb"), numpy_helper.from_array(bb, "bb"),
        numpy_helper.from_array(np.array([1, a, c], np.int64), "shape_c"),
        numpy_helper.from_array(np.array([1, a, 4], np.int64), "shape_b"),
    ]
    nodes = [
        helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Conv", ["pooled", "wc", "bc"], ["cmap"]),
        helper.make_node("Conv", ["pooled", "wb", "bb"], ["bmap"]),
        helper.make_node("Transpose", ["cmap"], ["ct"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["bmap"], ["bt"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["ct", "shape_c"], ["class_logits"]),
        helper.make_node("Reshape", ["bt", "shape_b"], ["box_regression"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("class_logits", TensorProto.FLOAT, [1, a, c]),
         helper.make_tensor_value_info("box_regression", TensorProto.FLOAT, [1, a, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = Manifest(
        kind="detector", name="tiny-detector", model_version="0.0.1",
        input=InputSpec(name="images", shape=[1, 3, h, w], mean=[0.5] * 3, std=[0.5] * 3, resize=resize),
        outputs=[TensorSpec(name="class_logits", shape=[1, a, c]), TensorSpec(name="box_regression", shape=[1, a, 4])],
        detector=DetectorSpec(class_names=class_names, anchors=TINY_ANCHORS, score_threshold=score_threshold,
                              iou_threshold=0.5, pre_nms_topk=100, max_detections=max_detections),
    )
    return _save(model, Path(out_dir), manifest)


def reference_detector_outputs(x: np.ndarray, seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy computation of the tiny detector's outputs for input ``x`` [1, 3, H, W]."""
    wc, bc, wb, bb = detector_weights(num_classes, seed)
    _, _, h, w = x.shape
    pooled = x[0].reshape(3, h // 8, 8, w // 8, 8).mean(axis=(2, 4)).reshape(3, -1).T  # [A, 3]
    return (pooled @ wc.T + bc)[None].astype(np.float32), (pooled @ wb.T + bb)[None].astype(np.float32)


def build_morphology(out_dir: Path, part: str = "head", threshold: float = 0.0, gain: float = 1.0) -> Path:
    """Score = gain * mean of the normalised 64x64 crop (dynamic batch)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["crops", "axes"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "gain"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_morphology",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["batch", 1, 64, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
         numpy_helper.from_array(np.array(gain, np.float32), "gain")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    manifest = Manifest(
        kind="morphology", name=f"tiny-{part}", model_version="0.0.1",
        input=InputSpec(name="crops", shape=[-1, 1, 64, 64], color="gray", mean=[0.5], std=[0.5], resize="stretch"),
        outputs=[TensorSpec(name="scores", shape=[-1])],
        morphology=MorphologySpec(part=part, threshold=threshold),
    )
    return _save(model, Path(out_dir), manifest)


def build_model_set(root: Path, image_size=(64, 96), parts=("head", "vacuole"), **kw) -> Path:
    """``root/detector`` + ``root/morphology_<part>`` like the packaged demo layout."""
    build_detector(Path(root) / "detector", image_size=image_size, **kw)
    for i, part in enumerate(parts):
        build_morphology(Path(root) / f"morphology_{part}", part=part, threshold=0.0, gain=1.0 + i)
    return Path(root)
