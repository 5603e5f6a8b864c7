"""Validation rules shared by every reader, and the summary printed by ``smearsight data check``.

Rules (all readers, boxes in 0-based continuous pixel coordinates ``x1, y1, x2, y2``):

* a box is *bad* when a coordinate is not a finite number, when ``x2 <= x1`` or ``y2 <= y1``
  (zero or negative size), or when it reaches outside ``[0, width] x [0, height]`` by more than
  :data:`BOX_TOLERANCE_PX` (boxes inside the tolerance are clipped to the border: that absorbs the
  rounding of normalised YOLO coordinates);
* a box whose class is not in the class list is bad;
* bad boxes are dropped from the returned dataset and reported as :class:`Problem`; the image is kept
  (with its remaining boxes, possibly none, i.e. as a negative);
* an image that is missing or unreadable is dropped and reported; an image without any box is kept as
  a negative example and is *not* a problem;
* boxes with a side shorter than :data:`TINY_BOX_PX` are valid but listed as notes by ``data check``
  (they are usually annotation slips, e.g. a click without a drag), without failing the check.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from smearsight.errors import InputError

from .records import DetectionDataset, Problem

if TYPE_CHECKING:
    from rich.table import Table

BOX_TOLERANCE_PX = 0.01

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)`` callback that readers call as they go through images."""
TINY_BOX_PX = 2.0


def validate_box(
    box: Sequence[float], width: int, height: int, tolerance: float = BOX_TOLERANCE_PX
) -> tuple[np.ndarray | None, str | None]:
    """Check one ``x1, y1, x2, y2`` pixel box against an image of ``width x height``.

    Returns ``(clipped_box, None)`` for a good box and ``(None, message)`` for a bad one.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, f"box {_fmt_box(box)} has a non-finite coordinate"
    if x2 <= x1 or y2 <= y1:
        return None, f"box {_fmt_box(box)} has zero or negative size (w={x2 - x1:g}, h={y2 - y1:g})"
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        return None, f"box {_fmt_box(box)} lies outside the {width}x{height} image"
    clipped = np.array(
        [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))], dtype=np.float32
    )
    return clipped, None


def f32_value(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (12.3, not 12.300000190734863).

    Writers store boxes through it so that float32 boxes round-trip exactly and files stay readable.
    """
    return float(str(np.float32(value)))


def read_list_file(path: Path, what: str) -> str:
    """Text of a file the dataset as a whole depends on (split list); InputError naming it when unreadable."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc})") from None


def _fmt_box(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


def size_mismatch_problem(
    file: str, where: str, declared: tuple[int, int], actual: tuple[int, int]
) -> Problem | None:
    """A Problem when the annotation's declared ``(w, h)`` disagrees with the real image's."""
    if tuple(declared) != tuple(actual):
        return Problem(
            file,
            f"image size in the annotation is {declared[0]}x{declared[1]} but the image is "
            f"{actual[0]}x{actual[1]}",
            where,
        )
    return None


def tiny_box_notes(ds: DetectionDataset, min_side: float = TINY_BOX_PX) -> list[str]:
    """Lines naming every box with a side shorter than ``min_side`` pixels (valid, but suspicious)."""
    notes = []
    for rec in ds.images:
        for k, (box, label) in enumerate(zip(rec.boxes, rec.labels, strict=True)):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            if min(w, h) < min_side:
                notes.append(
                    f"{rec.path} (box {k}, {ds.class_names[label]}): {w:g}x{h:g} px box "
                    f"at ({float(box[0]):g}, {float(box[1]):g})"
                )
    return notes


def summarize(ds: DetectionDataset) -> dict:
    """Counts and box-size percentiles per class.

    Box size is ``sqrt(w * h)`` in pixels (one number per box; the side of the square of equal area);
    percentiles p5 / p50 / p95 use NumPy's default linear interpolation.
    """
    per_class = []
    sizes_by_class: list[list[float]] = [[] for _ in ds.class_names]
    images_with: list[int] = [0] * len(ds.class_names)
    for rec in ds.images:
        if len(rec.boxes):
            wh = rec.boxes[:, 2:] - rec.boxes[:, :2]
            size = np.sqrt(np.clip(wh[:, 0], 0, None) * np.clip(wh[:, 1], 0, None))
            for s, label in zip(size, rec.labels, strict=True):
                sizes_by_class[int(label)].append(float(s))
            for label in set(int(v) for v in rec.labels):
                images_with[label] += 1
    for c, name in enumerate(ds.class_names):
        s = np.asarray(sizes_by_class[c], dtype=np.float64)
        p5, p50, p95 = (np.percentile(s, [5, 50, 95]).tolist() if s.size else [math.nan] * 3)
        per_class.append(
            {"class": name, "boxes": int(s.size), "images": images_with[c], "p5": p5, "p50": p50, "p95": p95}
        )
    return {
        "images": len(ds.images),
        "images_without_boxes": sum(1 for r in ds.images if len(r.boxes) == 0),
        "boxes": ds.num_boxes,
        "classes": per_class,
    }


def render_summary(ds: DetectionDataset, title: str) -> Table:
    """A rich Table of :func:`summarize`'s figures (names and title shown literally, never as markup)."""
    from rich.markup import escape
    from rich.table import Table

    info = summarize(ds)
    table = Table(
        title=escape(title),
        caption=(
            f"{info['images']} images, {info['images_without_boxes']} without boxes, {info['boxes']} boxes; "
            "size = sqrt(w*h) in px"
        ),
    )
    table.add_column("class")
    table.add_column("boxes", justify="right")
    table.add_column("images", justify="right")
    for p in ("p5", "p50", "p95"):
        table.add_column(f"size {p}", justify="right")
    for row in info["classes"]:
        table.add_row(
            escape(row["class"]),
            str(row["boxes"]),
            str(row["images"]),
            *("-" if math.isnan(row[p]) else f"{row[p]:.1f}" for p in ("p5", "p50", "p95")),
        )
    return table


def probe_image(
    path: str | os.PathLike[str], verify: bool, problems: list[Problem], file: str, where: str = ""
) -> tuple[int, int] | None:
    """``(width, height)`` of an image, or None after appending a Problem (missing / unreadable).

    ``verify=True`` decodes the whole image with OpenCV (what ``data check`` does); otherwise only the
    header is read where the format allows it.
    """
    from .images import image_size

    try:
        return image_size(path, decode=verify)
    except InputError as exc:
        message = str(exc)
        prefix = f"{path}: "
        if message.startswith(prefix):
            message = message[len(prefix):]
        problems.append(Problem(file, message if file == str(path) else f"image {path}: {message}", where))
        return None


def read_class_names_file(path: Path, problems: list[Problem]) -> list[str] | None:
    """Class names from a text file, one per line (blank lines ignored); None after a Problem."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(path), f"cannot read the class list: {exc}"))
        return None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        problems.append(Problem(str(path), f"duplicate class names {dup}"))
    return names


def check_class_names_file(path: Path, class_names: list[str]) -> bool:
    """True when ``classes.txt`` already lists ``class_names``, False when there is none yet; InputError when
    it lists others (label indices would shift). Writers call it before they write anything."""
    if not path.is_file():
        return False
    existing = [line.strip() for line in read_list_file(path, "class list").splitlines() if line.strip()]
    if existing != list(class_names):
        raise InputError(
            f"{path}: already lists classes {existing}, not {list(class_names)}; write this split to a new folder"
        )
    return True


def write_class_names_file(path: Path, class_names: list[str]) -> None:
    """Write ``classes.txt``; refuse to change an existing, different list (label indices would shift)."""
    from smearsight.fileio import atomic_write_text

    if not check_class_names_file(path, class_names):
        atomic_write_text(path, "".join(f"{n}\n" for n in class_names))
