"""Frame -> model input, as the manifest says (resize mode, colour, normalisation), and back for boxes.

``x = (pixel / 255 - mean) / std`` per channel, NCHW float32. Resize modes:

- ``letterbox``: scale by ``min(H/h, W/w)`` (rounded size, INTER_AREA when shrinking, else
  INTER_LINEAR), placed at the top-left of the canvas (as in training), the rest ``pad_value``.
- ``stretch``: resize to exactly (H, W).
- ``pad``: cells keep their pixel size (a detector trained at the camera's scale): no resize, the frame at
  the top-left of the canvas; a frame larger than the canvas is shrunk to fit (as ``letterbox``), never
  cropped, and :func:`shrink_note` says so.

``pad_value`` is a pixel value (0-255) before normalisation.

:class:`Preprocessor` allocates its canvas and the input tensor once (per frame size) and fills them
in place with OpenCV (resize, channel split, a per-channel float lookup table for the
normalisation), so the hot path allocates nothing of frame size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smearsight.errors import InputError, require
from smearsight.manifest import InputSpec


@dataclass(frozen=True)
class Letterbox:
    """Geometry from frame pixels to model-input pixels: ``model = frame * scale + offset``."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    frame_size: tuple[int, int]  # (h, w) of the original frame

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map xyxy boxes (model-input pixels, extra columns kept) back to frame pixels, clipped."""
        out = np.array(boxes, dtype=np.float32, copy=True)
        if out.size == 0:
            return out
        h, w = self.frame_size
        out[:, 0:4:2] = np.clip((out[:, 0:4:2] - self.offset_x) / self.scale_x, 0, w)
        out[:, 1:4:2] = np.clip((out[:, 1:4:2] - self.offset_y) / self.scale_y, 0, h)
        return out

    def to_model(self, boxes: np.ndarray) -> np.ndarray:
        """Map xyxy boxes from frame pixels to model-input pixels."""
        out = np.array(boxes, dtype=np.float32, copy=True)
        out[:, 0:4:2] = out[:, 0:4:2] * self.scale_x + self.offset_x
        out[:, 1:4:2] = out[:, 1:4:2] * self.scale_y + self.offset_y
        return out


def geometry(frame_hw: tuple[int, int], spec: InputSpec) -> tuple[Letterbox, tuple[int, int]]:
    """The Letterbox for a frame size and the resized size (h, w) the frame takes on the canvas."""
    h, w = frame_hw
    H, W = int(spec.shape[2]), int(spec.shape[3])  # noqa: N806
    if spec.resize == "stretch":
        return Letterbox(W / w, H / h, 0.0, 0.0, (h, w)), (H, W)
    scale = min(H / h, W / w)
    if spec.resize == "pad":
        if scale >= 1.0:
            return Letterbox(1.0, 1.0, 0.0, 0.0, (h, w)), (h, w)
        # larger than the canvas: shrunk to fit rather than cropped (the whole field stays in view)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    # the per-axis scales of the pixels as resized (nw / w, nh / h), not ``scale``: they differ by the
    # rounding of the resized size, up to half a pixel at the far edge
    return Letterbox(nw / w, nh / h, 0.0, 0.0, (h, w)), (nh, nw)


def shrink_note(frame_hw: tuple[int, int], spec: InputSpec) -> str | None:
    """A plain-words note when a ``pad`` model gets frames larger than its input (they are shrunk, so cells
    look smaller than the model was trained on); None otherwise."""
    h, w = frame_hw
    H, W = int(spec.shape[2]), int(spec.shape[3])  # noqa: N806
    if spec.resize != "pad" or (h <= H and w <= W):
        return None
    return (f"frames of {h}x{w} are larger than the detector's {H}x{W} input, so they are shrunk "
            f"{min(H / h, W / w):.2f}x and small cells may be missed; export the detector with --image-size "
            f"{h}x{w} (rounded up to its stride) for this camera, or run without --shrink")


class Preprocessor:
    """Reusable pre-processing for one model input; buffers allocated once per frame size.

    ``__call__(frame_rgb)`` returns ``(x [1, C, H, W] float32, Letterbox)``; ``x`` is the same array
    on every call (overwritten by the next frame).
    """

    def __init__(self, spec: InputSpec) -> None:
        self.cv2 = require("cv2", "pre-processing frames")
        self.spec = spec
        self.channels = 1 if spec.color == "gray" else 3
        self.H, self.W = int(spec.shape[2]), int(spec.shape[3])
        self.x = np.empty((1, self.channels, self.H, self.W), np.float32)
        # x = pixel * a + b, as a lookup table per channel
        pixels = np.arange(256, dtype=np.float64) / 255.0
        self.luts = [
            ((pixels - m) / s).astype(np.float32).reshape(256, 1) for m, s in zip(spec.mean, spec.std, strict=True)
        ]
        pad = int(np.clip(round(spec.pad_value), 0, 255))
        shape = (self.H, self.W) if self.channels == 1 else (self.H, self.W, 3)
        self.canvas = np.full(shape, pad, np.uint8)
        self.planes = [np.empty((self.H, self.W), np.uint8) for _ in range(self.channels)]
        self._frame_hw: tuple[int, int] | None = None
        self._box: Letterbox | None = None
        self._resized_hw = (0, 0)

    def _prepare(self, frame_hw: tuple[int, int]) -> None:
        self._box, self._resized_hw = geometry(frame_hw, self.spec)
        self._frame_hw = frame_hw
        self.canvas[...] = int(np.clip(round(self.spec.pad_value), 0, 255))

    def __call__(self, frame_rgb: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        cv2 = self.cv2
        if frame_rgb.dtype != np.uint8 or frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
            raise InputError(
                f"frame: expected an RGB uint8 image HxWx3, got {frame_rgb.dtype} of shape {frame_rgb.shape}"
            )
        hw = frame_rgb.shape[:2]
        if hw != self._frame_hw:
            self._prepare(hw)
        img = frame_rgb
        if self.spec.color == "gray":
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        elif self.spec.color == "bgr":
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        nh, nw = self._resized_hw
        if (nh, nw) != img.shape[:2]:
            shrinking = nh < img.shape[0] or nw < img.shape[1]
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        ch, cw = min(nh, self.H), min(nw, self.W)
        if (ch, cw) == (self.H, self.W) and img.shape[:2] == (self.H, self.W):
            canvas = img
        else:
            self.canvas[:ch, :cw] = img[:ch, :cw]
            canvas = self.canvas
        if self.channels == 1:
            cv2.LUT(canvas, self.luts[0], dst=self.x[0, 0])
        else:
            cv2.split(canvas, self.planes)
            for c in range(3):
                cv2.LUT(self.planes[c], self.luts[c], dst=self.x[0, c])
        return self.x, self._box


def preprocess_frame(frame_rgb: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Letterbox]:
    """One-off pre-processing (allocates; use :class:`Preprocessor` in a loop)."""
    x, box = Preprocessor(spec)(frame_rgb)
    return x.copy(), box
