"""``smearsight data anchors``: the coverage report against an independent NumPy computation, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from smearsight.cli import main


def _coco(root: Path, boxes: list[list[float]], size: tuple[int, int] = (128, 128)) -> Path:
    """One ``size`` = (H, W) image with COCO ``[x, y, w, h]`` boxes under ``root``; returns root."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    assert cv2.imwrite(str(root / "images" / "a.png"), np.zeros((*size, 3), np.uint8))
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b} for i, b in enumerate(boxes)]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": size[1], "height": size[0]}],
            "annotations": anns, "categories": [{"id": 1, "name": "cell"}]}
    (root / "annotations" / "train.json").write_text(json.dumps(data))
    return root


def _rows(out: str, table: int) -> dict[str, tuple[int, float, float]]:
    """``bucket -> (boxes, covered, median IoU)`` of the ``table``-th table printed (0: the --config layout)."""
    tables: list[dict[str, tuple[int, float, float]]] = []
    for line in out.splitlines():
        if line.startswith("┏"):
            tables.append({})
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if tables and len(cells) == 4 and cells[1].isdigit():
            tables[-1][cells[0]] = (int(cells[1]), float(cells[2]), float(cells[3]))
    return tables[table]


def test_coverage_matches_an_independent_numpy_computation(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(40):
        side, ratio = rng.uniform(3, 60), rng.uniform(0.5, 2)
        w, h = side * ratio**0.5, side / ratio**0.5
        boxes.append([round(float(rng.uniform(0, 128 - w)), 2), round(float(rng.uniform(0, 128 - h)), 2),
                      round(float(w), 2), round(float(h), 2)])
    root = _coco(tmp_path / "d", boxes)
    config = tmp_path / "a.yaml"
    config.write_text("levels: [3, 4]\nbase_sizes: [12, 40]\nscales: [1.0]\naspect_ratios: [1.0]\n")
    rc = main(["data", "anchors", str(root), "--format", "coco", "--split", "train", "--config", str(config),
               "--image-size", "128x128"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = _rows(out, 0)
    # Independent: every square anchor on the stride-8 (12 px) and stride-16 (40 px) grids, brute-force IoU.
    anchors = []
    for stride, base in ((8, 12.0), (16, 40.0)):
        for cy in (np.arange(128 // stride) + 0.5) * stride:
            for cx in (np.arange(128 // stride) + 0.5) * stride:
                anchors.append([cx - base / 2, cy - base / 2, cx + base / 2, cy + base / 2])
    a = np.asarray(anchors)
    b = np.asarray([[x, y, x + w, y + h] for x, y, w, h in boxes], np.float32).astype(np.float64)
    inter = np.prod(np.clip(np.minimum(b[:, None, 2:], a[None, :, 2:]) - np.maximum(b[:, None, :2], a[None, :, :2]),
                            0, None), axis=2)
    area_b, area_a = np.prod(b[:, 2:] - b[:, :2], axis=1), np.prod(a[:, 2:] - a[:, :2], axis=1)
    best = (inter / (area_b[:, None] + area_a[None, :] - inter)).max(axis=1)
    size = np.sqrt(area_b)
    for bucket, (lo, hi) in {"0-8": (0, 8), "8-16": (8, 16), "16-32": (16, 32), "32-64": (32, 64)}.items():
        sel = (size >= lo) & (size < hi)
        assert rows[bucket][0] == sel.sum() > 0
        assert rows[bucket][1] == pytest.approx(float((best[sel] >= 0.5).mean()), abs=5e-4)
        assert rows[bucket][2] == pytest.approx(float(np.median(best[sel])), abs=5e-4)
    assert rows["all"][0] == 40 and rows["all"][1] == pytest.approx(float((best >= 0.5).mean()), abs=5e-4)


def test_a_split_without_boxes_is_one_line(tmp_path: Path, capsys) -> None:
    root = _coco(tmp_path / "d", [])  # one negative image: nothing to measure
    rc = main(["data", "anchors", str(root), "--format", "coco", "--split", "train"])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == ""
    assert captured.err.strip() == f"error: {root}: split 'train' holds no boxes (nothing to measure anchors against)"


@pytest.mark.parametrize("iou", ["0", "1.5", "-0.2", "nan"])
def test_positive_iou_out_of_range_is_one_line(tmp_path: Path, capsys, iou: str) -> None:
    root = _coco(tmp_path / "d", [[10, 10, 20, 20]])
    rc = main(["data", "anchors", str(root), "--format", "coco", "--split", "train", "--positive-iou", iou])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == ""
    assert captured.err.strip() == f"error: --positive-iou: expected a number in (0, 1], got {float(iou):g}"


def test_recipe_auto_is_what_training_picks_whatever_the_reported_iou(tmp_path: Path, capsys) -> None:
    from smearsight.train.datasets.formats import read_dataset
    from smearsight.train.detector.config import TrainConfig
    from smearsight.train.detector.train_loop import resolve_recipe

    grid = [[10.0 + 20 * i, 10.0 + 20 * j, 10.0, 10.0] for i in range(5) for j in range(5)]  # 10 px cells
    root = _coco(tmp_path / "d", grid)
    ds, _ = read_dataset(root, "coco", "train")
    _, expected, _ = resolve_recipe(TrainConfig(image_size=[128, 128]), ds)
    for iou in ("0.3", "0.5"):  # at 0.3 the smallest layout would start at P3; training asks 0.5 and takes P2
        rc = main(["data", "anchors", str(root), "--format", "coco", "--split", "train", "--image-size", "128x128",
                   "--positive-iou", iou])
        out = " ".join(capsys.readouterr().out.split())
        assert rc == 0
        bases = [round(expected.base_size(i), 1) for i in range(len(expected.levels))]
        assert f"recipe auto: levels {expected.levels}, base {bases}," in out, (iou, out)


def test_config_as_a_training_recipe(tmp_path: Path, capsys) -> None:
    root = _coco(tmp_path / "d", [[10, 10, 20, 20], [40, 40, 12, 12]])
    args = ["data", "anchors", str(root), "--format", "coco", "--split", "train", "--config"]
    typo = tmp_path / "typo.yaml"
    typo.write_text("anchors:\n  levels: [3, 4, 5]\nmatchr:\n  positive_iou: 0.4\n")  # silently ignored before
    assert main([*args, str(typo)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {typo}: unknown field 'matchr'"
    # The shipped recipes are accepted as they are ('anchors: auto' was refused) and lend their input size.
    repo = Path(__file__).resolve().parents[2]
    assert main([*args, str(repo / "configs" / "detector_bccd.yaml")]) == 0
    capsys.readouterr()
    assert main([*args, str(repo / "configs" / "detector_tps.yaml")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "boxes at model input 768x1024" in out
    assert "levels [2, 3, 4, 5, 6], base [8.0, 16.0, 32.0, 64.0, 128.0]" in out
    # An anchors-only file (AnchorConfig fields at the top level) still works.
    bare = tmp_path / "bare.yaml"
    bare.write_text("levels: [3, 4]\nanchor_scale: 2.0\n")
    assert main([*args, str(bare), "--image-size", "128x128"]) == 0
    assert "levels [3, 4], base [16.0, 32.0]" in " ".join(capsys.readouterr().out.split())


def test_an_empty_dataset_without_a_split_is_named_plainly(tmp_path: Path, capsys) -> None:
    path = tmp_path / "empty.json"
    path.write_text('{"images": [], "annotations": [], "categories": []}')
    assert main(["data", "anchors", str(path), "--format", "coco"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {path}: the dataset holds no usable images"  # was "split None"
