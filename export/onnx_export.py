"""Checkpoint -> ``model.onnx`` + ``manifest.json``.

Export only touches each model's ``torch_model.build_from_checkpoint`` (the exportable network), never
the training machinery. The detector graph ends at the raw per-anchor outputs (no NMS inside); the
morphology graph holds teacher + student + discrepancy score.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smearsight import __version__
from smearsight.anchors import AnchorConfig
from smearsight.errors import InputError, first_line, require
from smearsight.fileio import atomic_files, check_output_dir, remove_stale_temp_files, sha256_file
from smearsight.manifest import MANIFEST_NAME, DetectorSpec, InputSpec, Manifest, MorphologySpec, TensorSpec

DETECTOR_INPUT = "images"
MORPHOLOGY_INPUT = "crops"
MORPHOLOGY_CROP = 64


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    directory: Path
    manifest: Manifest
    simplified: bool


def build_exportable(checkpoint: dict[str, Any]) -> Any:
    """The eval-mode torch module of a detector or morphology checkpoint."""
    if checkpoint["kind"] == "detector":
        from smearsight.train.detector.torch_model import build_from_checkpoint
    else:
        from smearsight.train.morphology.torch_model import build_from_checkpoint
    module = build_from_checkpoint(checkpoint)
    module.eval()
    return module


def input_shape(checkpoint: dict[str, Any], image_size: tuple[int, int] | None, batch: int) -> list[int]:
    """NCHW input shape for export; detector sizes must be multiples of the largest anchor stride."""
    if checkpoint["kind"] == "morphology":
        return [batch, 1, MORPHOLOGY_CROP, MORPHOLOGY_CROP]
    height, width = image_size or tuple(checkpoint["image_size"])
    stride = AnchorConfig(**checkpoint["anchors"]).max_stride
    if height % stride or width % stride:
        raise InputError(
            f"--image-size {height}x{width}: both sides must be multiples of the largest stride {stride} "
            "(camera frames are placed in an input of this size)"
        )
    return [batch, 3, int(height), int(width)]


def make_manifest(
    checkpoint: dict[str, Any],
    shape: list[int],
    output_shapes: dict[str, list[int]],
    checkpoint_sha256: str,
    opset: int,
    name: str,
    overrides: dict[str, float] | None = None,
) -> Manifest:
    """Fill a manifest from the checkpoint's contract fields (see smearsight.train.checkpoint).

    ``overrides`` (detector only) replaces the checkpoint's ``score``, ``pre_nms_topk`` or ``max_detections``.

    A detector exported at its training size keeps the training's ``letterbox`` (frames scaled to fit, as the
    trainer scaled its images). Exported at another size (larger frames from a camera of the same optics) it
    gets ``pad``: frames are not rescaled, so cells keep the pixel size the network learned; letterboxing
    into the larger canvas would enlarge every small frame's cells (a 384x512 frame 2x into 768x1024).
    """
    norm = checkpoint["normalization"]
    version = str(checkpoint.get("model_version") or f"{__version__}+{checkpoint_sha256[:8]}")
    if checkpoint["kind"] == "detector":
        from smearsight.train.detector.augment import PAD_VALUE

        thresholds = {**checkpoint["thresholds"], **(overrides or {})}
        resize = "letterbox" if [int(v) for v in shape[2:]] == [int(v) for v in checkpoint["image_size"]] else "pad"
        detector = DetectorSpec(
            class_names=list(checkpoint["class_names"]),
            anchors=AnchorConfig(**checkpoint["anchors"]),
            score_threshold=float(thresholds.get("score", 0.3)),
            iou_threshold=float(thresholds.get("iou", 0.5)),
            pre_nms_topk=int(thresholds.get("pre_nms_topk", DetectorSpec.model_fields["pre_nms_topk"].default)),
            max_detections=int(thresholds.get("max_detections", DetectorSpec.model_fields["max_detections"].default)),
        )
        return Manifest(
            kind="detector",
            name=name,
            model_version=version,
            input=InputSpec(name=DETECTOR_INPUT, shape=shape, color=norm.get("color", "rgb"),
                            mean=list(norm["mean"]), std=list(norm["std"]), resize=resize,
                            pad_value=float(norm.get("pad_value", PAD_VALUE))),  # the trainer's letterbox grey
            outputs=[TensorSpec(name=n, shape=s) for n, s in output_shapes.items()],
            detector=detector,
            source_checkpoint_sha256=checkpoint_sha256,
            opset=opset,
        )
    morph = checkpoint["morphology"]
    return Manifest(
        kind="morphology",
        name=name,
        model_version=version,
        input=InputSpec(name=MORPHOLOGY_INPUT, shape=shape, color="gray", mean=list(norm["mean"]),
                        std=list(norm["std"]), resize="stretch"),
        outputs=[TensorSpec(name=n, shape=s) for n, s in output_shapes.items()],
        morphology=MorphologySpec(part=morph["part"], threshold=float(morph["threshold"]),
                                  mode=morph.get("mode", "unsupervised")),
        source_checkpoint_sha256=checkpoint_sha256,
        opset=opset,
    )


def export_checkpoint(
    weights: str | Path,
    out_dir: str | Path,
    image_size: tuple[int, int] | None = None,
    opset: int = 17,
    dynamic_batch: bool | None = None,
    simplify: bool = True,
    pre_nms_topk: int | None = None,
    max_detections: int | None = None,
    score_threshold: float | None = None,
) -> ExportResult:
    """Export a detector or morphology checkpoint to ``out_dir/model.onnx`` + ``out_dir/manifest.json``.

    Shapes are static by default; morphology graphs get a dynamic batch unless ``dynamic_batch`` is
    False (the runtime scores a variable number of crops per frame). ``score_threshold`` (the operating
    point the device shows and counts, chosen on validation data), ``pre_nms_topk`` and
    ``max_detections`` replace the checkpoint's values in the manifest (a detector exported for larger
    frames than it was trained on has more anchors, and more candidates per class, than its
    training-time caps were chosen for).
    """
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
    from smearsight.train.checkpoint import load_checkpoint

    weights = Path(weights)
    checkpoint = load_checkpoint(weights)
    kind = checkpoint["kind"]
    overrides: dict[str, float] = {
        k: v for k, v in (("score", score_threshold), ("pre_nms_topk", pre_nms_topk),
                          ("max_detections", max_detections)) if v is not None
    }
    if overrides and kind != "detector":
        raise InputError(f"{weights}: --score-threshold / --pre-nms-topk / --max-detections apply to detector "
                         f"checkpoints, not {kind}")
    if image_size is not None and kind != "detector":
        raise InputError(f"{weights}: --image-size applies to detector checkpoints; {kind} crops are "
                         f"{MORPHOLOGY_CROP}x{MORPHOLOGY_CROP}")
    bad = [f"{k} {v}" for k, v in overrides.items() if k != "score" and v < 1]
    if bad:
        raise InputError(f"{', '.join(bad)}: detection caps must be at least 1")
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
        raise InputError(f"--score-threshold {score_threshold}: must lie in [0, 1]")
    if dynamic_batch is None:
        dynamic_batch = kind == "morphology"
    out_dir = check_output_dir(out_dir)
    shape = input_shape(checkpoint, image_size, batch=1)
    module = build_exportable(checkpoint)
    example = torch.zeros(shape, dtype=torch.float32)
    if kind == "detector":
        input_name, output_names = DETECTOR_INPUT, ["class_logits", "box_regression"]
    else:
        input_name, output_names = MORPHOLOGY_INPUT, ["scores"]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in output_names}}

    buffer = io.BytesIO()
    with torch.no_grad():
        outputs = module(example)
        outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
        with warnings.catch_warnings():
            # The tracer warns about shape-dependent branches (BiFPN resizing, the morphology score's border):
            # the export's spatial size is fixed (the manifest's input shape), so they are rightly constants, and
            # the parity check compares the graph with PyTorch. The user sees no page of warnings.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            try:
                torch.onnx.export(
                    module, (example,), buffer, dynamo=False, opset_version=opset, input_names=[input_name],
                    output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
                )
            except Exception as exc:  # an opset the exporter or an operator lacks, most often
                raise InputError(f"--opset {opset}: the ONNX export failed ({first_line(exc)})") from None
    model = onnx.load_from_string(buffer.getvalue())
    simplified = False
    if simplify:
        model, simplified = _simplify(model)
    # value_info is an optional hint, and onnxslim leaves a second, wrongly sized entry for some tensors:
    # drop it all, every consumer (ONNX Runtime, TensorRT, the checker) infers shapes itself
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)

    # the manifest is built and checked before anything is written: a bad checkpoint leaves no stray model.onnx
    data = model.SerializeToString()
    batch_dim = -1 if dynamic_batch else 1
    shape[0] = batch_dim
    output_shapes = {n: [batch_dim, *list(o.shape[1:])] for n, o in zip(output_names, outputs, strict=True)}
    from pydantic import ValidationError

    from smearsight.config import format_validation_error

    try:  # the same checks a device applies when it loads the manifest
        manifest = make_manifest(checkpoint, shape, output_shapes, sha256_file(weights), opset,
                                 name=_default_name(checkpoint), overrides=overrides)
        manifest.onnx_sha256 = hashlib.sha256(data).hexdigest()
        manifest = Manifest.model_validate(manifest.to_dict())
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, f"{weights}: its manifest")) from None
    # the model and the manifest holding its sha256 replace an earlier export's together
    remove_stale_temp_files(out_dir, (manifest.onnx_file, MANIFEST_NAME))
    with atomic_files([out_dir / manifest.onnx_file, out_dir / MANIFEST_NAME]) as (model_file, manifest_file):
        model_file.write(data)
        manifest_file.write(manifest.to_json().encode("utf-8"))
    return ExportResult(out_dir, manifest, simplified)


def _default_name(checkpoint: dict[str, Any]) -> str:
    if checkpoint["kind"] == "morphology":
        return f"morphology-{checkpoint['morphology']['part']}"
    return str(checkpoint.get("model_config", {}).get("name", "detector"))


def _simplify(model: Any) -> tuple[Any, bool]:
    """Fold constants and fuse ops with onnxslim when it is installed; keep the original otherwise."""
    try:
        import onnxslim
    except ImportError:
        return model, False
    try:
        return onnxslim.slim(model), True
    except Exception:  # a simplifier failure must never block an export
        return model, False

