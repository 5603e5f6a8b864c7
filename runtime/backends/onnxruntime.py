"""ONNX Runtime backend: CPU (tuned for small CPUs) or the CUDA provider when installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.errors import InputError, require
from smearsight.fileio import sha256_file
from smearsight.manifest import Manifest
from smearsight.runtime.backends.base import InferenceBackend

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}


def default_threads() -> int:
    """Intra-op threads: ``SMEARSIGHT_ORT_THREADS`` or the number of CPUs this process may use."""
    env = os.environ.get("SMEARSIGHT_ORT_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - non-Linux
        return max(os.cpu_count() or 1, 1)


def session_options(threads: int | None = None) -> Any:
    """The runtime's ONNX Runtime session options: all graph optimisations, ``threads`` intra-op threads
    (default: the runtime's choice), no spinning unless ``SMEARSIGHT_ORT_SPIN=1``."""
    ort = require("onnxruntime", "running ONNX models")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if os.environ.get("SMEARSIGHT_ORT_SPIN", "0") != "1":
        # passive waits: the capture thread and the main loop share the few cores with the pool
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _shapes_disagree(manifest_shape: list[int], graph_shape: list[Any]) -> bool:
    """True when a manifest's tensor shape and the graph's differ in rank or in a dimension both fix (the
    manifest's -1 and the graph's named dimensions are free)."""
    if len(manifest_shape) != len(graph_shape):
        return True
    return any(isinstance(g, int) and m > 0 and g != m for m, g in zip(manifest_shape, graph_shape, strict=True))


class OnnxRuntimeBackend(InferenceBackend):
    """A real onnxruntime session. Outputs of static shape are bound once to preallocated arrays
    (IOBinding), so a frame only binds its input and runs."""

    def __init__(self, model_dir: Path, manifest: Manifest, *, use_cuda: bool | None = None,
                 threads: int | None = None, verify_hash: bool = True) -> None:
        super().__init__(model_dir, manifest)
        ort = require("onnxruntime", "running ONNX models")
        path = self.model_dir / manifest.onnx_file
        if not path.is_file():
            raise InputError(f"{path}: ONNX model missing (named by {self.model_dir / 'manifest.json'})")
        if verify_hash and manifest.onnx_sha256 and sha256_file(path) != manifest.onnx_sha256:
            raise InputError(f"{path}: sha256 does not match the manifest's onnx_sha256; the model file is corrupt "
                             "or belongs to another manifest")
        if verify_hash and not manifest.onnx_sha256:
            self.notes.append(f"{path}: the manifest gives no onnx_sha256, so the model file cannot be checked")
        available = ort.get_available_providers()
        cuda_ok = "CUDAExecutionProvider" in available
        if use_cuda is None:
            use_cuda = cuda_ok
        if use_cuda and not cuda_ok:
            self.notes.append("the ONNX Runtime CUDA provider is not installed; running on the CPU")
            use_cuda = False
        opts = session_options(threads)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise InputError(f"{path}: ONNX Runtime cannot load the model ({str(exc).splitlines()[0]})") from None
        self.name = "onnxruntime-cuda" if use_cuda else "onnxruntime-cpu"
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != manifest.input.name:
            raise InputError(f"{path}: model inputs {[i.name for i in inputs]} do not match the manifest's input "
                             f"'{manifest.input.name}'")
        self.input_name = inputs[0].name
        if _shapes_disagree(manifest.input.shape, inputs[0].shape):  # a wrong one fails on every frame
            raise InputError(f"{path}: input '{self.input_name}' has shape {inputs[0].shape} but the manifest says "
                             f"{manifest.input.shape}")
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = [o.name for o in manifest.outputs if o.name not in self.output_names]
        if missing:
            raise InputError(f"{path}: model has no output(s) {missing} named by the manifest")
        graph = {o.name: o.shape for o in self.session.get_outputs()}
        for out in manifest.outputs:
            if _shapes_disagree(out.shape, graph[out.name]):
                raise InputError(f"{path}: output '{out.name}' has shape {graph[out.name]} but the manifest says "
                                 f"{out.shape}")
        self._static = None
        self._binding = None
        if not use_cuda:
            self._prepare_binding(ort)

    def _prepare_binding(self, ort: object) -> None:
        shapes = {}
        batch = self.manifest.input.shape[0]
        if batch == -1:
            return
        for out in self.session.get_outputs():
            shape = [batch if (d == -1 or not isinstance(d, int)) and i == 0 else d for i, d in enumerate(out.shape)]
            if not all(isinstance(d, int) and d > 0 for d in shape) or out.type not in _ORT_TYPES:
                return
            shapes[out.name] = (shape, _ORT_TYPES[out.type])
        self._static = {name: np.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}
        self._binding = self.session.io_binding()
        for name, arr in self._static.items():
            self._binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def infer(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the session on float32 NCHW ``inputs``."""
        self.check_input(inputs)
        if self._binding is not None:
            x = np.ascontiguousarray(inputs)
            self._binding.bind_cpu_input(self.input_name, x)
            self.session.run_with_iobinding(self._binding)
            return self._static
        outs = self.session.run(self.output_names, {self.input_name: inputs})
        return dict(zip(self.output_names, outs, strict=True))

    def close(self) -> None:
        self._binding = None
        self.session = None
