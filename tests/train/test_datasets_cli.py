"""``smearsight data check`` / ``data convert`` end to end through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from smearsight.cli import main
from smearsight.train.datasets.check import summarize
from smearsight.train.datasets.formats import read_dataset, write_dataset
from smearsight.train.datasets.records import DetectionDataset, ImageRecord


def _dataset(src: Path) -> DetectionDataset:
    recs = []
    boxes = [[[0, 0, 10, 10], [5, 5, 25, 25], [30, 10, 60, 40]], [[2, 3, 3, 4]], []]
    labels = [[0, 0, 1], [1], []]
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        path = src / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((48, 64, 3), 40 * i, np.uint8))
        recs.append(ImageRecord(path, 64, 48, boxes=np.reshape(b, (-1, 4)), labels=lab))
    return DetectionDataset(["wbc", "rbc"], recs, root=src)


def test_summary_percentiles() -> None:
    ds = _dataset_in_memory()
    info = summarize(ds)
    assert info["images"] == 3 and info["images_without_boxes"] == 1 and info["boxes"] == 4
    wbc, rbc = info["classes"]
    # wbc sizes sqrt(w*h) = 10, 20, 30 -> linear-interpolated p5 = 11, p50 = 20, p95 = 29.
    assert (wbc["boxes"], wbc["images"]) == (3, 2)
    assert wbc["p5"] == pytest.approx(11) and wbc["p50"] == pytest.approx(20) and wbc["p95"] == pytest.approx(29)
    assert rbc["boxes"] == 1 and rbc["p50"] == pytest.approx(6.0)  # 4 x 9 box


def _dataset_in_memory() -> DetectionDataset:
    recs = [
        ImageRecord("a.png", 64, 48, boxes=[[0, 0, 10, 10], [0, 0, 20, 20]], labels=[0, 0]),
        ImageRecord("b.png", 64, 48, boxes=[[0, 0, 30, 30], [1, 1, 5, 10]], labels=[0, 1]),
        ImageRecord("c.png", 64, 48),
    ]
    return DetectionDataset(["wbc", "rbc"], recs)


def test_check_passes_on_a_good_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(_dataset(tmp_path / "src"), tmp_path / "voc", "voc", "train")
    rc = main(["data", "check", str(tmp_path / "voc"), "--format", "voc", "--split", "train"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "wbc" in out and "rbc" in out and "no bad records" in out
    assert "3 images, 1 without boxes, 4 boxes" in out
    assert "img1.png (box 0, rbc): 1x1 px box" in out  # the tiny box is a note, not a failure


def test_check_fails_and_lists_bad_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "yolo"
    write_dataset(_dataset(tmp_path / "src"), root, "yolo", "train")
    (root / "labels" / "img2.txt").write_text("0 0.5 0.5 0.1\n5 0.5 0.5 0.1 0.1\n")
    (root / "images" / "img1.png").unlink()
    rc = main(["data", "check", str(root), "--format", "yolo", "--split", "train"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "3 bad record(s)" in captured.out
    assert "img2.txt (line 1): expected 5 fields" in captured.out
    assert "img2.txt (line 2): unknown class 5" in captured.out
    assert "train.txt (line 2): image" in captured.out and "img1.png not found" in captured.out
    assert "3 bad record(s)" in captured.err  # the one-line error


def test_check_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(tmp_path), "--format", "csv"]) == 1
    assert "--format 'csv'" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path / "missing"), "--format", "voc"]) == 1
    assert main(["data", "check", str(tmp_path), "--format", "voc", "--split", "train"]) == 1
    assert "Annotations" in capsys.readouterr().err


def test_convert_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = _dataset(tmp_path / "src")
    write_dataset(ds, tmp_path / "voc", "voc", "train")
    steps = [("voc", "coco", "voc", "coco"), ("coco", "yolo", "coco", "yolo"), ("yolo", "voc", "yolo", "voc2")]
    for src_fmt, dst_fmt, src, dst in steps:
        rc = main(
            ["data", "convert", str(tmp_path / src), "--from", src_fmt, "--to", dst_fmt,
             "--out", str(tmp_path / dst), "--split", "train", "--link"]
        )
        assert rc == 0, capsys.readouterr()
    assert "wrote 3 images, 4 boxes, 2 classes as voc" in capsys.readouterr().out
    assert (tmp_path / "coco" / "annotations" / "train.json").is_file()
    assert sorted(p.name for p in (tmp_path / "yolo" / "images").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    final, problems = read_dataset(tmp_path / "voc2", "voc", "train", verify_images=True)
    assert problems == [] and final.class_names == ["wbc", "rbc"]
    for a, b in zip(ds.images, final.images, strict=True):
        np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-3)
        np.testing.assert_array_equal(b.labels, a.labels)
        assert b.path.parent == tmp_path / "voc2" / "JPEGImages"
        np.testing.assert_array_equal(cv2.imread(str(b.path)), cv2.imread(str(a.path)))


def test_convert_refuses_bad_records_unless_skip_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(_dataset(tmp_path / "src"), tmp_path / "coco", "coco", "train")
    json_path = tmp_path / "coco" / "annotations" / "train.json"
    json_path.write_text(json_path.read_text().replace('"category_id": 2', '"category_id": 9'))
    args = ["data", "convert", str(json_path), "--from", "coco", "--to", "yolo", "--out", str(tmp_path / "y")]
    assert main(args) == 1
    assert "unknown class: category_id 9" in capsys.readouterr().out
    assert not (tmp_path / "y").exists()  # nothing half-written
    assert main([*args, "--skip-bad"]) == 0
    back, problems = read_dataset(tmp_path / "y", "yolo", "train")
    assert problems == [] and back.num_boxes == 2  # both rbc boxes dropped


def test_convert_refusing_an_existing_folder_places_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(_dataset(tmp_path / "src"), tmp_path / "voc", "voc", "train")
    out = tmp_path / "y"
    (out / "images").mkdir(parents=True)
    (out / "classes.txt").write_text("other\n")
    rc = main(["data", "convert", str(tmp_path / "voc"), "--from", "voc", "--to", "yolo", "--out", str(out)])
    assert rc == 1 and "already lists classes ['other']" in capsys.readouterr().err
    assert list((out / "images").iterdir()) == []  # no image copied before the refusal
    (out / "classes.txt").write_text("wbc\nrbc\n")
    (out / "data.yaml").write_text("names: [unclosed\n")
    rc = main(["data", "convert", str(tmp_path / "voc"), "--from", "voc", "--to", "yolo", "--out", str(out)])
    assert rc == 1 and "cannot update the existing file" in capsys.readouterr().err
    assert list((out / "images").iterdir()) == [] and not (out / "labels").exists()


def test_convert_into_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(_dataset(tmp_path / "src"), tmp_path / "voc", "voc", "train")
    blocker = tmp_path / "f"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        rc = main(["data", "convert", str(tmp_path / "voc"), "--from", "voc", "--to", "coco", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and "--out" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_convert_keeps_escaping_file_names_inside_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    root = tmp_path / "deep" / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    cv2.imwrite(str(tmp_path / "esc.png"), np.zeros((48, 64, 3), np.uint8))
    (root / "annotations" / "train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "../../../esc.png"}], "annotations": [],
        "categories": [{"id": 1, "name": "cell"}]}))
    out = tmp_path / "deep" / "out" / "y"
    rc = main(["data", "convert", str(root), "--from", "coco", "--to", "yolo", "--out", str(out), "--split", "train"])
    assert rc == 0, capsys.readouterr()
    assert (out / "images" / "esc.png").is_file() and not (tmp_path / "deep" / "out" / "esc.png").exists()


def test_check_shows_bracketed_names_literally_and_refuses_an_empty_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = _dataset(tmp_path / "src")
    ds.class_names = ["cell [dead]", "sperm[/]"]
    write_dataset(ds, tmp_path / "d[/]x", "voc", "train")
    assert main(["data", "check", str(tmp_path / "d[/]x"), "--format", "voc"]) == 0
    out = capsys.readouterr().out
    assert "cell [dead]" in out and "sperm[/]" in out and "d[/]x" in out
    (tmp_path / "empty" / "Annotations").mkdir(parents=True)
    assert main(["data", "check", str(tmp_path / "empty"), "--format", "voc"]) == 1
    assert "no images found" in capsys.readouterr().err


def test_check_notes_16_bit_images_holding_12_bit_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = _dataset(tmp_path / "src")
    write_dataset(ds, tmp_path / "voc", "voc", "train")
    dark = tmp_path / "voc" / "JPEGImages" / "img1.png"
    twelve_bit = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) % 4096)[:, :, None].repeat(3, 2)
    assert cv2.imwrite(str(dark), twelve_bit)
    bright = tmp_path / "voc" / "JPEGImages" / "img2.png"
    assert cv2.imwrite(str(bright), (twelve_bit.astype(np.uint32) * 16).astype(np.uint16))  # full 16-bit range
    assert main(["data", "check", str(tmp_path / "voc"), "--format", "voc"]) == 0
    out = capsys.readouterr().out
    assert "1 image(s) with 16-bit pixels" in out and "img1.png" in out
    assert f"brightest value is {twelve_bit.max()}" in out
    assert "img2.png: a 16-bit" not in out


def test_check_notes_voc_images_without_an_annotation_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for stem in ("a", "neg", "neg2"):
        assert cv2.imwrite(str(root / "JPEGImages" / f"{stem}.png"), np.zeros((16, 16, 3), np.uint8))
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.png</filename><object><name>cell</name><bndbox><xmin>2</xmin><ymin>2</ymin>"
        "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"
    )
    assert main(["data", "check", str(root), "--format", "voc"]) == 0  # usable: a note, not a bad record
    out = " ".join(capsys.readouterr().out.split())
    assert "2 image(s) in JPEGImages without an annotation file, not read" in out  # were left out silently
    assert f"note: {root / 'JPEGImages' / 'neg.png'}" in out and "a.png" not in out.split("not read")[1]
