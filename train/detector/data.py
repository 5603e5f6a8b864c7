"""Datasets for the detector: split loading with clear errors, the torch Dataset, and recipe helpers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.errors import InputError
from smearsight.train.datasets.records import DetectionDataset
from smearsight.train.detector.augment import clip_boxes, letterbox, mosaic_transform, train_transform
from smearsight.train.detector.config import AugmentConfig


def load_split(
    path: str | Path, fmt: str, split: str | None, what: str = "split", *, verify_images: bool = False
) -> DetectionDataset:
    """Read a dataset split; InputError when it cannot be read or holds no images. Bad records are skipped
    with a warning; ``verify_images`` decodes every image first (training: a corrupt file is skipped then,
    not met mid-epoch), otherwise only image headers are read."""
    from smearsight.train.datasets.formats import read_dataset

    ds, problems = read_dataset(path, fmt, split, verify_images=verify_images)
    if len(ds) == 0:
        detail = f" ({len(problems)} problem(s), first: {problems[0]})" if problems else ""
        named = f"{what} {split!r}" if split is not None else "the dataset"
        raise InputError(f"{path}: {named} holds no usable images{detail}")
    if problems:
        import logging

        logging.getLogger(__name__).warning(
            "%s: %d bad record(s) skipped, first: %s (run 'smearsight data check')", path, len(problems), problems[0]
        )
    return ds


def check_class_names(expected: list[str], found: list[str], source: str, reference: str = "the checkpoint's") -> None:
    """Class names of a checkpoint (or ``reference``) and a dataset must agree exactly (same names, same order)."""
    if list(expected) != list(found):
        raise InputError(
            f"{source}: class names {list(found)} differ from {reference} {list(expected)} "
            "(same names in the same order expected)"
        )


def round_up(value: float, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return int(math.ceil(value / multiple) * multiple)


def auto_image_size(ds: DetectionDataset, variant_size: int, multiple: int = 32, min_box_px: float = 16.0) -> list[int]:
    """Input size [H, W] for a dataset: the median frame scaled so its long side fits ``variant_size``, but never
    shrinking the 5th-percentile box below ``min_box_px`` (small cells keep their pixels); a multiple of 32
    (the recipe then rounds up to the anchors' largest stride)."""
    hs = np.array([r.height for r in ds.images], dtype=np.float64)
    ws = np.array([r.width for r in ds.images], dtype=np.float64)
    h, w = float(np.median(hs)), float(np.median(ws))
    scale = min(1.0, variant_size / max(h, w))
    boxes = np.concatenate([r.boxes for r in ds.images]) if ds.num_boxes else np.zeros((0, 4), np.float32)
    if len(boxes):
        size = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 1e-6, None) * np.clip(boxes[:, 3] - boxes[:, 1], 1e-6, None))
        scale = max(scale, min(1.0, min_box_px / float(np.percentile(size, 5))))
    return [round_up(h * scale, multiple), round_up(w * scale, multiple)]


def fit_scale(height: int, width: int, size: tuple[int, int]) -> float:
    """Letterbox scale that fits a ``height`` x ``width`` frame into ``size`` (H, W)."""
    return min(size[0] / height, size[1] / width)


def scaled_boxes(ds: DetectionDataset, size: tuple[int, int]) -> np.ndarray:
    """All boxes after the letterbox fit onto ``size`` (for anchor statistics)."""
    out = [r.boxes * fit_scale(r.height, r.width, size) for r in ds.images if len(r.boxes)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 4), np.float32)


class DetectorDataset:
    """Torch-style dataset: ``(image [3,H,W] float32 normalised, boxes [N,4], labels [N], index)``."""

    def __init__(
        self,
        ds: DetectionDataset,
        size: tuple[int, int],
        mean: list[float],
        std: list[float],
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.ds = ds
        self.size = (int(size[0]), int(size[1]))
        self.mean = np.asarray(mean, np.float32) * 255.0
        self.std = np.asarray(std, np.float32) * 255.0
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ds.images)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The image (uint8 HxWx3 RGB) with copies of its boxes and labels; InputError on a size mismatch."""
        from smearsight.train.datasets.images import read_image_rgb

        rec = self.ds.images[index]
        img = read_image_rgb(rec.path)
        if img.shape[:2] != (rec.height, rec.width):
            raise InputError(
                f"{rec.path}: image is {img.shape[1]}x{img.shape[0]} but the annotation says {rec.width}x{rec.height}"
            )
        return img, rec.boxes.copy(), rec.labels.copy()

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Canvas (uint8 HxWx3), boxes and labels in canvas pixels, with augmentation when training."""
        img, boxes, labels = self.read(index)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if self.augment.mosaic > 0 and len(self) > 1 and rng.random() < self.augment.mosaic:
                others = rng.choice(len(self) - 1, size=3, replace=len(self) < 4)
                others = [int(i) + (i >= index) for i in others]  # never the image itself
                samples = [(img, boxes, labels)] + [self.read(i) for i in others]
                order = rng.permutation(4)
                return mosaic_transform([samples[i] for i in order], self.size, self.augment, rng)
            return train_transform(img, boxes, labels, self.size, self.augment, rng)
        rec = self.ds.images[index]
        canvas, boxes = letterbox(img, boxes, self.size, fit_scale(rec.height, rec.width, self.size))
        boxes, labels = clip_boxes(boxes, labels, self.size, min_visible=0.0, min_size=0.0)
        return canvas, boxes, labels

    def __getitem__(self, index: int) -> tuple[Any, Any, Any, int]:
        import torch

        canvas, boxes, labels = self.load(index)
        x = (canvas.astype(np.float32) - self.mean) / self.std
        return (
            torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
            torch.from_numpy(boxes.astype(np.float32)),
            torch.from_numpy(labels.astype(np.int64)),
            index,
        )


def collate(batch: list[tuple[Any, Any, Any, int]]) -> tuple[Any, list[Any], list[Any], list[int]]:
    """Stack the images of a batch; boxes, labels and indices stay per-image lists."""
    import torch

    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch], [b[2] for b in batch], [b[3] for b in batch]
