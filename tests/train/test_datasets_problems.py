"""Every kind of bad record is reported with its file and location; readers never raise for them."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from smearsight.errors import InputError
from smearsight.train.datasets.check import validate_box
from smearsight.train.datasets.formats import read_dataset
from smearsight.train.datasets.records import Problem


def _image(path: Path, width: int = 64, height: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), 128, np.uint8))
    return path


def _truncated_png(path: Path) -> Path:
    _image(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # valid header, pixel data cut short
    return path


def _find(problems: list[Problem], file_part: str, message_part: str, where_part: str = "") -> Problem:
    hits = [p for p in problems if file_part in p.file and message_part in p.message and where_part in p.where]
    assert hits, f"no problem with {file_part!r} / {message_part!r} / {where_part!r} in:\n" + "\n".join(
        map(str, problems)
    )
    return hits[0]


def test_validate_box_rules() -> None:
    assert validate_box((0, 0, 64, 48), 64, 48)[1] is None  # touching every border is fine
    box, msg = validate_box((-0.005, 0, 64.004, 48), 64, 48)  # rounding noise: clipped
    assert msg is None and box.tolist() == [0, 0, 64, 48]
    assert "outside" in validate_box((0, 0, 64.5, 48), 64, 48)[1]
    assert "outside" in validate_box((-1, 0, 10, 10), 64, 48)[1]
    assert "zero or negative" in validate_box((5, 5, 5, 9), 64, 48)[1]
    assert "zero or negative" in validate_box((5, 9, 8, 2), 64, 48)[1]
    assert "non-finite" in validate_box((float("nan"), 0, 1, 1), 64, 48)[1]


# --------------------------------------------------------------------------- COCO


def _coco(tmp_path: Path, images: list[dict], annotations: list[dict]) -> Path:
    root = tmp_path / "coco"
    path = root / "annotations" / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cats = [{"id": 1, "name": "cell"}, {"id": 2, "name": "sperm"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}, indent=1))
    return root


def test_coco_bad_records(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _image(root / "images" / "ok.png")
    _image(root / "images" / "small.png", 32, 32)
    _truncated_png(root / "images" / "broken.png")
    (root / "images" / "junk.jpg").write_bytes(b"\x00" * 64)
    images = [
        {"id": 1, "file_name": "ok.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "small.png", "width": 64, "height": 48},  # declared size is wrong
        {"id": 3, "file_name": "gone.png", "width": 64, "height": 48},
        {"id": 4, "file_name": "broken.png", "width": 64, "height": 48},
        {"id": 5, "file_name": "junk.jpg"},
        {"id": 1, "file_name": "ok.png"},  # duplicate id
    ]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]},  # good
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [60, 2, 10, 10]},  # outside
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 4]},  # zero width
        {"id": 13, "image_id": 1, "category_id": 7, "bbox": [5, 5, 3, 4]},  # unknown class
        {"id": 14, "image_id": 1, "category_id": 1, "bbox": [5, "x", 3, 4]},  # non-numeric
        {"id": 15, "image_id": 1, "category_id": 1, "bbox": [5, 5, 3]},  # wrong length
        {"id": 16, "image_id": 99, "category_id": 1, "bbox": [5, 5, 3, 3]},  # unknown image
        {"id": 17, "image_id": 2, "category_id": 2, "bbox": [1, 1, 3, 3]},  # good
    ]
    _coco(tmp_path, images, anns)
    ds, problems = read_dataset(root, "coco", "train", verify_images=True)
    f = "train.json"
    _find(problems, f, "lies outside the 64x48 image", "annotations[1] (id 11) bbox")
    _find(problems, f, "zero or negative size", "annotations[2] (id 12)")
    _find(problems, f, "unknown class: category_id 7", "annotations[3] (id 13)")
    _find(problems, f, "must be 4 numbers", "annotations[4] (id 14) bbox")
    _find(problems, f, "must be 4 numbers", "annotations[5] (id 15) bbox")
    _find(problems, f, "image_id 99", "annotations[6] (id 16)")
    _find(problems, f, "annotation is 64x48 but the image is 32x32", "images[1] (id 2)")
    _find(problems, f, "gone.png: image file not found", "images[2] (id 3)")
    _find(problems, f, "broken.png: not a decodable image", "images[3] (id 4)")
    _find(problems, f, "junk.jpg: not a decodable image", "images[4] (id 5)")
    _find(problems, f, "duplicate image id 1", "images[5]")
    assert len(problems) == 11
    # Bad boxes dropped, good ones kept; missing/unreadable images dropped.
    assert [r.path.name for r in ds.images] == ["ok.png", "small.png"]
    assert ds.images[0].boxes.tolist() == [[1, 2, 11, 12]] and ds.images[1].labels.tolist() == [1]


def test_coco_ill_typed_ids_are_problems_not_crashes(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _image(root / "images" / "ok.png")
    anns = [
        {"id": 1, "image_id": [1], "category_id": 1, "bbox": [1, 1, 4, 4]},  # unhashable image_id
        {"id": 2, "image_id": 1, "category_id": [1], "bbox": [1, 1, 4, 4]},  # unhashable category_id
        {"id": 3, "image_id": "1", "category_id": 1, "bbox": [1, 1, 4, 4]},  # string image_id
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [1, 1, 4, 4]},  # good
    ]
    _coco(tmp_path, [{"id": 1, "file_name": "ok.png", "width": 64, "height": 48}], anns)
    ds, problems = read_dataset(root, "coco", "train")
    _find(problems, "train.json", "'image_id' must be an integer, got [1]", "annotations[0] (id 1) image_id")
    _find(problems, "train.json", "unknown class: category_id [1]", "annotations[1] (id 2)")
    _find(problems, "train.json", "'image_id' must be an integer, got '1'", "annotations[2] (id 3)")
    assert len(problems) == 3
    assert ds.images[0].labels.tolist() == [1]


def test_coco_truncated_image_found_only_when_verifying(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _truncated_png(root / "images" / "broken.png")
    _coco(tmp_path, [{"id": 1, "file_name": "broken.png", "width": 64, "height": 48}], [])
    assert read_dataset(root, "coco", "train")[1] == []  # header only: looks fine
    assert len(read_dataset(root, "coco", "train", verify_images=True)[1]) == 1


def test_coco_malformed_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    ds, problems = read_dataset(path, "coco", None)
    assert len(ds) == 0 and len(problems) == 1
    assert problems[0].file == str(path) and "malformed JSON" in problems[0].message
    assert problems[0].where.startswith("line 2")
    path.write_text('{"images": {}, "annotations": [], "categories": []}')
    assert "'images' must be a list" in read_dataset(path, "coco", None)[1][0].message


def test_missing_dataset_raises_input_error(tmp_path: Path) -> None:
    for fmt in ("coco", "voc", "yolo"):
        with pytest.raises(InputError, match="nowhere"):
            read_dataset(tmp_path / "nowhere", fmt, "train")
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    with pytest.raises(InputError, match="val.json"):
        read_dataset(tmp_path / "coco", "coco", "val")
    with pytest.raises(InputError, match="--format 'csv'"):
        read_dataset(tmp_path, "csv", None)


# --------------------------------------------------------------------------- VOC

_VOC = """<annotation><filename>{name}</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
_OBJ = "<object><name>{cls}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>" \
       "</bndbox></object>\n"


def _voc_file(root: Path, stem: str, name: str, objects: list[tuple], w: int = 64, h: int = 48) -> None:
    text = _VOC.format(
        name=name, w=w, h=h, objects="".join(_OBJ.format(cls=o[0], a=o[1], b=o[2], c=o[3], d=o[4]) for o in objects)
    )
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{stem}.xml").write_text(text)


def test_voc_bad_records(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    for stem in ("a", "b", "c"):
        _image(root / "JPEGImages" / f"{stem}.png")
    (root / "JPEGImages" / "junk.png").write_bytes(b"\x89PNG garbage")
    (root / "classes.txt").write_text("cell\nsperm\n")
    _voc_file(
        root,
        "a",
        "a.png",
        [
            ("cell", 1, 1, 64, 48),  # whole image: fine (1-based inclusive)
            ("cell", -3, 1, 10, 10),  # outside the image
            ("sperm", 5, 5, 65, 10),  # beyond the right edge
            ("sperm", 9, 5, 4, 10),  # negative width
            ("platelet", 2, 2, 9, 9),  # unknown class
            ("cell", "abc", 2, 9, 9),  # non-numeric
            ("sperm", 7, 7, 7, 7),  # xmin == xmax: a 1x1 px box, valid
            ("cell", 0, 0, 10, 10),  # a 0-based exporter's border box: clamped to the border, kept
        ],
    )
    _voc_file(root, "b", "b.png", [("cell", 2, 2, 9, 9)], w=100, h=48)  # size disagrees with the image
    (root / "Annotations" / "c.xml").write_text("<annotation><filename>c.png</filename>\n<size>\n</annotation>")
    _voc_file(root, "d", "d.png", [("cell", 2, 2, 9, 9)])  # image missing
    _voc_file(root, "e", "junk.png", [])  # unreadable image
    split = root / "ImageSets" / "Main" / "train.txt"
    split.parent.mkdir(parents=True)
    split.write_text("a\nb\nc\nd\ne\nf\n")
    ds, problems = read_dataset(root, "voc", "train")
    _find(problems, "a.xml", "outside", "object 1 (cell) bndbox")
    assert "xmin=-3" in _find(problems, "a.xml", "outside", "object 1").message
    _find(problems, "a.xml", "outside", "object 2 (sperm)")
    _find(problems, "a.xml", "zero or negative size", "object 3 (sperm)")
    _find(problems, "a.xml", "unknown class 'platelet'", "object 4")
    _find(problems, "a.xml", "bndbox/xmin must be a number, got 'abc'", "object 5")
    _find(problems, "b.xml", "annotation is 100x48 but the image is 64x48", "size")
    _find(problems, "c.xml", "malformed XML", "line 3")
    _find(problems, "d.xml", "d.png: image file not found")
    _find(problems, "e.xml", "junk.png: not a decodable image")
    _find(problems, "train.txt", "f.xml not found", "line 6")
    assert len(problems) == 10
    assert [r.path.name for r in ds.images] == ["a.png", "b.png"]
    assert ds.images[0].boxes.tolist() == [[0, 0, 64, 48], [6, 6, 7, 7], [0, 0, 10, 10]]


def test_voc_non_finite_size_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _image(root / "JPEGImages" / "a.png")
    (root / "classes.txt").write_text("cell\n")
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.png</filename><size><width>inf</width><height>48</height></size></annotation>"
    )
    ds, problems = read_dataset(root, "voc", None)
    _find(problems, "a.xml", "size width/height must be numbers, got 'inf'x'48'", "size")
    assert len(problems) == 1 and [r.path.name for r in ds.images] == ["a.png"]


def test_voc_missing_split_list_raises(tmp_path: Path) -> None:
    (tmp_path / "Annotations").mkdir()
    with pytest.raises(InputError, match="ImageSets/Main/test.txt"):
        read_dataset(tmp_path, "voc", "test")


# --------------------------------------------------------------------------- YOLO


def test_yolo_bad_records(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    for stem in ("a", "b"):
        _image(root / "images" / f"{stem}.png", 100, 50)
    _truncated_png(root / "images" / "t.png")
    (root / "classes.txt").write_text("cell\nsperm\n")
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n"  # good
        "1 0.5 0.5 0.2\n"  # 4 fields
        "1 0.5 zero 0.2 0.2\n"  # non-numeric
        "2 0.5 0.5 0.2 0.2\n"  # unknown class
        "0.5 0.5 0.5 0.2 0.2\n"  # class not an integer
        "0 0.95 0.5 0.2 0.2\n"  # beyond the right edge
        "1 0.5 0.5 0 0.2\n"  # zero width
        "1 0 0 1 1\n"  # centred on the corner: outside
        "1 0.5 0.5 1 1\n"  # whole image: fine
    )
    (root / "train.txt").write_text("./images/a.png\nimages/b.png\n./images/nope.png\n./images/t.png\n")
    ds, problems = read_dataset(root, "yolo", "train", verify_images=True)
    lab = str(Path("labels") / "a.txt")
    _find(problems, lab, "expected 5 fields", "line 2")
    _find(problems, lab, "non-numeric", "line 3")
    _find(problems, lab, "unknown class 2", "line 4")
    _find(problems, lab, "unknown class 0.5", "line 5")
    _find(problems, lab, "outside", "line 6")
    _find(problems, lab, "zero or negative size", "line 7")
    _find(problems, lab, "outside", "line 8")
    _find(problems, "train.txt", "nope.png not found", "line 3")
    _find(problems, str(Path("images") / "t.png"), "not a decodable image")
    assert len(problems) == 9
    assert [r.path.name for r in ds.images] == ["a.png", "b.png"]
    np.testing.assert_allclose(ds.images[0].boxes, [[40, 20, 60, 30], [0, 0, 100, 50]])
    assert len(ds.images[1].boxes) == 0


def test_yolo_malformed_yaml_and_missing_names(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    _image(root / "images" / "a.png")
    with pytest.raises(InputError, match="classes.txt or data.yaml"):
        read_dataset(root, "yolo", None)
    (root / "data.yaml").write_text("names: [a, b\ntrain: x\n")
    ds, problems = read_dataset(root, "yolo", None)
    assert problems[0].file.endswith("data.yaml") and "malformed YAML" in problems[0].message
    assert problems[0].where.startswith("line ")
    (root / "data.yaml").write_text("names: 7\n")
    _find(read_dataset(root, "yolo", None)[1], "data.yaml", "'names' must be a list", "names")


def test_coco_file_refuses_another_split_name(tmp_path: Path) -> None:
    root = _coco(tmp_path, [{"id": 1, "file_name": "a.png"}], [])
    _image(root / "images" / "a.png")
    json_path = root / "annotations" / "train.json"
    assert len(read_dataset(json_path, "coco", "train")[0]) == 1
    with pytest.raises(InputError, match=r"one COCO file holds one split, but split 'val' was asked for"):
        read_dataset(json_path, "coco", "val")  # else validation would silently run on the training file


def test_coco_records_that_used_to_pass_unreported(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png"}, {"id": 3, "file_name": "b.png"}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 5, 5]},
        {"id": 3, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": "0"},
        {"id": 4, "image_id": 3, "category_id": 1, "bbox": [1, 1, 10**400, 5]},
        {"id": 5, "image_id": 3, "category_id": 2, "bbox": [3, 3, 4, 4], "iscrowd": 1},
        {"id": 6, "image_id": 3, "category_id": 2, "bbox": [5, 5, 4, 4], "iscrowd": None},  # null: not a crowd
    ]
    root = _coco(tmp_path, images, anns)
    for name in ("a.png", "b.png"):
        _image(root / "images" / name)
    json_path = root / "annotations" / "train.json"
    data = json.loads(json_path.read_text())
    data["categories"].append({"id": 3, "name": "cell"})
    json_path.write_text(json.dumps(data))
    ds, problems = read_dataset(root, "coco", "train")
    _find(problems, "train.json", "file_name 'a.png' is already image id 1", "images[1]")
    _find(problems, "train.json", "'iscrowd' must be 0 or 1, got '0'", "annotations[2]")
    _find(problems, "train.json", "'bbox' must be 4 numbers", "annotations[3]")
    _find(problems, "train.json", "duplicate category name 'cell'", "categories[2]")
    assert len(problems) == 4
    assert [r.path.name for r in ds.images] == ["a.png", "b.png"] and ds.num_boxes == 2  # the crowd box is skipped


def test_class_lists_with_a_byte_order_mark(tmp_path: Path) -> None:
    voc = tmp_path / "voc"
    _image(voc / "JPEGImages" / "a.png")
    _voc_file(voc, "a", "a.png", [("cell", 2, 2, 9, 9)])
    (voc / "classes.txt").write_text("\ufeffcell\nsperm\n", encoding="utf-8")  # as Windows Notepad saves it
    ds, problems = read_dataset(voc, "voc", None)
    assert problems == [] and ds.class_names == ["cell", "sperm"] and ds.num_boxes == 1
    yolo = tmp_path / "yolo"
    _image(yolo / "images" / "a.png")
    (yolo / "labels").mkdir(parents=True)
    (yolo / "labels" / "a.txt").write_text("\ufeff0 0.5 0.5 0.25 0.25\n", encoding="utf-8")
    (yolo / "classes.txt").write_text("\ufeffcell\n", encoding="utf-8")
    ds, problems = read_dataset(yolo, "yolo", None)
    assert problems == [] and ds.class_names == ["cell"] and ds.num_boxes == 1


def test_voc_split_list_keeps_names_with_spaces(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    for stem in ("slide 01", "b"):
        _image(root / "JPEGImages" / f"{stem}.png")
        _voc_file(root, stem, f"{stem}.png", [("cell", 2, 2, 9, 9)])
    (root / "classes.txt").write_text("cell\n")
    split = root / "ImageSets" / "Main" / "train.txt"
    split.parent.mkdir(parents=True)
    split.write_text("slide 01\nb  1\n")  # a stem with a space; VOC's "stem flag" form
    ds, problems = read_dataset(root, "voc", "train")
    assert problems == [] and [r.path.name for r in ds.images] == ["slide 01.png", "b.png"]


def test_images_in_symlinked_folders_are_found_once(tmp_path: Path) -> None:
    from smearsight.train.datasets.images import list_images

    outside = tmp_path / "disk" / "train"
    _image(outside / "x.png")
    images = tmp_path / "yolo" / "images"
    images.mkdir(parents=True)
    (images / "train").symlink_to(outside, target_is_directory=True)
    (outside / "loop").symlink_to(images, target_is_directory=True)  # a cycle must not hang the walk
    assert [p.name for p in list_images(images)] == ["x.png"]


def test_training_split_drops_a_corrupt_image_before_training(tmp_path: Path, caplog) -> None:
    """A PNG cut short after its header passes a header read; training must not meet it mid-epoch."""
    from smearsight.train.detector.data import load_split

    root = _coco(tmp_path, [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                 [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    _image(root / "images" / "a.png")
    _truncated_png(root / "images" / "b.png")
    with caplog.at_level("WARNING"):
        ds = load_split(root, "coco", "train", "training split", verify_images=True)
    assert [r.path.name for r in ds.images] == ["a.png"]
    assert "1 bad record(s) skipped" in caplog.text and "b.png" in caplog.text


def _png_header_only(path: Path, width: int, height: int) -> Path:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_image_too_large_for_opencv_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    _png_header_only(root / "images" / "huge.png", 60000, 60000)  # 3.6 gigapixels: OpenCV refuses to decode
    _image(root / "images" / "ok.png")
    (root / "classes.txt").write_text("cell\n")
    ds, problems = read_dataset(root, "yolo", None)
    assert problems == [] and ds.images[0].width == 60000  # header only
    ds, problems = read_dataset(root, "yolo", None, verify_images=True)
    _find(problems, "huge.png", "not a decodable image (too many pixels for OpenCV)")
    assert len(problems) == 1 and [r.path.name for r in ds.images] == ["ok.png"]


def test_yolo_unreadable_label_file_drops_its_image_not_a_negative(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    for stem in ("a", "b", "neg"):
        _image(root / "images" / f"{stem}.png")
    (root / "classes.txt").write_text("cell\n")
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "labels" / "b.txt").write_bytes("0 0.5 0.5 0.2 0.2\n# r\xe9vis\xe9\n".encode("latin-1"))  # not UTF-8
    ds, problems = read_dataset(root, "yolo", None)
    _find(problems, str(Path("labels") / "b.txt"), "cannot read the label file")
    assert len(problems) == 1
    # b.png's cells are unknown: training on it as a negative would teach the model that they are background.
    assert [r.path.name for r in ds.images] == ["a.png", "neg.png"]


def test_an_image_listed_twice_in_a_split_is_reported_once_kept(tmp_path: Path) -> None:
    voc = tmp_path / "voc"
    for stem in ("a", "b"):
        _image(voc / "JPEGImages" / f"{stem}.png")
        _voc_file(voc, stem, f"{stem}.png", [("cell", 2, 2, 9, 9)])
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("a\nb\na 1\n")
    ds, problems = read_dataset(voc, "voc", "train")
    _find(problems, "train.txt", "a is listed again (first on line 1)", "line 3")
    assert len(problems) == 1 and [r.path.name for r in ds.images] == ["a.png", "b.png"]

    yolo = tmp_path / "yolo"
    for stem in ("a", "b"):
        _image(yolo / "images" / f"{stem}.png")
    (yolo / "classes.txt").write_text("cell\n")
    (yolo / "train.txt").write_text("./images/a.png\nimages/b.png\nimages/a.png\n")
    ds, problems = read_dataset(yolo, "yolo", "train")
    _find(problems, "train.txt", "a.png is listed again (first on line 1)", "line 3")
    assert len(problems) == 1 and [r.path.name for r in ds.images] == ["a.png", "b.png"]


def test_an_image_in_two_lists_or_folders_of_a_yolo_split_is_read_once(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    for stem in ("a", "b"):
        _image(root / "images" / f"{stem}.png")
    (root / "classes.txt").write_text("cell\n")
    (root / "one.txt").write_text("images/a.png\n")
    (root / "two.txt").write_text("images/b.png\nimages/a.png\n")
    (root / "data.yaml").write_text("names: [cell]\ntrain: [one.txt, two.txt]\n")
    ds, problems = read_dataset(root, "yolo", "train")
    _find(problems, "two.txt", f"a.png is listed again (first in {root / 'one.txt'}, line 1)", "line 2")
    assert len(problems) == 1 and sorted(r.path.name for r in ds.images) == ["a.png", "b.png"]

    (root / "data.yaml").write_text("names: [cell]\ntrain: [images, images]\n")
    ds, problems = read_dataset(root, "yolo", "train")
    assert len(problems) == 2 and all(f"is listed again (first in {root / 'images'})" in p.message for p in problems)
    assert sorted(r.path.name for r in ds.images) == ["a.png", "b.png"]


def test_coco_folder_without_annotation_files_says_so(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "a.png")
    with pytest.raises(InputError, match=r"annotations: no COCO annotation files \(\*\.json\) found"):
        read_dataset(tmp_path, "coco", None)  # was "give --split (COCO annotation files found: none)"
    (tmp_path / "annotations").mkdir()
    with pytest.raises(InputError, match=r"annotations: no COCO annotation files \(\*\.json\) found"):
        read_dataset(tmp_path, "coco", None)
    (tmp_path / "annotations" / "train.json").write_text("{}")
    (tmp_path / "annotations" / "val.json").write_text("{}")
    with pytest.raises(InputError, match=r"give --split \(COCO annotation files found: train, val\)"):
        read_dataset(tmp_path, "coco", None)


def test_voc_stale_filename_falls_back_to_the_xml_stem(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _image(root / "JPEGImages" / "a.jpg")  # converted to JPEG after labelling; <filename> still says a.png
    (root / "classes.txt").write_text("cell\n")
    _voc_file(root, "a", "a.png", [("cell", 2, 2, 9, 9)])
    _voc_file(root, "b", "b.png", [("cell", 2, 2, 9, 9)])  # no image under either name: still reported
    ds, problems = read_dataset(root, "voc", None)
    assert [r.path.name for r in ds.images] == ["a.jpg"]
    _find(problems, "b.xml", "b.png: image file not found")
    assert len(problems) == 1


def test_yolo_data_yaml_duplicate_or_empty_class_names_are_problems(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    _image(root / "images" / "a.png")
    (root / "data.yaml").write_text("names: [cell, sperm, cell]\n")  # classes.txt duplicates were reported already
    _find(read_dataset(root, "yolo", None)[1], "data.yaml", "duplicate class names ['cell']", "names")
    (root / "data.yaml").write_text("names:\n  0: cell\n  1: ''\n")
    _find(read_dataset(root, "yolo", None)[1], "data.yaml", "empty class name for class 1", "names")
    (root / "data.yaml").write_text("names: [cell, sperm]\n")
    assert read_dataset(root, "yolo", None)[1] == []


def test_coco_boolean_ids_and_empty_category_names_are_problems(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _image(root / "images" / "ok.png")
    path = root / "annotations" / "train.json"
    path.parent.mkdir(parents=True)
    data = {
        "images": [{"id": 1, "file_name": "ok.png", "width": True, "height": 48}, {"id": True, "file_name": "x.png"}],
        "annotations": [
            {"id": 1, "image_id": True, "category_id": 1, "bbox": [1, 1, 4, 4]},  # JSON true: Python's 1
            {"id": 2, "image_id": 1, "category_id": True, "bbox": [1, 1, 4, 4]},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [2, 2, 4, 4]},  # good
        ],
        "categories": [{"id": 1, "name": "cell"}, {"id": False, "name": "zero"}, {"id": 3, "name": " "}],
    }
    path.write_text(json.dumps(data))
    ds, problems = read_dataset(root, "coco", "train")
    _find(problems, "train.json", "'width' and 'height' must be integers", "images[0] (id 1)")
    _find(problems, "train.json", "image entry needs an integer 'id'", "images[1]")
    _find(problems, "train.json", "'image_id' must be an integer, got True", "annotations[0] (id 1)")
    _find(problems, "train.json", "unknown class: category_id True", "annotations[1] (id 2)")
    _find(problems, "train.json", "non-empty string 'name'", "categories[1]")
    _find(problems, "train.json", "non-empty string 'name'", "categories[2]")
    assert len(problems) == 6
    assert ds.class_names == ["cell"] and ds.images[0].boxes.tolist() == [[2, 2, 6, 6]]


def test_yolo_classes_txt_and_data_yaml_that_disagree_are_a_problem(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    _image(root / "images" / "a.png")
    (root / "classes.txt").write_text("cell\nsperm\n")
    (root / "data.yaml").write_text("names: [sperm, cell]\n")  # silently overridden by classes.txt before
    ds, problems = read_dataset(root, "yolo", None)
    _find(problems, "data.yaml", "'names' ['sperm', 'cell'] differ from classes.txt ['cell', 'sperm']", "names")
    assert len(problems) == 1 and ds.class_names == ["cell", "sperm"]
    (root / "data.yaml").write_text("names: {0: cell, 1: sperm}\ntrain: images\n")
    assert read_dataset(root, "yolo", None)[1] == []


def test_quiet_opencv_overlapping_in_two_threads_restores_the_level_once_both_leave() -> None:
    import threading

    import cv2

    from smearsight.train.datasets.images import quiet_opencv

    log = cv2.utils.logging
    before = log.getLogLevel()
    log.setLogLevel(log.LOG_LEVEL_WARNING)
    a_in, b_in, a_out, b_may_leave = (threading.Event() for _ in range(4))
    seen: dict[str, int] = {}

    def first() -> None:
        with quiet_opencv(cv2):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second() -> None:
        a_in.wait(5)
        with quiet_opencv(cv2):
            b_in.set()
            a_out.wait(5)
            seen["after_first_left"] = log.getLogLevel()  # the other thread left while this one decodes
            b_may_leave.wait(5)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    try:
        for t in threads:
            t.start()
        a_out.wait(5)
        b_may_leave.set()
        for t in threads:
            t.join(5)
        assert seen["after_first_left"] == log.LOG_LEVEL_FATAL
        assert log.getLogLevel() == log.LOG_LEVEL_WARNING  # not left at FATAL for good
    finally:
        log.setLogLevel(before)
