import json

import numpy as np
import onnxruntime as ort
import pytest

from smearsight.cli import main
from smearsight.manifest import load_manifest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def morphology_export(tiny_morphology_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("morph_onnx")
    assert main(["export", "onnx", "--weights", str(tiny_morphology_checkpoint), "--out", str(out)]) == 0
    return out


def test_morphology_graph_contract(morphology_export, tiny_morphology_checkpoint):
    from smearsight.train.checkpoint import load_checkpoint

    manifest = load_manifest(morphology_export)
    assert manifest.kind == "morphology" and manifest.input.color == "gray"
    assert manifest.input.shape == [-1, 1, 64, 64]
    assert [(o.name, o.shape) for o in manifest.outputs] == [("scores", [-1])]
    ckpt = load_checkpoint(tiny_morphology_checkpoint)
    assert manifest.morphology.part == "head"
    assert manifest.morphology.threshold == pytest.approx(ckpt["morphology"]["threshold"])
    session = ort.InferenceSession(str(morphology_export / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # dynamic batch
        x = np.random.default_rng(batch).normal(size=(batch, 1, 64, 64)).astype(np.float32)
        (scores,) = session.run(None, {"crops": x})
        assert scores.shape == (batch,)


def test_exported_graph_has_one_consistent_shape_per_tensor(morphology_export):
    """No stale value_info (onnxslim left a second, wrongly sized entry): shape inference gives one per tensor."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(morphology_export / "model.onnx"))
    assert len(model.graph.value_info) == 0
    names = [info.name for info in onnx.shape_inference.infer_shapes(model).graph.value_info]
    assert names and len(names) == len(set(names))


def test_morphology_parity_on_mhsma_like_crops(morphology_export, tiny_morphology_checkpoint, tmp_path, capsys):
    data = tmp_path / "mhsma"
    data.mkdir()
    np.save(data / "x_64_valid.npy", np.random.default_rng(3).integers(40, 200, (24, 64, 64)).astype(np.uint8))
    report = tmp_path / "r.json"
    rc = main(["export", "check", str(morphology_export), "--weights", str(tiny_morphology_checkpoint),
               "--data", str(data), "--count", "24", "--json", str(report)])
    assert rc == 0, capsys.readouterr().out
    result = json.loads(report.read_text())
    agreement = result["fp32"]["agreement"]
    assert agreement["reference"] == 24 and agreement["matched"] + agreement["borderline"] == 24


def test_check_refuses_kind_mismatch(morphology_export, tiny_detector_checkpoint, capsys):
    rc = main(["export", "check", str(morphology_export), "--weights", str(tiny_detector_checkpoint)])
    assert rc == 1
    assert "cannot be checked against a morphology model" in capsys.readouterr().err


def test_check_reports_missing_mhsma_file(morphology_export, tiny_morphology_checkpoint, tmp_path, capsys):
    rc = main(["export", "check", str(morphology_export), "--weights", str(tiny_morphology_checkpoint),
               "--data", str(tmp_path)])
    assert rc == 1
    assert "x_64_valid.npy" in capsys.readouterr().err


def test_check_refuses_mhsma_crops_of_the_wrong_shape(morphology_export, tiny_morphology_checkpoint, tmp_path,
                                                      capsys):
    np.save(tmp_path / "x_64_valid.npy", np.zeros((4, 32, 32), np.uint8))
    rc = main(["export", "check", str(morphology_export), "--weights", str(tiny_morphology_checkpoint),
               "--data", str(tmp_path)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "x_64_valid.npy" in err and "[N, 64, 64]" in err and "Traceback" not in err


@pytest.mark.parametrize("bad, expected", [
    ({"threshold": float("nan")}, "morphology.threshold"),
    ({"threshold": "0.3"}, "morphology.threshold"),
    ({"part": None}, "morphology.part"),
])
def test_export_of_a_bad_morphology_checkpoint_writes_nothing(tiny_morphology_checkpoint, tmp_path, capsys,
                                                              bad, expected):
    ckpt = torch.load(tiny_morphology_checkpoint, map_location="cpu", weights_only=False)
    ckpt["morphology"] = {**ckpt["morphology"], **bad}
    weights = tmp_path / "bad.pt"
    torch.save(ckpt, weights)  # written by hand or an old tool: save_checkpoint would refuse it
    out = tmp_path / "out"
    rc = main(["export", "onnx", "--weights", str(weights), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and expected in err and "Traceback" not in err
    assert not (out / "model.onnx").exists() and not (out / "manifest.json").exists()


def test_detector_only_options_are_refused_not_ignored(morphology_export, tiny_morphology_checkpoint,
                                                       tiny_detector_checkpoint, tmp_path, capsys):
    """--image-size on a morphology export and --data on a detector check were accepted and silently ignored."""
    out = tmp_path / "m"
    assert main(["export", "onnx", "--weights", str(tiny_morphology_checkpoint), "--out", str(out),
                 "--image-size", "128x128"]) == 1
    assert "--image-size applies to detector checkpoints" in capsys.readouterr().err and not out.exists()
    det = tmp_path / "det"
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(det)]) == 0
    capsys.readouterr()
    assert main(["export", "check", str(det), "--weights", str(tiny_detector_checkpoint), "--data",
                 str(tmp_path)]) == 1
    assert "MHSMA crops check morphology models" in capsys.readouterr().err
