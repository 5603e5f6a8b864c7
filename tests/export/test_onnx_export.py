import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from smearsight.anchors import AnchorConfig
from smearsight.cli import main
from smearsight.errors import InputError
from smearsight.manifest import load_manifest, verify_files

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def detector_export(tiny_detector_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("det_onnx")
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(out)]) == 0
    return out


def test_detector_graph_contract(detector_export, tiny_detector_checkpoint):
    manifest = load_manifest(detector_export)
    assert manifest.kind == "detector"
    assert manifest.input.shape == [1, 3, 64, 96]
    assert manifest.input.resize == "letterbox" and manifest.input.pad_value == 127  # as the trainer pads
    anchors = AnchorConfig(**manifest.detector.anchors.to_dict())
    a = anchors.num_anchors((64, 96))
    assert {o.name: o.shape for o in manifest.outputs} == {"class_logits": [1, a, 6], "box_regression": [1, a, 4]}
    model = onnx.load(str(detector_export / "model.onnx"))
    onnx.checker.check_model(model)
    assert not any(node.op_type in ("NonMaxSuppression", "TopK") for node in model.graph.node)
    assert verify_files(detector_export) == []
    assert manifest.source_checkpoint_sha256 and len(manifest.onnx_sha256) == 64


def test_detector_onnxruntime_matches_torch(detector_export, tiny_detector_checkpoint):
    from smearsight.train.checkpoint import load_checkpoint
    from smearsight.train.detector.torch_model import build_from_checkpoint

    x = np.random.default_rng(0).normal(size=(1, 3, 64, 96)).astype(np.float32)
    session = ort.InferenceSession(str(detector_export / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"images": x})
    with torch.no_grad():
        ref = build_from_checkpoint(load_checkpoint(tiny_detector_checkpoint))(torch.from_numpy(x))
    np.testing.assert_allclose(logits, ref[0].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(boxes, ref[1].numpy(), atol=1e-4, rtol=1e-4)


def test_export_check_passes_and_reports(detector_export, tiny_detector_checkpoint, tmp_path, capsys):
    report = tmp_path / "parity.json"
    rc = main(["export", "check", str(detector_export), "--weights", str(tiny_detector_checkpoint),
               "--count", "2", "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(report.read_text())
    assert data["fp32_ok"] and data["fp16_ok"]
    assert data["fp32"]["agreement"]["reference"] > 0  # there were detections to compare
    assert data["fp16"]["errors"][0]["max_abs"] > 0  # the reduced-precision run really differed
    assert "PASSED" in out


def test_export_check_fails_on_wrong_weights(detector_export, tiny_detector_checkpoint, tmp_path):
    from smearsight.train.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_detector_checkpoint)
    state = ckpt["state_dict"]
    ckpt["state_dict"] = {k: (v + 0.5 if v.is_floating_point() and v.ndim > 1 else v) for k, v in state.items()}
    other = tmp_path / "other.pt"
    save_checkpoint(other, ckpt)
    assert main(["export", "check", str(detector_export), "--weights", str(other), "--count", "1", "--no-fp16"]) == 1


def test_image_size_must_fit_stride(tiny_detector_checkpoint, tmp_path):
    from smearsight.export.onnx_export import export_checkpoint

    with pytest.raises(InputError, match="multiples of the largest stride 32"):
        export_checkpoint(tiny_detector_checkpoint, tmp_path, image_size=(60, 96))
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(tmp_path),
                 "--image-size", "60x96"]) == 1
    assert not (tmp_path / "model.onnx").exists()


def test_export_at_another_size_keeps_cells_at_their_trained_pixel_size(tiny_detector_checkpoint, tmp_path):
    """At the training size frames are letterboxed as in training; at a larger size they are only padded,
    so a frame of the training size is not enlarged (its cells would double) and the manifest says so."""
    from smearsight.export.onnx_export import export_checkpoint
    from smearsight.manifest import load_manifest as load
    from smearsight.runtime.preprocess import geometry

    export_checkpoint(tiny_detector_checkpoint, tmp_path / "big", image_size=(128, 192))
    spec = load(tmp_path / "big").input
    assert spec.resize == "pad" and spec.shape == [1, 3, 128, 192]
    box, resized = geometry((64, 96), spec)  # a frame of the training size
    assert (box.scale_x, box.scale_y, resized) == (1.0, 1.0, (64, 96))


def test_operating_point_comes_from_the_checkpoint_or_the_command_line(detector_export, tiny_detector_checkpoint,
                                                                      tiny_morphology_checkpoint, tmp_path, capsys):
    spec = load_manifest(detector_export).detector
    assert (spec.pre_nms_topk, spec.max_detections) == (1000, 1000)  # the checkpoint's thresholds
    out = tmp_path / "caps"
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(out),
                 "--pre-nms-topk", "4000", "--max-detections", "1500"]) == 0
    spec = load_manifest(out).detector
    assert (spec.pre_nms_topk, spec.max_detections, spec.score_threshold) == (4000, 1500, 0.5)
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(tmp_path / "t"),
                 "--score-threshold", "0.55"]) == 0
    spec = load_manifest(tmp_path / "t").detector
    assert (spec.score_threshold, spec.pre_nms_topk, spec.iou_threshold) == (0.55, 1000, 0.5)
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(tmp_path / "t2"),
                 "--score-threshold", "1.5"]) == 1
    assert "--score-threshold 1.5: must lie in [0, 1]" in capsys.readouterr().err
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(tmp_path / "zero"),
                 "--pre-nms-topk", "0"]) == 1
    assert "pre_nms_topk 0: detection caps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()
    assert main(["export", "onnx", "--weights", str(tiny_morphology_checkpoint), "--out", str(tmp_path / "m"),
                 "--max-detections", "10"]) == 1
    assert "apply to detector checkpoints, not morphology" in capsys.readouterr().err


def test_export_over_an_earlier_one_replaces_the_pair_and_clears_killed_writes(tiny_detector_checkpoint, tmp_path):
    out = tmp_path / "model"
    args = ["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(out)]
    assert main([*args, "--score-threshold", "0.4"]) == 0
    killed = [out / ".model.onnx.k1ll3d00.tmp", out / ".manifest.json.k1ll3d01.tmp"]  # what a kill -9 leaves
    for stale in killed:
        stale.write_bytes(b"\0" * 100)
    assert main([*args, "--score-threshold", "0.6"]) == 0
    manifest = load_manifest(out)
    assert manifest.detector.score_threshold == 0.6
    assert verify_files(out, manifest) == []  # the new model is the one the new manifest names
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]


def test_inspect_detects_tampering(detector_export, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(detector_export, copy)
    assert main(["export", "inspect", str(copy)]) == 0
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    assert main(["export", "inspect", str(copy)]) == 1
    assert "does not match" in capsys.readouterr().out
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["detector"]["iou_threshold"] = "high"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", "inspect", str(copy)]) == 1


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    assert main(["export", "onnx", "--weights", str(tmp_path / "none.pt"), "--out", str(tmp_path)]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_compare_detections_excuses_only_unmatched_borderline_boxes():
    from smearsight.export.parity import compare_detections

    ref = np.array([[0, 0, 10, 10, 0.301, 0], [20, 20, 30, 30, 0.3005, 0], [50, 50, 60, 60, 0.95, 0]], np.float32)
    # a confident box missing: the two matched borderline ones must not excuse it
    missing = compare_detections((ref, 3), (ref[:2], 2), score_threshold=0.3)
    assert missing.matched == 2 and missing.borderline == 0 and not missing.ok
    # a box right at the threshold missing on one side: excused
    at_threshold = compare_detections((ref, 3), (ref[[0, 2]], 2), score_threshold=0.3)
    assert at_threshold.matched == 2 and at_threshold.borderline == 1 and at_threshold.ok


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_export_check_on_a_damaged_model_is_one_line_error(detector_export, tiny_detector_checkpoint, tmp_path,
                                                          capsys, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(detector_export, broken)
    if damage == "missing":
        (broken / "model.onnx").unlink()
    else:
        (broken / "model.onnx").write_bytes(b"not an onnx model")
    rc = main(["export", "check", str(broken), "--weights", str(tiny_detector_checkpoint), "--count", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "model.onnx" in err and ("missing" in err if damage == "missing" else "sha256" in err)


def test_onnx_session_errors_are_input_errors(tmp_path):
    from smearsight.export.parity import run_onnx

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"model.onnx: onnxruntime cannot load it"):
        run_onnx(bad, np.zeros((1, 3, 8, 8), np.float32), "images", batch_one=True)


def _edited_checkpoint(source, path, edit):
    """A copy of ``source`` edited by hand (torch.save: save_checkpoint refuses to write such files)."""
    from smearsight.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(source)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


def test_checkpoints_that_cannot_make_a_working_model_are_one_line_errors(tiny_detector_checkpoint, tmp_path,
                                                                          capsys):
    """Each of these gave a traceback, or an export the device failed on at every frame."""
    five = _edited_checkpoint(tiny_detector_checkpoint, tmp_path / "five.pt",
                              lambda c: c.__setitem__("class_names", c["class_names"][:-1]))
    bare = _edited_checkpoint(tiny_detector_checkpoint, tmp_path / "bare.pt", lambda c: c.__setitem__("thresholds", {}))
    gray = _edited_checkpoint(tiny_detector_checkpoint, tmp_path / "gray.pt",
                              lambda c: c["normalization"].__setitem__("mean", [0.5]))
    image = tmp_path / "cells.png"
    import cv2

    cv2.imwrite(str(image), np.full((64, 96, 3), 200, np.uint8))
    cases = [
        (["export", "onnx", "--weights", str(five)], "lists 5 classes but the network scores 6"),
        (["predict", "detector", str(image), "--weights", str(five)], "lists 5 classes but the network scores 6"),
        (["predict", "detector", str(image), "--weights", str(bare)], "thresholds.score"),
        (["export", "onnx", "--weights", str(gray)], "mean/std need 3 values"),
        (["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--opset", "100"], "--opset 100"),
        (["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--max-detections", str(10**11)],
         "max_detections"),
    ]
    for n, (args, expected) in enumerate(cases):
        out = tmp_path / f"out{n}"
        assert main([*args, "--out", str(out)]) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1] and "Traceback" not in "\n".join(err), (args, err[-3:])
        assert not out.exists() or not any(out.iterdir()), args


def test_output_paths_are_checked_before_the_work(detector_export, tiny_detector_checkpoint, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("keep me")
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(a_file)]) == 1
    assert "is a file; expected a folder" in capsys.readouterr().err and a_file.read_text() == "keep me"
    assert main(["export", "check", str(detector_export), "--weights", str(tiny_detector_checkpoint), "--count", "1",
                 "--no-fp16", "--json", str(tmp_path)]) == 1
    assert "--json" in capsys.readouterr().err
    assert main(["export", "int8", str(detector_export), "--out", str(tmp_path / "q8"), "--json", str(tmp_path)]) == 1
    assert "--json" in capsys.readouterr().err and not (tmp_path / "q8").exists()


def test_predict_refuses_before_writing_anything(tiny_detector_checkpoint, tmp_path, capsys):
    import cv2

    good, named, corrupt = tmp_path / "good.png", tmp_path / "detections.png", tmp_path / "corrupt.png"
    for path in (good, named):
        cv2.imwrite(str(path), np.full((64, 96, 3), 200, np.uint8))
    corrupt.write_bytes(b"\x89PNG not really")
    for images, flags, expected in (
        ([good, corrupt], [], "corrupt.png"),  # before: good.json and good_pred.jpg were left behind
        ([good, named], [], "would overwrite the summary detections.json"),
        ([good], ["--score-threshold", "2"], "--score-threshold 2.0: must lie in [0, 1]"),
        ([good], ["--score-threshold", "nan"], "must lie in [0, 1]"),
    ):
        out = tmp_path / "out"
        rc = main(["predict", "detector", *map(str, images), "--weights", str(tiny_detector_checkpoint),
                   "--out", str(out), *flags])
        assert rc == 1 and expected in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir()), images


def test_onnx_runtime_refuses_a_manifest_whose_output_shape_differs_from_the_graph(detector_export, tmp_path):
    import shutil

    from smearsight.runtime.backends.onnxruntime import OnnxRuntimeBackend

    edited = tmp_path / "edited"
    shutil.copytree(detector_export, edited)
    data = json.loads((edited / "manifest.json").read_text())
    data["outputs"][0]["shape"] = [1, -1, data["outputs"][0]["shape"][2]]  # agrees with the anchors and classes
    data["outputs"][0]["shape"].insert(1, 7)  # ... but now one dimension more than the graph's
    (edited / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="has shape .* but the manifest says"):
        OnnxRuntimeBackend(edited, load_manifest(edited))


def test_export_check_compares_the_manifest_with_the_checkpoint(detector_export, tiny_detector_checkpoint, tmp_path,
                                                                capsys):
    """Parity runs on inputs built from the manifest, so it passed a manifest with the wrong normalisation,
    anchors or class order (each would make the device's boxes or labels wrong)."""
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(detector_export, edited)
    data = json.loads((edited / "manifest.json").read_text())
    data["input"]["mean"] = [0.0, 0.0, 0.0]
    data["detector"]["class_names"] = data["detector"]["class_names"][::-1]
    data["detector"]["anchors"]["base_sizes"] = [2 * b for b in data["detector"]["anchors"]["base_sizes"]]
    (edited / "manifest.json").write_text(json.dumps(data))
    rc = main(["export", "check", str(edited), "--weights", str(tiny_detector_checkpoint), "--count", "1",
               "--no-fp16"])
    err = capsys.readouterr().err
    assert rc == 1 and "disagrees with" in err
    for field in ("input.mean", "detector.class_names", "detector.anchors"):
        assert field in err, field


def test_a_nan_output_fails_parity_whichever_output_it_is():
    """max() of [1e-6, nan] is 1e-6: a NaN in the second output (box_regression) passed the fp32 check."""
    from smearsight.export.parity import Agreement, Comparison, OutputError, ParityReport

    for errors in ([OutputError("class_logits", 1e-6, 1e-6), OutputError("box_regression", np.nan, np.nan)],
                   [OutputError("class_logits", np.nan, np.nan), OutputError("box_regression", 1e-6, 1e-6)]):
        report = ParityReport("detector", 4, Comparison("onnxruntime fp32", errors, Agreement(0, 0, 0)))
        assert not report.fp32_ok
    good = [OutputError("class_logits", 1e-6, 1e-6), OutputError("box_regression", 2e-6, 1e-6)]
    assert ParityReport("detector", 4, Comparison("onnxruntime fp32", good, Agreement(3, 3, 3))).fp32_ok


def test_an_export_killed_between_its_two_renames_is_refused_by_every_reader(tiny_detector_checkpoint, tmp_path,
                                                                              capsys):
    """kill -9 after model.onnx replaced the old one but before manifest.json did: the new model sits beside the
    old manifest. The manifest's onnx_sha256 no longer matches, and every command that reads the folder says so
    in one line instead of using the pair."""
    import os
    import subprocess
    import sys

    from smearsight.runtime.backends import open_backend

    out = tmp_path / "model"
    args = ["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(out)]
    assert main([*args, "--image-size", "128x128"]) == 0
    old_manifest = (out / "manifest.json").read_bytes()
    kill_after_model = (
        "import os, sys\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    real(src, dst)\n"
        "    if str(dst).endswith('model.onnx'):\n"
        "        os.kill(os.getpid(), 9)\n"
        "os.replace = replace\n"
        "from smearsight.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", kill_after_model, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == -9, proc.stderr
    assert (out / "manifest.json").read_bytes() == old_manifest  # the mixed pair
    assert verify_files(out) and "onnx_sha256" in verify_files(out)[0]
    weights = str(tiny_detector_checkpoint)
    for command in (["export", "inspect", str(out)], ["export", "check", str(out), "--weights", weights],
                    ["export", "int8", str(out), "--out", str(tmp_path / "int8")],
                    ["export", "engine", "--onnx", str(out / "model.onnx"), "--out", str(tmp_path / "engine")],
                    ["deploy", "bundle", str(out), "--version", "1.0", "--out", str(tmp_path / "b.tar.gz")]):
        capsys.readouterr()
        assert main(command) == 1, command
        said = capsys.readouterr()
        assert "model.onnx" in said.out + said.err and "Traceback" not in said.err, command
    with pytest.raises(InputError, match="does not match the manifest's onnx_sha256"):
        open_backend(out, "onnx")
    assert not (tmp_path / "int8").exists() and not (tmp_path / "engine").exists()
    assert not (tmp_path / "b.tar.gz").exists()


@pytest.mark.parametrize("which", ["detector", "morphology"])
def test_export_shows_no_tracer_warnings(which, tiny_detector_checkpoint, tiny_morphology_checkpoint, tmp_path):
    """The tracer's warnings about shape-dependent branches are expected at a fixed input size: not shown."""
    import warnings

    import torch

    ckpt = tiny_detector_checkpoint if which == "detector" else tiny_morphology_checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", "onnx", "--weights", str(ckpt), "--out", str(tmp_path / "m")]) == 0
    assert [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)] == []
