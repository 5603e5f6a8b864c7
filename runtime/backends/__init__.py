"""Inference backends behind one interface: ONNX Runtime and TensorRT (chosen by flag and manifest)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Literal

from smearsight.errors import InputError, MissingDependencyError, first_line
from smearsight.manifest import load_manifest
from smearsight.runtime.backends.base import EngineMismatchError, InferenceBackend

__all__ = ["EngineMismatchError", "InferenceBackend", "cpu_only", "open_backend"]

log = logging.getLogger("smearsight.runtime")


def _tensorrt_importable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None


def cpu_only(backend: str = "auto") -> bool:
    """True when ``backend`` will run the detector on the CPU: no TensorRT (or ``backend`` is ``onnx``) and no
    ONNX Runtime CUDA provider. (onnxruntime-gpu lists its CUDA provider even on a machine without a GPU:
    such a machine counts as a GPU machine here.)"""
    if backend == "trt":
        return False
    if backend != "onnx" and _tensorrt_importable():
        return False
    try:
        import onnxruntime
    except ImportError:
        return True
    return "CUDAExecutionProvider" not in onnxruntime.get_available_providers()


def open_backend(
    model_dir: Path | str,
    backend: Literal["auto", "onnx", "trt"] = "auto",
    fallback_to_onnx: bool = True,
) -> InferenceBackend:
    """Open the model in ``model_dir`` (``manifest.json`` + ``model.onnx`` [+ engine]).

    ``auto`` uses the TensorRT engine when the manifest names one, TensorRT is installed and the
    engine matches this device, else ONNX Runtime. ``trt`` insists on the engine; when it cannot run
    (missing, other TensorRT version or GPU) the ONNX model is used instead if ``fallback_to_onnx``,
    and the reason is kept in ``backend.notes`` (``smearsight run`` shows and logs them); otherwise the
    reason is raised.
    """
    from smearsight.runtime.backends.onnxruntime import OnnxRuntimeBackend

    model_dir = Path(model_dir)
    if backend not in ("auto", "onnx", "trt"):
        raise InputError(f"--backend: '{backend}' is not one of auto, onnx, trt")
    manifest = load_manifest(model_dir)
    notes: list[str] = []
    want_trt = backend == "trt" or (backend == "auto" and manifest.engine is not None and _tensorrt_importable())
    if want_trt:
        from smearsight.runtime.backends.tensorrt import TensorRTBackend

        failure: Exception
        try:
            return TensorRTBackend(model_dir, manifest)
        except (InputError, MissingDependencyError) as exc:
            failure = exc
        except Exception as exc:  # CUDA or TensorRT itself failed: no usable GPU, a driver older than the CUDA stack
            failure = InputError(f"{model_dir}: TensorRT could not start ({first_line(exc)})")
            failure.__cause__ = exc
        if not fallback_to_onnx:
            raise failure
        notes.append(f"TensorRT not used: {failure}; running the ONNX model instead")
    result = OnnxRuntimeBackend(model_dir, manifest)
    result.notes[:0] = notes
    return result
