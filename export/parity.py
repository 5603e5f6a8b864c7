"""Parity of an exported ONNX model with its PyTorch checkpoint, and FP16 numerical safety.

* FP32 parity: onnxruntime against PyTorch on real inputs (synthetic smear frames for the detector,
  MHSMA or synthetic crops for morphology): max abs/rel error per output; the same detections after
  the runtime's decode + NMS (matched boxes IoU >= 0.99, same classes); the same morphology decisions.
* FP16 safety: the graph converted to float16 (onnxconverter-common, run in onnxruntime where its CPU
  kernels support it), else the PyTorch model in bfloat16; error and agreement against FP32, plus every
  graph tensor whose FP32 activations exceed the float16 range (it would overflow in an FP16 engine).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.anchors import generate_anchors
from smearsight.errors import InputError, require
from smearsight.fileio import sha256_file
from smearsight.manifest import Manifest, load_manifest, verify_files

FP16_MAX = 65504.0
CHECK_BATCH = 16  # inputs per ONNX Runtime run: every intermediate tensor of a run is held for the FP16 check
MATCH_IOU = 0.99


@dataclass
class OutputError:
    """Largest absolute and relative difference of one output against the reference."""

    name: str
    max_abs: float
    max_rel: float


@dataclass
class Agreement:
    """Detections or morphology decisions compared against the reference."""

    reference: int
    candidate: int
    matched: int
    borderline: int = 0

    @property
    def ok(self) -> bool:
        return self.matched + self.borderline >= max(self.reference, self.candidate)


@dataclass
class Comparison:
    """One model run (ONNX FP32, FP16 or BF16) against its reference."""

    label: str
    errors: list[OutputError]
    agreement: Agreement


@dataclass
class ParityReport:
    """Everything ``smearsight export check`` prints and decides on."""

    kind: str
    inputs: int
    fp32: Comparison
    fp16: Comparison | None = None
    fp16_method: str = ""
    overflow_layers: list[tuple[str, float]] = field(default_factory=list)
    tolerance: float = 1e-3

    @property
    def fp32_ok(self) -> bool:
        # "not <=": a NaN error fails (max() would skip a NaN that is not the first output's)
        within = all(e.max_abs <= self.tolerance for e in self.fp32.errors)
        return within and self.fp32.agreement.ok

    @property
    def fp16_ok(self) -> bool:
        return not self.overflow_layers

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fp32_ok"], out["fp16_ok"] = self.fp32_ok, self.fp16_ok
        return out


def relative_errors(name: str, ref: np.ndarray, got: np.ndarray) -> OutputError:
    """Max |got-ref| and max |got-ref| / (|ref| + 1e-3) (the offset keeps near-zero outputs meaningful)."""
    ref = np.asarray(ref, np.float64)
    diff = np.abs(np.asarray(got, np.float64) - ref)
    return OutputError(name, float(diff.max(initial=0.0)), float((diff / (np.abs(ref) + 1e-3)).max(initial=0.0)))


def compare_detections(
    ref: tuple[np.ndarray, int], got: tuple[np.ndarray, int], score_threshold: float, margin: float = 2e-3
) -> Agreement:
    """Greedy one-to-one matching (same class, IoU >= 0.99); detections within ``margin`` of the score
    threshold may legitimately appear on one side only and count as borderline."""
    from smearsight.anchors import box_iou

    ref_dets, ref_n = ref[0][: ref[1]], ref[1]
    got_dets, got_n = got[0][: got[1]], got[1]
    used = np.zeros(got_n, bool)
    found = np.zeros(ref_n, bool)
    if ref_n and got_n:
        iou = box_iou(ref_dets[:, :4], got_dets[:, :4])
        same = ref_dets[:, 5:6] == got_dets[None, :, 5]
        iou = np.where(same, iou, 0.0)
        for i in range(ref_n):
            candidates = np.where(~used & (iou[i] >= MATCH_IOU))[0]
            if len(candidates):
                used[candidates[np.argmax(iou[i, candidates])]] = True
                found[i] = True
    matched = int(found.sum())
    near = lambda d: np.abs(d[:, 4] - score_threshold) <= margin  # noqa: E731
    # only a detection seen on one side alone may be excused by a score at the threshold
    borderline = min(int(near(got_dets[~used]).sum()) + int(near(ref_dets[~found]).sum()),
                     max(ref_n, got_n) - matched)
    return Agreement(int(ref_n), int(got_n), matched, int(borderline))


def compare_decisions(ref_scores: np.ndarray, got_scores: np.ndarray, threshold: float) -> Agreement:
    """Same normal/abnormal decision per crop."""
    ref = np.asarray(ref_scores) >= threshold
    got = np.asarray(got_scores) >= threshold
    near = np.abs(np.asarray(ref_scores) - threshold) <= 1e-4 * max(1.0, abs(threshold))
    matched = int((ref == got).sum())
    borderline = int(((ref != got) & near).sum())
    return Agreement(len(ref), len(got), matched, borderline)


# ----------------------------------------------------------------------------------------- inputs
def detector_inputs(manifest: Manifest, count: int, seed: int = 0) -> np.ndarray:
    """Synthetic smear frames, pre-processed exactly as the runtime does, stacked ``[N, 3, H, W]``."""
    from smearsight.runtime.preprocess import preprocess_frame
    from smearsight.train.datasets.synth import SmearSynthesizer

    synth = SmearSynthesizer(seed=seed, size=manifest.image_size)
    frames = [preprocess_frame(synth.render(i)[0], manifest.input)[0] for i in range(count)]
    return np.concatenate(frames, axis=0).astype(np.float32)


def morphology_inputs(manifest: Manifest, count: int, data: Path | None, seed: int = 0) -> np.ndarray:
    """MHSMA validation crops when ``data`` is given, else deterministic synthetic crops; normalised."""
    if data is not None:
        from smearsight.train.morphology.data import load_npy_images

        path = Path(data) / "x_64_valid.npy"
        if not path.is_file():
            raise InputError(f"{path}: MHSMA crops not found (expected x_64_valid.npy under --data)")
        crops = load_npy_images(path)[:count].astype(np.float32)
    else:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:64, :64]
        crops = []
        for _ in range(count):
            cy, cx, r = rng.uniform(24, 40), rng.uniform(24, 40), rng.uniform(6, 14)
            blob = 120 + 60 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            crops.append(blob + rng.normal(0, 6, (64, 64)))
        crops = np.clip(np.stack(crops), 0, 255).astype(np.float32)
    mean, std = manifest.input.mean[0], manifest.input.std[0]
    return ((crops / 255.0 - mean) / std)[:, None].astype(np.float32)


# ---------------------------------------------------------------------------------------- running
def run_onnx_batches(
    model: Any, inputs: np.ndarray, input_name: str, batch_one: bool, batch: int = CHECK_BATCH
) -> Iterator[list[np.ndarray]]:
    """Run an ONNX model (path or ModelProto) over ``inputs``, ``batch`` at a time (one when the model's
    batch size is fixed); yields the outputs of each run, so that only one run's tensors are alive."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(model) if isinstance(model, str | Path) else model.SerializeToString()
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        what = str(model) if isinstance(model, str | Path) else "the converted model"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InputError(f"{what}: onnxruntime cannot load it ({type(exc).__name__}: {first})") from None
    step = 1 if batch_one else max(int(batch), 1)
    for start in range(0, len(inputs), step):
        yield session.run(None, {input_name: inputs[start : start + step]})


def run_onnx(model: Any, inputs: np.ndarray, input_name: str, batch_one: bool) -> list[np.ndarray]:
    """Run an ONNX model over ``inputs``; returns each output stacked over the inputs."""
    results = list(run_onnx_batches(model, inputs, input_name, batch_one))
    return [np.concatenate([r[k] for r in results], axis=0) for k in range(len(results[0]))]


def run_torch(module: Any, inputs: np.ndarray, dtype: str = "float32") -> list[np.ndarray]:
    """Run the PyTorch module one input at a time (as the runtime does) in float32 or bfloat16."""
    torch = require("torch", "parity checks")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if torch_dtype is not torch.float32:  # a cast copy: casting in place would round the caller's weights
        import copy

        module = copy.deepcopy(module).to(torch_dtype)
    outs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(len(inputs)):
            result = module(torch.from_numpy(inputs[i : i + 1]).to(torch_dtype))
            result = result if isinstance(result, tuple | list) else (result,)
            outs.append([r.float().numpy() for r in result])
    return [np.concatenate([o[k] for o in outs], axis=0) for k in range(len(outs[0]))]


def fp16_overflow_layers(
    onnx_path: Path, inputs: np.ndarray, input_name: str, batch_one: bool
) -> list[tuple[str, float]]:
    """Every float tensor in the FP32 graph whose magnitude exceeds the float16 range on ``inputs``."""
    onnx = require("onnx", "FP16 safety checks")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    existing = {o.name for o in model.graph.output}
    producers = {}
    for node in model.graph.node:
        for out in node.output:
            producers[out] = node.name or node.op_type
    for info in model.graph.value_info:
        if info.name not in existing and info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            # once per name and without a declared shape: a stale or duplicated value_info entry (onnxslim
            # leaves some) made ONNX Runtime plan one buffer for two sizes ("Shape mismatch attempting to
            # re-use buffer", seen on CI)
            existing.add(info.name)
            model.graph.output.append(onnx.helper.make_tensor_value_info(info.name, onnx.TensorProto.FLOAT, None))
    names = [o.name for o in model.graph.output]
    peaks = [0.0] * len(names)
    for run in run_onnx_batches(model, inputs, input_name, batch_one):  # every tensor of a run: keep peaks only
        for k, tensor in enumerate(run):
            peak = float(np.max(np.abs(tensor), initial=0.0))  # NaN when the tensor holds one
            peaks[k] = max(peaks[k], peak) if np.isfinite(peak) else np.inf
    overflow = [(producers.get(name, name), float(peak)) for name, peak in zip(names, peaks, strict=True)
                if not np.isfinite(peak) or peak > FP16_MAX]
    return sorted(overflow, key=lambda item: -item[1])


def fp16_model(onnx_path: Path) -> Any:
    """The graph with float16 weights and activations (float32 inputs/outputs kept)."""
    onnx = require("onnx", "FP16 safety checks")
    float16 = require("onnxconverter_common.float16", "FP16 safety checks")
    return float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)


# ------------------------------------------------------------------------------------------ check
def contract_differences(manifest: Manifest, checkpoint: dict[str, Any], checkpoint_sha256: str) -> list[str]:
    """The manifest fields that differ from what ``smearsight export onnx`` writes for this checkpoint at the
    manifest's own input size (the operating point and the caps, which export may set, are not compared)."""
    from smearsight.export.onnx_export import make_manifest

    outputs = {o.name: o.shape for o in manifest.outputs}
    expected = make_manifest(checkpoint, list(manifest.input.shape), outputs, checkpoint_sha256, manifest.opset,
                             manifest.name).to_dict()
    actual = manifest.to_dict()
    fields = ["source_checkpoint_sha256", *(f"input.{k}" for k in ("color", "mean", "std", "resize", "pad_value"))]
    fields += ["detector.class_names", "detector.anchors", "detector.iou_threshold"] if manifest.detector else [
        "morphology.part", "morphology.mode"]
    differences = []
    for name in fields:
        want, got = expected, actual
        for key in name.split("."):
            want, got = want.get(key), got.get(key)
        if want != got:
            differences.append(f"{name} {json.dumps(got)} (the checkpoint makes {json.dumps(want)})")
    return differences


def check_export(
    model_dir: str | Path,
    weights: str | Path,
    count: int = 4,
    data: Path | None = None,
    fp16: bool = True,
    tolerance: float | None = None,
) -> ParityReport:
    """Compare ``model_dir``'s ONNX model with the checkpoint ``weights`` (see module docstring)."""
    from smearsight.export.onnx_export import build_exportable
    from smearsight.runtime.postprocess import decode_nms
    from smearsight.train.checkpoint import load_checkpoint

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    problems = verify_files(model_dir, manifest)
    if problems:
        raise InputError("; ".join(problems))
    if data is not None and manifest.kind != "morphology":
        raise InputError(f"--data {data}: MHSMA crops check morphology models; a {manifest.kind} is checked on "
                         "synthetic smears")
    checkpoint = load_checkpoint(weights)
    if checkpoint["kind"] != manifest.kind:
        raise InputError(
            f"{weights}: a {checkpoint['kind']} checkpoint cannot be checked against a {manifest.kind} model"
        )
    differences = contract_differences(manifest, checkpoint, sha256_file(weights))
    if differences:  # parity on inputs built from a wrong manifest would pass and prove nothing
        raise InputError(f"{model_dir / 'manifest.json'} disagrees with {weights}: {'; '.join(differences)}")
    module = build_exportable(checkpoint)
    onnx_path = model_dir / manifest.onnx_file
    batch_one = manifest.input.shape[0] != -1
    input_name = manifest.input.name

    if manifest.kind == "detector":
        inputs = detector_inputs(manifest, count)
        spec = manifest.detector
        anchors = generate_anchors(manifest.image_size, spec.anchors)

        def post(outs: list[np.ndarray], i: int) -> tuple[np.ndarray, int]:
            return decode_nms(outs[0][i], outs[1][i], anchors, score_threshold=spec.score_threshold,
                              iou_threshold=spec.iou_threshold, pre_nms_topk=spec.pre_nms_topk,
                              max_detections=spec.max_detections, image_size=manifest.image_size)

        def agree(ref: list[np.ndarray], got: list[np.ndarray]) -> Agreement:
            parts = [compare_detections(post(ref, i), post(got, i), spec.score_threshold) for i in range(len(inputs))]
            return Agreement(*(sum(getattr(p, f) for p in parts) for f in ("reference", "candidate", "matched",
                                                                          "borderline")))
    else:
        inputs = morphology_inputs(manifest, max(count, 16), data)
        threshold = manifest.morphology.threshold

        def agree(ref: list[np.ndarray], got: list[np.ndarray]) -> Agreement:
            return compare_decisions(ref[0], got[0], threshold)

    names = [o.name for o in manifest.outputs]
    reference = run_torch(module, inputs)
    scale = max(float(np.max(np.abs(r), initial=0.0)) for r in reference)
    exported = run_onnx(onnx_path, inputs, input_name, batch_one)
    fp32 = Comparison("onnxruntime fp32", [relative_errors(n, r, g) for n, r, g in zip(names, reference, exported,
                      strict=True)], agree(reference, exported))
    report = ParityReport(manifest.kind, len(inputs), fp32, tolerance=tolerance or 1e-4 * max(1.0, scale))
    if not fp16:
        return report
    try:
        half = run_onnx(fp16_model(onnx_path), inputs, input_name, batch_one)
        report.fp16_method = "onnxruntime float16 (onnxconverter-common)"
    except Exception as exc:  # onnxruntime's CPU provider lacks float16 kernels for some ops
        half = run_torch(module, inputs, dtype="bfloat16")
        report.fp16_method = f"PyTorch bfloat16 (onnxruntime float16 unavailable: {type(exc).__name__})"
    report.fp16 = Comparison(report.fp16_method, [relative_errors(n, r, g) for n, r, g in zip(names, reference, half,
                             strict=True)], agree(reference, half))
    report.overflow_layers = fp16_overflow_layers(onnx_path, inputs, input_name, batch_one)
    return report
