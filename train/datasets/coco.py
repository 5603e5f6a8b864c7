"""COCO detection format: ``ROOT/annotations/<split>.json`` with images under ``ROOT/images/``.

Box convention: COCO ``bbox`` is ``[x, y, w, h]`` in 0-based continuous pixel coordinates, which maps
directly onto the in-memory ``x1, y1, x2, y2`` (``x2 = x + w``). Categories are written with 1-based ids
in ``class_names`` order; on reading, classes are the categories sorted by id. Annotations with
``iscrowd: 1`` are skipped (they are regions, not boxes for training). Bad records follow the rules in
:mod:`smearsight.train.datasets.check`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.errors import InputError
from smearsight.fileio import atomic_write_json

from .check import ProgressFn, f32_value, probe_image, size_mismatch_problem, validate_box
from .images import place_images
from .records import DetectionDataset, ImageRecord, Problem


def _clean(v: float) -> float | int:
    """Shortest decimal of a float32 value, as an int when integral (12.3 not 12.300000190734863)."""
    f = f32_value(v)
    return int(f) if f.is_integer() else f


def coco_dict(ds: DetectionDataset, file_names: list[str]) -> dict[str, Any]:
    """The COCO dictionary for ``ds`` with the given per-image ``file_name`` values."""
    ids = [int(r.image_id) for r in ds.images]
    if len(set(ids)) != len(ids) or min(ids, default=1) <= 0:
        ids = list(range(1, len(ds.images) + 1))
    images, annotations = [], []
    ann_id = 1
    for rec, image_id, name in zip(ds.images, ids, file_names, strict=True):
        images.append({"id": image_id, "file_name": name, "width": int(rec.width), "height": int(rec.height)})
        for box, label in zip(rec.boxes, rec.labels, strict=True):
            x1, y1, x2, y2 = (_clean(v) for v in box)
            w, h = round(x2 - x1, 6), round(y2 - y1, 6)
            w, h = (int(w) if float(w).is_integer() else w), (int(h) if float(h).is_integer() else h)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, w, h],
                    "area": round(float(w) * float(h), 6),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    categories = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(ds.class_names)]
    return {
        "info": {"description": "written by smearsight", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_coco(
    ds: DetectionDataset, root: Path, split: str, copy_images: bool = False, *, link: bool = False
) -> Path:
    """Write ``root/annotations/<split>.json`` atomically and return its path.

    Image ``file_name``s are relative to ``root/images/``. With ``copy_images`` the images are copied
    there (hard-linked when ``link`` and the file system allows); otherwise they are expected there
    already (an image elsewhere is referenced by a relative path from ``root/images``).
    """
    root = Path(root)
    images_dir = root / "images"
    paths = [r.path for r in ds.images]
    if copy_images:
        paths = place_images(paths, ds.root, images_dir, mode="link" if link else "copy")
    names = [Path(os.path.relpath(Path(p).absolute(), images_dir.absolute())).as_posix() for p in paths]
    return atomic_write_json(root / "annotations" / f"{split}.json", coco_dict(ds, names))


def coco_json_path(path: Path, split: str | None) -> Path:
    """The annotation file for ``path`` (a JSON file, or a root with ``annotations/<split>.json``)."""
    path = Path(path)
    if path.is_file():
        if split is not None and split != path.stem:
            raise InputError(
                f"{path}: one COCO file holds one split, but split {split!r} was asked for; give the dataset "
                f"folder (annotations/{split}.json) or this file's own split name {path.stem!r}"
            )
        return path
    if not path.is_dir():
        raise InputError(f"{path}: no such COCO file or dataset folder")
    ann_dir = path / "annotations"
    if split is not None:
        candidate = ann_dir / f"{split}.json"
        if not candidate.is_file():
            raise InputError(f"{candidate}: COCO annotation file for split {split!r} not found")
        return candidate
    found = sorted(ann_dir.glob("*.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"{ann_dir}: no COCO annotation files (*.json) found; expected annotations/<split>.json")
    names = ", ".join(p.stem for p in found) or "none"
    raise InputError(f"{ann_dir}: give --split (COCO annotation files found: {names})")


def _image_dirs(json_path: Path, split: str | None) -> list[Path]:
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    dirs = [root / "images"]
    if split:
        dirs.append(root / "images" / split)
    dirs.append(root)
    return dirs


def _int(value: Any) -> bool:
    """A JSON integer (not true/false, which Python reads as 1/0)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _num(value: Any) -> bool:
    """A JSON number that fits a float (not a bool, not an integer like 10**400)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def read_coco(
    path: str | os.PathLike[str],
    split: str | None = None,
    *,
    verify_images: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[DetectionDataset, list[Problem]]:
    """Read a COCO detection file (or ``path/annotations/<split>.json``).

    Never raises for bad records: returns them as :class:`Problem` entries (file + ``images[i]`` /
    ``annotations[i]`` index + field). Raises :class:`InputError` only when the file itself is missing.
    ``verify_images=True`` decodes every image (``data check``); otherwise only image headers are read.
    ``progress(done, total)`` is called as images are read.
    """
    json_path = coco_json_path(Path(path), split)
    file = str(json_path)
    problems: list[Problem] = []
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    empty = DetectionDataset([], [], root=root, split=split or json_path.stem)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        return empty, [Problem(file, f"malformed JSON: {exc.msg}", f"line {exc.lineno} column {exc.colno}")]
    except (OSError, UnicodeDecodeError) as exc:
        return empty, [Problem(file, f"cannot read the file: {exc}")]
    if not isinstance(data, dict):
        return empty, [Problem(file, "malformed COCO file: the top level must be an object")]
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problems.append(Problem(file, f"malformed COCO file: '{key}' must be a list", key))
    if problems:
        return empty, problems

    # Categories -> contiguous class indices (sorted by id).
    cats: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        where = f"categories[{i}]"
        if not isinstance(cat, dict) or not _int(cat.get("id")) or not isinstance(cat.get("name"), str) \
                or not cat["name"].strip():
            problems.append(Problem(file, "category needs an integer 'id' and a non-empty string 'name'", where))
            continue
        if cat["id"] in cats:
            problems.append(Problem(file, f"duplicate category id {cat['id']}", where))
            continue
        if cat["name"] in cats.values():
            problems.append(Problem(file, f"duplicate category name {cat['name']!r}", where))
            continue
        cats[cat["id"]] = cat["name"]
    cat_ids = sorted(cats)
    class_of = {cid: k for k, cid in enumerate(cat_ids)}
    class_names = [cats[c] for c in cat_ids]

    dirs = _image_dirs(json_path, split)
    records: dict[int, ImageRecord] = {}
    order: list[int] = []
    bad_images: set[int] = set()
    file_names: dict[str, int] = {}
    for i, img in enumerate(data["images"]):
        if progress is not None:
            progress(i, len(data["images"]))
        where = f"images[{i}]"
        if not isinstance(img, dict) or not _int(img.get("id")) or not isinstance(
            img.get("file_name"), str
        ):
            problems.append(Problem(file, "image entry needs an integer 'id' and a string 'file_name'", where))
            continue
        image_id = img["id"]
        where = f"images[{i}] (id {image_id})"
        if image_id in records or image_id in bad_images:
            problems.append(Problem(file, f"duplicate image id {image_id}", where))
            continue
        if img["file_name"] in file_names:
            problems.append(Problem(file, f"file_name {img['file_name']!r} is already image id "
                                          f"{file_names[img['file_name']]}", where))
            bad_images.add(image_id)
            continue
        file_names[img["file_name"]] = image_id
        candidates = [d / img["file_name"] for d in dirs]
        image_path = next((c for c in candidates if c.is_file()), candidates[0])
        size = probe_image(image_path, verify_images, problems, file, where)
        if size is None:
            bad_images.add(image_id)
            continue
        declared_w, declared_h = img.get("width"), img.get("height")
        if declared_w is not None or declared_h is not None:
            if not (_int(declared_w) and _int(declared_h)):
                problems.append(Problem(file, "'width' and 'height' must be integers", where))
            elif (p := size_mismatch_problem(file, where, (declared_w, declared_h), size)) is not None:
                problems.append(p)
        records[image_id] = ImageRecord(image_path, size[0], size[1], image_id=image_id)
        order.append(image_id)

    boxes: dict[int, list[np.ndarray]] = {k: [] for k in records}
    labels: dict[int, list[int]] = {k: [] for k in records}
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            problems.append(Problem(file, "annotation must be an object", where))
            continue
        if "id" in ann:
            where = f"annotations[{i}] (id {ann['id']})"
        crowd = ann.get("iscrowd") or 0  # some exporters write null
        if crowd not in (0, 1) or isinstance(crowd, float):
            problems.append(Problem(file, f"'iscrowd' must be 0 or 1, got {crowd!r}", where + " iscrowd"))
            continue
        if crowd:
            continue
        image_id = ann.get("image_id")
        if not _int(image_id):
            problems.append(Problem(file, f"'image_id' must be an integer, got {image_id!r}", where + " image_id"))
            continue
        if image_id in bad_images:
            continue
        if image_id not in records:
            problems.append(Problem(file, f"image_id {image_id!r} is not in 'images'", where + " image_id"))
            continue
        if not _int(ann.get("category_id")) or ann["category_id"] not in class_of:
            problems.append(Problem(file, f"unknown class: category_id {ann.get('category_id')!r}", where))
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_num(v) for v in bbox)):
            problems.append(Problem(file, f"'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}", where + " bbox"))
            continue
        rec = records[image_id]
        x, y, w, h = (float(v) for v in bbox)
        box, message = validate_box((x, y, x + w, y + h), rec.width, rec.height)
        if message is not None:
            problems.append(Problem(file, f"{message} ({rec.path.name})", where + " bbox"))
            continue
        boxes[image_id].append(box)
        labels[image_id].append(class_of[ann["category_id"]])

    images = []
    for image_id in order:
        rec = records[image_id]
        if boxes[image_id]:
            rec.boxes = np.stack(boxes[image_id]).astype(np.float32)
            rec.labels = np.asarray(labels[image_id], dtype=np.int64)
        images.append(rec)
    return DetectionDataset(class_names, images, root=root, split=split or json_path.stem), problems
