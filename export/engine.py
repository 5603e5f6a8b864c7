"""FP16 TensorRT engine build (TensorRT 10 Python API), and the build environment it is tied to.

TensorRT is imported lazily: on machines without it (these CI machines, most laptops) the command
says what to install and exits with code 2. Engines are not portable: the manifest records the
TensorRT version, CUDA version, GPU name and compute capability so that the runtime can refuse an
engine built for another device.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smearsight.errors import InputError, SmearSightError, require
from smearsight.fileio import (
    atomic_files,
    atomic_write_bytes,
    check_output_dir,
    check_output_file,
    remove_stale_temp_files,
)
from smearsight.manifest import MANIFEST_NAME, EngineSpec, load_manifest, verify_files


@dataclass
class EngineOptions:
    """Builder settings (recorded in the manifest's ``engine.build_flags``)."""

    fp16: bool = True
    strongly_typed: bool = False
    workspace_mb: int = 1024
    timing_cache: Path | None = None
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32

    @property
    def fp16_kernels(self) -> bool:
        """Whether the builder may pick FP16 kernels: a strongly-typed network takes its types from the ONNX
        model instead (float32 for ``smearsight export onnx`` models), whatever ``fp16`` says."""
        return self.fp16 and not self.strongly_typed

    def flags(self) -> dict[str, object]:
        return {
            "fp16": self.fp16_kernels,
            "strongly_typed": self.strongly_typed,
            "workspace_mb": self.workspace_mb,
            "batch_profile": [self.min_batch, self.opt_batch, self.max_batch],
        }


@dataclass
class GpuInfo:
    """The build GPU as the manifest records it."""

    name: str
    compute_capability: str
    cuda_version: str


class EngineBuildError(SmearSightError):
    """TensorRT rejected the network (parser errors per node, or a failed build)."""


def parser_errors(parser: Any) -> list[str]:
    """One line per ONNX parser error, naming the node (index, name, operator) where TensorRT says it."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = error.node()
        name = _call(error, "node_name")
        operator = _call(error, "node_operator")
        where = f"node {node}" + (f" '{name}'" if name else "") + (f" ({operator})" if operator else "")
        lines.append(f"{where}: {error.desc()} [{error.code()}]")
    return lines


def _call(obj: Any, method: str) -> str:
    fn = getattr(obj, method, None)
    try:
        return str(fn()) if callable(fn) else ""
    except Exception:
        return ""


def build_engine(onnx_path: str | Path, options: EngineOptions) -> tuple[bytes, Any]:
    """Parse ``onnx_path`` and build a serialized engine; returns (engine bytes, tensorrt module).

    Dynamic batch dimensions get one optimisation profile (min/opt/max batch). The timing cache file,
    when given, is loaded before and saved after the build so that rebuilds are fast.
    """
    trt = require("tensorrt", "building TensorRT engines")
    onnx_path = Path(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if options.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = parser_errors(parser)
        raise EngineBuildError(f"{onnx_path}: TensorRT could not parse the model: " + "; ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.fp16_kernels:
        config.set_flag(trt.BuilderFlag.FP16)
    cache_bytes = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)

    dynamic_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic_inputs = [t for t in dynamic_inputs if any(d < 0 for d in t.shape)]
    if dynamic_inputs:
        profile = builder.create_optimization_profile()
        for tensor in dynamic_inputs:
            shape = list(tensor.shape)
            if any(d < 0 for d in shape[1:]):
                raise InputError(f"{onnx_path}: input '{tensor.name}' has dynamic dimensions other than the batch")
            shapes = [[b, *shape[1:]] for b in (options.min_batch, options.opt_batch, options.max_batch)]
            profile.set_shape(tensor.name, *shapes)
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT failed to build the engine (see the log above)")
    if options.timing_cache is not None:
        atomic_write_bytes(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), trt


def query_gpu() -> GpuInfo:
    """Name, compute capability and CUDA version of GPU 0 (pycuda when present, else nvidia-smi)."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        device = cuda.Device(0)
        major, minor = device.compute_capability()
        version = cuda.get_driver_version()
        return GpuInfo(device.name(), f"{major}.{minor}", f"{version // 1000}.{(version % 1000) // 10}")
    except ImportError:
        pass
    if shutil.which("nvidia-smi") is None:
        raise SmearSightError("no NVIDIA GPU found (neither pycuda nor nvidia-smi is available)")
    query = ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=60)
        lines = done.stdout.splitlines()
        if done.returncode != 0 or not lines or len(lines[0].split(",")) != 3:
            said = (done.stdout.strip() or done.stderr.strip() or f"exit code {done.returncode}").splitlines()[0]
            raise SmearSightError(f"nvidia-smi cannot describe the GPU ({said}); is the NVIDIA driver loaded?")
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SmearSightError(f"nvidia-smi cannot describe the GPU ({exc})") from None
    name, capability, _driver = (part.strip() for part in lines[0].split(","))
    cuda_version = smi.split("CUDA Version:")[1].split()[0] if "CUDA Version:" in smi else "unknown"
    return GpuInfo(name, capability, cuda_version)


def export_engine(onnx_path: str | Path, out_dir: str | Path, options: EngineOptions) -> EngineSpec:
    """Build ``out_dir/model.engine`` from ``onnx_path`` and record it in ``out_dir/manifest.json``.

    The ONNX model must be the one its manifest names (an export killed between writing the two leaves a
    mismatched pair), and the output paths must be writable: both are checked before the build. The engine,
    the manifest (and the ONNX model copied beside them when ``out_dir`` is another folder) replace earlier
    ones together.
    """
    onnx_path = Path(onnx_path)
    out_dir = check_output_dir(out_dir)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: ONNX model not found")
    manifest = load_manifest(onnx_path.parent)
    if manifest.precision == "int8":
        raise InputError(f"{onnx_path.parent / MANIFEST_NAME}: precision 'int8': the int8 model is for CPU-only "
                         "devices; build the engine from the float32 model (the export onnx output)")
    if onnx_path.name != manifest.onnx_file:
        raise InputError(f"{onnx_path}: the manifest beside it names '{manifest.onnx_file}' as its model")
    manifest.engine = None  # an earlier build's engine is replaced, its file need not match
    problems = verify_files(onnx_path.parent, manifest)
    if problems:
        raise InputError(f"{problems[0]} (export the model again)")
    if options.timing_cache is not None:
        check_output_file(options.timing_cache, "--timing-cache")
    engine_bytes, trt = build_engine(onnx_path, options)
    gpu = query_gpu()
    spec = EngineSpec(
        file="model.engine",
        sha256=hashlib.sha256(engine_bytes).hexdigest(),
        tensorrt_version=str(trt.__version__),
        cuda_version=gpu.cuda_version,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        build_flags=options.flags(),
    )
    manifest.engine = spec
    manifest.precision = "fp16" if options.fp16_kernels else "fp32"  # the ONNX graph itself is float32
    files = {out_dir / spec.file: engine_bytes}
    if out_dir.resolve() != onnx_path.parent.resolve():
        files[out_dir / manifest.onnx_file] = onnx_path.read_bytes()
    files[out_dir / MANIFEST_NAME] = manifest.to_json().encode("utf-8")
    remove_stale_temp_files(out_dir, [path.name for path in files])
    with atomic_files(list(files)) as handles:
        for handle, data in zip(handles, files.values(), strict=True):
            handle.write(data)
    return spec
