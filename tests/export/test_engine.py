import importlib.util
import os

import pytest

from smearsight.cli import main
from smearsight.export.engine import GpuInfo
from smearsight.manifest import load_manifest, verify_files

pytest.importorskip("torch")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def onnx_dir(tiny_detector_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_src")
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_engine_without_tensorrt_says_what_to_install(onnx_dir, tmp_path, capsys):
    rc = main(["export", "engine", "--onnx", str(onnx_dir / "model.onnx"), "--out", str(tmp_path), "--fp16"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "tensorrt is not installed" in err and "TensorRT comes with the device's CUDA stack" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "model.engine").exists()


def test_engine_missing_onnx_is_input_error(tmp_path):
    assert main(["export", "engine", "--onnx", str(tmp_path / "nope.onnx"), "--out", str(tmp_path)]) == 1


def test_engine_batch_profile_order_checked(onnx_dir, tmp_path):
    args = ["export", "engine", "--onnx", str(onnx_dir / "model.onnx"), "--out", str(tmp_path)]
    assert main([*args, "--min-batch", "4", "--opt-batch", "2"]) == 1


@pytest.mark.trt
def test_fp16_engine_build_records_environment(onnx_dir, tmp_path):
    timing_cache = tmp_path / "timing.cache"
    rc = main(["export", "engine", "--onnx", str(onnx_dir / "model.onnx"), "--out", str(tmp_path), "--fp16",
               "--timing-cache", str(timing_cache)])
    assert rc == 0
    manifest = load_manifest(tmp_path)
    assert manifest.precision == "fp16"
    engine = manifest.engine
    assert engine is not None and engine.tensorrt_version and engine.compute_capability
    assert engine.build_flags["fp16"] is True
    assert timing_cache.stat().st_size > 0
    assert verify_files(tmp_path) == []


def test_engine_refuses_a_model_that_its_manifest_does_not_name(onnx_dir, tiny_detector_checkpoint, tmp_path,
                                                                 capsys):
    """An export killed between its two renames leaves the new model beside the old manifest: an engine built
    from that pair would run one graph under another's contract. It is refused before any build."""
    import shutil

    other = tmp_path / "other"
    assert main(["export", "onnx", "--weights", str(tiny_detector_checkpoint), "--out", str(other),
                 "--image-size", "128x128"]) == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(onnx_dir, mixed)
    shutil.copyfile(other / "model.onnx", mixed / "model.onnx")
    capsys.readouterr()
    out = tmp_path / "engine"
    assert main(["export", "engine", "--onnx", str(mixed / "model.onnx"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{mixed / 'model.onnx'}: sha256" in err and "onnx_sha256" in err and "export the model again" in err
    assert len(err.strip().splitlines()) == 1
    shutil.copyfile(mixed / "model.onnx", mixed / "renamed.onnx")
    assert main(["export", "engine", "--onnx", str(mixed / "renamed.onnx"), "--out", str(out)]) == 1
    assert "names 'model.onnx' as its model" in capsys.readouterr().err
    assert not out.exists()


def test_engine_output_paths_are_checked_before_the_build(onnx_dir, tmp_path, capsys):
    args = ["export", "engine", "--onnx", str(onnx_dir / "model.onnx")]
    (tmp_path / "file").write_text("x")
    assert main([*args, "--out", str(tmp_path / "file")]) == 1
    assert "--out" in capsys.readouterr().err
    (tmp_path / "cache").mkdir()
    assert main([*args, "--out", str(tmp_path / "out"), "--timing-cache", str(tmp_path / "cache")]) == 1
    assert "--timing-cache" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("pycuda") is not None, reason="pycuda answers before nvidia-smi")
def test_gpu_query_without_a_working_driver_is_one_line(tmp_path, monkeypatch):
    """nvidia-smi is installed but the driver is not loaded (it says so and exits 9), as on a host whose kernel
    was updated: one line saying so, not a CalledProcessError traceback after the whole engine build."""
    from smearsight.errors import SmearSightError
    from smearsight.export.engine import query_gpu

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\n"
                   "exit 9\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SmearSightError, match="nvidia-smi cannot describe the GPU \\(NVIDIA-SMI has failed") as info:
        query_gpu()
    assert "\n" not in str(info.value)
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 9.0, 570.1'\necho '| CUDA Version: 12.8 |'\n")
    assert query_gpu() == GpuInfo("NVIDIA H200", "9.0", "12.8")


def test_strongly_typed_engines_are_not_recorded_as_fp16():
    """A strongly-typed network takes its types from the float32 ONNX model; the builder's FP16 flag is not set,
    so the manifest must not call the engine fp16 (the default --fp16 made it say so)."""
    from smearsight.export.engine import EngineOptions

    assert EngineOptions(fp16=True).flags()["fp16"] is True
    assert EngineOptions(fp16=True, strongly_typed=True).flags()["fp16"] is False


def test_engine_refuses_the_int8_model(tmp_path, capsys):
    from smearsight.runtime.pipeline import packaged_models_root

    int8 = packaged_models_root() / "detector_int8"
    assert main(["export", "engine", "--onnx", str(int8 / "model.onnx"), "--out", str(tmp_path / "e")]) == 1
    assert "precision 'int8'" in capsys.readouterr().err and not (tmp_path / "e").exists()
