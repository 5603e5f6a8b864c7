"""The four-image mosaic augmentation: boxes stay on their cells' pixels, every image keeps its own
quadrant, the dataset draws the other three images, and ``mosaic: 0`` leaves the single-image stream as
it was."""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from smearsight.train.datasets.records import DetectionDataset, ImageRecord  # noqa: E402
from smearsight.train.detector.augment import mosaic_transform, train_transform  # noqa: E402
from smearsight.train.detector.config import AugmentConfig  # noqa: E402
from smearsight.train.detector.data import DetectorDataset  # noqa: E402

CELL = 14
LABEL_COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230]], np.uint8)
BACKGROUNDS = [20, 70, 170, 250]  # one grey per source image; none is the pad value 127
SIZE = (128, 160)


def _painted_image(rng: np.random.Generator, background: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 120x160 image with cells on a grid (2 px gaps at least), each painted in its label's colour."""
    img = np.full((120, 160, 3), background, np.uint8)
    boxes, labels = [], []
    for y in range(4, 120 - CELL, CELL + 6):
        for x in range(4, 160 - CELL, CELL + 6):
            if rng.random() < 0.6:
                label = int(rng.integers(0, 3))
                img[y : y + CELL, x : x + CELL] = LABEL_COLOURS[label]
                boxes.append([x, y, x + CELL, y + CELL])
                labels.append(label)
    return img, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def _geometric_only() -> AugmentConfig:
    return AugmentConfig(color=0.0, blur=0.0, noise=0.0, hflip=0.5, vflip=0.5, rot90=0.5, mosaic=1.0)


def test_mosaic_boxes_sit_on_their_cells_and_visible_cells_are_boxed() -> None:
    cfg = _geometric_only()
    checked_components = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        samples = [_painted_image(rng, bg) for bg in BACKGROUNDS]
        canvas, boxes, labels = mosaic_transform(samples, SIZE, cfg, rng)
        assert canvas.shape == (*SIZE, 3) and canvas.dtype == np.uint8
        assert len(boxes) == len(labels) > 0
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= SIZE[1]).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= SIZE[0]).all()
        # every box's interior is its label's colour (a shifted, flipped or mis-scaled box would not be)
        for box, label in zip(boxes, labels, strict=True):
            x0, y0, x1, y1 = np.round(box).astype(int)
            inner = canvas[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].reshape(-1, 3).astype(int)
            if len(inner):
                assert np.abs(inner - LABEL_COLOURS[label]).max() <= 12, (seed, box, label)
        # the other way round: a painted blob larger than half a cell at the largest scale has a box
        largest_cell_area = (CELL * cfg.scale_max * max(SIZE[0] / 120, SIZE[1] / 160)) ** 2
        for label, colour in enumerate(LABEL_COLOURS):
            mask = (np.abs(canvas.astype(int) - colour).max(axis=2) <= 30).astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
            for x, y, w, h, area in stats[1:n]:
                if area < 0.5 * largest_cell_area:
                    continue
                blob = np.array([x, y, x + w, y + h], np.float32)
                own = boxes[labels == label]
                ix = np.clip(np.minimum(own[:, 2], blob[2]) - np.maximum(own[:, 0], blob[0]), 0, None)
                iy = np.clip(np.minimum(own[:, 3], blob[3]) - np.maximum(own[:, 1], blob[1]), 0, None)
                union = (own[:, 2] - own[:, 0]) * (own[:, 3] - own[:, 1]) + w * h - ix * iy
                assert (ix * iy / union).max() >= 0.7, (seed, label, blob)
                checked_components += 1
    assert checked_components > 50


def test_each_image_keeps_one_quadrant() -> None:
    """Backgrounds tell the images apart: the canvas splits at one centre into four single-image regions."""
    cfg = _geometric_only()
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        samples = [(np.full((120, 160, 3), bg, np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
                   for bg in BACKGROUNDS]
        canvas, boxes, _ = mosaic_transform(samples, SIZE, cfg, rng)
        assert len(boxes) == 0
        grey = canvas[..., 0].astype(int)
        # the centre lies in the middle half: each corner pixel belongs to its own image (or the pad)
        corners = [grey[0, 0], grey[0, -1], grey[-1, 0], grey[-1, -1]]
        found = [c for c in corners if c != 127]
        assert len(set(found)) == len(found)
        for i, bg in enumerate(BACKGROUNDS):
            rows, cols = np.nonzero(grey == bg)
            assert len(rows) > 0, (seed, bg)
            region = np.zeros_like(grey, bool)
            region[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
            assert set(np.unique(grey[region])) <= {bg, 127}, (seed, i)


def _dataset(tmp_path, backgrounds: list[int]) -> DetectionDataset:
    images = []
    for i, bg in enumerate(backgrounds):
        img, boxes, labels = _painted_image(np.random.default_rng(i), bg)
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), img[..., ::-1])
        images.append(ImageRecord(path, 160, 120, boxes, labels, image_id=i))
    return DetectionDataset(["a", "b", "c"], images)


def test_dataset_mosaic_draws_three_other_images(tmp_path) -> None:
    ds = _dataset(tmp_path, BACKGROUNDS)
    train = DetectorDataset(ds, SIZE, [0.5] * 3, [0.25] * 3, _geometric_only())
    for epoch in range(4):
        train.epoch = epoch
        for index in range(4):
            canvas, _, _ = train.load(index)
            greys = set(np.unique(canvas[..., 0]).tolist())
            assert set(BACKGROUNDS) <= greys, (epoch, index)


def test_mosaic_of_a_two_image_dataset_repeats_the_other_image(tmp_path) -> None:
    ds = _dataset(tmp_path, BACKGROUNDS[:2])
    train = DetectorDataset(ds, SIZE, [0.5] * 3, [0.25] * 3, _geometric_only())
    for index in range(2):
        canvas, boxes, labels = train.load(index)
        greys = set(np.unique(canvas[..., 0]).tolist()) & set(BACKGROUNDS)
        assert greys == set(BACKGROUNDS[:2]) and len(boxes) == len(labels) > 0


def test_mosaic_off_leaves_the_single_image_augmentation_unchanged(tmp_path) -> None:
    ds = _dataset(tmp_path, BACKGROUNDS)
    cfg = AugmentConfig(mosaic=0.0)
    train = DetectorDataset(ds, SIZE, [0.5] * 3, [0.25] * 3, cfg, seed=3)
    train.epoch = 2
    for index in range(4):
        got = train.load(index)
        img, boxes, labels = train.read(index)
        want = train_transform(img, boxes, labels, SIZE, cfg, np.random.default_rng([3, 2, index]))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_mosaic_needs_four_samples() -> None:
    sample = (np.zeros((8, 8, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="needs 4 samples, got 2"):
        mosaic_transform([sample, sample], SIZE, AugmentConfig(), np.random.default_rng(0))


@pytest.mark.parametrize("min_visible", [0.4, 0.6])
def test_cells_cut_by_the_canvas_stay_boxes_only_when_mostly_visible(min_visible: float) -> None:
    """Scale jitter above 1 crops the image: a cut cell keeps its box only with ``min_visible`` of it in view
    (annotators rarely box a cell less than about half visible; docs/benchmarks.md)."""
    cfg = AugmentConfig(color=0.0, blur=0.0, noise=0.0, hflip=0.0, vflip=0.0, rot90=0.0, scale_min=1.6,
                        scale_max=1.6, min_visible=min_visible)
    full_area = (CELL * 1.6 * min(SIZE[0] / 120, SIZE[1] / 160)) ** 2
    shares = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        img, boxes, labels = _painted_image(rng, 70)
        _, out_boxes, _ = train_transform(img, boxes, labels, SIZE, cfg, rng)
        shares.extend(((out_boxes[:, 2] - out_boxes[:, 0]) * (out_boxes[:, 3] - out_boxes[:, 1]) / full_area).tolist())
    shares = np.asarray(shares)
    assert shares.min() >= min_visible - 0.02
    assert ((shares >= 0.4) & (shares < 0.6)).any() == (min_visible < 0.6)
