"""Microscopy augmentation in NumPy/OpenCV: flips, 90-degree rotations, colour/stain jitter, blur, noise,
the scale-jittered letterbox that places an image on the fixed training canvas, and the four-image mosaic.

All geometric operations transform the xyxy pixel boxes with the image.
"""

from __future__ import annotations

import numpy as np

from smearsight.errors import require
from smearsight.train.detector.config import AugmentConfig

PAD_VALUE = 127


def hflip(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = img.shape[1]
    out = boxes.copy()
    out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return img[:, ::-1], out


def vflip(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = img.shape[0]
    out = boxes.copy()
    out[:, 1], out[:, 3] = h - boxes[:, 3], h - boxes[:, 1]
    return img[::-1], out


def rot90(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotate 90 degrees counter-clockwise: (x, y) -> (y, W - x)."""
    w = img.shape[1]
    out = np.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], axis=1).astype(np.float32)
    return np.rot90(img), out


def color_jitter(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Hue/saturation shift, brightness/contrast, and a per-channel gain imitating stain variation."""
    cv2 = require("cv2", "augmentation")
    hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue, cfg.hue) * 180.0) % 180.0
    hsv[..., 1] *= rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    mean = out.mean()
    out = (out - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
    out *= rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    out *= 1.0 + rng.uniform(-cfg.stain, cfg.stain, size=3).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def photometric(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    cv2 = require("cv2", "augmentation")
    if rng.random() < cfg.color:
        img = color_jitter(img, cfg, rng)
    if rng.random() < cfg.blur:
        sigma = rng.uniform(0.3, 1.5)
        img = cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), sigma)
    if rng.random() < cfg.noise:
        noise = rng.normal(0, rng.uniform(2, 8), size=img.shape)
        img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return img


def geometric(
    img: np.ndarray, boxes: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if rng.random() < cfg.hflip:
        img, boxes = hflip(img, boxes)
    if rng.random() < cfg.vflip:
        img, boxes = vflip(img, boxes)
    if rng.random() < cfg.rot90:
        img, boxes = rot90(img, boxes)
    return np.ascontiguousarray(img), boxes


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """The (height, width) an ``h`` x ``w`` image has after resizing by ``scale`` (rounded, at least 1)."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def letterbox(
    img: np.ndarray,
    boxes: np.ndarray,
    size: tuple[int, int],
    scale: float,
    offset: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Resize ``img`` by ``scale``, paste it at ``offset`` = (x, y) on a ``size`` = (H, W) canvas (crop if larger)."""
    cv2 = require("cv2", "resizing images")
    h, w = img.shape[:2]
    nh, nw = scaled_size(h, w, scale)
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (nw, nh), interpolation=interp)
    canvas = np.full((size[0], size[1], 3), PAD_VALUE, dtype=np.uint8)
    ox, oy = offset
    # Source/destination windows for a paste that may be partly outside the canvas.
    sx0, sy0 = max(0, -ox), max(0, -oy)
    dx0, dy0 = max(0, ox), max(0, oy)
    cw = min(nw - sx0, size[1] - dx0)
    ch = min(nh - sy0, size[0] - dy0)
    if cw > 0 and ch > 0:
        canvas[dy0 : dy0 + ch, dx0 : dx0 + cw] = img[sy0 : sy0 + ch, sx0 : sx0 + cw]
    out = boxes.astype(np.float32)  # scaled as the pixels were: by the rounded size, per axis
    out[:, 0::2] = out[:, 0::2] * np.float32(nw / w) + ox
    out[:, 1::2] = out[:, 1::2] * np.float32(nh / h) + oy
    return canvas, out


def clip_boxes(
    boxes: np.ndarray, labels: np.ndarray, size: tuple[int, int], min_visible: float = 0.4, min_size: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the canvas; drop those mostly outside it or smaller than ``min_size`` px."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32), labels
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, size[1])
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, size[0])
    cw = clipped[:, 2] - clipped[:, 0]
    ch = clipped[:, 3] - clipped[:, 1]
    keep = (cw >= min_size) & (ch >= min_size) & (cw * ch >= min_visible * np.maximum(area, 1e-6))
    return clipped[keep].astype(np.float32), labels[keep]


def jittered_scale(h: int, w: int, size: tuple[int, int], cfg: AugmentConfig, rng: np.random.Generator) -> float:
    """The letterbox fit of an ``h`` x ``w`` image onto ``size`` times a log-uniform scale jitter."""
    fit = min(size[0] / h, size[1] / w)
    return fit * float(np.exp(rng.uniform(np.log(cfg.scale_min), np.log(cfg.scale_max))))


def train_transform(
    img: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    size: tuple[int, int],
    cfg: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full training augmentation onto a ``size`` canvas (letterbox fit times a random scale, random placement)."""
    img, boxes = geometric(img, boxes, cfg, rng)
    img = photometric(img, cfg, rng)
    h, w = img.shape[:2]
    scale = jittered_scale(h, w, size, cfg, rng)
    nh, nw = scaled_size(h, w, scale)
    ox = int(rng.integers(min(0, size[1] - nw), max(0, size[1] - nw) + 1))
    oy = int(rng.integers(min(0, size[0] - nh), max(0, size[0] - nh) + 1))
    canvas, boxes = letterbox(img, boxes, size, scale, (ox, oy))
    boxes, labels = clip_boxes(boxes, labels, size, cfg.min_visible)
    return canvas, boxes, labels


def mosaic_transform(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    size: tuple[int, int],
    cfg: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four images (``(img, boxes, labels)`` each) around a random centre of one ``size`` canvas.

    As in YOLOv4/v5's mosaic: the canvas is split at a centre drawn from its middle half; each image is
    flipped/rotated and colour-jittered on its own, scaled like :func:`train_transform` (fit times jitter,
    so cells keep their usual size), and placed with one corner on the centre, so the quadrant shows the
    part of it nearest that corner. Boxes are clipped to their quadrant (those mostly cut off are dropped).
    """
    if len(samples) != 4:
        raise ValueError(f"mosaic_transform needs 4 samples, got {len(samples)}")
    height, width = size
    xc = int(rng.integers(width // 4, width - width // 4 + 1))
    yc = int(rng.integers(height // 4, height - height // 4 + 1))
    canvas = np.full((height, width, 3), PAD_VALUE, dtype=np.uint8)
    all_boxes, all_labels = [], []
    # quadrant: (x0, y0, x1, y1) on the canvas; the image's corner that touches the centre
    quadrants = [((0, 0, xc, yc), (1, 1)), ((xc, 0, width, yc), (0, 1)),
                 ((0, yc, xc, height), (1, 0)), ((xc, yc, width, height), (0, 0))]
    for (img, boxes, labels), ((x0, y0, x1, y1), (at_right, at_bottom)) in zip(samples, quadrants, strict=True):
        qh, qw = y1 - y0, x1 - x0
        if qh <= 0 or qw <= 0:
            continue
        img, boxes = geometric(img, boxes, cfg, rng)
        img = photometric(img, cfg, rng)
        scale = jittered_scale(img.shape[0], img.shape[1], size, cfg, rng)
        nh, nw = scaled_size(img.shape[0], img.shape[1], scale)
        offset = (qw - nw if at_right else 0, qh - nh if at_bottom else 0)
        tile, tile_boxes = letterbox(img, boxes, (qh, qw), scale, offset)
        tile_boxes, tile_labels = clip_boxes(tile_boxes, labels, (qh, qw), cfg.min_visible)
        canvas[y0:y1, x0:x1] = tile
        tile_boxes[:, 0::2] += x0
        tile_boxes[:, 1::2] += y0
        all_boxes.append(tile_boxes)
        all_labels.append(tile_labels)
    boxes = np.concatenate(all_boxes).astype(np.float32) if all_boxes else np.zeros((0, 4), np.float32)
    labels = np.concatenate(all_labels) if all_labels else np.zeros((0,), np.int64)
    return canvas, boxes, labels
