import json

import pytest

from smearsight.anchors import AnchorConfig
from smearsight.errors import InputError
from smearsight.fileio import sha256_file
from smearsight.manifest import (
    DetectorSpec,
    EngineSpec,
    InputSpec,
    Manifest,
    MorphologySpec,
    TensorSpec,
    check_engine_compatibility,
    load_manifest,
    verify_files,
)

ANCHORS_64x96 = AnchorConfig().num_anchors((64, 96))


def detector_manifest(**overrides):
    fields = dict(
        kind="detector",
        name="test",
        model_version="0.1.0",
        input=InputSpec(name="images", shape=[1, 3, 64, 96], mean=[0.5] * 3, std=[0.5] * 3),
        outputs=[
            TensorSpec(name="class_logits", shape=[1, ANCHORS_64x96, 6]),
            TensorSpec(name="box_regression", shape=[1, ANCHORS_64x96, 4]),
        ],
        detector=DetectorSpec(class_names=list("abcdef"), anchors=AnchorConfig()),
    )
    fields.update(overrides)
    return Manifest(**fields)


def test_round_trip(tmp_path):
    manifest = detector_manifest()
    manifest.save(tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.image_size == (64, 96)


def test_morphology_manifest(tmp_path):
    m = Manifest(
        kind="morphology",
        name="head",
        model_version="1",
        input=InputSpec(name="crops", shape=[-1, 1, 64, 64], color="gray", mean=[0.5], std=[0.5]),
        outputs=[TensorSpec(name="scores", shape=[-1])],
        morphology=MorphologySpec(part="head", threshold=0.3),
    )
    m.save(tmp_path)
    assert load_manifest(tmp_path / "manifest.json").morphology.part == "head"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.pop("detector"), "needs a 'detector' section"),
        (lambda d: d.update(kind="segmenter"), "field 'kind'"),
        (lambda d: d["input"].update(shape=[1, 1, 64, 96]), "channels"),
        (lambda d: d["detector"].update(score_threshold=2), "detector.score_threshold"),
        (lambda d: d.update(surprise=1), "unknown field 'surprise'"),
        (lambda d: d["detector"].update(box_output="boxes"), "not among outputs"),
        (lambda d: d["input"].update(std=[float("nan")] * 3), "input.std"),
        (lambda d: d["input"].update(mean=[0.5, float("inf"), 0.5]), "input.mean"),
        (lambda d: d["input"].update(shape=[1, 3, 0, 96]), "dimensions must be positive"),
        (lambda d: d["outputs"][0].update(shape=[1, -5, 6]), "dimensions must be positive"),
        (lambda d: d["detector"].update(score_threshold="0.3"), "detector.score_threshold"),
        (lambda d: d["detector"].update(max_detections=True), "detector.max_detections"),
        (lambda d: d.update(onnx_file="../model.onnx"), "plain file name"),
    ],
)
def test_broken_manifests_rejected_with_field(tmp_path, mutate, expected):
    data = detector_manifest().to_dict()
    mutate(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        load_manifest(tmp_path)
    assert expected in str(info.value)
    assert "manifest.json" in str(info.value)


def test_not_json(tmp_path):
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(InputError, match="nested too deeply"):
        load_manifest(tmp_path)


def test_morphology_threshold_must_be_finite(tmp_path):
    data = Manifest(
        kind="morphology", name="head", model_version="1",
        input=InputSpec(name="crops", shape=[-1, 1, 64, 64], color="gray", mean=[0.5], std=[0.5]),
        outputs=[TensorSpec(name="scores", shape=[-1])],
        morphology=MorphologySpec(part="head", threshold=0.3),
    ).to_dict()
    data["morphology"]["threshold"] = float("nan")
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="morphology.threshold"):
        load_manifest(tmp_path)


def test_verify_files_detects_tampering(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    manifest = detector_manifest(onnx_sha256=sha256_file(tmp_path / "model.onnx"))
    manifest.save(tmp_path)
    assert verify_files(tmp_path) == []
    (tmp_path / "model.onnx").write_bytes(b"graph!")
    problems = verify_files(tmp_path)
    assert len(problems) == 1 and "does not match" in problems[0]
    (tmp_path / "model.onnx").unlink()
    assert "missing" in verify_files(tmp_path)[0]


def test_engine_compatibility_in_plain_words():
    engine = EngineSpec(
        sha256="0" * 64, tensorrt_version="10.3.0", cuda_version="12.6", gpu_name="Orin", compute_capability="8.7"
    )
    assert check_engine_compatibility(engine, "10.3.0", "8.7") is None
    assert "TensorRT 10.3.0" in check_engine_compatibility(engine, "10.7.0", "8.7")
    assert "compute capability 8.7" in check_engine_compatibility(engine, "10.3.0", "9.0")


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        (([1, ANCHORS_64x96, 5], [1, ANCHORS_64x96, 4]), "scores 5 classes but detector.class_names lists 6"),
        (([1, 100, 6], [1, 100, 4]), f"has 100 anchors but detector.anchors give {ANCHORS_64x96} at 64x96"),
        (([1, ANCHORS_64x96, 6], [1, ANCHORS_64x96, 5]), "must end in 4 box coordinates"),
    ],
)
def test_a_detector_manifest_that_disagrees_with_its_outputs_is_refused(tmp_path, outputs, expected):
    """Such a manifest (hand-edited, or from a checkpoint whose class list lost a name) failed on every frame
    of the device, which kept running and logging."""
    logits, deltas = outputs
    data = detector_manifest().to_dict()
    data["outputs"] = [{"name": "class_logits", "shape": logits}, {"name": "box_regression", "shape": deltas}]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=expected):
        load_manifest(tmp_path)
    dynamic = {**data, "outputs": [{"name": "class_logits", "shape": [-1, -1, 6]},
                                   {"name": "box_regression", "shape": [-1, -1, 4]}]}
    (tmp_path / "manifest.json").write_text(json.dumps(dynamic))
    assert load_manifest(tmp_path).detector.class_names == list("abcdef")  # dynamic dims are not checked


def test_max_detections_is_bounded(tmp_path):
    data = detector_manifest().to_dict()
    data["detector"]["max_detections"] = 10**11  # the device would allocate [max, 6] floats: 2 TiB
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="detector.max_detections"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(("names", "expected"), [(["a", "b", "a"], "'a' more than once"), (["a", " "], "non-empty")])
def test_detector_class_names_are_unique_and_named(tmp_path, names, expected):
    """Duplicates made the run's per-class counts keep only the last duplicate's (the record kept them all)."""
    data = detector_manifest().to_dict()
    data["detector"]["class_names"] = names
    data["outputs"] = [{"name": "class_logits", "shape": [1, -1, len(names)]},
                       {"name": "box_regression", "shape": [1, -1, 4]}]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=expected):
        load_manifest(tmp_path)
