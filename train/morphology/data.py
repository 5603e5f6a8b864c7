"""Morphology crops: the MHSMA layout (``x_64_<split>.npy`` + ``y_<part>_<split>.npy``) or PNG crops + CSV.

CSV layout: ``DIR/labels.csv`` with columns ``file`` (path relative to DIR), ``split`` and one column per
part (0 = normal, 1 = abnormal); the images are 64x64 grayscale (colour images are converted; 16-bit ones keep
their top 8 bits, so one holding only low values, such as 12-bit camera data, is refused).
Every problem raises :class:`InputError` naming the file and what was expected.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.catalog import MORPHOLOGY_PARTS
from smearsight.errors import InputError

CROP_SIZE = 64


@dataclass
class CropSet:
    """Grayscale crops ``images`` uint8 [N,64,64] and labels int64 [N] (0 normal, 1 abnormal); ``source`` names the
    file that holds the crops, ``labels_source`` the one that holds the labels (what a label problem names)."""

    images: np.ndarray
    labels: np.ndarray
    source: str
    labels_source: str = ""

    def __post_init__(self) -> None:
        self.labels_source = self.labels_source or self.source

    def __len__(self) -> int:
        return int(self.images.shape[0])


def check_part(part: str) -> str:
    """``part`` if it is one of MORPHOLOGY_PARTS, else InputError."""
    if part not in MORPHOLOGY_PARTS:
        raise InputError(f"part: unknown part {part!r}, expected one of {', '.join(MORPHOLOGY_PARTS)}")
    return part


def validate_images(images: np.ndarray, source: str) -> np.ndarray:
    """Accept [N,64,64] or [N,64,64,1] uint8 (or float in 0..255); return uint8 [N,64,64]."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != (CROP_SIZE, CROP_SIZE):
        raise InputError(f"{source}: expected an array of shape [N, 64, 64] (gray crops), got {list(images.shape)}")
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer):
        if not images.size:
            return images.astype(np.uint8)
        if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
            raise InputError(f"{source}: pixel values must be finite numbers in 0..255 (found NaN or infinity)")
        low, high = images.min(), images.max()
        if low < 0 or high > 255:
            raise InputError(f"{source}: pixel values must lie in 0..255, got {low}..{high}")
        if np.issubdtype(images.dtype, np.floating) and high <= 1.0:
            raise InputError(f"{source}: pixels look scaled to 0..1 (max {high}); expected 0..255 (multiply by 255)")
        return np.round(images).astype(np.uint8)
    raise InputError(f"{source}: expected uint8 pixels, got dtype {images.dtype}")


def validate_labels(labels: np.ndarray, source: str) -> np.ndarray:
    """Accept [N] or [N,1] labels 0 (normal) / 1 (abnormal) of any integer, bool or 0.0/1.0 float dtype."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InputError(f"{source}: expected a 1-D label array, got shape {list(labels.shape)}")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.isin(labels, (0.0, 1.0))):
            raise InputError(f"{source}: expected integer labels 0/1, got dtype {labels.dtype}")
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:
        raise InputError(f"{source}: labels must be 0 (normal) or 1 (abnormal), found {sorted(values)}")
    return labels.astype(np.int64)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InputError(f"{path}: not a readable .npy array ({type(exc).__name__}: {first})") from None
    if not isinstance(array, np.ndarray):  # e.g. an .npz archive saved under a .npy name
        array.close()
        raise InputError(f"{path}: expected a single .npy array, got {type(array).__name__}")
    return array


def load_npy_images(path: Path) -> np.ndarray:
    """A ``x_64_*.npy`` crop array, checked: uint8-valued ``[N, 64, 64]`` (InputError naming the file)."""
    return validate_images(_load_npy(path), str(path))


def load_crops(data_dir: str | Path, part: str, split: str) -> CropSet:
    """Load one split of one part from an MHSMA folder or a PNG+CSV folder."""
    check_part(part)
    root = Path(data_dir)
    if root.is_file():  # e.g. --data labels.csv
        raise InputError(f"{root}: is a file; expected the folder holding x_64_<split>.npy or labels.csv")
    if not root.is_dir():
        raise InputError(f"{root}: data folder not found")
    x_path = root / f"x_64_{split}.npy"
    if x_path.is_file() or (root / f"y_{part}_{split}.npy").is_file():
        y_path = root / f"y_{part}_{split}.npy"
        images = load_npy_images(x_path)
        labels = validate_labels(_load_npy(y_path), str(y_path))
        if len(images) != len(labels):
            raise InputError(f"{y_path}: {len(labels)} labels for {len(images)} images in {x_path.name}")
        if len(images) == 0:
            raise InputError(f"{x_path}: the '{split}' split holds no crops")
        return CropSet(images, labels, str(x_path), str(y_path))
    csv_path = root / "labels.csv"
    if csv_path.is_file():
        return _load_csv(root, csv_path, part, split)
    raise InputError(f"{root}: no {x_path.name} (MHSMA layout) and no labels.csv (PNG crops) found")


def _load_csv(root: Path, csv_path: Path, part: str, split: str) -> CropSet:
    from smearsight.errors import require
    from smearsight.train.datasets.images import low_bit_depth_problem

    cv2 = require("cv2", "PNG crops")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:  # spreadsheets add a BOM
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            for column in ("file", "split", part):
                if column not in fields:
                    raise InputError(f"{csv_path}: missing column '{column}' (columns: {', '.join(fields)})")
                if (times := fields.count(column)) > 1:  # DictReader would silently keep the last one
                    raise InputError(f"{csv_path}: column '{column}' appears {times} times in the header")
            rows = []
            for n, row in enumerate(reader, start=2):  # line 1 is the header
                if row["split"] is None:  # DictReader fills a short row's missing cells with None
                    raise InputError(f"{csv_path} line {n}: the row has no 'split' value ({row['file']!r})")
                if row["split"].strip() == split:  # as the label cells: spreadsheets leave spaces around values
                    rows.append(row)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{csv_path}: not a readable UTF-8 CSV file ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise InputError(f"{csv_path}: no rows with split '{split}'")
    images, labels = [], []
    seen: set[Path] = set()
    base = Path(os.path.normpath(root.absolute()))
    for row in rows:
        if not row["file"] or row[part] is None:  # short row: DictReader fills missing cells with None
            raise InputError(f"{csv_path}: a '{split}' row lacks its 'file' or '{part}' value (file={row['file']!r})")
        path = root / row["file"]
        if not Path(os.path.normpath(path.absolute())).is_relative_to(base):  # a linked sub-folder is fine
            raise InputError(f"{csv_path}: {row['file']!r} lies outside {root} (paths are relative to the folder)")
        resolved = path.resolve()
        if resolved in seen:
            raise InputError(f"{csv_path}: {row['file']!r} is listed twice in split '{split}'")
        seen.add(resolved)
        image = _read_gray(cv2, path)
        if image is None:
            raise InputError(f"{path}: missing or unreadable image (listed in {csv_path.name})")
        if image.shape != (CROP_SIZE, CROP_SIZE):
            raise InputError(f"{path}: expected a 64x64 crop, got {image.shape[1]}x{image.shape[0]}")
        # decoded once, at its own depth: its top 8 bits below (what IMREAD_GRAYSCALE gives for grey PNG and TIFF)
        if image.dtype == np.uint16:
            if note := low_bit_depth_problem(path, image):  # 12-bit data in a 16-bit PNG: read as 8-bit, black
                raise InputError(note)
            image = (image >> 8).astype(np.uint8)
        value = row[part].strip()
        if value not in ("0", "1"):
            raise InputError(f"{csv_path}: column '{part}' must be 0 or 1, got {value!r} for {row['file']}")
        images.append(image)
        labels.append(int(value))
    return CropSet(np.stack(images), np.asarray(labels, dtype=np.int64), str(csv_path))


def _read_gray(cv2: Any, path: Path) -> np.ndarray | None:
    """``path`` decoded once as gray, uint8 or (a 16-bit file) uint16; None when missing or undecodable."""
    from smearsight.train.datasets.images import quiet_opencv

    if not path.is_file():
        return None
    with quiet_opencv(cv2):  # the caller's InputError says it in one line
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
        if image is not None and image.dtype not in (np.uint8, np.uint16):  # a float or 32-bit TIFF, say
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return image


def require_two_classes(crops: CropSet, what: str) -> None:
    """Raise when a split holds one class only (AUC and F0.5 are undefined there)."""
    counts = np.bincount(crops.labels, minlength=2)
    if counts.min() == 0:
        only = "normal" if counts[0] else "abnormal"
        raise InputError(f"{crops.labels_source}: {what} needs both classes, but the split holds {only} samples only")


def to_tensor_input(images: np.ndarray, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """uint8 [N,64,64] -> float32 [N,1,64,64] normalised as ``(pixel/255 - mean)/std``."""
    return ((images.astype(np.float32) / 255.0 - mean) / std)[:, None]
