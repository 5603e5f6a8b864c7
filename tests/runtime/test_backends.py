"""Backends: real onnxruntime sessions on tiny ONNX models; TensorRT refusal/fallback; TRT marked `trt`."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from smearsight.errors import InputError
from smearsight.runtime.backends import EngineMismatchError, open_backend

pytest.importorskip("onnx")


@pytest.fixture()
def detector_dir(tiny, tmp_path):
    return tiny.build_detector(tmp_path / "det", image_size=(64, 96), seed=3)


def test_onnxruntime_matches_numpy_reference(tiny, detector_dir):
    backend = open_backend(detector_dir, "onnx")
    try:
        assert backend.name == "onnxruntime-cpu"
        assert backend.manifest.kind == "detector"
        x = np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 64, 96)).astype(np.float32)
        out = backend.infer(x)
        want_c, want_b = tiny.reference_detector_outputs(x, seed=3, num_classes=6)
        np.testing.assert_allclose(out["class_logits"], want_c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["box_regression"], want_b, rtol=1e-5, atol=1e-5)
        first = out["class_logits"].copy()
        out2 = backend.infer(-x)  # outputs bound once: same arrays, new values
        assert out2["class_logits"] is out["class_logits"]
        assert not np.allclose(out2["class_logits"], first)
    finally:
        backend.close()


def test_dynamic_batch_morphology_model(tiny, tmp_path):
    d = tiny.build_morphology(tmp_path / "m", part="head", gain=2.0)
    with open_backend(d) as backend:
        for batch in (1, 5):
            x = np.random.default_rng(batch).normal(size=(batch, 1, 64, 64)).astype(np.float32)
            np.testing.assert_allclose(backend.infer(x)["scores"], 2.0 * x.mean(axis=(1, 2, 3)), rtol=1e-5,
                                       atol=1e-6)


def test_wrong_input_is_refused_in_plain_words(detector_dir):
    with open_backend(detector_dir, "onnx") as backend:
        with pytest.raises(InputError, match="does not match the manifest"):
            backend.infer(np.zeros((1, 3, 32, 32), np.float32))
        with pytest.raises(InputError, match="float32"):
            backend.infer(np.zeros((1, 3, 64, 96), np.float64))


def test_corrupt_or_missing_model_files(detector_dir, tmp_path):
    (detector_dir / "model.onnx").write_bytes((detector_dir / "model.onnx").read_bytes()[:-10] + b"0" * 10)
    with pytest.raises(InputError, match="sha256 does not match"):
        open_backend(detector_dir, "onnx")
    (detector_dir / "model.onnx").unlink()
    with pytest.raises(InputError, match="ONNX model missing"):
        open_backend(detector_dir, "onnx")
    with pytest.raises(InputError, match="manifest not found"):
        open_backend(tmp_path / "nowhere")
    with pytest.raises(InputError, match="not one of"):
        open_backend(tmp_path, "tpu")  # type: ignore[arg-type]


def _add_engine(model_dir: Path, trt_version="10.0.1", capability="8.7") -> None:
    (model_dir / "model.engine").write_bytes(b"not really an engine")
    data = json.loads((model_dir / "manifest.json").read_text())
    data["engine"] = {"file": "model.engine", "sha256": "", "tensorrt_version": trt_version, "cuda_version": "12.6",
                      "gpu_name": "Orin", "compute_capability": capability}
    (model_dir / "manifest.json").write_text(json.dumps(data))


def test_mismatched_engine_is_refused_and_falls_back(detector_dir, monkeypatch):
    # The device facts come from tensorrt + pycuda, absent here: stand in for that hardware edge only.
    import smearsight.runtime.backends.tensorrt as trt_backend

    _add_engine(detector_dir, trt_version="10.0.1", capability="8.7")
    monkeypatch.setattr(trt_backend, "device_facts", lambda device_index=0: ("10.3.0", "8.7", "Orin"))
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.0.1 but this device has TensorRT 10.3.0"):
        open_backend(detector_dir, "trt", fallback_to_onnx=False)
    backend = open_backend(detector_dir, "trt", fallback_to_onnx=True)
    assert backend.name == "onnxruntime-cpu"
    assert any("TensorRT 10.0.1" in n and "ONNX model instead" in n for n in backend.notes)
    monkeypatch.setattr(trt_backend, "device_facts", lambda device_index=0: ("10.0.1", "7.2", "Xavier"))
    with pytest.raises(EngineMismatchError, match="compute capability 8.7"):
        open_backend(detector_dir, "trt", fallback_to_onnx=False)


def test_unloadable_engine_releases_the_cuda_context(detector_dir, monkeypatch):
    # tensorrt + pycuda are absent here: stand in for that hardware edge only (a GPU context that counts
    # push/pop/detach and a runtime that cannot deserialise the file), then fall back to ONNX Runtime.
    import types

    import smearsight.runtime.backends.tensorrt as trt_backend

    calls: list[str] = []

    class _Ctx:
        def push(self):
            calls.append("push")

        def pop(self):
            calls.append("pop")

        def detach(self):
            calls.append("detach")

    class _Device:
        def __init__(self, index):
            pass

        def retain_primary_context(self):
            calls.append("retain")
            return _Ctx()

    class _Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return None

    fake_trt = types.ModuleType("tensorrt")
    fake_trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    fake_trt.Runtime = _Runtime
    fake_pycuda = types.ModuleType("pycuda")
    fake_driver = types.ModuleType("pycuda.driver")
    fake_driver.init = lambda: None
    fake_driver.Device = _Device
    fake_pycuda.driver = fake_driver
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.setitem(sys.modules, "pycuda", fake_pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", fake_driver)
    _add_engine(detector_dir, trt_version="10.3.0", capability="8.7")
    monkeypatch.setattr(trt_backend, "device_facts", lambda device_index=0: ("10.3.0", "8.7", "Orin"))
    with pytest.raises(InputError, match="could not deserialise"):
        open_backend(detector_dir, "trt", fallback_to_onnx=False)
    assert calls[0] == "retain" and calls[-1] == "detach"
    assert calls.count("push") == calls.count("pop") >= 1
    calls.clear()
    backend = open_backend(detector_dir, "trt", fallback_to_onnx=True)
    assert backend.name == "onnxruntime-cpu"
    assert calls[-1] == "detach" and calls.count("push") == calls.count("pop")


def test_a_gpu_that_cuda_cannot_start_falls_back_in_plain_words(detector_dir, monkeypatch):
    """TensorRT and pycuda installed, but no usable GPU (a driver older than the CUDA stack, a GPU gone): before,
    pycuda's own error escaped open_backend, so --backend auto/trt ended the run with a traceback instead of
    falling back to ONNX Runtime. tensorrt + pycuda are absent here: stand in for that hardware edge only."""
    import types

    class CudaError(Exception):  # pycuda._driver.Error's place
        pass

    def init():
        raise CudaError("cuInit failed: CUDA driver version is insufficient for CUDA runtime version\n(details)")

    fake_driver = types.ModuleType("pycuda.driver")
    fake_driver.init = init
    fake_pycuda = types.ModuleType("pycuda")
    fake_pycuda.driver = fake_driver
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "pycuda", fake_pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", fake_driver)
    _add_engine(detector_dir, trt_version="10.3.0", capability="8.7")
    with pytest.raises(InputError, match="TensorRT could not start \\(cuInit failed: CUDA driver version is "
                                         "insufficient for CUDA runtime version\\)$"):
        open_backend(detector_dir, "trt", fallback_to_onnx=False)
    backend = open_backend(detector_dir, "trt")
    assert backend.name == "onnxruntime-cpu"
    assert any("TensorRT not used" in n and "cuInit failed" in n and "ONNX model instead" in n
               for n in backend.notes)
    backend.close()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_trt_without_tensorrt_falls_back(detector_dir):
    _add_engine(detector_dir)
    backend = open_backend(detector_dir, "trt")
    assert backend.name.startswith("onnxruntime")
    assert any("not installed" in n for n in backend.notes)
    assert open_backend(detector_dir, "auto").name.startswith("onnxruntime")  # auto never insists on TRT


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(detector_dir):
    import tensorrt as trt

    from smearsight.fileio import sha256_file
    from smearsight.runtime.backends.tensorrt import device_facts

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((detector_dir / "model.onnx").read_bytes())
    config = builder.create_builder_config()
    engine_bytes = builder.build_serialized_network(network, config)
    (detector_dir / "model.engine").write_bytes(bytes(engine_bytes))
    version, capability, name = device_facts()
    data = json.loads((detector_dir / "manifest.json").read_text())
    data["engine"] = {"file": "model.engine", "sha256": sha256_file(detector_dir / "model.engine"),
                      "tensorrt_version": version, "cuda_version": "", "gpu_name": name,
                      "compute_capability": capability}
    (detector_dir / "manifest.json").write_text(json.dumps(data))
    x = np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 64, 96)).astype(np.float32)
    with open_backend(detector_dir, "trt", fallback_to_onnx=False) as engine, open_backend(detector_dir, "onnx") as ort:
        assert engine.name == "tensorrt"
        got = engine.infer(x)
        want = ort.infer(x)
        for key in ("class_logits", "box_regression"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=1e-3)


def test_runtime_modules_import_without_torch_tensorrt_pycuda():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'tensorrt', 'pycuda', 'timm', 'onnx'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import smearsight.runtime.postprocess, smearsight.runtime.cuda_postprocess, smearsight.runtime.preprocess\n"
        "import smearsight.runtime.backends.tensorrt, smearsight.runtime.backends.onnxruntime\n"
        "import smearsight.runtime.morphology_stage, smearsight.runtime.pipeline, smearsight.runtime.cli\n"
        "from smearsight.errors import MissingDependencyError\n"
        "from smearsight.runtime.backends.tensorrt import device_facts\n"
        "try:\n"
        "    device_facts()\n"
        "except MissingDependencyError as exc:\n"
        "    print('hint:', exc)\n"
        "assert not any(m.split('.')[0] in ('torch', 'tensorrt', 'pycuda') for m in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tensorrt is not installed" in proc.stdout


def test_cpu_only_follows_the_backend_asked_for():
    import onnxruntime

    from smearsight.runtime.backends import cpu_only

    no_cuda_provider = "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    assert cpu_only("trt") is False
    assert cpu_only("onnx") is no_cuda_provider  # TensorRT, installed or not, is not used with --backend onnx
