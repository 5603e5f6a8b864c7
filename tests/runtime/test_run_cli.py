"""`smearsight run` through the real CLI entry point on tiny ONNX models."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from smearsight.cli import main
from smearsight.runtime import pipeline as pl

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    return tiny.build_model_set(tmp_path_factory.mktemp("models"), image_size=(64, 96), seed=2,
                                score_threshold=0.2)


def test_run_folder_to_null_with_stats(models, tmp_path):
    src = tmp_path / "frames"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(src / f"{i}.png"), rng.integers(0, 256, size=(96, 144, 3), dtype=np.uint8))
    stats = tmp_path / "stats.json"
    rc = main(["run", f"file://{src}/", "null://", "--models", str(models), "--backend", "onnx", "--headless",
               "--max-frames", "2", "--stats-json", str(stats), "--record", str(tmp_path / "rec.db")])
    assert rc == 0
    data = json.loads(stats.read_text())
    assert data["frames"] == 2 and data["fps"] > 0 and data["backend"] == "onnxruntime-cpu"
    assert data["morphology_parts"] == ["head", "vacuole"]
    assert data["latency_ms"]["infer"] > 0 and "decode_nms" in data["latency_ms"]
    assert data["session_id"] >= 1


def test_no_arguments_runs_builtin_default(models, tmp_path, monkeypatch, capfd):
    # the packaged demo models are placed by the lead; stand a tiny set in their place
    monkeypatch.setattr(pl, "packaged_models_root", lambda: models)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--max-frames", "2", "--stats-json", "s.json"])
    assert rc == 0
    err = capfd.readouterr().err
    assert "no display" in err and "smearsight-out.mp4" in err
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["source"] == "synth://" and data["frames"] == 2
    assert (tmp_path / "smearsight-out.mp4").stat().st_size > 0


def test_missing_models_and_bad_flags_are_one_line_errors(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(pl, "packaged_models_root", lambda: tmp_path / "none")
    assert main(["run", "--headless", "--max-frames", "1"]) == 1
    assert "demo models are not installed" in capfd.readouterr().err
    assert main(["run", "--backend", "tpu", "--max-frames", "1"]) == 1
    assert "--backend" in capfd.readouterr().err
    assert main(["run", "--models", str(tmp_path / "nope"), "--headless"]) == 1
    assert "no such folder" in capfd.readouterr().err


def test_headless_refuses_a_window(models, capfd):
    rc = main(["run", "synth://", "display://0", "--models", str(models), "--headless", "--max-frames", "1"])
    assert rc == 1
    assert "--headless" in capfd.readouterr().err


def test_builtin_demo_models_int8_and_carried_morphology(tmp_path):
    """The shipped demo pair on synth:// for real: the int8 detector on a CPU-only machine, and each sperm
    judged about once while the stage moves (far fewer crops than sperm detections)."""
    from smearsight.runtime.backends import cpu_only

    stats = tmp_path / "s.json"
    assert main(["run", "synth://", "null://", "--max-frames", "12", "--stats-json", str(stats)]) == 0
    data = json.loads(stats.read_text())
    assert data["frames"] == 12 and data["fps_steady"] > 0
    assert data["precision"] == ("int8" if cpu_only() else "fp32")
    sperm = data["counts"]["immature_sperm"] + data["counts"]["mature_sperm"]
    assert data["morphology_reuse"] and 0 < data["morphology_crops_judged"] < sperm / 3
    assert main(["run", "synth://", "null://", "--max-frames", "3", "--precision", "fp32",
                 "--morphology-every-frame", "--stats-json", str(stats)]) == 0
    data = json.loads(stats.read_text())
    sperm = data["counts"]["immature_sperm"] + data["counts"]["mature_sperm"]
    assert data["precision"] == "fp32" and data["morphology_crops_judged"] == sperm and data["fps_steady"] is None
