"""The one in-memory form of a detection dataset, shared by every reader, writer and trainer.

Boxes are absolute pixel coordinates ``(x1, y1, x2, y2)`` in float32 with ``x2 > x1`` and ``y2 > y1``;
labels index into :attr:`DetectionDataset.class_names`. Readers never raise on a bad record: they
collect :class:`Problem` entries so that ``smearsight data check`` can report every one of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ImageRecord:
    """One image and its boxes."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    image_id: int = 0

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.path}: {len(self.boxes)} boxes but {len(self.labels)} labels")

    @property
    def file_name(self) -> str:
        return self.path.name


@dataclass
class DetectionDataset:
    """A split of a detection dataset: class names and image records."""

    class_names: list[str]
    images: list[ImageRecord]
    root: Path | None = None
    split: str | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_boxes(self) -> int:
        return sum(len(r.boxes) for r in self.images)

    def fingerprint(self) -> dict[str, int | str]:
        """Image and box counts and a SHA-256 over the class names and every image's name (relative to the
        dataset root), size, boxes and labels: equal for the same data in a moved folder, different when an
        image, a box or a class changes."""
        digest = hashlib.sha256(json.dumps(list(self.class_names)).encode("utf-8"))
        for rec in sorted(self.images, key=lambda r: self._relative_name(r.path)):
            digest.update(f"\0{self._relative_name(rec.path)}\0{rec.width}x{rec.height}\0{len(rec.boxes)}\0".encode())
            digest.update(rec.boxes.astype("<f4").tobytes() + rec.labels.astype("<i8").tobytes())
        return {"images": len(self.images), "boxes": self.num_boxes, "sha256": digest.hexdigest()}

    def _relative_name(self, path: Path) -> str:
        if self.root is not None:
            try:
                return path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return path.name

    def boxes_per_class(self) -> np.ndarray:
        counts = np.zeros(len(self.class_names), dtype=np.int64)
        for rec in self.images:
            counts += np.bincount(rec.labels, minlength=len(self.class_names))[: len(self.class_names)]
        return counts


@dataclass(frozen=True)
class Problem:
    """A bad record: the file, where in it (line, object index, field), and what is wrong."""

    file: str
    message: str
    where: str = ""

    def __str__(self) -> str:
        return f"{self.file}{f' ({self.where})' if self.where else ''}: {self.message}"
