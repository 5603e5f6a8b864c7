"""INT8 post-training quantization of a detector for CPU-only devices (ONNX Runtime, static QDQ).

The FP16 TensorRT engine is the GPU path; a device without a GPU runs the ONNX model, and on x86 CPUs
with AVX-512 VNNI / AVX-VNNI (or ARM dot-product) ONNX Runtime's integer kernels run the EfficientDet
detector several times faster than float32 (docs/benchmarks.md). This module:

1. calibrates activation ranges (min/max) on frames pre-processed exactly as the runtime does, drawn from
   a frame source (``synth://``, ``file://folder/``, a video) or independent synthetic smears;
2. quantizes weights per channel to int8 and activations to uint8 (QDQ format, ONNX Runtime's
   ``quantize_static``), the weights by default to 7 bits (``reduce_range``): on x86 CPUs without VNNI
   (AVX2 only) ONNX Runtime's u8s8 kernels multiply with ``VPMADDUBSW``, whose 16-bit sums saturate with
   full 8-bit weights; on such a CPU the demo detector's int8 model follows the float model more closely
   at reduced range, at the same speed (figures in docs/benchmarks.md). The stem
   convolution is left in float (with three input channels ONNX Runtime's integer convolution is no
   faster, and the stem sees the raw image), and so are the BiFPN's Resize nodes and their consumers
   (ONNX Runtime's uint8 Resize is slower than the float one);
3. checks the result against the float model on *other* frames: detections are matched one to one
   (same class, IoU >= 0.5) at the manifest's score threshold; the agreement is the smaller of the share
   of float detections the int8 model finds and the share of int8 detections the float model made.
   Below ``min_agreement`` nothing is written, nor when neither model detects anything on those frames
   (unless ``min_agreement`` is 0: the manifest then records no agreement).

The output is a complete model folder (``model.onnx`` + ``manifest.json`` with ``precision: int8`` and a
``quantization`` section) written through a staging folder, so an interrupted run leaves nothing half
written. Morphology models are refused: their anomaly score is a small difference between teacher and
student features, which integer rounding swamps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.errors import InputError, SmearSightError, require
from smearsight.fileio import check_output_dir, fsync_dir, sha256_file, staging_dir
from smearsight.manifest import MANIFEST_NAME, Manifest, QuantizationSpec, load_manifest

MATCH_IOU = 0.5


@dataclass
class QuantizeReport:
    """What the int8 model was calibrated on and how closely it follows the float model."""

    out_dir: str
    calibration: str
    calibration_frames: int
    check_frames: int
    float_detections: int
    int8_detections: int
    matched: int
    excluded_nodes: list[str]
    float_mb: float
    int8_mb: float

    @property
    def recall(self) -> float:
        """Share of the float model's detections the int8 model also finds."""
        return self.matched / self.float_detections if self.float_detections else 1.0

    @property
    def precision(self) -> float:
        """Share of the int8 model's detections the float model also made."""
        return self.matched / self.int8_detections if self.int8_detections else 1.0

    @property
    def agreement(self) -> float:
        """The smaller of :attr:`recall` and :attr:`precision`."""
        return min(self.recall, self.precision)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recall": self.recall, "precision": self.precision, "agreement": self.agreement}


def synthetic_frames(size: tuple[int, int], count: int, seed: int) -> Iterator[np.ndarray]:
    """Independent synthetic smear frames (RGB uint8) of ``size`` (H, W)."""
    from smearsight.train.datasets.synth import SmearSynthesizer

    synth = SmearSynthesizer(seed=seed, size=size)
    for i in range(count):
        yield synth.render(i)[0]


def source_frames(uri: str, count: int) -> Iterator[np.ndarray]:
    """Up to ``count`` RGB frames from a runtime frame source URI (every frame of a file or folder)."""
    from smearsight.device.sources import open_source

    source = open_source(uri, drop=False)
    try:
        for n, frame in enumerate(source):
            if n >= count:
                break
            yield frame.image
    finally:
        source.close()


def match_detections(ref: np.ndarray, got: np.ndarray, iou_min: float = MATCH_IOU) -> int:
    """Greedy one-to-one matches between two detection sets ``[N, 6]`` (same class, IoU >= ``iou_min``),
    the reference taken in descending score order."""
    from smearsight.anchors import box_iou

    if len(ref) == 0 or len(got) == 0:
        return 0
    iou = box_iou(ref[:, :4], got[:, :4])
    iou = np.where(ref[:, 5:6] == got[None, :, 5], iou, 0.0)
    used = np.zeros(len(got), bool)
    matched = 0
    for i in np.argsort(-ref[:, 4], kind="stable"):
        candidates = np.flatnonzero(~used & (iou[i] >= iou_min))
        if candidates.size:
            used[candidates[np.argmax(iou[i, candidates])]] = True
            matched += 1
    return matched


def _float_nodes(model: Any, keep_stem_float: bool) -> list[str]:
    """Nodes left in float: the Conv nodes reading the graph input (with ``keep_stem_float``), and every
    Resize with the nodes reading its output. ONNX Runtime turns a Resize between DequantizeLinear and
    QuantizeLinear into a uint8 Resize, which took 17 % of the int8 detector's time; run in float inside
    the int8 graph it took 9 % (docs/benchmarks.md). Keeping its consumer in float prevents that fusion."""
    inputs = {i.name for i in model.graph.input}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    out = [n.name for n in model.graph.node
           if keep_stem_float and n.op_type == "Conv" and any(x in inputs for x in n.input)]
    for node in model.graph.node:
        if node.op_type == "Resize":
            out += [node.name, *readers.get(node.output[0], [])]
    return list(dict.fromkeys(out))


def quantize_detector(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    calibration: str | None = None,
    count: int = 16,
    check_count: int = 8,
    seed: int = 1000,
    keep_stem_float: bool = True,
    reduce_range: bool = True,
    min_agreement: float = 0.9,
    on_frame: Callable[[str], None] | None = None,
) -> QuantizeReport:
    """Quantize the float detector in ``model_dir`` to int8 into ``out_dir`` (see the module docstring).

    Args:
        calibration: a frame-source URI for calibration frames; None = ``count`` independent synthetic
            smears (seed ``seed``). Check frames are always synthetic smears of another seed.
        keep_stem_float: leave the convolution(s) reading the image in float.
        reduce_range: 7-bit weights (safe on every x86 CPU); False = full 8-bit, for CPUs with VNNI only.
        min_agreement: refuse (``SmearSightError``, nothing written) when the int8 model's detections
            agree with the float model's on fewer than this share (the smaller of recall and precision).
        on_frame: called with a short label per calibration or check frame (progress display).
    """
    require("onnx", "INT8 quantization")
    require("onnxruntime", "INT8 quantization")
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from smearsight.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from smearsight.runtime.pipeline import Pipeline
    from smearsight.runtime.preprocess import preprocess_frame

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    manifest = load_manifest(model_dir)
    if manifest.kind != "detector":
        raise InputError(f"{model_dir / MANIFEST_NAME}: kind '{manifest.kind}': only detector models are "
                         "quantized to int8 (morphology anomaly scores are too small a difference for int8)")
    # an FP16 engine built in the folder (export engine --out DIR) leaves its model.onnx the float32 graph
    if manifest.precision != "fp32" and not (manifest.precision == "fp16" and manifest.engine is not None):
        raise InputError(f"{model_dir / MANIFEST_NAME}: precision '{manifest.precision}': quantize the float32 "
                         "model (the export onnx output)")
    if count < 1 or check_count < 1:
        raise InputError("--count and --check-count must be at least 1")
    if not 0.0 <= min_agreement <= 1.0:
        raise InputError(f"--min-agreement: {min_agreement} must lie in [0, 1]")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"--out {out_dir}: exists and is not an empty folder (choose a new folder)")
    check_output_dir(out_dir)  # a folder that cannot be made fails now, not after calibrating
    src = model_dir / manifest.onnx_file
    if not src.is_file():
        raise InputError(f"{src}: ONNX model missing (named by {model_dir / MANIFEST_NAME})")
    if manifest.onnx_sha256 and sha256_file(src) != manifest.onnx_sha256:
        raise InputError(f"{src}: sha256 does not match the manifest's onnx_sha256")

    spec = manifest.input
    frames = (source_frames(calibration, count) if calibration
              else synthetic_frames(manifest.image_size, count, seed))
    calib = []
    for i, frame in enumerate(frames):
        calib.append(preprocess_frame(frame, spec)[0])
        if on_frame:
            on_frame(f"calibration frame {i + 1}/{count}")
    if not calib:
        raise InputError(f"--calibration {calibration}: gave no frames")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {spec.name: x}

    with staging_dir(out_dir) as staging:
        pre = staging / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        excluded = _float_nodes(onnx.load(str(pre)), keep_stem_float)
        staged = staging / "model"
        staged.mkdir()
        target = staged / "model.onnx"
        quantize_static(
            str(pre), str(target), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            reduce_range=reduce_range,
        )
        pre.unlink()
        for cache in staging.glob("*.data"):
            cache.unlink()
        int8_manifest = Manifest.model_validate({
            **manifest.to_dict(),
            "precision": "int8",
            "model_version": f"{manifest.model_version}+int8",
            "onnx_file": "model.onnx",
            "onnx_sha256": sha256_file(target),
            "engine": None,
            "quantization": QuantizationSpec(
                calibration=calibration or f"synthetic smears (seed {seed})", frames=len(calib),
                float_onnx_sha256=sha256_file(src), excluded_nodes=excluded,
            ).to_dict(),
        })
        int8_manifest.save(staged)

        n_ref = n_got = matched = 0
        with contextlib.ExitStack() as pipes:
            ref = Pipeline(OnnxRuntimeBackend(model_dir, manifest))
            pipes.callback(ref.close)
            test = Pipeline(OnnxRuntimeBackend(staged, int8_manifest))
            pipes.callback(test.close)
            for i, frame in enumerate(synthetic_frames(manifest.image_size, check_count, seed + 7919)):
                a, na, _, _ = ref.process(frame)
                a = a[:na].copy()
                b, nb, _, _ = test.process(frame)
                n_ref, n_got = n_ref + na, n_got + nb
                matched += match_detections(a, b[:nb])
                if on_frame:
                    on_frame(f"check frame {i + 1}/{check_count}")
        report = QuantizeReport(
            out_dir=str(out_dir), calibration=int8_manifest.quantization.calibration,  # type: ignore[union-attr]
            calibration_frames=len(calib), check_frames=check_count, float_detections=n_ref,
            int8_detections=n_got, matched=matched, excluded_nodes=excluded,
            float_mb=src.stat().st_size / 1e6, int8_mb=target.stat().st_size / 1e6,
        )
        compared = bool(n_ref or n_got)
        if not compared and min_agreement > 0:  # 0/0 detections "agree" completely and prove nothing
            raise SmearSightError(
                f"int8 model not checked: neither it nor the float model detects anything on the {check_count} "
                "synthetic check frames (a detector of other cells, or a score threshold too high for them); "
                "use --min-agreement 0 to accept it unchecked"
            )
        if report.agreement < min_agreement:
            raise SmearSightError(
                f"int8 model rejected: it agrees with the float model on {report.agreement:.3f} of detections "
                f"(recall {report.recall:.3f}, precision {report.precision:.3f}) < --min-agreement {min_agreement}; "
                "calibrate on frames closer to the device's (--calibration) or keep the float model"
            )
        int8_manifest.quantization.agreement = (  # type: ignore[union-attr]
            round(report.agreement, 4) if compared else None)  # None: not measured
        int8_manifest.save(staged)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staged, out_dir)
        fsync_dir(out_dir.parent)
        return report
