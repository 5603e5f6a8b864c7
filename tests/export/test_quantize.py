"""INT8 quantization of a detector: a real ONNX Runtime static QDQ quantization of an exported tiny detector."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from smearsight.cli import main
from smearsight.errors import InputError, SmearSightError
from smearsight.export.quantize import match_detections, quantize_detector
from smearsight.manifest import load_manifest, verify_files

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def float_model(tiny_detector_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("det_fp32")
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def int8_model(float_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "det_int8"
    report_path = out.parent / "report.json"
    code = main(["export", "int8", str(float_model), "--out", str(out), "--count", "4", "--check-count", "3",
                 "--min-agreement", "0", "--json", str(report_path)])
    assert code == 0
    return out, json.loads(report_path.read_text())


def test_match_detections_is_one_to_one_by_class_and_iou():
    ref = np.array([[0, 0, 10, 10, 0.9, 1], [20, 20, 30, 30, 0.8, 2], [0, 0, 10, 10, 0.7, 1]], np.float32)
    got = np.array([[1, 1, 10, 10, 0.6, 1], [20, 20, 30, 30, 0.5, 3], [40, 40, 50, 50, 0.4, 1]], np.float32)
    # box 0 matches (IoU 0.81); box 1 has another class; the duplicate of box 0 finds nothing left
    assert match_detections(ref, got) == 1
    assert match_detections(ref, got[:0]) == 0
    assert match_detections(ref[:2], ref[:2]) == 2


def test_int8_model_is_quantized_and_follows_the_float_model(float_model, int8_model):
    out, report = int8_model
    manifest = load_manifest(out)
    source = load_manifest(float_model)
    assert manifest.precision == "int8" and manifest.model_version == source.model_version + "+int8"
    assert manifest.quantization.float_onnx_sha256 == source.onnx_sha256
    assert manifest.quantization.frames == report["calibration_frames"] == 4
    assert manifest.quantization.agreement == pytest.approx(report["agreement"], abs=1e-4)
    assert verify_files(out) == []
    graph = onnx.load(str(out / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 10
    # the stem (reads the image) stays float: its weight is a float initializer, not a DequantizeLinear output
    stem = next(n for n in graph.node if n.op_type == "Conv" and graph.input[0].name in n.input)
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert stem.input[1] in floats and stem.input[1] not in dequantized
    other_convs = [n for n in graph.node if n.op_type == "Conv" and n is not stem]
    assert other_convs and all(n.input[1] in dequantized for n in other_convs)
    # 7-bit weights by default (reduce_range: no VPMADDUBSW saturation on AVX2-only CPUs)
    peak = max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max()) for t in int8_weights)
    assert 32 < peak <= 64
    assert 0 < report["matched"] <= min(report["float_detections"], report["int8_detections"])

    # independent check of the numbers: the int8 logits track the float ones closely on a real input
    x = np.random.default_rng(3).uniform(-1, 1, size=source.input.shape).astype(np.float32)
    ref = ort.InferenceSession(str(float_model / "model.onnx"), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    a = ref.run(["class_logits"], {"images": x})[0].ravel()
    b = q.run(["class_logits"], {"images": x})[0].ravel()
    assert not np.array_equal(a, b)
    assert np.corrcoef(a, b)[0, 1] > 0.98
    assert np.abs(a - b).mean() < 0.1 * np.abs(a).mean() + 0.05


def test_full_range_uses_all_8_bits(float_model, tmp_path):
    killed = tmp_path / ".full.k1ll3d00.staging" / "model"  # what a kill -9 of an earlier try leaves
    killed.mkdir(parents=True)
    quantize_detector(float_model, tmp_path / "full", count=2, check_count=1, reduce_range=False, min_agreement=0)
    graph = onnx.load(str(tmp_path / "full" / "model.onnx")).graph
    peak = max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max())
               for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert peak > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_quantize_refuses_bad_requests_and_writes_nothing(float_model, int8_model, tmp_path,
                                                          tiny_morphology_checkpoint):
    out, report = int8_model
    with pytest.raises(InputError, match="precision 'int8'"):
        quantize_detector(out, tmp_path / "again")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not an empty folder"):
        quantize_detector(float_model, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    morph = tmp_path / "morph"
    assert main(["export", "onnx", "--weights", str(tiny_morphology_checkpoint), "--out", str(morph)]) == 0
    with pytest.raises(InputError, match="only detector models"):
        quantize_detector(morph, tmp_path / "m8")
    assert main(["export", "int8", str(float_model), "--out", str(tmp_path / "x"), "--min-agreement", "2"]) == 1
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match="a_file is a file, so the folder cannot be created"):
        quantize_detector(float_model, tmp_path / "a_file" / "int8")


def test_badly_calibrated_int8_model_is_refused(tmp_path):
    """The trained demo detector calibrated on one flat grey frame: its activation ranges are far too
    narrow for real smears, the check finds the difference, and nothing is written."""
    import cv2

    from smearsight.runtime.pipeline import packaged_models_root

    flat = tmp_path / "flat"
    flat.mkdir()
    cv2.imwrite(str(flat / "grey.png"), np.full((96, 128, 3), 127, np.uint8))
    with pytest.raises(SmearSightError, match="int8 model rejected"):
        quantize_detector(packaged_models_root() / "detector", tmp_path / "rejected",
                          calibration=f"file://{flat}/", count=1, check_count=1, min_agreement=0.9)
    assert not (tmp_path / "rejected").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rejected")]


def test_shipped_int8_demo_detector_belongs_to_the_shipped_float_one():
    from smearsight.runtime.pipeline import packaged_models_root

    root = packaged_models_root()
    float_manifest, int8_manifest = load_manifest(root / "detector"), load_manifest(root / "detector_int8")
    assert int8_manifest.precision == "int8" and int8_manifest.quantization.agreement >= 0.9
    assert int8_manifest.quantization.float_onnx_sha256 == float_manifest.onnx_sha256
    assert int8_manifest.detector == float_manifest.detector and int8_manifest.input == float_manifest.input
    assert verify_files(root / "detector_int8") == []


def test_a_check_without_any_detection_does_not_pass_as_full_agreement(tiny_detector_checkpoint, tmp_path):
    """At a score threshold no anchor reaches, both models find nothing on the check frames: 0/0 used to count as
    agreement 1.0, pass any --min-agreement and be recorded in the manifest as measured."""
    blind = tmp_path / "blind"
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(blind),
                 "--score-threshold", "1.0"]) == 0
    with pytest.raises(SmearSightError, match="int8 model not checked: neither it nor the float model detects"):
        quantize_detector(blind, tmp_path / "int8", count=2, check_count=2, min_agreement=0.9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blind"]
    report = quantize_detector(blind, tmp_path / "unchecked", count=2, check_count=2, min_agreement=0)
    assert report.float_detections == report.int8_detections == 0
    assert load_manifest(tmp_path / "unchecked").quantization.agreement is None


def test_a_folder_with_an_fp16_engine_beside_its_float_model_is_quantized(float_model, tmp_path):
    """The README's order: export onnx --out DIR, export engine --out DIR (precision fp16 now describes the
    engine), export int8 DIR: its model.onnx is still the float32 graph, and was refused as 'precision fp16'."""
    import hashlib
    import shutil

    from smearsight.manifest import EngineSpec

    folder = tmp_path / "det"
    shutil.copytree(float_model, folder)
    (folder / "model.engine").write_bytes(b"an engine")
    manifest = load_manifest(folder)
    manifest.precision = "fp16"
    manifest.engine = EngineSpec(sha256=hashlib.sha256(b"an engine").hexdigest(),
                                 tensorrt_version="10.3.0", cuda_version="12.6", gpu_name="Orin",
                                 compute_capability="8.7")
    manifest.save(folder)
    quantize_detector(folder, tmp_path / "int8", count=2, check_count=1, min_agreement=0)
    int8 = load_manifest(tmp_path / "int8")
    assert int8.precision == "int8" and int8.engine is None and verify_files(tmp_path / "int8") == []
    assert int8.quantization.float_onnx_sha256 == manifest.onnx_sha256
