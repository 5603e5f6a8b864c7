"""Frames larger than a ``pad`` detector's input, detected at their own scale in overlapping tiles.

A ``pad`` detector learned cells at the camera's pixel size; shrinking a larger frame to fit its input
makes every cell smaller than it was trained on (the demo detector's recall falls from ~0.99 to ~0.6 at
1080x1920). :func:`plan_tiles` covers the frame with input-sized tiles that overlap by at least
``min_overlap`` pixels instead, and each tile is detected unscaled.

Merging needs no second NMS: every frame pixel belongs to exactly one tile's *core* (the tile cut in the
middle of each overlap with a neighbour), and a tile keeps only the detections whose centre lies in its
core (:func:`keep_owned`). A cell no larger than the overlap whose centre lies in a core lies wholly inside
that tile, so it is found there uncut; the part of it that a neighbour sees cut by its edge has its centre
on the owner's side of the cut too, so that neighbour drops it. Cells larger than the overlap can be cut
or found twice, which is why the overlap defaults to the largest anchor (:func:`default_overlap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One tile: its pixels in the frame, ``[y0:y1, x0:x1]``, and the core whose detections it keeps."""

    y0: int
    x0: int
    y1: int
    x1: int
    core: tuple[float, float, float, float]  # (y0, x0, y1, x1) in frame pixels, half-open


def _starts(length: int, tile: int, min_overlap: int) -> list[int]:
    """Tile starts along one axis: as few tiles as keep ``min_overlap``, spread evenly, the last at the edge."""
    if length <= tile:
        return [0]
    step = tile - min_overlap
    count = 1 + math.ceil((length - tile) / step)
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _cuts(starts: list[int], tile: int, length: int) -> list[float]:
    """Core boundaries along one axis: 0, the middle of each overlap, ``length``."""
    middles = [(starts[i + 1] + min(starts[i] + tile, length)) / 2 for i in range(len(starts) - 1)]
    return [0.0, *middles, float(length)]


def plan_tiles(frame_hw: tuple[int, int], tile_hw: tuple[int, int], min_overlap: int) -> list[Tile]:
    """Tiles of at most ``tile_hw`` covering a frame of ``frame_hw``, row by row.

    Neighbouring tiles overlap by at least ``min_overlap`` pixels (clamped to half a tile); a frame that fits
    is one tile. Raises ValueError for a non-positive size.
    """
    (h, w), (th, tw) = frame_hw, tile_hw
    if min(h, w, th, tw) <= 0:
        raise ValueError(f"frame {frame_hw} and tile {tile_hw} must be positive sizes")
    th, tw = min(th, h), min(tw, w)
    rows = _starts(h, th, max(0, min(int(min_overlap), th // 2)))
    cols = _starts(w, tw, max(0, min(int(min_overlap), tw // 2)))
    row_cuts, col_cuts = _cuts(rows, th, h), _cuts(cols, tw, w)
    return [
        Tile(y0, x0, y0 + th, x0 + tw, (row_cuts[i], col_cuts[j], row_cuts[i + 1], col_cuts[j + 1]))
        for i, y0 in enumerate(rows)
        for j, x0 in enumerate(cols)
    ]


def default_overlap(anchors: np.ndarray) -> int:
    """The tile overlap for a detector: its largest anchor's longer side, in whole pixels (at least 1)."""
    if anchors.size == 0:
        return 1
    sides = np.maximum(anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1])
    return max(1, math.ceil(float(sides.max())))


def keep_owned(dets: np.ndarray, n: int, tile: Tile) -> np.ndarray:
    """The rows of ``dets[:n]`` (``tile``'s pixels, xyxy first) whose box centre lies in its core, moved to
    frame pixels (a new array)."""
    rows = dets[:n].copy()
    rows[:, 0:4:2] += np.float32(tile.x0)
    rows[:, 1:4:2] += np.float32(tile.y0)
    cx = (rows[:, 0] + rows[:, 2]) * 0.5
    cy = (rows[:, 1] + rows[:, 3]) * 0.5
    y0, x0, y1, x1 = tile.core
    return rows[(cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)]
