"""The one in-memory form of a detection dataset, shared by every reader, writer and trainer.

Boxes are absolute pixel coordinates ``(x1, y1, x2, y2)`` in float32 with ``x2 > x1`` and ``y2 > y1``;
labels index into :attr:`DetectionDataset.class_names`. Readers never raise on a bad record: they
collect :class:`Problem` entries so that ``smearsight data check`` can report every one of them.
"""

from __future__ import annotations

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
