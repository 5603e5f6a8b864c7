"""Frames larger than a ``pad`` detector's input, detected in overlapping tiles (runtime/tiling.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smearsight.anchors import box_iou
from smearsight.runtime.tiling import default_overlap, keep_owned, plan_tiles

CASES = [  # frame (h, w), tile (h, w), overlap
    ((1080, 1920), (768, 1024), 72),
    ((600, 1200), (768, 1024), 72),  # shorter than the tile, wider than two
    ((2000, 3000), (768, 1024), 100),
    ((768, 1024), (768, 1024), 72),  # fits: one tile
    ((500, 700), (768, 1024), 72),
    ((97, 145), (64, 96), 40),  # overlap above half a tile: clamped
    ((1000, 1000), (256, 256), 0),
]


@pytest.mark.parametrize(("frame", "tile", "overlap"), CASES)
def test_tiles_cover_the_frame_and_their_cores_split_it(frame, tile, overlap):
    h, w = frame
    tiles = plan_tiles(frame, tile, overlap)
    th, tw = min(tile[0], h), min(tile[1], w)
    margin = min(overlap, th // 2, tw // 2) / 2
    covered = np.zeros(frame, np.int32)
    owners = np.zeros(frame, np.int32)
    centres_y, centres_x = np.arange(h) + 0.5, np.arange(w) + 0.5
    for t in tiles:
        assert (t.y1 - t.y0, t.x1 - t.x0) == (th, tw)
        assert 0 <= t.y0 and t.y1 <= h and 0 <= t.x0 and t.x1 <= w
        covered[t.y0:t.y1, t.x0:t.x1] += 1
        cy0, cx0, cy1, cx1 = t.core
        # a core keeps half the overlap away from every tile edge that is not the frame's
        assert cy0 >= t.y0 + (margin if t.y0 > 0 else 0) and cy1 <= t.y1 - (margin if t.y1 < h else 0)
        assert cx0 >= t.x0 + (margin if t.x0 > 0 else 0) and cx1 <= t.x1 - (margin if t.x1 < w else 0)
        rows = (centres_y >= cy0) & (centres_y < cy1)
        cols = (centres_x >= cx0) & (centres_x < cx1)
        owners += np.outer(rows, cols)
    assert covered.min() >= 1
    assert (owners == 1).all()  # every pixel belongs to exactly one tile
    # no more tiles than the overlap needs: one fewer per axis would leave a gap
    for length, size, starts in ((h, th, {t.y0 for t in tiles}), (w, tw, {t.x0 for t in tiles})):
        step = size - min(overlap, th // 2, tw // 2)
        assert len(starts) == 1 or (len(starts) - 2) * step + size < length


def test_tiled_detections_of_a_perfect_detector_are_each_cell_once_and_uncut():
    """A stand-in detector that boxes every cell as its tile shows it (cut at the tile's edge); merged by
    ownership, every cell appears exactly once with its whole box, at the seams too."""
    rng = np.random.default_rng(3)
    frame, tile, overlap = (1080, 1920), (768, 1024), 72
    sizes = rng.uniform(8, overlap, size=(3000, 2))
    x0 = rng.uniform(-20, 1920 - 8, 3000)
    y0 = rng.uniform(-20, 1080 - 8, 3000)
    cells = np.stack([x0, y0, x0 + sizes[:, 0], y0 + sizes[:, 1]], axis=1).astype(np.float32)
    cells[:, 0:4:2] = np.clip(cells[:, 0:4:2], 0, 1920)
    cells[:, 1:4:2] = np.clip(cells[:, 1:4:2], 0, 1080)
    cells = cells[(cells[:, 2] - cells[:, 0] >= 1) & (cells[:, 3] - cells[:, 1] >= 1)]
    kept = []
    for t in plan_tiles(frame, tile, overlap):
        seen = cells.copy()
        seen[:, 0:4:2] = np.clip(seen[:, 0:4:2] - t.x0, 0, t.x1 - t.x0)
        seen[:, 1:4:2] = np.clip(seen[:, 1:4:2] - t.y0, 0, t.y1 - t.y0)
        seen = seen[(seen[:, 2] - seen[:, 0] >= 1) & (seen[:, 3] - seen[:, 1] >= 1)]
        dets = np.concatenate([seen, np.ones((len(seen), 2), np.float32)], axis=1)
        kept.append(keep_owned(dets, len(dets), t))
    merged = np.concatenate(kept)[:, :4]
    assert len(merged) == len(cells)
    order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_allclose(order(merged), order(cells), atol=1e-3)


def test_default_overlap_is_the_largest_anchor():
    anchors = np.array([[0, 0, 8, 8], [10, 10, 20, 81.2], [0, 0, 50, 30]], np.float32)
    assert default_overlap(anchors) == 72


def test_shipped_detector_finds_cells_at_their_scale_on_a_larger_camera_frame():
    """1080x1920 frames into the demo detector's 768x1024 input: shrunk, cells look half their size and
    most are missed; tiled, they are found as on a 768x1024 frame."""
    from smearsight.runtime import pipeline as pl
    from smearsight.runtime.backends import open_backend
    from smearsight.train.datasets.synth import SmearSynthesizer

    image, boxes, _ = SmearSynthesizer(seed=777, size=(1080, 1920)).render(0)
    recall = {}
    for tile in (True, False):
        pipe = pl.Pipeline(open_backend(pl.packaged_models_root() / "detector", "onnx"), [], tile=tile)
        try:
            dets, n, _, _ = pipe.process(image)
            iou = box_iou(boxes, dets[:n, :4])
            recall[tile] = float((iou.max(axis=1) >= 0.5).mean())
            if tile:
                assert pipe.tiles_last == 4 and pipe.cap_warning() == ""
                assert 0.85 <= n / len(boxes) <= 1.15, (n, len(boxes))
                assert ((iou >= 0.5).sum(axis=1) > 1).mean() < 0.08  # cells boxed twice: as on whole frames
            else:
                assert pipe.tiles_last == 1 and "--shrink" in pipe.cap_warning()
        finally:
            pipe.close()
    assert recall[True] >= 0.9, recall
    assert recall[False] < 0.7, recall


def test_run_tiles_by_default_and_shrinks_when_asked(tiny, tmp_path):
    from smearsight.cli import main

    models = tiny.build_model_set(tmp_path / "models", image_size=(64, 96), parts=(), resize="pad")
    for flag, tiles in (([], 4), (["--shrink"], 1)):
        stats = tmp_path / "stats.json"
        rc = main(["run", "synth://?size=160x100", "null://", "--models", str(models), "--backend", "onnx",
                   "--max-frames", "2", "--detect-every", "1", "--stats-json", str(stats), *flag])
        assert rc == 0
        data = json.loads(stats.read_text())
        assert data["detector_tiles"] == tiles
        shrunk = [msg for msg in data["problems"] if "shrunk" in msg]
        assert bool(shrunk) == (tiles == 1)
