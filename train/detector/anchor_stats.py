"""How well an anchor layout covers a dataset's boxes, and the data-driven anchor choice of the recipe.

For a box and one anchor shape, IoU only falls as the centre offset grows in x or y, so the best anchor of
that shape sits at the grid centre nearest to the box centre: the best IoU over all anchors is exact from
(levels x shapes) candidates per box, without building the [A, G] IoU matrix.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from smearsight.anchors import AnchorConfig, anchor_shapes

BUCKETS: tuple[tuple[float, float], ...] = (
    (0, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, 256), (256, math.inf),
)


def best_anchor_iou(boxes: np.ndarray, image_size: tuple[int, int], cfg: AnchorConfig) -> np.ndarray:
    """Best IoU of each xyxy box ``[G, 4]`` with any anchor of ``cfg`` for an input of ``image_size``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    best = np.zeros(len(boxes))
    if len(boxes) == 0:
        return best
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    bw = boxes[:, 2] - boxes[:, 0]
    bh = boxes[:, 3] - boxes[:, 1]
    for level, ((rows, cols), stride) in enumerate(zip(cfg.feature_sizes(image_size), cfg.strides, strict=True)):
        ix = np.clip(np.round(cx / stride - 0.5), 0, cols - 1)
        iy = np.clip(np.round(cy / stride - 0.5), 0, rows - 1)
        dx = np.abs((ix + 0.5) * stride - cx)
        dy = np.abs((iy + 0.5) * stride - cy)
        for aw, ah in anchor_shapes(cfg, level):
            # Box centred at 0, anchor centred at the offset (dx, dy): 1-D overlaps in x and y.
            ox = np.clip(np.minimum(bw / 2, dx + aw / 2) - np.maximum(-bw / 2, dx - aw / 2), 0, None)
            oy = np.clip(np.minimum(bh / 2, dy + ah / 2) - np.maximum(-bh / 2, dy - ah / 2), 0, None)
            inter = ox * oy
            iou = inter / (bw * bh + aw * ah - inter)
            best = np.maximum(best, iou)
    return best


def coverage_report(
    boxes: np.ndarray, image_size: tuple[int, int], cfg: AnchorConfig, positive_iou: float
) -> list[dict]:
    """Per box-size bucket (sqrt(area), px): count, fraction reaching ``positive_iou``, median best IoU."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    size = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
    best = best_anchor_iou(boxes, image_size, cfg)
    rows = []
    for lo, hi in BUCKETS:
        sel = (size >= lo) & (size < hi)
        n = int(sel.sum())
        rows.append({
            "bucket": f"{lo:g}-{hi:g}" if math.isfinite(hi) else f">={lo:g}",
            "count": n,
            "covered": float((best[sel] >= positive_iou).mean()) if n else float("nan"),
            "median_iou": float(np.median(best[sel])) if n else float("nan"),
        })
    rows.append({
        "bucket": "all", "count": len(boxes),
        "covered": float((best >= positive_iou).mean()) if len(boxes) else float("nan"),
        "median_iou": float(np.median(best)) if len(boxes) else float("nan"),
    })
    return rows


def choose_anchors(
    boxes: np.ndarray, image_size: tuple[int, int], positive_iou: float = 0.5, target: float = 0.99
) -> AnchorConfig:
    """Data-driven anchor layout: among P2..P7 ranges (>= 3 levels) and anchor scales 2/4 x stride, the one
    with the fewest anchors whose best-anchor IoU reaches ``positive_iou`` for a ``target`` fraction of boxes
    (or for as many as the best candidate reaches, less 0.5 %)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    candidates = []
    for lo, hi, scale in itertools.product(range(2, 6), range(4, 8), (2.0, 4.0)):
        if hi - lo < 2:
            continue
        cfg = AnchorConfig(levels=list(range(lo, hi + 1)), anchor_scale=scale)
        cov = float((best_anchor_iou(boxes, image_size, cfg) >= positive_iou).mean()) if len(boxes) else 1.0
        candidates.append((cov, cfg.num_anchors(image_size), cfg))
    best_cov = max(c[0] for c in candidates)
    need = min(target, best_cov - 0.005)
    ok = [c for c in candidates if c[0] >= need]
    return min(ok, key=lambda c: (c[1], -c[0]))[2]
