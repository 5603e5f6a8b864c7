"""Pascal VOC detection format: ``ROOT/Annotations/*.xml``, ``ROOT/JPEGImages/``, ``ROOT/ImageSets/Main/<split>.txt``.

Pixel convention: VOC ``bndbox`` values are 1-based pixel indices, inclusive at both ends (a box over the
whole image is ``xmin=1, xmax=W``). In memory that box is ``x1 = xmin - 1, x2 = xmax`` (0-based continuous
coordinates, ``(0, W)`` for the whole image): the same convention as the VOC devkit and detectron2.
The writer inverts it exactly (``xmin = x1 + 1, xmax = x2``), writing integers when the value is integral
and the shortest decimal otherwise, so integral boxes round-trip exactly.

Images: ``JPEGImages/<filename>``, else the image named after the XML file (``JPEGImages/<stem>.jpg``, .png, ...),
which is how the VOC devkit finds it.

Classes: VOC has no class list. The reader uses ``class_names`` if given, else ``ROOT/classes.txt`` if
present (then any other object name is an *unknown class*), else the sorted names found across *all*
XML files under ``Annotations`` (so every split of one dataset gets the same class order). The writer
writes ``ROOT/classes.txt`` to keep the order. ``difficult`` and ``truncated`` objects are read as
ordinary boxes.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from smearsight.errors import InputError
from smearsight.fileio import atomic_write_text

from .check import (
    ProgressFn,
    check_class_names_file,
    f32_value,
    probe_image,
    read_class_names_file,
    read_list_file,
    size_mismatch_problem,
    validate_box,
    write_class_names_file,
)
from .images import IMAGE_SUFFIXES, list_images, place_images
from .records import DetectionDataset, ImageRecord, Problem

_FIELDS = ("xmin", "ymin", "xmax", "ymax")


def _parse(xml_path: Path) -> tuple[ET.Element | None, Problem | None]:
    try:
        return ET.parse(xml_path).getroot(), None
    except ET.ParseError as exc:
        line, col = getattr(exc, "position", (0, 0))
        return None, Problem(str(xml_path), f"malformed XML: {exc}", f"line {line} column {col}")
    except OSError as exc:
        return None, Problem(str(xml_path), f"cannot read the file: {exc}")


def _text(node: ET.Element | None, tag: str) -> str | None:
    if node is None:
        return None
    child = node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _image_path(root: Path, xml_path: Path, filename: str | None) -> Path:
    images = root / "JPEGImages"
    if filename and (images / filename).is_file():
        return images / filename
    # VOC's own rule (the devkit, torchvision): the image is named after the XML file; <filename> can be stale
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        candidate = images / f"{xml_path.stem}{suffix}"
        if candidate.is_file():
            return candidate
    return images / (filename or f"{xml_path.stem}.jpg")


def read_voc(
    path: str | os.PathLike[str],
    split: str | None = None,
    *,
    class_names: list[str] | None = None,
    verify_images: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[DetectionDataset, list[Problem]]:
    """Read a Pascal VOC dataset split (``split=None``: every XML file under ``Annotations``).

    Never raises for bad records (see :mod:`~smearsight.train.datasets.check`); raises
    :class:`InputError` only when ``Annotations/`` or the split list is missing.
    """
    root = Path(path)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise InputError(f"{ann_dir}: not a Pascal VOC dataset (no Annotations folder)")
    problems: list[Problem] = []
    all_xml = sorted(ann_dir.glob("*.xml"))
    parsed: dict[Path, tuple[ET.Element | None, Problem | None]] = {}

    entries: list[tuple[Path, Problem | None]] = []
    if split is None:
        entries = [(p, None) for p in all_xml]
    else:
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise InputError(f"{split_file}: split list for {split!r} not found")
        first_line: dict[Path, int] = {}
        for n, line in enumerate(read_list_file(split_file, "split list").splitlines(), start=1):
            tokens = line.split()
            if not tokens:
                continue
            # "stem" or VOC's "stem flag"; a stem may itself hold spaces ("slide 01")
            whole = ann_dir / f"{line.strip()}.xml"
            xml_path = whole if whole.is_file() else ann_dir / f"{tokens[0]}.xml"
            missing = None
            if not xml_path.is_file():
                missing = Problem(str(split_file), f"annotation file {xml_path} not found", f"line {n}")
            elif xml_path in first_line:  # else the image would count twice in training and in evaluation
                missing = Problem(str(split_file), f"{xml_path.stem} is listed again (first on line "
                                                   f"{first_line[xml_path]})", f"line {n}")
            first_line.setdefault(xml_path, n)
            entries.append((xml_path, missing))

    if class_names is None and (root / "classes.txt").is_file():
        class_names = read_class_names_file(root / "classes.txt", problems)
    if class_names is None:
        found: set[str] = set()
        for xml_path in all_xml:
            parsed[xml_path] = node, _ = _parse(xml_path)
            if node is not None:
                found.update(n for obj in node.findall("object") if (n := _text(obj, "name")))
        class_names = sorted(found)
    class_of = {n: k for k, n in enumerate(class_names)}

    images: list[ImageRecord] = []
    for image_id, (xml_path, missing) in enumerate(entries, start=1):
        if progress is not None:
            progress(image_id - 1, len(entries))
        if missing is not None:
            problems.append(missing)
            continue
        node, problem = parsed[xml_path] if xml_path in parsed else _parse(xml_path)
        file = str(xml_path)
        if problem is not None:
            problems.append(problem)
            continue
        image_path = _image_path(root, xml_path, _text(node, "filename"))
        size = probe_image(image_path, verify_images, problems, file, "filename")
        if size is None:
            continue
        size_node = node.find("size")
        w_text, h_text = _text(size_node, "width"), _text(size_node, "height")
        if w_text is not None or h_text is not None:
            try:
                declared = (int(float(w_text)), int(float(h_text)))  # type: ignore[arg-type]
            except (TypeError, ValueError, OverflowError):
                problems.append(Problem(file, f"size width/height must be numbers, got {w_text!r}x{h_text!r}", "size"))
            else:
                if (p := size_mismatch_problem(file, "size", declared, size)) is not None:
                    problems.append(p)
        boxes, labels = [], []
        for k, obj in enumerate(node.findall("object")):
            name = _text(obj, "name")
            where = f"object {k}" + (f" ({name})" if name else "")
            if not name:
                problems.append(Problem(file, "object has no <name>", where))
                continue
            if name not in class_of:
                known = ", ".join(class_names)
                problems.append(Problem(file, f"unknown class {name!r} (classes: {known})", where))
                continue
            bnd = obj.find("bndbox")
            if bnd is None:
                problems.append(Problem(file, "object has no <bndbox>", where))
                continue
            values = []
            for field in _FIELDS:
                text = _text(bnd, field)
                try:
                    values.append(float(text))  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    problems.append(Problem(file, f"bndbox/{field} must be a number, got {text!r}", where))
                    break
            if len(values) < 4:
                continue
            xmin, ymin, xmax, ymax = values
            # VOC is 1-based, but 0-based exporters (CVAT, LabelImg) write 0 for a box on the left/top border
            xmin, ymin = (1.0 if 0.0 <= v < 1.0 else v for v in (xmin, ymin))
            box, message = validate_box((xmin - 1.0, ymin - 1.0, xmax, ymax), size[0], size[1])
            if message is not None:
                raw = f"VOC xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g}"
                problems.append(Problem(file, f"{message} [{raw}]", where + " bndbox"))
                continue
            boxes.append(box)
            labels.append(class_of[name])
        images.append(ImageRecord(image_path, size[0], size[1], boxes=boxes, labels=labels, image_id=image_id))
    return DetectionDataset(class_names, images, root=root, split=split), problems


def images_without_annotation(path: str | os.PathLike[str], ds: DetectionDataset) -> list[Path]:
    """Images in ``JPEGImages`` that no XML file names and none is named after: VOC does not read them (not even
    as negatives), so ``data check`` lists them."""
    root = Path(path)
    stems = {p.stem for p in (root / "Annotations").glob("*.xml")}
    used = {r.path for r in ds.images}
    return [p for p in list_images(root / "JPEGImages") if p.stem not in stems and p not in used]


def _num_text(value: float) -> str:
    v = round(float(value), 6)
    return str(int(v)) if v.is_integer() else repr(v)


def voc_xml(rec: ImageRecord, file_name: str, class_names: list[str]) -> str:
    """The VOC XML text for one image (boxes converted to 1-based inclusive pixel indices)."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "JPEGImages"
    ET.SubElement(ann, "filename").text = file_name
    size = ET.SubElement(ann, "size")
    ET.SubElement(size, "width").text = str(int(rec.width))
    ET.SubElement(size, "height").text = str(int(rec.height))
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(ann, "segmented").text = "0"
    for box, label in zip(rec.boxes, rec.labels, strict=True):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = class_names[int(label)]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = (f32_value(v) for v in box)
        for field, value in zip(_FIELDS, (x1 + 1.0, y1 + 1.0, x2, y2), strict=True):
            ET.SubElement(bnd, field).text = _num_text(value)
    ET.indent(ann, space="\t")
    return ET.tostring(ann, encoding="unicode") + "\n"


def write_voc(
    ds: DetectionDataset, root: Path, split: str | None, *, image_mode: str = "copy"
) -> Path:
    """Write ``ds`` as Pascal VOC under ``root``; return ``root``.

    Images are copied (``image_mode="copy"``) or hard-linked (``"link"``) flat into ``root/JPEGImages``
    (``"none"``: they must already be there); one XML per image; ``ImageSets/Main/<split>.txt`` lists the
    stems when ``split`` is given; ``classes.txt`` keeps the class order. Every file is written atomically.
    """
    root = Path(root)
    images_dir = root / "JPEGImages"
    check_class_names_file(root / "classes.txt", list(ds.class_names))  # refuses before anything is placed
    if image_mode == "none":
        for rec in ds.images:
            if Path(rec.path).parent.absolute() != images_dir.absolute():
                raise InputError(f"{rec.path}: VOC needs its images in {images_dir} (copy or link them)")
    paths = place_images([r.path for r in ds.images], ds.root, images_dir, mode=image_mode, flat=True)
    write_class_names_file(root / "classes.txt", list(ds.class_names))
    stems = []
    for rec, dest in zip(ds.images, paths, strict=True):
        atomic_write_text(root / "Annotations" / f"{dest.stem}.xml", voc_xml(rec, dest.name, ds.class_names))
        stems.append(dest.stem)
    if split is not None:
        atomic_write_text(root / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{s}\n" for s in stems))
    return root
