"""YOLO (darknet / Ultralytics) detection format.

Layout: images under ``ROOT/images/`` (sub-folders allowed), one label file per image at the same
relative path under ``ROOT/labels/`` with suffix ``.txt`` (``images/a/b.jpg`` -> ``labels/a/b.txt``, the
Ultralytics rule; flat datasets get ``labels/<stem>.txt``). Each label line is ``class cx cy w h`` with the
centre and size normalised by the image width/height. A missing label file means an image without boxes
(a negative), as in Ultralytics; a label file that cannot be read (not UTF-8, say) drops its image, which
is reported. Class names come from ``ROOT/classes.txt`` (one per line) or ``ROOT/data.yaml`` (``names``
as a list or a ``{index: name}`` mapping). A split is ``ROOT/<split>.txt``
or the ``<split>`` entry of ``data.yaml`` (a folder or a list file, or a list of them; a missing ``../x`` is
looked up as ``x``, as Ultralytics does for Roboflow's exports); a list file names image paths
relative to the list file's own folder, as in Ultralytics (``./images/x.jpg`` or ``images/x.jpg``;
absolute paths are allowed). ``split=None`` takes every image.

Image sizes are read from the image headers (no decode) unless ``verify_images`` is set. The writer
stores normalised values with 10 significant digits, so boxes round-trip far below 1e-3 px.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.errors import InputError
from smearsight.fileio import atomic_write_text

from .check import (
    ProgressFn,
    check_class_names_file,
    f32_value,
    probe_image,
    read_class_names_file,
    read_list_file,
    validate_box,
    write_class_names_file,
)
from .images import IMAGE_SUFFIXES, list_images, place_images
from .records import DetectionDataset, ImageRecord, Problem


def _load_yaml(path: Path, problems: list[Problem]) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problems.append(Problem(str(path), f"malformed YAML: {getattr(exc, 'problem', exc)}", where))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(path), f"cannot read the file: {exc}"))
        return None
    if not isinstance(data, dict):
        problems.append(Problem(str(path), "data.yaml must be a mapping"))
        return None
    return data


def _names_from_yaml(path: Path, data: dict[str, Any], problems: list[Problem]) -> list[str] | None:
    names = data.get("names")
    found: list[str] | None = None
    if isinstance(names, list) and all(isinstance(n, (str, int)) for n in names):
        found = [str(n) for n in names]
    elif isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            keys = []
        if keys == list(range(len(names))):
            found = [str(names[k] if k in names else names[str(k)]) for k in keys]
    if found is None:
        problems.append(Problem(str(path), "'names' must be a list or a mapping {0: name, 1: name, ...}", "names"))
        return None
    # As for classes.txt: a repeated or empty name makes labels, metrics and the exported classes ambiguous.
    if len(set(found)) != len(found):
        problems.append(Problem(str(path), f"duplicate class names {sorted({n for n in found if found.count(n) > 1})}",
                                "names"))
    if empty := [i for i, n in enumerate(found) if not n.strip()]:
        problems.append(Problem(str(path), f"empty class name for class {', '.join(map(str, empty))}", "names"))
    return found


def class_names_for(root: Path, problems: list[Problem]) -> tuple[list[str], dict[str, Any] | None]:
    """Class names of a YOLO dataset (classes.txt wins over data.yaml) and the parsed data.yaml, if any."""
    yaml_path = next((root / n for n in ("data.yaml", "data.yml") if (root / n).is_file()), None)
    data = _load_yaml(yaml_path, problems) if yaml_path is not None else None
    if (root / "classes.txt").is_file():
        names = read_class_names_file(root / "classes.txt", problems)
        if names is not None and yaml_path is not None and data is not None and "names" in data:
            yaml_names = _names_from_yaml(yaml_path, data, [])
            if yaml_names is not None and yaml_names != names:  # Ultralytics would train with the other list
                problems.append(Problem(str(yaml_path), f"'names' {yaml_names} differ from classes.txt {names} "
                                                        "(classes.txt is used); make them agree", "names"))
        return names or [], data
    if yaml_path is not None and data is not None:
        names = _names_from_yaml(yaml_path, data, problems)
        return names or [], data
    if yaml_path is not None:
        return [], data
    raise InputError(f"{root}: YOLO dataset needs class names in classes.txt or data.yaml")


def _label_path(root: Path, image: Path) -> Path:
    try:
        rel = image.relative_to(root / "images")
    except ValueError:
        parts = list(image.parts)
        if "images" in parts:
            i = len(parts) - 1 - parts[::-1].index("images")
            return Path(*parts[:i], "labels", *parts[i + 1 :]).with_suffix(".txt")
        return image.with_suffix(".txt")
    return (root / "labels" / rel).with_suffix(".txt")


def _split_images(
    root: Path, split: str, data: dict[str, Any] | None, problems: list[Problem]
) -> list[tuple[Path, Problem | None]]:
    list_file = root / f"{split}.txt"
    targets = [list_file]
    if not list_file.is_file() and data is not None and split in data:
        names = data[split] if isinstance(data[split], list) else [data[split]]  # Ultralytics allows a list
        if not names or not all(isinstance(name, str) for name in names):
            raise InputError(f"{root}: data.yaml '{split}' must name a folder or list file, or a list of them, "
                             f"not {data[split]!r}")
        base = root / str(data.get("path") or ".")  # an absolute 'path' replaces root
        targets = []
        for name in names:
            target = base / name
            if not target.exists() and name.startswith("../"):
                target = base / name[3:]  # Roboflow's exports say ../train/images; Ultralytics reads them so too
            targets.append(target)
    out: list[tuple[Path, Problem | None]] = []
    first_seen: dict[str, tuple[Path, int | None]] = {}  # real path -> the list file (and line) or folder
    for target in targets:
        if target.is_dir():
            for image in list_images(target):
                again = _seen_before(image, target, None, first_seen)
                out.append((image, again and Problem(str(target), f"{image} is listed again ({again})", "")))
            continue
        if not target.is_file():
            raise InputError(f"{target}: split list for {split!r} not found")
        out.extend(_list_file_images(target, first_seen))
    return out


def _seen_before(image: Path, source: Path, line: int | None,
                 first_seen: dict[str, tuple[Path, int | None]]) -> str | None:
    """Where ``image`` was first listed, in words, when it was (it would count twice in training and
    evaluation); else None, and it is remembered as listed by ``source`` (at ``line``)."""
    key = os.path.realpath(image)
    if key not in first_seen:
        first_seen[key] = (source, line)
        return None
    where, first_line = first_seen[key]
    if where == source and first_line is not None:
        return f"first on line {first_line}"
    return f"first in {where}" + (f", line {first_line}" if first_line is not None else "")


def _list_file_images(list_file: Path, first_seen: dict[str, tuple[Path, int | None]]
                      ) -> list[tuple[Path, Problem | None]]:
    """The images a split list file names (relative to its folder), each with its problem or None."""
    out: list[tuple[Path, Problem | None]] = []
    for n, line in enumerate(read_list_file(list_file, "split list").splitlines(), start=1):
        entry = line.strip()
        if not entry:
            continue
        p = Path(entry)
        image = p if p.is_absolute() else list_file.parent / (entry[2:] if entry.startswith("./") else entry)
        problem = None
        if not image.is_file():
            problem = Problem(str(list_file), f"image {image} not found", f"line {n}")
        elif image.suffix.lower() not in IMAGE_SUFFIXES:
            kinds = ", ".join(IMAGE_SUFFIXES)
            problem = Problem(str(list_file), f"{image} is not an image file ({kinds})", f"line {n}")
        elif again := _seen_before(image, list_file, n, first_seen):
            problem = Problem(str(list_file), f"{image} is listed again ({again})", f"line {n}")
        out.append((image, problem))
    return out


def _parse_labels(
    label_path: Path, width: int, height: int, n_classes: int, problems: list[Problem]
) -> tuple[list[np.ndarray], list[int]] | None:
    """Boxes and labels of one label file; None (after a Problem) when the file cannot be read at all."""
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    file = str(label_path)
    try:
        text = label_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(file, f"cannot read the label file: {exc}"))
        return None
    for n, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"line {n}"
        if len(tokens) != 5:
            problems.append(Problem(file, f"expected 5 fields 'class cx cy w h', got {len(tokens)}", where))
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            problems.append(Problem(file, f"non-numeric value in {line.strip()!r}", where))
            continue
        cls = values[0]
        if not cls.is_integer() or not 0 <= cls < n_classes:
            problems.append(Problem(file, f"unknown class {tokens[0]} (have {n_classes} classes)", where))
            continue
        cx, cy, w, h = values[1:]
        x1, x2 = (cx - w / 2) * width, (cx + w / 2) * width
        y1, y2 = (cy - h / 2) * height, (cy + h / 2) * height
        box, message = validate_box((x1, y1, x2, y2), width, height)
        if message is not None:
            problems.append(Problem(file, f"{message} [normalised {' '.join(tokens[1:])}]", where))
            continue
        boxes.append(box)
        labels.append(int(cls))
    return boxes, labels


def read_yolo(
    path: str | os.PathLike[str],
    split: str | None = None,
    *,
    verify_images: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[DetectionDataset, list[Problem]]:
    """Read a YOLO dataset split (``split=None``: every image under ``ROOT/images``).

    Never raises for bad records; raises :class:`InputError` when the folder, the class names or the
    split list is missing.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such YOLO dataset folder")
    problems: list[Problem] = []
    class_names, data = class_names_for(root, problems)
    if split is None:
        if not (root / "images").is_dir():
            raise InputError(f"{root / 'images'}: YOLO dataset has no images folder")
        entries: list[tuple[Path, Problem | None]] = [(p, None) for p in list_images(root / "images")]
    else:
        entries = _split_images(root, split, data, problems)
    images: list[ImageRecord] = []
    for image_id, (image_path, missing) in enumerate(entries, start=1):
        if progress is not None:
            progress(image_id - 1, len(entries))
        if missing is not None:
            problems.append(missing)
            continue
        label_path = _label_path(root, image_path)
        size = probe_image(image_path, verify_images, problems, str(image_path))
        if size is None:
            continue
        boxes: list[np.ndarray] = []
        labels: list[int] = []
        if label_path.is_file():
            parsed = _parse_labels(label_path, size[0], size[1], len(class_names), problems)
            if parsed is None:  # its boxes are unknown: dropped, not kept as a negative
                continue
            boxes, labels = parsed
        images.append(ImageRecord(image_path, size[0], size[1], boxes=boxes, labels=labels, image_id=image_id))
    return DetectionDataset(class_names, images, root=root, split=split), problems


def _g(value: float) -> str:
    return f"{value:.10g}"


def yolo_lines(rec: ImageRecord) -> str:
    """Label-file text for one image."""
    lines = []
    w, h = float(rec.width), float(rec.height)
    for box, label in zip(rec.boxes, rec.labels, strict=True):
        x1, y1, x2, y2 = (f32_value(v) for v in box)
        cx, cy = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h
        bw, bh = (x2 - x1) / w, (y2 - y1) / h
        lines.append(f"{int(label)} {_g(cx)} {_g(cy)} {_g(bw)} {_g(bh)}\n")
    return "".join(lines)


def write_yolo(ds: DetectionDataset, root: Path, split: str | None, *, image_mode: str = "copy") -> Path:
    """Write ``ds`` as a YOLO dataset under ``root``; return ``root``.

    Images go to ``root/images/`` (copied, hard-linked with ``image_mode="link"``, or already there with
    ``"none"``), labels to ``root/labels/`` (an empty file for an image without boxes), class names to
    ``root/classes.txt`` and ``data.yaml``; ``root/<split>.txt`` lists the images when ``split`` is given.
    Every file is written atomically.
    """
    import yaml

    root = Path(root)
    images_dir = root / "images"
    # Everything that can refuse the write is checked before the first file is placed.
    check_class_names_file(root / "classes.txt", list(ds.class_names))
    yaml_path = root / "data.yaml"
    data: dict[str, Any] = {}
    if yaml_path.is_file():
        try:
            loaded = yaml.safe_load(yaml_path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise InputError(f"{yaml_path}: cannot update the existing file ({str(exc).splitlines()[0]})") from None
        data = loaded if isinstance(loaded, dict) else {}
    if image_mode == "none":
        for p in ds.images:
            try:
                p.path.absolute().relative_to(images_dir.absolute())
            except ValueError:
                raise InputError(f"{p.path}: YOLO needs its images under {images_dir} (copy or link them)") from None
    paths = place_images([r.path for r in ds.images], ds.root, images_dir, mode=image_mode)
    write_class_names_file(root / "classes.txt", list(ds.class_names))
    listed = []
    for rec, dest in zip(ds.images, paths, strict=True):
        atomic_write_text(_label_path(root, dest), yolo_lines(rec))
        listed.append("./" + dest.absolute().relative_to(root.absolute()).as_posix())
    if split is not None:
        atomic_write_text(root / f"{split}.txt", "".join(f"{s}\n" for s in listed))
        data[split] = f"{split}.txt"
    data["names"] = {i: n for i, n in enumerate(ds.class_names)}
    atomic_write_text(yaml_path, yaml.safe_dump(data, sort_keys=False))
    return root
