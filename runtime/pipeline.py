"""The on-device pipeline: source -> preprocess -> detector -> decode + NMS -> morphology -> annotate -> sink.

With ``detect_every`` (``smearsight run --detect-every``, default ``auto``) the detector stages run on key
frames only and the frames between reuse the key frame's detections moved with the stage
(runtime/stage_motion.py); with ``detect_every="async"`` the detector runs on a thread of its own on the
latest frame and every frame shows its newest result moved with the stage (runtime/background_detect.py).

:class:`Pipeline` holds everything that is allocated once (backends, the pre-processing buffers, the
anchors, the fixed ``[max_det, 6]`` detection arrays, the GPU decoder when TensorRT runs) and processes
one frame at a time. :func:`run` drives it from a frame source into a sink, records the session and
keeps per-stage latencies; problems (a lost camera, a corrupt frame, a full disk) become plain words on
the picture and in the log, and the loop keeps going where it can.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.anchors import generate_anchors
from smearsight.catalog import MORPHOLOGY_PARTS
from smearsight.errors import InputError, first_line
from smearsight.fileio import atomic_write_json, check_output_file
from smearsight.interrupts import raise_if_interrupted
from smearsight.manifest import MANIFEST_NAME, load_manifest
from smearsight.runtime.backends import InferenceBackend, cpu_only, open_backend
from smearsight.runtime.frame_worker import InferenceWorker, Processed
from smearsight.runtime.postprocess import EMPTY_ROW, decode_nms, to_frame_pixels
from smearsight.runtime.preprocess import Preprocessor, shrink_note
from smearsight.runtime.tiling import Tile, default_overlap, keep_owned, plan_tiles

log = logging.getLogger("smearsight.runtime")

STAGES = ("capture", "motion", "detector_wait", "preprocess", "infer", "decode_nms", "morphology", "annotate", "sink",
          "record")
DEFAULT_SOURCE = "synth://"
DEFAULT_FILE_SINK = "file://smearsight-out.mp4"
# stats' fps_steady leaves out the first frames (model warm-up, the first field's morphology, caches)
WARMUP_FRAMES = 5
MAX_FAILED_FRAMES = 50  # frames the models fail on, before any succeeded, after which run() gives up


# ------------------------------------------------------------------------------------------- models
@dataclass
class ModelSet:
    """Where the detector and the morphology models live."""

    detector: Path
    morphology: list[Path] = field(default_factory=list)
    packaged: bool = False
    notes: list[str] = field(default_factory=list)
    auto_int8: bool = False  # the int8 detector was chosen by --precision auto (the float one is there too)


def packaged_models_root() -> Path:
    """The demo models shipped inside the package (``smearsight/models``)."""
    return Path(str(resources.files("smearsight").joinpath("models")))


def find_models(models: Path | str | None, precision: str = "auto", backend: str = "auto") -> ModelSet:
    """Resolve ``--models DIR``: ``DIR/detector/`` (float; its TensorRT engine if any) or ``DIR/detector_int8/``
    (``smearsight export int8``), + ``DIR/morphology_<part>/`` (or ``DIR`` itself a detector directory).
    None = the demo models shipped in the package.

    ``precision``: ``fp32`` the float detector, ``int8`` the int8 one, ``auto`` the int8 one when it exists and
    this device runs ONNX Runtime on the CPU only (no TensorRT, no CUDA provider, ``backend`` not ``trt``).
    """
    if precision not in ("auto", "fp32", "int8"):
        raise InputError(f"--precision: '{precision}' is not one of auto, fp32, int8")
    packaged = models is None
    root = packaged_models_root() if packaged else Path(models).expanduser()
    if not packaged and not root.is_dir():
        if root.exists():  # e.g. the model.onnx or manifest.json itself
            raise InputError(f"--models {root}: is a file; expected the folder holding detector/ (or the "
                             f"detector's own folder, with its {MANIFEST_NAME})")
        raise InputError(f"--models {root}: no such folder")
    int8 = root / "detector_int8"
    has_int8 = (int8 / MANIFEST_NAME).is_file()
    stale_int8 = ""
    notes: list[str] = []
    if (root / MANIFEST_NAME).is_file():
        detector = root
        own = load_manifest(root).precision
        if precision != "auto" and (own == "int8") != (precision == "int8"):
            raise InputError(f"{root / MANIFEST_NAME}: this detector's precision is '{own}', not the "
                             f"--precision {precision} asked for")
    elif precision == "int8":
        if not has_int8:
            raise InputError(f"--precision int8: no {int8 / MANIFEST_NAME} (make one with smearsight export int8)")
        stale = _stale_int8(root)
        if stale:
            raise InputError(stale)
        detector = int8
    elif precision == "auto" and has_int8 and cpu_only(backend) and not (stale_int8 := _stale_int8(root)):
        detector = int8
    elif (root / "detector" / MANIFEST_NAME).is_file():
        detector = root / "detector"
    elif packaged:
        raise InputError(
            f"{root / 'detector'}: the built-in demo models are not installed in this package "
            "(expected detector/manifest.json + model.onnx); pass --models DIR with exported models"
        )
    else:
        raise InputError(f"--models {root}: no detector model (expected {root}/detector/{MANIFEST_NAME})")
    if precision == "auto" and has_int8 and detector != int8 and cpu_only(backend):
        notes.append(f"{int8}: not used: {stale_int8}")
    morph = []
    for part in MORPHOLOGY_PARTS:
        d = root / f"morphology_{part}"
        if (d / MANIFEST_NAME).is_file():
            morph.append(d)
        elif d.exists() or d.is_symlink():
            notes.append(f"morphology model skipped: {d}: no {MANIFEST_NAME} there")
    auto_int8 = precision == "auto" and detector == int8 and (root / "detector" / MANIFEST_NAME).is_file()
    return ModelSet(detector, morph, packaged, notes, auto_int8)


def _stale_int8(root: Path) -> str:
    """Why ``root/detector_int8`` was not made from ``root/detector`` (re-exported since) or cannot be used
    (its manifest is damaged), or ""."""
    try:
        int8 = load_manifest(root / "detector_int8")
    except InputError as exc:
        return str(exc)
    if not (root / "detector" / MANIFEST_NAME).is_file():
        return ""
    source = load_manifest(root / "detector").onnx_sha256
    made_from = int8.quantization.float_onnx_sha256 if int8.quantization else ""
    if made_from and source and made_from != source:
        return (f"{root / 'detector_int8' / MANIFEST_NAME}: quantized from another float model than "
                f"{root / 'detector'} (field 'quantization.float_onnx_sha256'); run smearsight export int8 again")
    return ""


# ------------------------------------------------------------------------------------------- pipeline
class Pipeline:
    """One detector (+ optional morphology models) with every buffer allocated once.

    ``process(frame_rgb)`` returns ``(detections, count, morphology, timings)``: ``detections`` is the
    fixed ``[max_det, 6]`` array in frame pixels (reused by the next call), ``timings`` seconds per stage.

    ``detect_every`` > 1 runs the detector on key frames only and moves their detections with the stage
    in between (:class:`~smearsight.runtime.stage_motion.DetectionCarry`); :attr:`detected_last` says
    whether the last frame went through the detector. ``"async"`` runs it on a
    :class:`~smearsight.runtime.background_detect.BackgroundDetector` thread instead, offered every frame;
    each frame shows the newest result moved by the stage's shift since the frame it was found on. A frame
    whose shift is unknown (the first, a jump, a focus change, a new size) is detected in the loop itself
    (only these count as :attr:`detected_last`; :attr:`detector_runs` counts every run). The background
    runs' ``preprocess``/``infer``/``decode_nms`` times are reported with the frame their result reaches.
    The stage's shift is measured once per frame (the ``motion`` stage) whenever carrying detections or
    morphology results needs it; :attr:`boxes_age_s` is how much earlier than the last frame the frame its
    boxes were found on came in (0 when the detector ran on it).

    ``tile`` (a detector exported with resize ``pad``): a frame larger than the input is detected at its own
    scale in overlapping input-sized tiles (runtime/tiling.py; :attr:`tiles_last` says into how many) rather
    than shrunk to fit.
    """

    def __init__(self, detector: InferenceBackend, morphology: list[InferenceBackend] | None = None, *,
                 reuse_morphology: bool = False, detect_every: int | str = 1, target_fps: float = 10.0,
                 morphology_budget_s: float | None = 0.1, tile: bool = True) -> None:
        from smearsight.runtime.morphology_stage import MorphologyStage
        from smearsight.runtime.stage_motion import DetectionCarry, StageShift

        man = detector.manifest
        if man.kind != "detector" or man.detector is None:
            raise InputError(f"{detector.model_dir}: not a detector model (manifest kind '{man.kind}')")
        self.detector = detector
        self.spec = man.detector
        self.class_names = list(self.spec.class_names)
        self.image_size = man.image_size
        self.anchors = generate_anchors(self.image_size, self.spec.anchors)
        outs = {o.name: o.shape for o in man.outputs}
        expected = outs[self.spec.class_output]
        if len(expected) >= 2 and expected[-2] not in (-1, self.anchors.shape[0]):
            raise InputError(
                f"{detector.model_dir}: the manifest's anchors give {self.anchors.shape[0]} anchors but output "
                f"'{self.spec.class_output}' has {expected[-2]}"
            )
        self.preprocess = Preprocessor(man.input)
        self.max_det = self.spec.max_detections
        self._dets = np.empty((self.max_det, 6), np.float32)
        self._frame_dets = np.empty((self.max_det, 6), np.float32)
        self._class_candidates = np.zeros(len(self.class_names), np.int64)
        self.capped_classes: list[str] = []  # see cap_warning
        self.size_note: str | None = None  # frames larger than a ``pad`` model's input (see cap_warning)
        # frames larger than a ``pad`` model's input detected unscaled in overlapping tiles (runtime/tiling.py)
        self.tile = tile and man.input.resize == "pad"
        self.tile_overlap = default_overlap(self.anchors)
        self._tiles: tuple[tuple[int, int], list[Tile]] | None = None
        self._tile_dets = np.empty((self.max_det, 6), np.float32)
        self.tiles_last = 1  # tiles the last detected frame was split into
        self._gpu_decoder = None
        self._gpu_preprocess = None
        self._decode_on_device = False
        if detector.name == "tensorrt":
            self._gpu_decoder = self._open_gpu_decoder()
        self.morphology_backends = list(morphology or [])
        self.morphology = (
            MorphologyStage(self.morphology_backends, self.class_names, reuse=reuse_morphology,
                            budget_s=morphology_budget_s)
            if self.morphology_backends else None
        )
        self.notes = list(detector.notes) + [n for b in self.morphology_backends for n in b.notes]
        if self.morphology is not None and not len(self.morphology.sperm_classes):
            self.notes.append(f"morphology models loaded, but the detector's classes ({', '.join(self.class_names)}) "
                              "include no sperm, so no crop will be judged")
        self.detect_async = detect_every == "async"
        self.carry = DetectionCarry(1 if self.detect_async else detect_every, target_fps=target_fps)
        carrying = self.carry.enabled or self.detect_async
        self.motion = StageShift() if carrying or self.morphology is not None and reuse_morphology else None
        self.detected_last = False
        self.background = None
        if self.detect_async:
            from smearsight.runtime.background_detect import BackgroundDetector

            self.background = BackgroundDetector(self._detect, self.max_det)
        self._epoch = 0  # stage-position frame of reference (async): a new one after every unknown shift
        self._position = [0.0, 0.0]  # the stage's accumulated shift within it
        self._async_hw: tuple[int, int] | None = None  # frame size of the reference; None: detect in the loop
        self._boxes_time: float | None = None  # when the frame that the shown boxes were found on came in
        self.boxes_age_s = 0.0
        self._loop_runs = 0
        self.shift_unknown = 0  # frames after the first whose stage shift could not be measured
        self._shift_seen = False

    @property
    def detect_mode(self) -> int | str:
        """What ``detect_every`` asked for: ``"async"``, ``"auto"`` or the interval in frames."""
        if self.detect_async:
            return "async"
        return "auto" if self.carry.auto else self.carry.detect_every

    @property
    def detect_interval(self) -> int | str:
        """The interval in frames in use now (``auto`` changes it), or ``"async"``."""
        return "async" if self.detect_async else self.carry.detect_every

    @property
    def detector_runs(self) -> int:
        """Detector runs finished so far: on frames in the loop, and in the background (async)."""
        return self._loop_runs + (self.background.results if self.background is not None else 0)

    def _open_gpu_decoder(self) -> Any:
        """The CUDA decoder, sharing the engine's context and stream so that the raw outputs never
        leave the GPU (only when the engine's outputs are float32)."""
        det = self.detector
        try:
            from smearsight.runtime.cuda_postprocess import CudaDecodeNMS

            on_device = all(
                det.output_dtype(n) == np.float32 for n in (self.spec.class_output, self.spec.box_output)
            )
            decoder = CudaDecodeNMS(
                self.anchors, len(self.class_names), score_threshold=self.spec.score_threshold,
                iou_threshold=self.spec.iou_threshold, pre_nms_topk=self.spec.pre_nms_topk,
                max_detections=self.max_det, image_size=self.image_size,
                context=det.context_handle, stream=det.stream,
            )
            self._decode_on_device = on_device
            if on_device and det.manifest.input.shape[0] in (1, -1):
                self._gpu_preprocess = self._open_gpu_preprocess()
            return decoder
        except Exception as exc:  # the NumPy reference gives the same detections
            log.warning("GPU decode + NMS not available (%s); using the CPU reference", first_line(exc))
            log.debug("GPU decode + NMS failed to open", exc_info=True)
            return None

    def _open_gpu_preprocess(self) -> Any:
        det = self.detector
        det.context_handle.push()
        try:
            from smearsight.runtime.cuda_postprocess import CudaPreprocessor

            return CudaPreprocessor(det.manifest.input, det.context_handle, det.stream)
        except Exception as exc:  # the CPU pre-processing gives the same input
            log.warning("GPU pre-processing not available (%s); pre-processing on the CPU", first_line(exc))
            log.debug("GPU pre-processing failed to open", exc_info=True)
            return None
        finally:
            det.context_handle.pop()

    def _all_gpu(self, frame_rgb: np.ndarray) -> tuple[np.ndarray, int, Any]:
        """Upload the frame, pre-process, run the engine and decode + NMS on one stream."""
        det = self.detector
        ctx = det.context_handle
        ctx.push()
        try:
            box = self._gpu_preprocess(frame_rgb, det.input_device())
            det.execute()
            dets, n = self._gpu_decoder.run_on_device(
                det.device_output(self.spec.class_output), det.device_output(self.spec.box_output)
            )
            return dets, n, box
        finally:
            ctx.pop()

    def _infer_decode_gpu(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        det = self.detector
        ctx = det.context_handle
        ctx.push()
        try:
            det.enqueue(x)
            return self._gpu_decoder.run_on_device(
                det.device_output(self.spec.class_output), det.device_output(self.spec.box_output)
            )
        finally:
            ctx.pop()

    def decode(self, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
        """Decode + NMS of the detector outputs into the fixed array (model-input pixels)."""
        logits = outputs[self.spec.class_output]
        deltas = outputs[self.spec.box_output]
        if self._gpu_decoder is not None:
            return self._gpu_decoder(logits, deltas)
        return decode_nms(
            logits, deltas, self.anchors, score_threshold=self.spec.score_threshold,
            iou_threshold=self.spec.iou_threshold, pre_nms_topk=self.spec.pre_nms_topk,
            max_detections=self.max_det, image_size=self.image_size, out=self._dets,
            class_candidates=self._class_candidates,
        )

    def _note_caps(self) -> None:
        """Set ``capped_classes`` from the last decode's per-class candidate counts (CUDA or NumPy)."""
        counts = self._gpu_decoder.class_candidates if self._gpu_decoder is not None else self._class_candidates
        cap = self.spec.pre_nms_topk
        self.capped_classes = [name for name, count in zip(self.class_names, counts.tolist(), strict=True)
                               if count > cap]

    def cap_warning(self) -> str:
        """Plain words when the last decode (NumPy or CUDA) had more candidates of a class above the score
        threshold than the manifest's ``pre_nms_topk``: the weakest of them were dropped before NMS, so on
        such a crowded field some cells may be neither boxed nor counted; or when the frames are larger than
        a ``pad`` detector's input and were shrunk, or when a morphology model stopped (empty otherwise)."""
        said = list(self.morphology.failed.values()) if self.morphology is not None else []
        if self.capped_classes:
            said.insert(0, f"more {', '.join(self.capped_classes)} candidates than the model's pre_nms_topk "
                           f"({self.spec.pre_nms_topk}): some cells may be missed and counts low; re-export with a "
                           "larger --pre-nms-topk")
        elif self.size_note:
            said.insert(0, self.size_note)
        return "; ".join(said)

    def process(self, frame_rgb: np.ndarray) -> tuple[np.ndarray, int, list[dict[str, Any]], dict[str, float]]:
        """Run one RGB uint8 frame through the models (or carry the key frame's detections onto it)."""
        t0 = time.perf_counter()
        times: dict[str, float] = {}
        gray = shift = None
        if self.motion is not None or self._gpu_preprocess is not None:  # both read the frame as RGB uint8
            _check_rgb_frame(frame_rgb)
        if self.motion is not None:
            gray = self.motion.cv2.cvtColor(frame_rgb, self.motion.cv2.COLOR_RGB2GRAY)
            shift = self.motion(gray)
            if shift is None and self._shift_seen:
                self.shift_unknown += 1
            self._shift_seen = True
            times["motion"] = time.perf_counter() - t0
        frame_hw = frame_rgb.shape[:2]
        out = self._frame_dets
        if self.background is not None:
            n = self._process_async(frame_rgb, shift, frame_hw, out, times, t0)
        else:
            self.detected_last = self.carry.should_detect(shift, frame_hw)
            if self.detected_last:
                try:
                    n = self._detect(frame_rgb, out, times)
                except Exception:
                    self.carry.reset()  # this frame's shift was not applied to the carried boxes
                    raise
                self.carry.keyframe(out, n, frame_hw)
                self._boxes_time = t0
                self._loop_runs += 1
            else:
                t1 = time.perf_counter()
                n = self.carry.carry(shift, out)  # type: ignore[arg-type]
                times["motion"] += time.perf_counter() - t1
        self.boxes_age_s = t0 - self._boxes_time if self._boxes_time is not None else 0.0
        t3 = time.perf_counter()
        morph = []
        if self.morphology is not None:
            morph = (self.morphology(frame_rgb, out, n, gray=gray, shift=shift) if self.motion is not None
                     else self.morphology(frame_rgb, out, n))
        times["morphology"] = time.perf_counter() - t3
        return out, n, morph, times

    def _process_async(self, frame_rgb: np.ndarray, shift: tuple[float, float] | None, frame_hw: tuple[int, int],
                       out: np.ndarray, times: dict[str, float], came_in: float) -> int:
        """One frame (``came_in``: when it entered :meth:`process`) with the detector in the background: its
        newest result, moved onto this frame."""
        bg = self.background
        assert bg is not None
        hw = (int(frame_hw[0]), int(frame_hw[1]))
        if not bg.alive:
            raise RuntimeError("the detector thread has stopped")
        if shift is None or self._async_hw != hw:  # nothing known to carry from: detect here, and wait for it
            self._epoch += 1
            self._position = [0.0, 0.0]
            self._async_hw = None
            t1 = time.perf_counter()
            if not bg.drain():  # never two detections at once: they share every buffer
                from smearsight.runtime.background_detect import DRAIN_TIMEOUT_S

                raise RuntimeError(f"the detector has not finished its last frame within {DRAIN_TIMEOUT_S:.0f} s")
            times["detector_wait"] = time.perf_counter() - t1
            n = self._detect(frame_rgb, out, times)
            self._loop_runs += 1
            self.carry.keyframe(out, n, hw)
            self._async_hw = hw
            self._boxes_time = came_in
            self.detected_last = True
            return n  # this very frame is not offered again
        self._position[0] += shift[0]  # type: ignore[index]
        self._position[1] += shift[1]  # type: ignore[index]
        t1 = time.perf_counter()
        result = bg.take()
        if result is not None and result.error is not None:
            self._async_hw = None  # the next frame is detected here, where a failure is reported with its frame
            log.warning("background detection failed: %s", first_line(result.error))
            result = None
        if result is not None and result.tag[0] == self._epoch:  # else found before a jump: nothing to carry
            _, x0, y0, found_on = result.tag
            self.carry.keyframe(result.detections, result.count, hw)
            n = self.carry.carry((self._position[0] - x0, self._position[1] - y0), out)
            times.update(result.times)
            self._boxes_time = found_on
        else:
            n = self.carry.carry(shift, out)
        self.detected_last = False
        if self._async_hw is not None:  # (after a failure the next frame is detected here: nothing to offer)
            bg.offer(frame_rgb, (self._epoch, self._position[0], self._position[1], came_in))
        times["motion"] += time.perf_counter() - t1
        return n

    def _detect(self, frame_rgb: np.ndarray, out: np.ndarray, times: dict[str, float]) -> int:
        """Pre-process, infer, decode + NMS into ``out`` (frame pixels); returns the detection count. With
        :attr:`tile`, a frame larger than the input is detected tile by tile and the tiles' detections merged
        (their stage times summed)."""
        tiles = self._plan(frame_rgb.shape[:2])
        self.tiles_last = len(tiles) if tiles else 1
        if not tiles:
            self.size_note = shrink_note(frame_rgb.shape[:2], self.detector.manifest.input)
            n, stage_times = self._detect_one(frame_rgb, out)
            self._note_caps()
            times.update(zip(("preprocess", "infer", "decode_nms"), stage_times, strict=True))
            return n
        self.size_note = None
        totals = [0.0, 0.0, 0.0]
        kept, capped = [], set()
        for tile in tiles:
            n, stage_times = self._detect_one(frame_rgb[tile.y0:tile.y1, tile.x0:tile.x1], self._tile_dets)
            self._note_caps()
            capped.update(self.capped_classes)
            t0 = time.perf_counter()
            kept.append(keep_owned(self._tile_dets, n, tile))
            totals = [a + b for a, b in zip(totals, stage_times, strict=True)]
            totals[2] += time.perf_counter() - t0
        t0 = time.perf_counter()
        merged = np.concatenate(kept)
        order = np.argsort(-merged[:, 4], kind="stable")[: self.max_det]
        n = len(order)
        out[:n] = merged[order]
        out[n:] = EMPTY_ROW
        self.capped_classes = [name for name in self.class_names if name in capped]
        totals[2] += time.perf_counter() - t0
        times.update(zip(("preprocess", "infer", "decode_nms"), totals, strict=True))
        return n

    def _plan(self, frame_hw: tuple[int, int]) -> list[Tile] | None:
        """The tiles for a frame size, or None when the frame is detected whole (no :attr:`tile`, or it fits)."""
        if not self.tile:
            return None
        h, w = int(frame_hw[0]), int(frame_hw[1])
        H, W = self.image_size  # noqa: N806
        if h <= H and w <= W:
            return None
        if self._tiles is None or self._tiles[0] != (h, w):
            self._tiles = ((h, w), plan_tiles((h, w), (H, W), self.tile_overlap))
        return self._tiles[1]

    def _detect_one(self, frame_rgb: np.ndarray, out: np.ndarray) -> tuple[int, tuple[float, float, float]]:
        """One image through the detector into ``out`` (its pixels); the count and the three stage times."""
        t0 = time.perf_counter()
        if self._gpu_preprocess is not None:  # upload, preprocess, engine, decode + NMS: one GPU stream
            t1 = t0
            dets, n, box = self._all_gpu(np.ascontiguousarray(frame_rgb))
            t2 = time.perf_counter()
        else:
            x, box = self.preprocess(frame_rgb)
            t1 = time.perf_counter()
            if self._decode_on_device:  # TensorRT + CUDA decode: one stream, the fixed array comes back
                dets, n = self._infer_decode_gpu(x)
                t2 = time.perf_counter()
            else:
                outputs = self.detector.infer(x)
                t2 = time.perf_counter()
                dets, n = self.decode(outputs)
        _, n = to_frame_pixels(dets, n, scale=(box.scale_x, box.scale_y), offset=(box.offset_x, box.offset_y),
                               frame_size=box.frame_size, out=out)
        return n, (t1 - t0, t2 - t1, time.perf_counter() - t2)

    def reset(self) -> None:
        """Forget what was carried from earlier frames (a new slide or session): the next frame is detected."""
        self.carry.reset()
        self._async_hw = None
        self._boxes_time = None
        self._shift_seen = False
        if self.motion is not None:
            self.motion.reset()
        if self.morphology is not None:
            self.morphology.reset()

    def close(self) -> None:
        if self.background is not None and not self.background.close():
            for b in self.morphology_backends:  # the detector thread never touches these
                b.close()
            return  # a detection still runs on the buffers and the engine: leave them to the process's exit
        if self._gpu_preprocess is not None:
            self.detector.context_handle.push()
            try:
                self._gpu_preprocess.close()
            finally:
                self.detector.context_handle.pop()
        if self._gpu_decoder is not None:
            self._gpu_decoder.close()
        self.detector.close()
        for b in self.morphology_backends:
            b.close()


def _check_rgb_frame(frame: np.ndarray) -> None:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise InputError(f"frame: expected an RGB uint8 image HxWx3, got {frame.dtype} of shape {frame.shape}")


def open_pipeline(models: Path | str | None, backend: str = "auto", *, morphology: bool = True,
                  precision: str = "auto", reuse_morphology: bool = True, detect_every: int | str = 1,
                  target_fps: float = 10.0, morphology_budget_s: float | None = 0.1, tile: bool = True) -> Pipeline:
    """Open the detector and morphology models found by :func:`find_models` as a :class:`Pipeline`."""
    from smearsight.runtime.morphology_stage import check_morphology_model

    found = find_models(models, precision, backend)
    try:
        detector = open_backend(found.detector, backend)  # type: ignore[arg-type]
    except InputError as exc:
        if not found.auto_int8:
            raise
        detector = open_backend(found.detector.parent / "detector", backend)  # type: ignore[arg-type]
        found.notes.append(f"{found.detector}: not used: {exc}")
    detector.notes.extend(found.notes)
    morph = []
    if morphology:
        for d in found.morphology:
            b = None
            try:
                b = open_backend(d, backend)  # type: ignore[arg-type]
                check_morphology_model(b)
                part = b.manifest.morphology.part  # type: ignore[union-attr]
                if d.name != f"morphology_{part}":
                    raise InputError(f"{d}: holds the {part} model (manifest morphology.part '{part}'); move it to "
                                     f"morphology_{part}/")
                morph.append(b)
            except InputError as exc:
                if b is not None:
                    b.close()
                detector.notes.append(f"morphology model skipped: {exc}")  # logged by run() with the others
    return Pipeline(detector, morph, reuse_morphology=reuse_morphology, detect_every=detect_every,
                    target_fps=target_fps, morphology_budget_s=morphology_budget_s, tile=tile)


# ------------------------------------------------------------------------------------------- run loop
@dataclass
class RunConfig:
    """What ``smearsight run`` was asked to do."""

    source: str = DEFAULT_SOURCE
    sink: str | None = None
    models: Path | None = None
    backend: str = "auto"
    headless: bool = False
    max_frames: int | None = None
    record: Path | None = None
    stats_json: Path | None = None
    loop: bool = False
    fullscreen: bool = False
    wait_display: bool = False
    morphology: bool = True
    morphology_reuse: bool = True
    precision: str = "auto"
    # the detector on every Nth frame, detections carried with the stage in between; "auto": as often as
    # target_fps allows (runtime/stage_motion.py); "async": on its own thread (runtime/background_detect.py)
    detect_every: int | str = "auto"
    target_fps: float = 10.0
    morphology_budget_s: float | None = 0.1  # per frame, for new sperm (runtime/morphology_stage.py)
    # infer the next frame while this one is drawn and shown (runtime/frame_worker.py); off by default: no
    # gain on a CPU-only device, where ONNX Runtime already uses every core; meant for GPU devices (unmeasured)
    overlap: bool = False
    # frames larger than a ``pad`` detector's input: detected unscaled in overlapping tiles (False: shrunk)
    tile: bool = True
    panel: str | None = None
    captures: Path = Path("captures")


class StageTimer:
    """Bounded per-stage latency history (seconds); medians in ms."""

    def __init__(self, keep: int = 2000) -> None:
        self.samples: dict[str, deque[float]] = {s: deque(maxlen=keep) for s in STAGES}

    def add(self, stage: str, seconds: float) -> None:
        self.samples[stage].append(seconds)

    def last_ms(self) -> dict[str, float]:
        return {s: round(v[-1] * 1e3, 1) for s, v in self.samples.items() if v}

    def medians_ms(self) -> dict[str, float]:
        return {s: round(statistics.median(v) * 1e3, 3) for s, v in self.samples.items() if v}

    def max_ms(self) -> dict[str, float]:
        return {s: round(max(v) * 1e3, 3) for s, v in self.samples.items() if v}


class _Problems:
    """Plain-words problems: logged once each, the latest shown on screen for a few seconds."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.current = ""
        self.until = 0.0

    def report(self, message: str, hold_s: float = 5.0, *, count: bool = True) -> None:
        """Show ``message``, logged and counted; ``count=False`` only shows it: a state polled every frame
        whose events the reporter (the frame source) logs and counts itself."""
        if not message:
            return
        if count:
            if message not in self.seen:
                log.warning(message)
            self.seen[message] = self.seen.get(message, 0) + 1
        self.current = message
        self.until = time.monotonic() + hold_s

    def active(self) -> str:
        return self.current if time.monotonic() < self.until else ""


def choose_sink(sink: str | None, headless: bool) -> tuple[str, str]:
    """The sink URI to use and a plain-words note when it was chosen for the user."""
    if sink:
        return sink, ""
    if not headless:
        from smearsight.device.sinks import display_problem

        problem = display_problem()
        if not problem:
            return "display://0", ""
        return DEFAULT_FILE_SINK, f"{problem}: writing the annotated video to {DEFAULT_FILE_SINK[7:]} instead"
    return DEFAULT_FILE_SINK, f"--headless: writing the annotated video to {DEFAULT_FILE_SINK[7:]}"


def run(cfg: RunConfig, pipeline: Pipeline | None = None, *, echo: Any = None) -> dict[str, Any]:
    """Run the pipeline from ``cfg.source`` to ``cfg.sink``; returns (and optionally writes) the stats.

    Raises InputError only when nothing can run at all: no models, an unknown source or sink, a source
    that gave no frame, models that failed on the first ``MAX_FAILED_FRAMES`` frames (each shown with the
    reason meanwhile), a ``--stats-json`` that cannot be written. The stats' ``counts`` are detections
    per class summed over the frames shown (a cell in view for ten frames counts ten times), not cells.
    """
    from smearsight.deploy.sdnotify import Watchdog
    from smearsight.device.record import SessionSummary
    from smearsight.device.sinks import open_sink
    from smearsight.device.sources import open_source
    from smearsight.runtime.annotate import annotate

    say = echo or (lambda msg: log.info(msg))
    if cfg.stats_json is not None:
        check_output_file(cfg.stats_json, "--stats-json")
    own_pipeline = pipeline is None
    pipe = pipeline or open_pipeline(cfg.models, cfg.backend, morphology=cfg.morphology, precision=cfg.precision,
                                     reuse_morphology=cfg.morphology_reuse, detect_every=cfg.detect_every,
                                     target_fps=cfg.target_fps, morphology_budget_s=cfg.morphology_budget_s,
                                     tile=cfg.tile)
    problems = _Problems()
    for note in pipe.notes:  # logged once (the log is what the terminal and the journal show)
        problems.report(note, hold_s=10.0)
    sink_uri, sink_note = choose_sink(cfg.sink, cfg.headless)
    if sink_note:
        say(sink_note)
    source = sink = recorder = bridge = worker = None
    watchdog = Watchdog()
    last_img: np.ndarray | None = None
    last_counts: dict[str, int] = {}
    last_status: dict[str, Any] = {}  # the frozen field's status: its counts stay on the tablet
    captures = 0
    timer = StageTimer()
    totals = dict.fromkeys(pipe.class_names, 0)
    slide = SessionSummary(pipe.class_names)  # this session's running summary: the status page's, the stats'
    slide_now = slide.to_dict()
    slide_open = True  # False after the panel stopped the session: its summary stays on the page as it ended
    frames = 0
    failed_in_a_row = 0
    gave_up = ""  # why the run stopped before its source ended: the models fail on every frame
    t_warm: float | None = None
    judged = 0
    detected = 0
    intervals: deque[float] = deque(maxlen=10000)  # between frames shown, after the warm-up
    boxes_age: deque[float] = deque(maxlen=10000)
    session_id = None
    t_start = time.perf_counter()
    try:
        _check_outputs_apart(cfg, sink_uri)
        source = open_source(cfg.source, loop=cfg.loop)
        # a video plays at the source's own rate when it has one (a file), else at the rate aimed for
        sink = open_sink(sink_uri, headless=cfg.headless, fullscreen=cfg.fullscreen,
                         wait=cfg.wait_display or None, fps=source.nominal_fps or cfg.target_fps)
        if getattr(sink, "note", ""):
            say(sink.note)
        if cfg.record is not None:
            from smearsight.device.record import RecordError, SessionRecorder

            try:
                recorder = SessionRecorder(cfg.record)
                session_id = recorder.start_session(
                    {"source": cfg.source, "class_names": pipe.class_names, "backend": pipe.detector.name,
                     "model": pipe.detector.manifest.name, "model_version": pipe.detector.manifest.model_version}
                )
            except RecordError as exc:
                problems.report(f"not recording: {exc}", hold_s=30.0)
                recorder = None
        if cfg.panel:
            from smearsight.runtime.panel_bridge import PanelBridge

            bridge = PanelBridge(cfg.panel)
        sink_uri = getattr(sink, "uri", sink_uri)  # http://:0 -> the port the system chose
        watchdog.ready(f"running {cfg.source} -> {sink_uri}")
        say(f"running {cfg.source} -> {sink_uri} with {pipe.detector.name}"
            + (f" + {len(pipe.morphology_backends)} morphology model(s)" if pipe.morphology_backends else ""))
        t_start = time.perf_counter()
        t_prev = t_start
        fps = 0.0
        # async: frames no faster than the target, so that the detector's thread gets the rest of the CPU
        worker = InferenceWorker(pipe, source, threaded=cfg.overlap,
                                 min_interval_s=pipe.carry.target_s if pipe.detect_async else 0.0)
        for item in worker:
            # a Ctrl-C or SIGTERM that a finalizer swallowed still stops the run, on every kind of frame (lost
            # camera, frozen field, failed frame) and before the next one is shown
            raise_if_interrupted()
            frame = item.frame
            watchdog.ping()
            problems.report(source.status, count=False)
            if bridge is not None:
                problems.report(bridge.problem())  # logged and counted; the screen shows the countdown
                problems.report(bridge.status_line(), count=False)
                requests = bridge.take_requests()
                if requests.start_session is not None:  # a new slide, recorded or not: a new summary
                    slide, slide_open = SessionSummary(pipe.class_names), True
                    slide_now = slide.to_dict()
                elif requests.stop_session:
                    slide_open = False
                session_id = _apply_panel_requests(requests, recorder, session_id, cfg, pipe,
                                                   worker.reset_morphology, say)
                if bridge.frozen and last_img is not None:  # hold the field the technician froze
                    worker.hold.set()
                    sink.write(last_img, {**last_status, "frozen": True, "session": slide_now})
                    captures += _save_captures(bridge.take_captures(), last_img, cfg.captures,
                                               last_status.get("frame", frame.index), say, problems)
                    bridge.publish(frame.index, fps, last_counts, "", str(session_id or ""))
                    if getattr(sink, "should_stop", False):  # the window closed, q or Esc, on the frozen field
                        break
                    continue
                worker.hold.clear()
                if item.held:  # drawn while the field was frozen, just released: the field stays a moment
                    sink.write(last_img, {**last_status, "frozen": True, "session": slide_now})
                    if getattr(sink, "should_stop", False):
                        break
                    continue
            if frame.stale:  # camera lost: keep the message on screen, no inference
                img = frame.image.copy()
                lost = source.status or problems.active() or "camera lost"  # before a panel's own countdown
                annotate(img, np.zeros((0, 6), np.float32), pipe.class_names, None,
                         {"error": lost, "title": "SmearSight"})
                sink.write(img, {"error": lost, "frame": frame.index, "session": slide_now})
                if bridge is not None:  # the panel says so too, with nothing counted in view
                    bridge.publish(max(frame.index, 0), 0.0, dict.fromkeys(pipe.class_names, 0), lost,
                                   str(session_id or ""))
                if getattr(sink, "should_stop", False):  # q while the camera is lost: not only once it is back
                    break
                continue
            if item.generation != worker.generation:  # judged before a new session reset the morphology
                continue
            problems.report(item.error or item.warning)
            if item.detections is None:  # the frame could not be processed: show it with the reason
                img = frame.image.copy()
                annotate(img, np.zeros((0, 6), np.float32), pipe.class_names, None,
                         {"error": item.error, "title": "SmearSight"})
                sink.write(img, {"error": item.error, "frame": frame.index, "session": slide_now})
                if bridge is not None:
                    bridge.publish(frame.index, fps, dict.fromkeys(pipe.class_names, 0), item.error,
                                   str(session_id or ""))
                if getattr(sink, "should_stop", False):  # the window closed, q or Esc
                    break
                failed_in_a_row += 1
                if frames == 0 and failed_in_a_row >= MAX_FAILED_FRAMES:
                    gave_up = f"the models failed on the first {failed_in_a_row} frames ({item.error})"
                    break
                continue
            failed_in_a_row = 0
            frames += 1
            if frames == WARMUP_FRAMES:
                t_warm = time.perf_counter()
            judged += item.judged
            detected += item.detected
            timer.add("capture", item.wait_s)
            for stage, secs in item.times.items():
                timer.add(stage, secs)
            valid = item.detections
            morph = item.morphology
            n = valid.shape[0]
            counts = np.bincount(valid[:, 5].astype(np.int64), minlength=len(pipe.class_names)) if n else None
            frame_counts = {name: int(counts[i]) if counts is not None else 0
                            for i, name in enumerate(pipe.class_names)}
            for name, c in frame_counts.items():
                totals[name] += c
            if slide_open:
                slide.add_frame(frame.timestamp, valid, pipe.class_names, morph)
                slide_now = slide.to_dict()
            now = time.perf_counter()
            dt = now - t_prev
            t_prev = now
            fps = 1.0 / dt if fps == 0.0 else 0.9 * fps + 0.1 / max(dt, 1e-6)
            if frames > WARMUP_FRAMES and dt < 2.0:  # not one after a frozen screen
                intervals.append(dt)
            boxes_age.append(item.boxes_age_s)
            if frames > 1 and dt < 2.0:  # not the first frame (models' warm-up) nor one after a frozen screen
                # what the frame cost, without waiting for the camera: a slow camera is no reason to carry
                pipe.carry.observe(dt - item.wait_s, item.detected)
            for err in (getattr(sink, "error", ""), getattr(recorder, "error", "") if recorder else ""):
                problems.report(err, hold_s=10.0)
            overlay = {"fps": fps, "latency_ms": timer.last_ms(), "counts": frame_counts, "frame": frame.index,
                       "title": "SmearSight",
                       "detect_every": pipe.detect_interval,
                       "boxes_age_ms": 1000.0 * item.boxes_age_s}
            active = problems.active()
            if active:
                overlay["status"] = active
            t5 = time.perf_counter()
            try:
                img = annotate(frame.image, valid, pipe.class_names, morph, overlay)
                t6 = time.perf_counter()
                status = frame_status(frame.index, fps, frame_counts, active, pipe, item, overlay["latency_ms"],
                                      slide_now)
                sink.write(img, status)
                t7 = time.perf_counter()
                if recorder is not None:
                    recorder.record_frame(frame.index, frame.timestamp, valid, pipe.class_names, morph,
                                          detected=item.detected, boxes_age_s=item.boxes_age_s)
                if bridge is not None:  # keep a copy for freeze: the annotated frame's buffer is reused
                    if last_img is None or last_img.shape != img.shape:
                        last_img = np.empty_like(img)
                    np.copyto(last_img, img)
                    last_counts, last_status = frame_counts, status
                    captures += _save_captures(bridge.take_captures(), img, cfg.captures, frame.index, say, problems)
                    bridge.publish(frame.index, fps, frame_counts, active, str(session_id or ""))
            except Exception as exc:  # showing or recording one frame failed: keep going
                # counted by message: the same one for every frame failing the same way, on one line
                problems.report(f"frame: could not show or record it ({first_line(exc)})")
                log.debug("output of frame %d failed", frame.index, exc_info=True)
            else:
                t8 = time.perf_counter()
                timer.add("annotate", t6 - t5)
                timer.add("sink", t7 - t6)
                timer.add("record", t8 - t7)
            if getattr(sink, "should_stop", False) or (cfg.max_frames is not None and frames >= cfg.max_frames):
                break
    except KeyboardInterrupt:
        say("stopped")
    finally:
        t_end = time.perf_counter()
        elapsed = t_end - t_start
        if worker is not None:
            worker.stop()  # no new frame from here on; joined below, once the source is closed
        summary = None
        recorded = session_id is not None and session_id >= 0
        if recorder is not None:
            summary = recorder.end_session()
            recorder.close()
        if sink is not None:
            sink.close()
            problems.report(getattr(sink, "error", ""))  # e.g. a video that could not be finished
        if source is not None:
            source.close()
        worker_done = worker.close() if worker is not None else True
        if bridge is not None:
            bridge.close(str(session_id or ""), elapsed, frames, captures, totals)
        if source is not None:
            problems.report(source.error)
        stats = {
            "frames": frames,
            "fps": round(frames / elapsed, 3) if elapsed > 0 and frames else 0.0,
            "fps_steady": (round((frames - WARMUP_FRAMES) / (t_end - t_warm), 3)
                           if t_warm is not None and frames > 2 * WARMUP_FRAMES and t_end > t_warm else None),
            "latency_ms": timer.medians_ms(),
            "latency_max_ms": timer.max_ms(),
            "counts": totals,
            "backend": pipe.detector.name,
            "model": pipe.detector.manifest.name,
            "precision": pipe.detector.manifest.precision,
            "morphology_parts": [b.manifest.morphology.part for b in pipe.morphology_backends],
            "morphology_crops_judged": judged,
            "detect_every": pipe.detect_mode,
            "detect_every_last": pipe.detect_interval,
            "detector_frames": detected,
            "detector_runs": pipe.detector_runs,
            "stage_shift_unknown": pipe.shift_unknown,
            "boxes_age_ms": round(1000.0 * statistics.fmean(boxes_age), 1) if boxes_age else 0.0,
            "frame_interval_ms": _spread_ms(intervals),
            "morphology_reuse": bool(pipe.morphology is not None and pipe.morphology.reuse),
            "overlap": worker is not None and worker.threaded,
            "detector_tiles": pipe.tiles_last,
            "source": cfg.source,
            "sink": sink_uri,
            "sink_frames": getattr(sink, "frames", 0),  # frames the sink took (saved, for an image folder)
            "problems": {msg: n for msg, n in problems.seen.items()},
        }
        if source is not None:
            stats["source_stats"] = {k: v for k, v in asdict(source.stats).items() if k != "last_problem"}
            for msg, n in source.stats.problems.items():  # each skipped frame or lost camera, as it happened
                stats["problems"][msg] = stats["problems"].get(msg, 0) + n
            if source.error:
                stats["source_error"] = source.error
        if recorded:
            stats["session_id"] = session_id
            stats["record"] = str(cfg.record)
        # the recorded session's summary (SessionSummary too, + frames_not_saved), else this run's last one
        stats["session_summary"] = summary if summary is not None and recorded else slide.to_dict()
        if own_pipeline and worker_done:  # never under a frame still being inferred
            pipe.close()
    if cfg.stats_json is not None:
        try:
            atomic_write_json(Path(cfg.stats_json), stats)
        except OSError as exc:
            raise InputError(f"--stats-json {cfg.stats_json}: could not write it ({exc.strerror or exc})") from exc
    if frames == 0 and (gave_up or stats.get("source_error")):
        raise InputError(f"{cfg.source}: no frame was processed: {gave_up or stats['source_error']}")
    return stats



def _check_outputs_apart(cfg: RunConfig, sink_uri: str) -> None:
    """Raise InputError when a ``file://`` output is the source video or image folder itself (writing it would
    destroy the recording being read), or when ``--stats-json`` or ``--record`` names the source, the output or
    the other one: each is written over at the end of the run (or as it goes), which would destroy the other."""
    import os

    from smearsight.device.sinks import local_path

    source, output = local_path(cfg.source), local_path(sink_uri)
    if source is not None and output is not None and os.path.realpath(source) == os.path.realpath(output):
        raise InputError(f"{sink_uri}: is the source {cfg.source} itself; write the output elsewhere")
    taken = [(f"the source {cfg.source}", source), (f"the output {sink_uri}", output)]
    for what, path in (("--stats-json", cfg.stats_json), ("--record", cfg.record)):
        if path is None:
            continue
        real = os.path.realpath(Path(path).expanduser())
        for other, other_path in taken:
            if other_path is not None and os.path.realpath(other_path) == real:
                raise InputError(f"{what} {path}: is also {other}; give each its own file")
        taken.append((f"the {what} file", Path(path)))


def frame_status(frame_index: int, fps: float, counts: dict[str, int], problem: str, pipe: Pipeline,
                 item: Processed, latency_ms: dict[str, float],
                 session: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status of one shown frame, as the sinks get it (``http://`` serves it as ``/status.json``).

    ``detected``: the detector ran on this very frame; otherwise its boxes are an earlier frame's, moved with
    the stage, found ``boxes_age_ms`` earlier. ``detect_every`` is the interval in use (or ``"async"``);
    ``sperm_abnormal`` / ``sperm_judged`` count the sperm in view with a result on at least one part.
    ``session``: the session's running summary so far (:meth:`smearsight.device.record.SessionSummary.to_dict`).
    """
    from smearsight.runtime.annotate import morphology_flags, sperm_tally

    abnormal, judged = sperm_tally(morphology_flags(item.morphology))
    return {"frame": frame_index, "fps": round(fps, 2), "counts": counts, "status": problem,
            "backend": pipe.detector.name, "detected": bool(item.detected),
            "detect_every": pipe.detect_interval, "detector_runs": pipe.detector_runs,
            "boxes_age_ms": round(1000.0 * item.boxes_age_s, 1), "latency_ms": latency_ms,
            "sperm_abnormal": abnormal, "sperm_judged": judged, **({"session": session} if session else {})}


def _spread_ms(seconds: deque[float]) -> dict[str, float] | None:
    """Median, 95th percentile and maximum in ms (None for fewer than two samples)."""
    if len(seconds) < 2:
        return None
    ms = np.asarray(seconds) * 1000.0
    return {"median": round(float(np.median(ms)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
            "max": round(float(ms.max()), 1)}


def _apply_panel_requests(req: Any, recorder: Any, session_id: int | None, cfg: RunConfig, pipe: Pipeline,
                          reset_morphology: Any, say: Any) -> int | None:
    """Start/stop recorded sessions as the panel asks; returns the current session id."""
    if recorder is None:
        if req.start_session is not None or req.stop_session:
            say("panel asked to start/stop a session, but nothing is being recorded (use --record FILE)")
        return session_id
    if req.stop_session and session_id is not None and session_id >= 0:
        recorder.end_session()
        say(f"session {session_id} stopped from the panel")
        session_id = None
    if req.start_session is not None:
        reset_morphology()  # a new session is a new slide: nothing carries over
        if session_id is not None and session_id >= 0:
            recorder.end_session()
        session_id = recorder.start_session({"source": cfg.source, "class_names": pipe.class_names,
                                             "label": req.start_session, "backend": pipe.detector.name})
        say(f"session {session_id} started from the panel ({req.start_session or 'no label'})")
    return session_id


def _save_captures(asked: int, image_rgb: np.ndarray, directory: Path, frame_index: int, say: Any,
                   problems: _Problems) -> int:
    """Save the field on screen once per capture the panel asked for; returns how many were saved."""
    saved = 0
    for _ in range(asked):
        try:
            path = save_capture(image_rgb, directory, frame_index)
        except Exception as exc:  # a full disk or an unwritable --captures: say so, keep running
            problems.report(f"--captures {directory}: could not save the field ({first_line(exc)})")
            continue
        saved += 1
        say(f"captured {path}")
    return saved


def save_capture(image_rgb: np.ndarray, directory: Path, frame_index: int) -> Path:
    """Write a captured annotated field as PNG (atomically); returns its path."""
    import cv2

    ok, data = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(f"{directory}: could not encode the captured frame")
    from smearsight.fileio import atomic_write_bytes

    stem = f"capture_{time.strftime('%Y%m%d-%H%M%S')}_{frame_index:06d}"
    path, copy = Path(directory) / f"{stem}.png", 1
    while path.exists():  # a second capture of the same field within the second: its own file
        copy += 1
        path = Path(directory) / f"{stem}_{copy}.png"
    return atomic_write_bytes(path, data.tobytes())


def stats_text(stats: dict[str, Any]) -> str:
    """A short plain-text summary of a run's stats."""
    lat = ", ".join(f"{k} {v:.1f}" for k, v in stats["latency_ms"].items())
    counts = ", ".join(f"{k} {v}" for k, v in stats["counts"].items() if v)
    tiles = f", {stats['detector_tiles']} tiles a frame" if stats.get("detector_tiles", 1) > 1 else ""
    return (f"{stats['frames']} frames at {stats['fps']:.1f} FPS ({stats['backend']}{tiles}); median ms: {lat}"
            + (f"; detections summed over the frames: {counts}" if counts else ""))


__all__ = ["ModelSet", "Pipeline", "RunConfig", "find_models", "open_pipeline", "run", "stats_text"]
