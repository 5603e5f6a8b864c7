"""COCO / VOC / YOLO readers and writers round-trip the same boxes; image reading and sizes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from smearsight.errors import InputError
from smearsight.train.datasets.coco import read_coco, write_coco
from smearsight.train.datasets.formats import read_dataset, write_dataset
from smearsight.train.datasets.images import image_size, image_size_from_header, read_image_rgb
from smearsight.train.datasets.records import DetectionDataset, ImageRecord
from smearsight.train.datasets.voc import read_voc
from smearsight.train.datasets.yolo import read_yolo

CLASSES = ["sertoli", "round spermatid", "mature sperm"]  # order deliberately not alphabetical


def _write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return path


def make_dataset(src: Path, integral: bool = True) -> DetectionDataset:
    """Three small images (PNG, JPEG, BMP), integral or fractional boxes, one negative image."""
    specs = [("a.png", 96, 64), ("b.jpg", 80, 72), ("c.bmp", 50, 40)]
    boxes = [
        [[0, 0, 96, 64], [10, 12, 30, 40], [50, 5, 51, 6]],  # whole image, ordinary, 1x1 px
        [[3, 4, 79, 71], [20, 20, 28, 30]],
        [],  # negative
    ]
    labels = [[0, 2, 1], [1, 2], []]
    recs = []
    for i, ((name, w, h), b, lab) in enumerate(zip(specs, boxes, labels, strict=True)):
        b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        if not integral and len(b):
            b = b + np.array([0.25, 0.5, -0.75, -0.125]) * (b[:, 2:3] - b[:, 0:1] > 2)
        recs.append(ImageRecord(_write_image(src / name, w, h, i), w, h, boxes=b, labels=lab, image_id=i + 1))
    return DetectionDataset(list(CLASSES), recs, root=src)


def assert_same(a: DetectionDataset, b: DetectionDataset, atol: float) -> None:
    assert b.class_names == a.class_names
    assert [r.path.name for r in b.images] == [r.path.name for r in a.images]
    for ra, rb in zip(a.images, b.images, strict=True):
        assert (rb.width, rb.height) == (ra.width, ra.height)
        np.testing.assert_array_equal(rb.labels, ra.labels)
        np.testing.assert_allclose(rb.boxes, ra.boxes, atol=atol, rtol=0)


@pytest.mark.parametrize("integral", [True, False])
@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo"])
def test_each_format_round_trips(tmp_path: Path, fmt: str, integral: bool) -> None:
    ds = make_dataset(tmp_path / "src", integral)
    write_dataset(ds, tmp_path / fmt, fmt, "train")
    back, problems = read_dataset(tmp_path / fmt, fmt, "train", verify_images=True)
    assert problems == []
    # VOC keeps 6 decimals, YOLO 10 significant digits of the normalised value, COCO the float32 value.
    assert_same(ds, back, atol=0.0 if integral and fmt != "yolo" else 1e-4)
    assert len(back.images[2].boxes) == 0  # the negative image is kept


def test_chain_coco_voc_yolo_coco(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "src")
    write_coco(ds, tmp_path / "coco", "train", copy_images=True)
    coco, p1 = read_coco(tmp_path / "coco", "train")
    write_dataset(coco, tmp_path / "voc", "voc", "train")
    voc, p2 = read_voc(tmp_path / "voc", "train")
    write_dataset(voc, tmp_path / "yolo", "yolo", "train", image_mode="link")
    yolo, p3 = read_yolo(tmp_path / "yolo", "train")
    write_dataset(yolo, tmp_path / "coco2", "coco", "train")
    final, p4 = read_coco(tmp_path / "coco2" / "annotations" / "train.json")
    assert p1 == p2 == p3 == p4 == []
    assert_same(ds, final, atol=1e-3)
    # Images really travelled with the annotations.
    for rec in final.images:
        assert rec.path.is_file() and rec.path.parent == tmp_path / "coco2" / "images"


def test_coco_file_layout_and_categories(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "src")
    out = write_coco(ds, tmp_path / "coco", "val", copy_images=True)
    assert out == tmp_path / "coco" / "annotations" / "val.json"
    data = json.loads(out.read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert [c["name"] for c in data["categories"]] == CLASSES
    assert [im["file_name"] for im in data["images"]] == ["a.png", "b.jpg", "c.bmp"]
    first = data["annotations"][1]
    assert first["bbox"] == [10, 12, 20, 28] and first["category_id"] == 3 and first["area"] == 560
    # Independent reference: pycocotools reads what we wrote.
    from pycocotools.coco import COCO

    api = COCO(str(out))
    assert len(api.getAnnIds()) == 5 and api.loadImgs(2)[0]["width"] == 80
    assert not list((tmp_path / "coco").rglob("*.tmp"))


def test_write_coco_without_copy_references_images_in_place(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    ds = make_dataset(root / "images" / "sub")
    write_coco(ds, root, "train")
    data = json.loads((root / "annotations" / "train.json").read_text())
    assert data["images"][0]["file_name"] == "sub/a.png"
    back, problems = read_coco(root, "train")
    assert problems == [] and back.images[0].path == root / "images" / "sub" / "a.png"


def test_voc_one_based_convention(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "src")
    write_dataset(ds, tmp_path / "voc", "voc", "train")
    text = (tmp_path / "voc" / "Annotations" / "a.xml").read_text()
    # Whole 96x64 image = xmin 1 .. xmax 96 (1-based inclusive); a 1x1 px box at (50,5) = xmin=xmax=51.
    assert "<xmin>1</xmin>" in text and "<xmax>96</xmax>" in text and "<ymax>64</ymax>" in text
    assert "<xmin>51</xmin>" in text and "<xmax>51</xmax>" in text
    assert (tmp_path / "voc" / "ImageSets" / "Main" / "train.txt").read_text().split() == ["a", "b", "c"]
    assert (tmp_path / "voc" / "classes.txt").read_text().split("\n")[:3] == CLASSES


def test_voc_without_class_list_uses_sorted_names_from_all_files(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "src")
    write_dataset(ds, tmp_path / "voc", "voc", None)
    (tmp_path / "voc" / "classes.txt").unlink()
    back, problems = read_voc(tmp_path / "voc", None)
    assert problems == [] and back.class_names == sorted(CLASSES)
    names = [[back.class_names[k] for k in r.labels] for r in back.images]
    assert names == [[CLASSES[k] for k in r.labels] for r in ds.images]


def test_yolo_data_yaml_names_subfolders_and_yaml_split(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    _write_image(root / "images" / "train" / "x.jpg", 100, 50, 0)
    _write_image(root / "images" / "train" / "y.png", 40, 40, 1)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "x.txt").write_text("1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.2 0.2\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: cell\n  1: sperm\n")
    ds, problems = read_yolo(root, "train")
    assert problems == [] and ds.class_names == ["cell", "sperm"]
    assert [r.path.name for r in ds.images] == ["x.jpg", "y.png"]
    np.testing.assert_allclose(ds.images[0].boxes, [[40, 15, 60, 35], [0, 0, 20, 10]], atol=1e-5)
    assert len(ds.images[1].boxes) == 0  # no label file: a negative
    (root / "data.yaml").write_text("names: [cell, sperm]\n")
    all_images, problems = read_yolo(root, None)
    assert problems == [] and len(all_images) == 2


def test_yolo_split_list_relative_paths(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "src")
    write_dataset(ds, tmp_path / "yolo", "yolo", "val")
    lines = (tmp_path / "yolo" / "val.txt").read_text().split()
    assert lines == ["./images/a.png", "./images/b.jpg", "./images/c.bmp"]
    (tmp_path / "yolo" / "val.txt").write_text("images/b.jpg\n")
    back, problems = read_yolo(tmp_path / "yolo", "val")
    assert problems == [] and [r.path.name for r in back.images] == ["b.jpg"]


def test_writer_refuses_a_different_class_list_in_the_same_folder(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "src")
    write_dataset(ds, tmp_path / "yolo", "yolo", "train")
    other = DetectionDataset(list(reversed(CLASSES)), ds.images, root=ds.root)
    with pytest.raises(InputError, match="classes.txt"):
        write_dataset(other, tmp_path / "yolo", "yolo", "val")


def test_unreadable_split_list_and_data_yaml_are_one_line_input_errors(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "src")
    write_dataset(ds, tmp_path / "yolo", "yolo", "train")
    (tmp_path / "yolo" / "train.txt").write_bytes(b"\xff\xfe images/a.png\n")  # not UTF-8
    with pytest.raises(InputError, match=r"train\.txt: cannot read the split list") as info:
        read_dataset(tmp_path / "yolo", "yolo", "train")
    assert "\n" not in str(info.value)
    write_dataset(ds, tmp_path / "voc", "voc", "train")
    (tmp_path / "voc" / "ImageSets" / "Main" / "train.txt").write_bytes(b"a\n\xff\n")
    with pytest.raises(InputError, match=r"train\.txt: cannot read the split list"):
        read_dataset(tmp_path / "voc", "voc", "train")
    (tmp_path / "yolo" / "data.yaml").write_text("names: [a, b\n")  # malformed YAML
    with pytest.raises(InputError, match=r"data\.yaml: cannot update the existing file"):
        write_dataset(ds, tmp_path / "yolo", "yolo", "val")


def test_read_image_rgb_channel_order_and_errors(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 2] = 10
    cv2.imwrite(str(tmp_path / "red.png"), rgb[..., ::-1])  # cv2 writes BGR
    out = read_image_rgb(tmp_path / "red.png")
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, rgb)
    gray = np.full((5, 7), 77, np.uint8)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    assert read_image_rgb(tmp_path / "gray.png").shape == (5, 7, 3)
    with pytest.raises(InputError, match="missing.png.*not found"):
        read_image_rgb(tmp_path / "missing.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="junk.jpg"):
        read_image_rgb(tmp_path / "junk.jpg")


@pytest.mark.parametrize(
    "name, params",
    [
        ("base.jpg", []),
        ("prog.jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        ("p.png", []),
        ("b.bmp", []),
        ("t.tif", []),  # no header parser: falls back to a decode
    ],
)
def test_header_size_matches_decoded_size(tmp_path: Path, name: str, params: list[int]) -> None:
    path = tmp_path / name
    cv2.imwrite(str(path), np.zeros((37, 53, 3), np.uint8), params)
    decoded = cv2.imread(str(path))
    assert image_size(path) == (decoded.shape[1], decoded.shape[0]) == (53, 37)
    if name.endswith(".tif"):
        assert image_size_from_header(path) is None
    else:
        assert image_size_from_header(path) == (53, 37)


def test_yolo_roboflow_export_layout(tmp_path: Path) -> None:
    # Roboflow's YOLO export: ROOT/{train,valid}/{images,labels}, data.yaml naming ../train/images.
    root = tmp_path / "rf"
    for split in ("train", "valid"):
        (root / split / "labels").mkdir(parents=True)
        (root / split / "images").mkdir()
        assert cv2.imwrite(str(root / split / "images" / f"{split}_1.jpg"), np.zeros((48, 64, 3), np.uint8))
        (root / split / "labels" / f"{split}_1.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\n\nnc: 1\nnames: ['cell']\n")
    for split, name in (("train", "train_1.jpg"), ("val", "valid_1.jpg")):
        ds, problems = read_dataset(root, "yolo", split)
        assert problems == [] and [r.path.name for r in ds.images] == [name]
        np.testing.assert_allclose(ds.images[0].boxes, [[24, 12, 40, 36]])


def test_yolo_data_yaml_split_as_a_list_of_folders_and_files(tmp_path: Path) -> None:
    root = tmp_path / "y"
    for rel in ("images/a/1.png", "images/b/2.png", "images/c/3.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / rel), np.zeros((8, 8, 3), np.uint8))
    (root / "extra.txt").write_text("images/c/3.png\n")
    (root / "data.yaml").write_text("names: [cell]\ntrain: [images/a, images/b, extra.txt]\nval: 7\n")
    ds, problems = read_dataset(root, "yolo", "train")
    assert problems == [] and [r.path.name for r in ds.images] == ["1.png", "2.png", "3.png"]
    with pytest.raises(InputError, match="data.yaml 'val' must name a folder or list file, or a list of them, not 7"):
        read_dataset(root, "yolo", "val")


def test_header_size_of_an_os2_bitmap(tmp_path: Path) -> None:
    import struct

    w, h = 53, 37  # BITMAPCOREHEADER (OS/2, 12 bytes): 16-bit width and height, read as 32-bit they were garbage
    row = (w * 3 + 3) // 4 * 4
    pixels = (bytes([10, 20, 30]) * w + b"\0" * (row - 3 * w)) * h
    path = tmp_path / "os2.bmp"
    path.write_bytes(b"BM" + struct.pack("<IHHI", 26 + len(pixels), 0, 0, 26) + struct.pack("<IHHHH", 12, w, h, 1, 24)
                     + pixels)
    decoded = cv2.imread(str(path))
    assert decoded is not None and decoded.shape[:2] == (h, w)
    assert image_size_from_header(path) == image_size(path) == (w, h)


def test_a_truncated_tiff_is_one_error_without_opencv_log_lines(tmp_path: Path, capfd) -> None:
    path = tmp_path / "t.tif"
    ok, buf = cv2.imencode(".tif", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path.write_bytes(buf.tobytes()[:3000])  # header intact, directory cut off
    capfd.readouterr()
    with pytest.raises(InputError, match="t.tif: not a decodable image"):
        read_image_rgb(path)
    assert capfd.readouterr().err == ""  # OpenCV printed "[ERROR:0@...] global grfmt_tiff.cpp ... TIFF_Error" lines


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo"])
def test_fingerprint_follows_the_data_not_the_folder(tmp_path: Path, fmt: str) -> None:
    """`--resume` compares fingerprints: a moved copy matches, one moved box or a renamed class does not."""
    import shutil

    ds = make_dataset(tmp_path / "src")
    write_dataset(ds, tmp_path / "a", fmt, "train")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    first, _ = read_dataset(tmp_path / "a", fmt, "train")
    moved, _ = read_dataset(tmp_path / "elsewhere" / "b", fmt, "train")
    assert first.fingerprint() == moved.fingerprint()
    assert first.fingerprint()["images"] == len(ds) and first.fingerprint()["boxes"] == ds.num_boxes
    nudged = DetectionDataset(first.class_names, [*first.images], root=first.root)
    rec = first.images[0]
    nudged.images[0] = ImageRecord(rec.path, rec.width, rec.height, rec.boxes + np.float32(0.5), rec.labels)
    assert nudged.fingerprint()["sha256"] != first.fingerprint()["sha256"]
    renamed = DetectionDataset([*first.class_names[:-1], "other"], first.images, root=first.root)
    assert renamed.fingerprint()["sha256"] != first.fingerprint()["sha256"]
