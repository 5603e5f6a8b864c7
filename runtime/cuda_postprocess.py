"""Decode + NMS on the GPU: the kernels in ``runtime/kernels/decode_nms.cu`` loaded through pycuda.

pycuda is imported lazily (install ``smearsight[gpu]``). The module is compiled once per process,
every buffer is allocated once in :class:`CudaDecodeNMS`'s constructor, and each call only copies the
raw outputs in (or takes device pointers, e.g. TensorRT's output buffers), launches the kernels on
one stream and copies back the fixed ``[max_detections, 6]`` array and the count. No
``pycuda.autoinit``: the caller's context is used, or the device's primary context is retained and
pushed/popped around every call.

Results equal :func:`smearsight.runtime.postprocess.decode_nms`: same candidates, scores, order and
kept set; box coordinates may differ in the last bit (``expf`` versus NumPy's float32 ``exp``; see the
kernel file's header).
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import numpy as np

from smearsight.anchors import BBOX_LOG_CLAMP
from smearsight.errors import InputError, require

KERNEL_FILE = "decode_nms.cu"
SORT_CAP = 4096
_MODULES: dict[int, tuple[Any, Any]] = {}


def kernel_source() -> str:
    """The CUDA source of the decode + NMS kernels (shipped in the package)."""
    return resources.files("smearsight.runtime").joinpath("kernels", KERNEL_FILE).read_text(encoding="utf-8")


def _logit_floor(score_threshold: float) -> float:
    from smearsight.runtime.postprocess import _logit_floor as floor

    value = floor(score_threshold)
    return float(np.clip(value, -3.0e38, 3.0e38))


class CudaDecodeNMS:
    """GPU decode + class-aware NMS for one detector; buffers, stream and kernels allocated once.

    Args:
        anchors: ``[A, 4]`` float32 anchors (uploaded once).
        num_classes: C.
        context: a pycuda ``Context`` to use (pushed/popped per call); None retains device 0's primary
            context.
        stream: a pycuda ``Stream`` to launch on (e.g. the TensorRT backend's); None creates one.
    """

    def __init__(
        self,
        anchors: np.ndarray,
        num_classes: int,
        *,
        score_threshold: float,
        iou_threshold: float,
        pre_nms_topk: int,
        max_detections: int,
        image_size: tuple[int, int] | None = None,
        context: Any = None,
        stream: Any = None,
        device_index: int = 0,
    ) -> None:
        cuda = require("pycuda.driver", "decode + NMS on the GPU")
        if pre_nms_topk > SORT_CAP:
            raise InputError(f"pre_nms_topk: {pre_nms_topk} is above the GPU kernel's limit {SORT_CAP}")
        self._cuda = cuda
        anchors = np.ascontiguousarray(anchors, dtype=np.float32)
        if anchors.shape[0] >= 1 << 24 or num_classes > 255:
            raise InputError("decode + NMS on the GPU supports fewer than 2^24 anchors and 255 classes")
        if context is None:
            cuda.init()
            self._ctx = cuda.Device(device_index).retain_primary_context()
            self._owns_ctx = True
        else:
            self._ctx = context
            self._owns_ctx = False
        self.num_anchors = int(anchors.shape[0])
        self.num_classes = int(num_classes)
        self.topk = int(pre_nms_topk)
        self.max_detections = int(max_detections)
        self.col_blocks = (self.topk + 63) // 64
        self.score_threshold = np.float32(score_threshold)
        self.iou_threshold = np.float32(iou_threshold)
        self.logit_floor = np.float32(_logit_floor(score_threshold))
        self.clip = np.int32(image_size is not None)
        self.img_h, self.img_w = (np.float32(v) for v in (image_size or (0, 0)))
        try:
            self._allocate(anchors, stream)
        except BaseException:
            self.close()  # frees what was allocated; releases a retained primary context
            raise

    def _allocate(self, anchors: np.ndarray, stream: Any) -> None:
        cuda = self._cuda
        a, c, k = self.num_anchors, self.num_classes, self.topk
        self._ctx.push()
        try:
            self._stream = stream if stream is not None else cuda.Stream()
            mod = self._module()
            self._k_threshold = mod.get_function("threshold_kernel")
            self._k_select = mod.get_function("select_topk_kernel")
            self._k_decode = mod.get_function("decode_kernel")
            self._k_mask = mod.get_function("nms_mask_kernel")
            self._k_reduce = mod.get_function("nms_reduce_kernel")
            self._k_finalize = mod.get_function("finalize_kernel")
            self._k_merge = mod.get_function("merge_kernel")
            self.d_anchors = cuda.to_device(anchors)
            self.d_logits = cuda.mem_alloc(a * c * 4)
            self.d_deltas = cuda.mem_alloc(a * 4 * 4)
            self.d_cand_keys = cuda.mem_alloc(max(a * c * 8, 8))
            self.d_cand_counts = cuda.mem_alloc(c * 4)
            self.d_sel_keys = cuda.mem_alloc(c * k * 8)
            self.d_sel_counts = cuda.mem_alloc(c * 4)
            self.d_boxes = cuda.mem_alloc(c * k * 4 * 4)
            self.d_mask = cuda.mem_alloc(c * k * self.col_blocks * 8)
            self.d_kept = cuda.mem_alloc(c * k * 4)
            self.d_kept_counts = cuda.mem_alloc(c * 4)
            self.d_out = cuda.mem_alloc(self.max_detections * 6 * 4)
            self.d_count = cuda.mem_alloc(4)
            self.h_out = cuda.pagelocked_empty((self.max_detections, 6), np.float32)
            self.h_count = cuda.pagelocked_empty((1,), np.int32)
            self.h_cand_counts = cuda.pagelocked_empty((c,), np.int32)
            self.h_logits = cuda.pagelocked_empty((a, c), np.float32)
            self.h_deltas = cuda.pagelocked_empty((a, 4), np.float32)
        finally:
            self._ctx.pop()

    def _module(self) -> Any:
        # keyed by id() but holding the context object, so a later context cannot reuse a dead one's id
        entry = _MODULES.get(id(self._ctx))
        if entry is None or entry[0] is not self._ctx:
            from pycuda.compiler import SourceModule

            module = SourceModule(
                kernel_source(), no_extern_c=True, options=[f"-DSORT_CAP={SORT_CAP}", "--fmad=false"]
            )
            entry = _MODULES[id(self._ctx)] = (self._ctx, module)
        return entry[1]

    def __call__(self, class_logits: np.ndarray, box_regression: np.ndarray) -> tuple[np.ndarray, int]:
        """Host arrays in; returns ``(detections, count)``. The array is reused by the next call."""
        self.h_logits[...] = np.asarray(class_logits, dtype=np.float32).reshape(self.num_anchors, self.num_classes)
        self.h_deltas[...] = np.asarray(box_regression, dtype=np.float32).reshape(self.num_anchors, 4)
        self._ctx.push()
        try:
            self._cuda.memcpy_htod_async(self.d_logits, self.h_logits, self._stream)
            self._cuda.memcpy_htod_async(self.d_deltas, self.h_deltas, self._stream)
            self._launch(self.d_logits, self.d_deltas)
            return self._fetch()
        finally:
            self._ctx.pop()

    def run_on_device(self, d_logits: Any, d_deltas: Any) -> tuple[np.ndarray, int]:
        """Device pointers in (float32 ``[A, C]`` and ``[A, 4]``, e.g. engine outputs); the caller has
        pushed the context and ordered its work on the same stream."""
        as_ptr = (lambda p: np.uintp(p) if isinstance(p, int) else p)  # noqa: E731
        self._launch(as_ptr(d_logits), as_ptr(d_deltas))
        return self._fetch()

    def _launch(self, d_logits: Any, d_deltas: Any) -> None:
        a, c, k, cb = self.num_anchors, self.num_classes, self.topk, self.col_blocks
        i32 = np.int32
        s = self._stream
        self._cuda.memset_d32_async(self.d_cand_counts, 0, c, s)
        n = a * c
        self._k_threshold(d_logits, i32(a), i32(c), self.score_threshold, self.logit_floor, self.d_cand_keys,
                          self.d_cand_counts, block=(256, 1, 1), grid=(max(math.ceil(n / 256), 1), 1), stream=s)
        self._k_select(self.d_cand_keys, self.d_cand_counts, i32(a), i32(k), self.d_sel_keys, self.d_sel_counts,
                       block=(1024, 1, 1), grid=(c, 1), stream=s)
        self._k_decode(self.d_sel_keys, self.d_sel_counts, d_deltas, self.d_anchors, i32(c), i32(k),
                       np.float32(BBOX_LOG_CLAMP), self.clip, self.img_h, self.img_w, self.d_boxes,
                       block=(256, 1, 1), grid=(math.ceil(c * k / 256), 1), stream=s)
        self._k_mask(self.d_boxes, self.d_sel_counts, i32(k), i32(cb), self.iou_threshold, self.d_mask,
                     block=(64, 1, 1), grid=(cb, cb, c), stream=s)
        self._k_reduce(self.d_mask, self.d_sel_counts, i32(k), i32(cb), self.d_kept, self.d_kept_counts,
                       block=(32, 1, 1), grid=(c, 1), stream=s)
        self._k_finalize(self.d_kept_counts, i32(c), i32(self.max_detections), self.d_out, self.d_count,
                         block=(256, 1, 1), grid=(1, 1), stream=s)
        self._k_merge(self.d_sel_keys, self.d_boxes, self.d_kept, self.d_kept_counts, i32(c), i32(k),
                      i32(self.max_detections), self.d_out, block=(256, 1, 1), grid=(math.ceil(c * k / 256), 1),
                      stream=s)

    def _fetch(self) -> tuple[np.ndarray, int]:
        self._cuda.memcpy_dtoh_async(self.h_out, self.d_out, self._stream)
        self._cuda.memcpy_dtoh_async(self.h_count, self.d_count, self._stream)
        self._cuda.memcpy_dtoh_async(self.h_cand_counts, self.d_cand_counts, self._stream)
        self._stream.synchronize()
        return self.h_out, int(self.h_count[0])

    @property
    def class_candidates(self) -> np.ndarray:
        """Each class's candidates above the score threshold in the last call, before the ``pre_nms_topk``
        cap (what ``decode_nms(..., class_candidates=)`` reports on the CPU)."""
        return self.h_cand_counts

    def close(self) -> None:
        """Free the device buffers (the retained primary context is released)."""
        if getattr(self, "_ctx", None) is None:
            return
        self._ctx.push()
        try:
            for name in list(vars(self)):
                if name.startswith("d_"):
                    getattr(self, name).free()
        finally:
            self._ctx.pop()
            if self._owns_ctx:
                self._ctx.detach()
            self._ctx = None


PREPROCESS_KERNEL_FILE = "preprocess.cu"


class CudaPreprocessor:
    """Frame -> model input on the GPU (``runtime/kernels/preprocess.cu``), written into a device buffer
    such as the TensorRT engine's input. Pinned and device frame buffers are allocated once (and grown
    if a larger frame arrives). The caller has pushed ``context``; work is queued on ``stream``."""

    def __init__(self, spec: Any, context: Any, stream: Any) -> None:
        cuda = require("pycuda.driver", "pre-processing on the GPU")
        from pycuda.compiler import SourceModule

        from smearsight.runtime.preprocess import geometry

        self._cuda = cuda
        self._geometry = geometry
        self.spec = spec
        self.out_h, self.out_w = int(spec.shape[2]), int(spec.shape[3])
        self.color_mode = np.int32({"rgb": 0, "bgr": 1, "gray": 2}[spec.color])
        pixels = np.arange(256, dtype=np.float64) / 255.0
        lut = np.stack([(pixels - m) / s for m, s in zip(spec.mean, spec.std, strict=True)]).astype(np.float32)
        self.pad_index = np.int32(int(np.clip(round(spec.pad_value), 0, 255)))
        self._ctx = context
        self._stream = stream
        source = resources.files("smearsight.runtime").joinpath("kernels", PREPROCESS_KERNEL_FILE)
        self._kernel = SourceModule(source.read_text(encoding="utf-8"), no_extern_c=True).get_function(
            "preprocess_kernel"
        )
        self.d_lut = cuda.to_device(np.ascontiguousarray(lut))
        self._capacity = 0
        self._frame_hw: tuple[int, int] | None = None
        self._box = None
        self._resized = (0, 0)

    def _ensure(self, nbytes: int) -> None:
        if nbytes > self._capacity:
            if self._capacity:
                self.d_frame.free()
            self.h_frame = self._cuda.pagelocked_empty(nbytes, np.uint8)
            self.d_frame = self._cuda.mem_alloc(nbytes)
            self._capacity = nbytes

    def __call__(self, frame_rgb: np.ndarray, d_out: Any) -> Any:
        """Queue the upload and the kernel; returns the frame's Letterbox."""
        h, w = frame_rgb.shape[:2]
        if (h, w) != self._frame_hw:
            self._box, self._resized = self._geometry((h, w), self.spec)
            self._frame_hw = (h, w)
        n = frame_rgb.size
        self._ensure(n)
        self.h_frame[:n] = frame_rgb.reshape(-1)
        self._cuda.memcpy_htod_async(self.d_frame, self.h_frame[:n], self._stream)
        nh, nw = self._resized
        block = (32, 8, 1)
        grid = ((self.out_w + 31) // 32, (self.out_h + 7) // 8)
        self._kernel(self.d_frame, np.int32(h), np.int32(w), d_out, np.int32(self.out_h), np.int32(self.out_w),
                     np.int32(nh), np.int32(nw), np.float32(h / nh), np.float32(w / nw), self.color_mode,
                     self.d_lut, self.pad_index, block=block, grid=grid, stream=self._stream)
        return self._box

    def close(self) -> None:
        if self._capacity:
            self.d_frame.free()
            self._capacity = 0
        self.d_lut.free()
