"""The model manifest: the contract between export and the runtime (``manifest.json`` beside a model).

Validated on load; every problem is a one-line :class:`~smearsight.errors.InputError` naming the file
and field. The runtime uses :func:`check_engine_compatibility` to refuse engines built for another GPU
or TensorRT version.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from smearsight.anchors import AnchorConfig
from smearsight.config import StrictConfig, format_validation_error
from smearsight.errors import InputError
from smearsight.fileio import atomic_write_text, sha256_file

MANIFEST_NAME = "manifest.json"
PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9._+-]{1,128}")
SCHEMA_VERSION = 1


class _ManifestPart(StrictConfig):
    """Manifest sections take JSON types as written (no "0.3" for 0.3, no true for 1) and finite numbers only."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class TensorSpec(_ManifestPart):
    """A graph input or output. ``-1`` in ``shape`` marks a dynamic dimension (batch)."""

    name: str
    shape: list[int]
    dtype: Literal["float32", "float16", "int64", "int32", "uint8"] = "float32"

    @field_validator("shape")
    @classmethod
    def _dimensions(cls, shape: list[int]) -> list[int]:
        if not shape or any(d == 0 or d < -1 for d in shape):
            raise ValueError(f"dimensions must be positive (or -1 for a dynamic one), got {shape}")
        return shape


class InputSpec(TensorSpec):
    """The model input and how a frame becomes it: ``x = (pixel / 255 - mean) / std`` per channel."""

    layout: Literal["NCHW"] = "NCHW"
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    mean: list[float]
    std: list[float]
    resize: Literal["letterbox", "stretch", "pad"] = "letterbox"
    pad_value: float = 0.0

    @model_validator(mode="after")
    def _channels_match(self) -> InputSpec:
        channels = 1 if self.color == "gray" else 3
        if len(self.shape) != 4:
            raise ValueError(f"input shape must be NCHW with 4 dimensions, got {self.shape}")
        if self.shape[1] != channels:
            raise ValueError(f"input has {self.shape[1]} channels but color '{self.color}' needs {channels}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} values for color '{self.color}'")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


# Candidates kept per class before NMS. A cell meets many anchors at the P2 level (stride 4, 9 per
# location): on dense synthetic 768x1024 smears up to ~4,800 anchors of one class pass the 0.3 score
# threshold, and a cap of 1000 lost 2 % recall (docs/benchmarks.md). The GPU kernel handles up to 4096.
DEFAULT_PRE_NMS_TOPK = 4000


MAX_DETECTIONS_LIMIT = 100_000


class DetectorSpec(_ManifestPart):
    """What the runtime needs to decode the detector's raw outputs."""

    class_names: list[str]
    anchors: AnchorConfig
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    iou_threshold: float = Field(0.5, gt=0.0, le=1.0)
    pre_nms_topk: int = Field(DEFAULT_PRE_NMS_TOPK, ge=1)
    max_detections: int = Field(1000, ge=1, le=MAX_DETECTIONS_LIMIT)  # the device allocates [max, 6] once
    class_output: str = "class_logits"
    box_output: str = "box_regression"

    @field_validator("class_names")
    @classmethod
    def _names_unique(cls, names: list[str]) -> list[str]:
        if not names or any(not n.strip() for n in names):
            raise ValueError("must list at least one class, each with a non-empty name")
        seen = {n for n in names if names.count(n) > 1}
        if seen:
            raise ValueError(f"lists {', '.join(sorted(repr(n) for n in seen))} more than once")
        return names


class MorphologySpec(_ManifestPart):
    """Morphology decision: a crop is abnormal when its score is at or above ``threshold``."""

    part: Literal["head", "acrosome", "vacuole", "tail"]
    threshold: float
    score_output: str = "scores"
    mode: Literal["unsupervised", "supervised"] = "unsupervised"


def _plain_file_name(name: str) -> str:
    """A file beside the manifest: no folders, no '..' (a bundle unpacks these names)."""
    if not PLAIN_FILE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError("must be a plain file name beside the manifest (letters, digits, . _ + -)")
    return name


class EngineSpec(_ManifestPart):
    """A TensorRT engine and the build environment it is tied to."""

    file: str = "model.engine"
    _file_name = field_validator("file")(_plain_file_name)
    sha256: str
    tensorrt_version: str
    cuda_version: str
    gpu_name: str
    compute_capability: str
    build_flags: dict[str, object] = Field(default_factory=dict)


class QuantizationSpec(_ManifestPart):
    """How an int8 model was made from its float32 original (``smearsight export int8``)."""

    method: Literal["static-qdq"] = "static-qdq"
    calibration: str
    frames: int = Field(ge=1)
    float_onnx_sha256: str
    excluded_nodes: list[str] = Field(default_factory=list)
    agreement: float | None = Field(None, ge=0.0, le=1.0)


class Manifest(_ManifestPart):
    """Everything the runtime needs to run an exported model, and what it was made from."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["detector", "morphology"]
    name: str
    model_version: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    input: InputSpec
    outputs: list[TensorSpec]
    detector: DetectorSpec | None = None
    morphology: MorphologySpec | None = None
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    source_checkpoint_sha256: str = ""
    onnx_file: str = "model.onnx"
    onnx_sha256: str = ""
    _onnx_file_name = field_validator("onnx_file")(_plain_file_name)
    opset: int = 17
    engine: EngineSpec | None = None
    quantization: QuantizationSpec | None = None

    @model_validator(mode="after")
    def _kind_section(self) -> Manifest:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        if self.kind == "detector" and self.detector is None:
            raise ValueError("a detector manifest needs a 'detector' section")
        if self.kind == "morphology" and self.morphology is None:
            raise ValueError("a morphology manifest needs a 'morphology' section")
        names = {o.name for o in self.outputs}
        if self.detector is not None:
            for out in (self.detector.class_output, self.detector.box_output):
                if out not in names:
                    raise ValueError(f"detector output '{out}' is not among outputs {sorted(names)}")
            self._detector_outputs_agree()
        if self.morphology is not None and self.morphology.score_output not in names:
            raise ValueError(f"morphology output '{self.morphology.score_output}' is not among outputs")
        return self

    def _detector_outputs_agree(self) -> None:
        """The detector's output shapes (where fixed) against its class names and anchors: a manifest that
        disagrees with its graph would fail on every frame of the device."""
        spec = self.detector
        assert spec is not None
        shapes = {o.name: o.shape for o in self.outputs}
        logits, deltas = shapes[spec.class_output], shapes[spec.box_output]
        if len(logits) >= 2 and logits[-1] > 0 and logits[-1] != len(spec.class_names):
            raise ValueError(f"output '{spec.class_output}' scores {logits[-1]} classes but detector.class_names "
                             f"lists {len(spec.class_names)}")
        if deltas and deltas[-1] > 0 and deltas[-1] != 4:
            raise ValueError(f"output '{spec.box_output}' must end in 4 box coordinates, got shape {deltas}")
        if len(self.input.shape) == 4 and min(self.input.shape[2:]) > 0:
            expected = spec.anchors.num_anchors(self.image_size)
            for name, shape in ((spec.class_output, logits), (spec.box_output, deltas)):
                if len(shape) >= 2 and shape[-2] > 0 and shape[-2] != expected:
                    raise ValueError(f"output '{name}' has {shape[-2]} anchors but detector.anchors give {expected} "
                                     f"at {self.image_size[0]}x{self.image_size[1]}")

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the model input."""
        return int(self.input.shape[2]), int(self.input.shape[3])

    def to_json(self) -> str:
        """The text of ``manifest.json``."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/manifest.json`` atomically."""
        return atomic_write_text(Path(directory) / MANIFEST_NAME, self.to_json())


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate a manifest from a model directory or a ``manifest.json`` path."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"{path}: not a manifest (JSON nested too deeply)") from None
    except OSError as exc:  # e.g. a models folder copied as root, read by the device's own user
        raise InputError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    from pydantic import ValidationError

    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, str(path))) from None


def verify_files(directory: str | Path, manifest: Manifest | None = None) -> list[str]:
    """Check the hashes of the files a manifest names; return one message per problem (empty = good)."""
    directory = Path(directory)
    manifest = manifest or load_manifest(directory)
    problems = []
    checks = [(manifest.onnx_file, manifest.onnx_sha256, "onnx_sha256")]
    if manifest.engine is not None:
        checks.append((manifest.engine.file, manifest.engine.sha256, "engine.sha256"))
    for name, expected, field in checks:
        file = directory / name
        if not expected:
            problems.append(f"{directory / MANIFEST_NAME}: field '{field}' is empty")
        elif not file.is_file():
            problems.append(f"{file}: missing (named by the manifest)")
        elif (actual := sha256_file(file)) != expected:
            problems.append(f"{file}: sha256 {actual[:12]}… does not match manifest field '{field}' {expected[:12]}…")
    return problems


def check_engine_compatibility(engine: EngineSpec, tensorrt_version: str, compute_capability: str) -> str | None:
    """Plain-words reason why ``engine`` cannot run on this device, or ``None`` when it can.

    TensorRT engines are tied to the TensorRT version (major.minor.patch) and the GPU's compute
    capability they were built with.
    """
    if engine.tensorrt_version != tensorrt_version:
        return (
            f"the engine was built with TensorRT {engine.tensorrt_version} but this device has TensorRT "
            f"{tensorrt_version}; engines only run on the TensorRT version that built them"
        )
    if engine.compute_capability != compute_capability:
        return (
            f"the engine was built for a GPU of compute capability {engine.compute_capability} "
            f"({engine.gpu_name}) but this device's GPU is {compute_capability}; rebuild it on this kind of GPU"
        )
    return None
