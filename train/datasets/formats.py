"""Format dispatch: read and write COCO, Pascal VOC and YOLO through one pair of functions.

What happens to bad records (all formats; see :mod:`smearsight.train.datasets.check`): bad boxes are
dropped and reported, images that are missing or unreadable are dropped and reported, images without
boxes are kept as negatives. Readers raise :class:`~smearsight.errors.InputError` only when the dataset
as a whole cannot be read (folder, split list or annotation file missing).
"""

from __future__ import annotations

import os
from pathlib import Path

from smearsight.errors import InputError

from .check import ProgressFn
from .records import DetectionDataset, Problem

FORMATS: tuple[str, ...] = ("coco", "voc", "yolo")


def _check_fmt(fmt: str) -> str:
    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def read_dataset(
    path: str | os.PathLike[str],
    fmt: str,
    split: str | None = None,
    *,
    verify_images: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[DetectionDataset, list[Problem]]:
    """Read a dataset split in ``fmt`` ("coco" | "voc" | "yolo"); return it and the list of bad records.

    ``verify_images=True`` decodes every image with OpenCV (slower; ``data check`` does it) instead of
    reading only image headers. ``progress(done, total)`` is called as images are read.
    """
    fmt = _check_fmt(fmt)
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such dataset")
    if fmt == "coco":
        from .coco import read_coco

        return read_coco(path, split, verify_images=verify_images, progress=progress)
    if fmt == "voc":
        from .voc import read_voc

        return read_voc(path, split, verify_images=verify_images, progress=progress)
    from .yolo import read_yolo

    return read_yolo(path, split, verify_images=verify_images, progress=progress)


def write_dataset(
    ds: DetectionDataset, out_root: str | os.PathLike[str], fmt: str, split: str | None, *, image_mode: str = "copy"
) -> Path:
    """Write ``ds`` under ``out_root`` in ``fmt``; return the annotation file (COCO) or the dataset root.

    Images are copied (``image_mode="copy"``), hard-linked where possible (``"link"``), or expected in
    place already (``"none"``). COCO needs a split name (``annotations/<split>.json``); ``None`` means
    ``"all"`` there. Every annotation file is written atomically.
    """
    fmt = _check_fmt(fmt)
    out_root = Path(out_root)
    if image_mode not in ("copy", "link", "none"):
        raise InputError(f"image mode {image_mode!r}: expected copy, link or none")
    if fmt == "coco":
        from .coco import write_coco

        if image_mode == "none":
            return write_coco(ds, out_root, split or "all", copy_images=False)
        return write_coco(ds, out_root, split or "all", copy_images=True, link=image_mode == "link")
    if fmt == "voc":
        from .voc import write_voc

        return write_voc(ds, out_root, split, image_mode=image_mode)
    from .yolo import write_yolo

    return write_yolo(ds, out_root, split, image_mode=image_mode)
