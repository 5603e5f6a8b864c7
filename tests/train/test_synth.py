"""Synthetic smears: determinism, exact boxes in the catalog's size ranges, COCO output, the virtual slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smearsight.catalog import TPS_CLASS_NAMES, TPS_CLASSES
from smearsight.cli import main
from smearsight.train.datasets import synth_render as R
from smearsight.train.datasets.synth import SmearSynthesizer, SyntheticSlide, generate_dataset, split_indices
from smearsight.train.datasets.synth_cells import N_UNIFORMS

SMALL = (256, 320)


def _interior(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    return (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < w) & (boxes[:, 3] < h)


def test_render_is_deterministic_per_seed_and_index():
    a = SmearSynthesizer(7, SMALL).render(3)
    b = SmearSynthesizer(7, SMALL).render(3)  # a fresh instance: nothing cached between them
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == (*SMALL, 3) and a[0].dtype == np.uint8
    assert a[1].dtype == np.float32 and a[2].dtype == np.int64
    other_index = SmearSynthesizer(7, SMALL).render(4)
    other_seed = SmearSynthesizer(8, SMALL).render(3)
    assert not np.array_equal(a[0], other_index[0])
    assert not np.array_equal(a[0], other_seed[0])


def test_boxes_inside_image_and_sizes_in_catalog_ranges():
    synth = SmearSynthesizer(11, (384, 512))
    seen = np.zeros(len(TPS_CLASSES), int)
    for i in range(6):
        image, boxes, labels = synth.render(i)
        h, w = image.shape[:2]
        assert len(boxes) == len(labels) > 0
        assert ((labels >= 0) & (labels < len(TPS_CLASS_NAMES))).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        inner = _interior(boxes, (h, w))
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        side, mean_side = np.maximum(bw, bh), np.sqrt(bw * bh)
        for k, cls in enumerate(TPS_CLASSES):
            sel = inner & (labels == k)
            seen[k] += sel.sum()
            lo, hi = cls.size_px
            # Whichever size measure one uses (sqrt(w*h) or the longer side), it is in the catalog range.
            assert ((mean_side[sel] >= lo) & (side[sel] <= hi)).all(), (cls.name, mean_side[sel], side[sel])
    assert (seen > 0).all(), seen  # every class appears
    # Plausible mix: germ cells and sperm common, Sertoli cells few.
    assert seen[0] < seen[2] and seen[0] < seen[5]


def _single_cell_od(cls: int, size: float, ang: float = 0.6) -> tuple[np.ndarray, np.ndarray, R.Scene]:
    rng = np.random.default_rng(5)
    style = R.make_style(rng)
    style.blur_sigma = 0.0
    style.plasma = 0.0
    scene = R.Scene(
        cls=np.array([cls]),
        cx=np.array([60.3]),
        cy=np.array([57.8]),
        size=np.array([size]),
        ang=np.array([ang]),
        u=rng.random((1, N_UNIFORMS)),
        debris=np.zeros((0, 8)),
        boxes=np.full((1, 4), np.nan),
    )
    nuc, cyto = R.render_od([scene], style, R.make_textures(rng), 0, 0, 120, 120)
    return nuc, cyto, scene


@pytest.mark.parametrize("cls,size", [(0, 45.0), (1, 25.0), (2, 15.0)])
def test_whole_cell_box_is_tight_around_the_drawn_stain(cls, size):
    """Independent of how the box is computed: threshold the rendered densities and take their extent."""
    nuc, cyto, scene = _single_cell_od(cls, size)
    od = nuc + cyto
    ys, xs = np.nonzero(od > 0.5 * np.percentile(od[od > 0], 20))
    measured = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
    box = scene.boxes[0]
    np.testing.assert_array_equal(measured, box)
    lo, hi = TPS_CLASSES[cls].size_px
    assert lo <= np.sqrt((box[2] - box[0]) * (box[3] - box[1])) and max(box[2] - box[0], box[3] - box[1]) <= hi


@pytest.mark.parametrize("cls", [3, 4, 5])
def test_sperm_box_covers_the_head_not_the_tail(cls):
    nuc, _, scene = _single_cell_od(cls, 12.0)
    x1, y1, x2, y2 = scene.boxes[0]
    assert 8 <= np.sqrt((x2 - x1) * (y2 - y1)) and max(x2 - x1, y2 - y1) <= 14
    # The darkest (most condensed) nuclear stain is the head, inside the box ...
    y, x = np.unravel_index(np.argmax(nuc), nuc.shape)
    assert x1 <= x < x2 and y1 <= y < y2
    # ... and the flagellum (or cytoplasm) drawn outside the box is faint.
    outside = nuc.copy()
    outside[int(y1) : int(y2), int(x1) : int(x2)] = 0
    assert outside.max() < 0.6 * nuc.max()
    if cls != 3:
        assert (outside > 0.05).sum() > 20  # mature and immature sperm have a tail


def test_split_is_deterministic_80_20():
    train, val = split_indices(50, 3)
    assert (train, val) == split_indices(50, 3)
    assert len(val) == 10 and len(train) == 40 and not set(train) & set(val)
    assert split_indices(1, 3) == ([0], [])
    assert len(split_indices(2, 3)[1]) == 1


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_writes_a_valid_identical_coco_dataset(tmp_path):
    args = ["data", "synth", "--images", "5", "--seed", "4", "--size", "256x320", "--preview"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    root = tmp_path / "a"
    assert (root / "preview.png").stat().st_size > 1000
    assert len(list((root / "images").glob("*.jpg"))) == 5
    train = json.loads((root / "annotations" / "train.json").read_text())
    val = json.loads((root / "annotations" / "val.json").read_text())
    assert len(train["images"]) == 4 and len(val["images"]) == 1
    assert [c["name"] for c in train["categories"]] == list(TPS_CLASS_NAMES)
    assert {i["file_name"] for i in train["images"]} | {i["file_name"] for i in val["images"]} == {
        f"synth_{i:05d}.jpg" for i in range(5)
    }

    # The datasets helper's reader/checker finds no problem.
    from smearsight.train.datasets.formats import read_dataset

    for split, n in (("train", 4), ("val", 1)):
        ds, problems = read_dataset(root, "coco", split)
        assert problems == [] and len(ds) == n and ds.num_boxes > 0

    # pycocotools as an independent reader.
    from pycocotools.coco import COCO

    coco = COCO(str(root / "annotations" / "train.json"))
    assert len(coco.getAnnIds()) == len(train["annotations"]) > 0
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"] and w > 0 and h > 0

    # Same seed: byte-identical output (images, annotations, preview).
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert _files(root) == _files(tmp_path / "b")


def test_dataset_boxes_match_the_renderer(tmp_path):
    summary = generate_dataset(tmp_path, 2, seed=9, size=SMALL, progress=False)
    assert summary["images"] == 2 and summary["train_images"] == 1 and summary["val_images"] == 1
    from smearsight.train.datasets.formats import read_dataset

    synth = SmearSynthesizer(9, SMALL)
    records = {}
    for split in ("train", "val"):
        ds, problems = read_dataset(tmp_path, "coco", split)
        assert problems == []
        records.update({r.path.name: r for r in ds.images})
    for i in range(2):
        _, boxes, labels = synth.render(i)
        rec = records[f"synth_{i:05d}.jpg"]
        np.testing.assert_allclose(rec.boxes, boxes, atol=1e-3)
        np.testing.assert_array_equal(rec.labels, labels)


@pytest.mark.parametrize("argv", [["--size", "12xfoo"], ["--size", "32x32"], ["--images", "0"]])
def test_cli_bad_input_is_one_line_exit_1(tmp_path, argv, capsys):
    base = {"--size": "256x320", "--images": "1"}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    flat = [x for kv in base.items() for x in kv]
    rc = main(["data", "synth", "--out", str(tmp_path / "o"), "--seed", "1", *flat])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert "error" in err and len(err.splitlines()) == 1


def test_cli_refuses_a_file_as_output(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["data", "synth", "--out", str(target), "--images", "1", "--size", "256x320"]) == 1


# ------------------------------------------------------------------------------------------ virtual slide

SLIDE = (1200, 1300)
FRAME = (256, 320)


@pytest.fixture(scope="module")
def slide() -> SyntheticSlide:
    return SyntheticSlide(3, slide_size=SLIDE, frame_size=FRAME, max_cached_tiles=4)


def test_slide_same_position_same_frame(slide):
    a, boxes, labels = slide.frame_at(900.0, 880.0, with_boxes=True)  # straddles four tiles
    assert a.shape == (*FRAME, 3) and a.dtype == np.uint8
    b = SyntheticSlide(3, slide_size=SLIDE, frame_size=FRAME).frame_at(900, 880)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, slide.frame_at(900.2, 879.8))  # rounded to whole pixels
    assert not np.array_equal(a, slide.frame_at(100, 100))
    assert len(boxes) == len(labels) > 0
    h, w = FRAME
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_slide_tiles_join_seamlessly_and_boxes_move_with_the_stage(slide):
    x, y = 900, 880
    a = slide.clean_view(x, y)
    b = slide.clean_view(x + 8, y + 5)
    np.testing.assert_array_equal(a[5:, 8:], b[:-5, :-8])
    # The tiled view equals a direct render of the same window (no seams at tile borders).
    scenes = [s for s in (slide._block(r, c) for r in range(2) for c in range(2)) if s is not None]
    nuc, cyto = R.render_od(scenes, slide.style, slide.textures, x, y, FRAME[1], FRAME[0])
    direct = R.to_uint8(R.od_to_rgb(nuc, cyto, slide.style), None, 0.0)
    assert np.abs(direct.astype(int) - a.astype(int)).max() <= 1
    ba, la = slide.boxes_at(x, y)
    bb, lb = slide.boxes_at(x + 8, y + 5)
    keep_a = _interior(ba, FRAME) & (ba[:, 0] > 8) & (ba[:, 1] > 5)
    moved = ba[keep_a] - np.array([8, 5, 8, 5], np.float32)
    keys_b = {tuple(np.round(r, 3)) for r in bb}
    assert all(tuple(np.round(r, 3)) in keys_b for r in moved)


def test_slide_frames_survive_tile_cache_eviction(slide):
    first = slide.frame_at(0, 0)
    for x, y in [(900, 900), (0, 900), (900, 0), (500, 500)]:
        slide.frame_at(x, y)
    assert len(slide._tiles) <= 4
    np.testing.assert_array_equal(first, slide.frame_at(0, 0))


def test_stage_path_is_a_slow_serpentine(slide):
    path = slide.stage_path(speed_px_per_frame=16.0)
    pts = np.array([next(path) for _ in range(2000)])
    h, w = FRAME
    assert (pts[:, 0] >= 0).all() and (pts[:, 0] <= SLIDE[1] - w).all()
    assert (pts[:, 1] >= 0).all() and (pts[:, 1] <= SLIDE[0] - h).all()
    steps = np.abs(np.diff(pts, axis=0)).sum(axis=1)
    assert steps.max() <= 16.0 + 1e-9
    assert (steps > 0).mean() > 0.9
    dx = np.sign(np.diff(pts[:, 0]))
    assert (dx > 0).any() and (dx < 0).any()  # sweeps both ways
    assert pts[:, 1].max() == SLIDE[0] - h  # reaches the bottom row ...
    assert pts[-1, 1] < pts[:, 1].max() or pts[:, 1].min() == 0  # ... and keeps going (endless)
    again = slide.stage_path(16.0)
    np.testing.assert_array_equal(pts[:50], np.array([next(again) for _ in range(50)]))
    with pytest.raises(Exception, match="speed"):
        next(slide.stage_path(0))


def test_synth_imports_and_renders_without_torch():
    """The runtime's synth:// source imports this module on a device, where torch is not installed."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'timm', 'tensorrt', 'pycuda', 'pycocotools'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from smearsight.train.datasets.synth import SyntheticSlide\n"
        "s = SyntheticSlide(0, slide_size=(600, 700), frame_size=(256, 320))\n"
        "x, y = next(s.stage_path())\n"
        "assert s.frame_at(x, y).shape == (256, 320, 3)\n"
        "assert not any(m.split('.')[0] in ('torch', 'pycocotools') for m in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------ bad runs


def test_cli_negative_seed_is_one_line_and_creates_nothing(tmp_path, capsys):
    rc = main(["data", "synth", "--out", str(tmp_path / "o"), "--images", "1", "--seed", "-1", "--size", "64x64"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == "error: --seed: -1 must be 0 or more"
    assert not (tmp_path / "o").exists()


def test_cli_full_disk_is_one_line_naming_the_file(tmpfs, capsys):
    with tmpfs("small", "size=48k") as disk:
        rc = main(["data", "synth", "--out", str(disk / "d"), "--images", "4", "--seed", "1", "--size", "256x320"])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {disk / 'd' / 'images'}/synth_0000") and "No space left on device" in err
        assert not list(disk.rglob("*.tmp")) and not (disk / "d" / "annotations").exists()


def test_rerun_cut_short_leaves_no_stale_annotations(tmp_path, monkeypatch):
    generate_dataset(tmp_path, 3, seed=1, size=(64, 64), progress=False)
    assert (tmp_path / "annotations" / "train.json").is_file()
    render = SmearSynthesizer.render

    def interrupted(self, index):
        if index == 1:
            raise KeyboardInterrupt
        return render(self, index)

    monkeypatch.setattr(SmearSynthesizer, "render", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, 3, seed=2, size=(64, 64), progress=False)  # synth_00000.jpg now holds seed 2
    # The seed-1 boxes must not survive beside seed-2 pixels: the dataset is unreadable, not silently wrong.
    assert not (tmp_path / "annotations" / "train.json").exists()
    assert not (tmp_path / "annotations" / "val.json").exists()


def test_cli_out_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "images").write_text("x")
    for out, expected in ((tmp_path / "file" / "sub", "is a file, so the folder cannot be created"),
                          (tmp_path / "d", "images is a file; expected a folder for the frames")):
        rc = main(["data", "synth", "--out", str(out), "--images", "1", "--size", "64x64"])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1 and expected in err, err
