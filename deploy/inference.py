"""Running a bundled model for reference outputs and smoke tests.

Uses the runtime's :func:`smearsight.runtime.backends.open_backend` when it is available, so that the
smoke test loads models exactly as the runtime does; otherwise an ONNX Runtime CPU session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from smearsight.errors import InputError
from smearsight.manifest import InputSpec, Manifest, load_manifest

Backend = Literal["onnx", "trt"]


def reference_frame(spec: InputSpec) -> np.ndarray:
    """A deterministic uint8 frame ``[C, H, W]`` at the model's input size and channel order.

    Pure integer arithmetic, so that every platform and NumPy version produces the same bytes.
    """
    _, c, h, w = spec.shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64), indexing="ij")
    planes = [((xx * (3 + 2 * k) + yy * (5 + k) + (xx * yy) % (31 + 6 * k) + 40 * k) % 256) for k in range(c)]
    return np.stack(planes).astype(np.uint8)


def frame_to_input(frame: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Normalise a ``[C, H, W]`` uint8 frame into the ``[1, C, H, W]`` float32 model input."""
    x = frame.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std)[None].astype(np.float32)


def run_model(model_dir: Path, inputs: np.ndarray, backend: Backend = "onnx") -> dict[str, np.ndarray]:
    """Load the model in ``model_dir`` with ``backend`` and run ``inputs``; outputs by name."""
    model_dir = Path(model_dir)
    try:
        from smearsight.runtime.backends import open_backend
    except ImportError:
        open_backend = None
    if open_backend is not None:
        engine = open_backend(model_dir, backend, fallback_to_onnx=False)
        try:
            return {k: np.asarray(v) for k, v in engine.infer(inputs).items()}
        finally:
            engine.close()
    if backend != "onnx":
        raise InputError(f"{model_dir}: backend '{backend}' needs smearsight.runtime.backends")
    return _run_onnxruntime(model_dir, load_manifest(model_dir), inputs)


def _run_onnxruntime(model_dir: Path, manifest: Manifest, inputs: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    path = model_dir / manifest.onnx_file
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InputError(f"{path}: ONNX Runtime cannot load the model ({str(exc).splitlines()[0]})") from None
    names = [o.name for o in manifest.outputs]
    values = session.run(names, {manifest.input.name: inputs})
    return dict(zip(names, (np.asarray(v) for v in values), strict=True))
