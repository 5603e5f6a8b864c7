"""Anchors and box coding in NumPy: the single source of truth for training, export and runtime.

Anchor order (matches how the detector heads flatten their outputs to ``[B, A, C]``):
pyramid level (ascending), then feature-map row ``y``, then column ``x``, then anchor shape
(scales outer, aspect ratios inner). Anchor centres sit at ``(x + 0.5) * stride``.

Box regression encoding, per anchor with centre ``(ax, ay)`` and size ``(aw, ah)``::

    dx = (cx - ax) / aw      dy = (cy - ay) / ah
    dw = log(w / aw)         dh = log(h / ah)

Decoding clamps ``dw``/``dh`` at :data:`BBOX_LOG_CLAMP` and always runs in float32.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field, field_validator, model_validator

from smearsight.config import StrictConfig

BBOX_LOG_CLAMP = math.log(1000.0 / 16.0)


class AnchorConfig(StrictConfig):
    """Anchor layout. ``base_sizes`` (one per level, pixels) overrides ``anchor_scale * stride``."""

    levels: list[int] = Field(default_factory=lambda: [3, 4, 5, 6, 7])
    anchor_scale: float = Field(4.0, gt=0)
    base_sizes: list[float] | None = None
    scales: list[float] = Field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])

    @field_validator("levels")
    @classmethod
    def _levels_ok(cls, value: list[int]) -> list[int]:
        if not value or any(lvl < 1 or lvl > 8 for lvl in value) or sorted(set(value)) != value:
            raise ValueError("levels must be a non-empty ascending list of distinct integers in 1..8")
        return value

    @field_validator("scales", "aspect_ratios")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("must be a non-empty list of positive numbers")
        return value

    @model_validator(mode="after")
    def _base_sizes_match(self) -> AnchorConfig:
        if self.base_sizes is not None:
            if len(self.base_sizes) != len(self.levels):
                raise ValueError(
                    f"base_sizes has {len(self.base_sizes)} entries but levels has {len(self.levels)}"
                )
            if any(b <= 0 for b in self.base_sizes):
                raise ValueError("base_sizes must be positive")
        return self

    @property
    def strides(self) -> list[int]:
        return [2**lvl for lvl in self.levels]

    @property
    def max_stride(self) -> int:
        return 2 ** self.levels[-1]

    @property
    def anchors_per_location(self) -> int:
        return len(self.scales) * len(self.aspect_ratios)

    def base_size(self, level_index: int) -> float:
        if self.base_sizes is not None:
            return float(self.base_sizes[level_index])
        return float(self.anchor_scale * self.strides[level_index])

    def feature_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Feature-map (rows, cols) per level for an input of ``image_size`` = (H, W)."""
        h, w = image_size
        return [(math.ceil(h / s), math.ceil(w / s)) for s in self.strides]

    def num_anchors(self, image_size: tuple[int, int]) -> int:
        return sum(r * c for r, c in self.feature_sizes(image_size)) * self.anchors_per_location


def anchor_shapes(config: AnchorConfig, level_index: int) -> np.ndarray:
    """Anchor (w, h) pairs at one level, in the documented shape order, float64 ``[K, 2]``."""
    base = config.base_size(level_index)
    shapes = []
    for scale in config.scales:
        for ratio in config.aspect_ratios:  # ratio = w / h
            shapes.append((base * scale * math.sqrt(ratio), base * scale / math.sqrt(ratio)))
    return np.asarray(shapes, dtype=np.float64)


def generate_anchors(image_size: tuple[int, int], config: AnchorConfig) -> np.ndarray:
    """All anchors for an input of ``image_size`` = (H, W) as float32 ``[A, 4]`` (x1, y1, x2, y2)."""
    out = []
    for index, ((rows, cols), stride) in enumerate(zip(config.feature_sizes(image_size), config.strides, strict=True)):
        shapes = anchor_shapes(config, index)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * stride, (np.arange(cols) + 0.5) * stride, indexing="ij")
        centres = np.stack([cx.ravel(), cy.ravel()], axis=1)  # [rows*cols, 2]
        half = shapes / 2.0
        lo = centres[:, None, :] - half[None, :, :]
        hi = centres[:, None, :] + half[None, :, :]
        out.append(np.concatenate([lo, hi], axis=2).reshape(-1, 4))
    return np.concatenate(out, axis=0).astype(np.float32)


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    """(x1, y1, x2, y2) -> (cx, cy, w, h), same dtype."""
    boxes = np.asarray(boxes)
    wh = boxes[..., 2:4] - boxes[..., 0:2]
    return np.concatenate([boxes[..., 0:2] + 0.5 * wh, wh], axis=-1)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(cx, cy, w, h) -> (x1, y1, x2, y2), same dtype."""
    boxes = np.asarray(boxes)
    half = 0.5 * boxes[..., 2:4]
    return np.concatenate([boxes[..., 0:2] - half, boxes[..., 0:2] + half], axis=-1)


def encode_boxes(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Regression targets ``[N, 4]`` = (dx, dy, dw, dh) of ``boxes`` relative to paired ``anchors``."""
    b = xyxy_to_cxcywh(np.asarray(boxes, dtype=np.float64))
    a = xyxy_to_cxcywh(np.asarray(anchors, dtype=np.float64))
    out = np.empty_like(b)
    out[..., 0:2] = (b[..., 0:2] - a[..., 0:2]) / a[..., 2:4]
    out[..., 2:4] = np.log(np.maximum(b[..., 2:4], 1e-6) / a[..., 2:4])
    return out.astype(np.float32)


def decode_boxes(deltas: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_boxes`, computed in float32 whatever the input dtype."""
    d = np.asarray(deltas, dtype=np.float32)
    a = xyxy_to_cxcywh(np.asarray(anchors, dtype=np.float32))
    centre = a[..., 0:2] + d[..., 0:2] * a[..., 2:4]
    size = a[..., 2:4] * np.exp(np.minimum(d[..., 2:4], np.float32(BBOX_LOG_CLAMP)))
    return cxcywh_to_xyxy(np.concatenate([centre, size], axis=-1)).astype(np.float32)


def box_area(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes)
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[N, M]`` of xyxy boxes (float64 internally)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
