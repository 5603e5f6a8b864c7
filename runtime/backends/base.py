"""The inference backend interface every engine runner implements."""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from smearsight.errors import InputError
from smearsight.manifest import Manifest


class EngineMismatchError(InputError):
    """A TensorRT engine cannot run on this device (other TensorRT version or GPU)."""


class InferenceBackend(abc.ABC):
    """Runs one exported model. ``infer`` takes the pre-processed float32 NCHW input.

    Attributes:
        manifest: the model's manifest.
        name: e.g. ``"onnxruntime-cpu"``, ``"onnxruntime-cuda"``, ``"tensorrt"``.
        notes: plain-words remarks for the screen/log (e.g. why TensorRT was not used).
    """

    name: str = "backend"

    def __init__(self, model_dir: Path, manifest: Manifest) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.notes: list[str] = []

    @abc.abstractmethod
    def infer(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model; returns ``{output name: array}``. Arrays may be reused by the next call."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions, buffers and contexts."""

    def __enter__(self) -> InferenceBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_input(self, inputs: np.ndarray) -> None:
        """Raise InputError (plain words) when ``inputs`` does not match the manifest's input."""
        spec = self.manifest.input
        if inputs.dtype != np.float32:
            raise InputError(f"{self.manifest.name}: input must be float32, got {inputs.dtype}")
        if inputs.ndim != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, inputs.shape, strict=True)
        ):
            raise InputError(
                f"{self.manifest.name}: input shape {list(inputs.shape)} does not match the manifest's {spec.shape}"
            )
