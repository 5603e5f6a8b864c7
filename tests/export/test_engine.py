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


@pytest.fixture
def stand_in_tensorrt(tmp_path, monkeypatch):
    """Where no NVIDIA GPU is (TensorRT cannot run without one): a stand-in for the few TensorRT 10 calls the
    build makes, whose "engine" is the ONNX bytes it parsed, and an nvidia-smi that describes an Orin."""
    import sys
    from types import SimpleNamespace

    if HAS_TRT:
        pytest.skip("the real TensorRT is installed here")
    parsed: list[bytes] = []

    class Config:
        def __init__(self):
            self.flags, self.cache = set(), b""

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            self.flags.add(flag)

        def create_timing_cache(self, data):
            self.cache = bytes(data) + b"+timed"
            return self.cache

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return SimpleNamespace(serialize=lambda: self.cache)

    network = SimpleNamespace(num_inputs=1, get_input=lambda i: SimpleNamespace(name="images", shape=(1, 3, 64, 96)))
    builder = SimpleNamespace(
        create_network=lambda flags: network, create_builder_config=Config,
        build_serialized_network=lambda net, config: b"ENGINE fp16=%d " % ("FP16" in config.flags) + parsed[-1])
    parser = SimpleNamespace(parse=lambda data, path: parsed.append(data) or True, num_errors=0)
    def logger(severity):
        return None

    logger.WARNING = 2
    trt = SimpleNamespace(
        __version__="10.3.0", Logger=logger, Builder=lambda log: builder, OnnxParser=lambda net, log: parser,
        MemoryPoolType=SimpleNamespace(WORKSPACE=0), BuilderFlag=SimpleNamespace(FP16="FP16"),
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'Orin, 8.7, 540.3'\necho '| CUDA Version: 12.6 |'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return parsed


def test_engine_model_and_manifest_are_written_as_one_set(onnx_dir, tmp_path, stand_in_tensorrt):
    out = tmp_path / "out"
    out.mkdir()
    killed = [out / ".model.engine.k1ll3d00.tmp", out / ".manifest.json.k1ll3d01.tmp"]  # what a kill -9 left
    for stale in killed:
        stale.write_bytes(b"\0" * 10)
    cache = tmp_path / "timing.cache"
    args = ["export", "engine", "--onnx", str(onnx_dir / "model.onnx"), "--out", str(out), "--timing-cache", str(cache)]
    assert main(args) == 0
    manifest = load_manifest(out)
    assert verify_files(out, manifest) == []  # the engine, the copied model and the manifest belong together
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.engine", "model.onnx"]
    assert (out / "model.engine").read_bytes().startswith(b"ENGINE fp16=1 ")
    assert manifest.precision == "fp16" and manifest.onnx_sha256 == load_manifest(onnx_dir).onnx_sha256
    engine = manifest.engine
    assert (engine.tensorrt_version, engine.gpu_name, engine.compute_capability, engine.cuda_version) == (
        "10.3.0", "Orin", "8.7", "12.6")
    assert cache.read_bytes() == b"+timed"
    assert main([*args, "--strongly-typed"]) == 0  # rebuilt in place: replaced, and no longer called fp16
    manifest = load_manifest(out)
    assert manifest.precision == "fp32" and manifest.engine.build_flags["fp16"] is False
    assert (out / "model.engine").read_bytes().startswith(b"ENGINE fp16=0 ") and verify_files(out) == []
