"""TensorRT 10 backend: engine deserialised once; pinned host buffers, device buffers and one stream
allocated once; ``set_tensor_address`` + ``execute_async_v3`` per frame; explicit CUDA context
push/pop (no ``pycuda.autoinit``). tensorrt and pycuda are imported lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smearsight.errors import InputError, require
from smearsight.fileio import sha256_file
from smearsight.manifest import Manifest, check_engine_compatibility
from smearsight.runtime.backends.base import EngineMismatchError, InferenceBackend


def device_facts(device_index: int = 0) -> tuple[str, str, str]:
    """(TensorRT version, GPU compute capability "major.minor", GPU name) of this device."""
    trt = require("tensorrt", "running TensorRT engines")
    cuda = require("pycuda.driver", "running TensorRT engines")
    cuda.init()
    dev = cuda.Device(device_index)
    major, minor = dev.compute_capability()
    return str(trt.__version__), f"{major}.{minor}", str(dev.name())


def check_engine(model_dir: Path, manifest: Manifest) -> Path:
    """The engine file if it can run here; raises EngineMismatchError/InputError in plain words."""
    if manifest.engine is None:
        raise InputError(f"{model_dir}: the manifest names no TensorRT engine")
    path = Path(model_dir) / manifest.engine.file
    if not path.is_file():
        raise InputError(f"{path}: TensorRT engine missing (named by the manifest)")
    trt_version, capability, _ = device_facts()
    reason = check_engine_compatibility(manifest.engine, trt_version, capability)
    if reason:
        raise EngineMismatchError(f"{path}: {reason}")
    if manifest.engine.sha256 and sha256_file(path) != manifest.engine.sha256:
        raise InputError(f"{path}: sha256 does not match the manifest's engine.sha256; the engine file is corrupt "
                         "or belongs to another manifest (rebuild it with smearsight export engine)")
    return path


class TensorRTBackend(InferenceBackend):
    """Runs a serialized TensorRT 10 engine (FP16 or FP32) with pycuda buffers."""

    name = "tensorrt"

    def __init__(self, model_dir: Path, manifest: Manifest, device_index: int = 0) -> None:
        super().__init__(model_dir, manifest)
        path = check_engine(self.model_dir, manifest)
        trt = require("tensorrt", "running TensorRT engines")
        cuda = require("pycuda.driver", "running TensorRT engines")
        self._trt = trt
        self._cuda = cuda
        self.inputs: dict[str, tuple[Any, Any]] = {}
        self.outputs: dict[str, tuple[Any, Any]] = {}
        self._dynamic: set[str] = set()
        self.context = self.engine = None
        cuda.init()
        self._ctx = cuda.Device(device_index).retain_primary_context()
        try:
            self._load(path)
        except BaseException:
            self.close()  # frees what was allocated and releases the retained context (open_backend may fall back)
            raise

    def _load(self, path: Path) -> None:
        trt, cuda, manifest = self._trt, self._cuda, self.manifest
        self._ctx.push()
        try:
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise InputError(f"{path}: TensorRT could not deserialise the engine")
            self.context = self.engine.create_execution_context()
            self.stream = cuda.Stream()
            for i in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(i)
                is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                shape = list(self.engine.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    if not is_input:
                        shape = self._max_output_shape(name, shape)
                    else:
                        shape = list(self.engine.get_tensor_profile_shape(name, 0)[2])  # max of profile 0
                        self._dynamic.add(name)
                host = cuda.pagelocked_empty(int(np.prod(shape)), dtype)
                device = cuda.mem_alloc(max(host.nbytes, 1))
                self.context.set_tensor_address(name, int(device))
                (self.inputs if is_input else self.outputs)[name] = (host, device)
        finally:
            self._ctx.pop()
        if manifest.input.name not in self.inputs:
            raise InputError(f"{path}: engine inputs {sorted(self.inputs)} lack the manifest's '{manifest.input.name}'")

    def _max_output_shape(self, name: str, shape: list[int]) -> list[int]:
        # outputs with a dynamic batch: size them for the input profile's max batch
        inp = self.manifest.input.name
        max_batch = int(self.engine.get_tensor_profile_shape(inp, 0)[2][0])
        return [max_batch if d < 0 else d for d in shape]

    @property
    def context_handle(self) -> Any:
        """The pycuda context the engine runs in (for GPU post-processing on the same device)."""
        return self._ctx

    def output_dtype(self, name: str) -> np.dtype:
        return self.outputs[name][0].dtype

    def device_output(self, name: str) -> Any:
        """The device buffer of output ``name`` (valid after :meth:`enqueue`, in stream order)."""
        return self.outputs[name][1]

    def input_device(self) -> Any:
        """The device buffer of the model input (fill it, then :meth:`execute`)."""
        return self.inputs[self.manifest.input.name][1]

    def execute(self) -> None:
        """Launch the engine on :attr:`stream` with the input already on the device (batch as built).
        The caller has pushed :attr:`context_handle`."""
        name = self.manifest.input.name
        if name in self._dynamic:
            self.context.set_input_shape(name, tuple(max(d, 1) for d in self.manifest.input.shape))
        if not self.context.execute_async_v3(self.stream.handle):
            raise InputError(f"{self.manifest.name}: TensorRT execution failed")

    def enqueue(self, inputs: np.ndarray) -> None:
        """Copy the input in and launch the engine on :attr:`stream`, without waiting or copying back.
        The caller has pushed :attr:`context_handle`."""
        self.check_input(inputs)
        name = self.manifest.input.name
        host, device = self.inputs[name]
        n = inputs.size
        if n > host.size:
            raise InputError(f"{self.manifest.name}: batch {inputs.shape[0]} exceeds the engine's profile")
        np.copyto(host[:n], inputs.reshape(-1), casting="same_kind")
        if name in self._dynamic:
            self.context.set_input_shape(name, tuple(inputs.shape))
        self._cuda.memcpy_htod_async(device, host[:n], self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise InputError(f"{self.manifest.name}: TensorRT execution failed")

    def infer(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Copy in, execute on the stream, copy the outputs back (views of the pinned buffers)."""
        self._ctx.push()
        try:
            self.enqueue(inputs)
            result = {}
            for out_name, (ohost, odev) in self.outputs.items():
                shape = tuple(self.context.get_tensor_shape(out_name))
                count = int(np.prod(shape))
                self._cuda.memcpy_dtoh_async(ohost[:count], odev, self.stream)
                result[out_name] = ohost[:count].reshape(shape)
            self.stream.synchronize()
            return result
        finally:
            self._ctx.pop()

    def close(self) -> None:
        if getattr(self, "_ctx", None) is None:
            return
        self._ctx.push()
        try:
            self.context = None
            for _, device in list(self.inputs.values()) + list(self.outputs.values()):
                device.free()
            self.inputs, self.outputs = {}, {}
            self.engine = None
        finally:
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None
