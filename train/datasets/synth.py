"""Synthetic testicular touch-print smears: single frames, COCO datasets, and one large virtual slide.

NumPy + OpenCV only (no torch): the runtime's ``synth://`` camera source imports this module on a device.

* :class:`SmearSynthesizer` renders independent frames, each with its own stain palette (H&E-,
  Diff-Quik- or Papanicolaou-like), density, clustering, debris, focus blur, noise and illumination.
* :func:`generate_dataset` writes such frames as JPEG images plus COCO ``train``/``val`` annotations.
* :class:`SyntheticSlide` is one large slide rendered lazily in cached tiles; :meth:`SyntheticSlide.frame_at`
  crops a camera frame (with the camera's vignetting and noise) and :meth:`SyntheticSlide.stage_path`
  moves a stage over it in a serpentine.

Classes are those of :data:`smearsight.catalog.TPS_CLASSES`. Boxes are exact for the drawn raster. For
mature and immature sperm and for elongated spermatids the box covers the HEAD only (with the immature
sperm's cytoplasmic droplet and the elongated spermatid's attached cytoplasm), never the tail; for round
spermatids, primary spermatocytes and Sertoli cells it covers the whole cell. Box longer sides lie in
the catalog's size ranges (8-14, 12-18, 20-30, 30-60 px) except where a box is clipped by the frame.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from smearsight.catalog import TPS_CLASS_NAMES, TPS_CLASSES
from smearsight.errors import InputError
from smearsight.fileio import atomic_write_bytes, check_output_dir
from smearsight.train.datasets.synth_render import (
    Scene,
    illumination_map,
    make_scene,
    make_style,
    make_textures,
    od_to_rgb,
    render_od,
    to_uint8,
    window_annotations,
)
from smearsight.train.progress import make_progress

__all__ = ["SmearSynthesizer", "SyntheticSlide", "generate_dataset", "make_preview", "parse_size"]

_MARGIN = 24  # cells are placed this far beyond the frame so that its borders are not empty
JPEG_QUALITY = 95


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"HxW"`` (e.g. ``768x1024``) into ``(H, W)``; InputError when malformed or too small."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"--size: {text!r} is not HEIGHTxWIDTH, e.g. 768x1024") from None
    if h < 64 or w < 64 or h > 16384 or w > 16384:
        raise InputError(f"--size: {text!r} must be between 64x64 and 16384x16384 pixels")
    return h, w


def _noise_bank(seed: int, h: int, w: int) -> np.ndarray:
    """Unit-variance camera noise: mostly luminance (sensor), some chroma (demosaicing)."""
    rng = np.random.default_rng([seed, 0x0153])
    chroma = rng.standard_normal((h + 64, w + 64, 3), dtype=np.float32)
    lum = rng.standard_normal((h + 64, w + 64, 1), dtype=np.float32)
    return (0.85 * lum + 0.53 * chroma).astype(np.float32)


def _noise_crop(bank: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    oy, ox = int(rng.integers(0, bank.shape[0] - h + 1)), int(rng.integers(0, bank.shape[1] - w + 1))
    return bank[oy : oy + h, ox : ox + w]


class SmearSynthesizer:
    """Independent synthetic smear frames, deterministic per ``(seed, index)``.

    ``size`` is ``(height, width)``. :meth:`render` returns ``(image RGB uint8 HxWx3, boxes [N,4] float32
    xyxy pixels, labels [N] int64)`` with labels indexing :data:`smearsight.catalog.TPS_CLASS_NAMES`.
    """

    def __init__(self, seed: int, size: tuple[int, int] = (768, 1024)):
        self.seed = int(seed)
        self.size = (int(size[0]), int(size[1]))
        if self.size[0] < 16 or self.size[1] < 16:
            raise InputError(f"size: {size} is too small (expected at least 16x16 pixels)")
        self.textures = make_textures(np.random.default_rng([self.seed, 0x7E47]))
        self._noise = _noise_bank(self.seed, *self.size)
        self.class_names: tuple[str, ...] = TPS_CLASS_NAMES

    def scene(self, index: int) -> tuple[Scene, object, np.random.Generator]:
        rng = np.random.default_rng([self.seed, int(index), 0x5EA7])
        style = make_style(rng)
        h, w = self.size
        scene = make_scene(rng, style, -_MARGIN, -_MARGIN, w + 2 * _MARGIN, h + 2 * _MARGIN)
        return scene, style, rng

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render frame ``index``: ``(image, boxes, labels)``."""
        scene, style, rng = self.scene(index)
        h, w = self.size
        nuc, cyto = render_od([scene], style, self.textures, 0, 0, w, h)
        rgb = od_to_rgb(nuc, cyto, style, illumination_map(style, h, w))
        image = to_uint8(rgb, _noise_crop(self._noise, h, w, rng), style.noise_sigma)
        boxes, labels = window_annotations([scene], 0, 0, w, h)
        return image, boxes, labels


class SyntheticSlide:
    """One large virtual slide, rendered lazily in cached tiles, seen through a moving camera.

    ``slide_size`` and ``frame_size`` are ``(height, width)``. Nothing is rendered at construction; a
    tile (1024x1024) is rendered the first time a frame needs it (~0.1 s) and kept in an LRU cache.
    """

    TILE = 1024

    def __init__(
        self,
        seed: int,
        slide_size: tuple[int, int] = (6144, 8192),
        frame_size: tuple[int, int] = (768, 1024),
        *,
        max_cached_tiles: int = 16,
    ):
        self.seed = int(seed)
        self.slide_size = (int(slide_size[0]), int(slide_size[1]))
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        if self.frame_size[0] > self.slide_size[0] or self.frame_size[1] > self.slide_size[1]:
            (fh, fw), (sh, sw) = self.frame_size, self.slide_size
            raise InputError(f"the frame ({fw}x{fh}, WxH) does not fit on the slide ({sw}x{sh}, WxH)")
        self.class_names: tuple[str, ...] = TPS_CLASS_NAMES
        self.style = make_style(np.random.default_rng([self.seed, 0x511DE]))
        self.textures = make_textures(np.random.default_rng([self.seed, 0x7E47]))
        fh, fw = self.frame_size
        self._illum = np.repeat(illumination_map(self.style, fh, fw)[..., None], 3, axis=2)
        self._noise = _noise_bank(self.seed, fh, fw)
        self._blocks: dict[tuple[int, int], Scene] = {}
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._max_tiles = max(4, int(max_cached_tiles))
        self._lock = threading.RLock()
        self.n_rows = math.ceil(self.slide_size[0] / self.TILE)
        self.n_cols = math.ceil(self.slide_size[1] / self.TILE)

    def _block(self, r: int, c: int) -> Scene | None:
        if not (0 <= r < self.n_rows and 0 <= c < self.n_cols):
            return None
        key = (r, c)
        if key not in self._blocks:
            rng = np.random.default_rng([self.seed, r, c, 0xB10C])
            t = self.TILE
            h = min(t, self.slide_size[0] - r * t)
            w = min(t, self.slide_size[1] - c * t)
            self._blocks[key] = make_scene(rng, self.style, c * t, r * t, w, h)
        return self._blocks[key]

    def _neighbours(self, r: int, c: int) -> list[Scene]:
        return [s for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (s := self._block(r + dr, c + dc)) is not None]

    def _tile(self, r: int, c: int) -> np.ndarray:
        key = (r, c)
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
            return tile
        t = self.TILE
        h = min(t, self.slide_size[0] - r * t)
        w = min(t, self.slide_size[1] - c * t)
        nuc, cyto = render_od(self._neighbours(r, c), self.style, self.textures, c * t, r * t, w, h)
        tile = to_uint8(od_to_rgb(nuc, cyto, self.style), None, 0.0)
        self._tiles[key] = tile
        while len(self._tiles) > self._max_tiles:
            self._tiles.popitem(last=False)
        return tile

    def _clamp(self, x: float, y: float) -> tuple[int, int]:
        fh, fw = self.frame_size
        xi = int(min(max(round(float(x)), 0), self.slide_size[1] - fw))
        yi = int(min(max(round(float(y)), 0), self.slide_size[0] - fh))
        return xi, yi

    def clean_view(self, x: float, y: float) -> np.ndarray:
        """The slide itself (no vignetting or camera noise) under the frame whose top-left is (x, y)."""
        fh, fw = self.frame_size
        xi, yi = self._clamp(x, y)
        out = np.empty((fh, fw, 3), np.uint8)
        t = self.TILE
        with self._lock:
            for r in range(yi // t, (yi + fh - 1) // t + 1):
                for c in range(xi // t, (xi + fw - 1) // t + 1):
                    tile = self._tile(r, c)
                    ty0, tx0 = max(yi, r * t), max(xi, c * t)
                    ty1, tx1 = min(yi + fh, r * t + tile.shape[0]), min(xi + fw, c * t + tile.shape[1])
                    out[ty0 - yi : ty1 - yi, tx0 - xi : tx1 - xi] = tile[
                        ty0 - r * t : ty1 - r * t, tx0 - c * t : tx1 - c * t
                    ]
        return out

    def frame_at(
        self, x: float, y: float, *, with_boxes: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The camera frame (RGB uint8, ``frame_size``) whose top-left corner is at slide pixel (x, y).

        Positions are rounded to whole pixels and clamped to the slide. The same (x, y) always gives the
        same frame. With ``with_boxes`` returns ``(image, boxes [N,4] float32 in frame pixels, labels [N])``
        for the cells visible in the frame (boxes clipped; cells less than 45% inside are left out).
        """
        xi, yi = self._clamp(x, y)
        clean = self.clean_view(xi, yi)
        rng = np.random.default_rng([self.seed, xi, yi, 0xF4A3])
        rgb = cv2.multiply(clean, self._illum, dtype=cv2.CV_32F)
        fh, fw = self.frame_size
        image = to_uint8(rgb, _noise_crop(self._noise, fh, fw, rng), self.style.noise_sigma)
        if not with_boxes:
            return image
        boxes, labels = self.boxes_at(xi, yi)
        return image, boxes, labels

    def boxes_at(self, x: float, y: float) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (frame pixels, clipped) and labels of the cells visible in the frame at (x, y)."""
        xi, yi = self._clamp(x, y)
        fh, fw = self.frame_size
        t = self.TILE
        with self._lock:
            self.clean_view(xi, yi)  # every cell reaching into the frame gets drawn, so its box is known
            scenes = [
                s
                for r in range(yi // t - 1, (yi + fh - 1) // t + 2)
                for c in range(xi // t - 1, (xi + fw - 1) // t + 2)
                if (s := self._block(r, c)) is not None
            ]
            return window_annotations(scenes, xi, yi, fw, fh)

    def stage_path(self, speed_px_per_frame: float = 4.0) -> Iterator[tuple[float, float]]:
        """An endless serpentine scan of frame positions (top-left x, y), ``speed`` px per frame.

        Rows are 3/4 of a frame apart; the stage sweeps a row, steps down, sweeps back, and at the bottom
        reverses and scans back up.
        """
        speed = float(speed_px_per_frame)
        if not speed > 0:
            raise InputError(f"speed_px_per_frame: {speed_px_per_frame} must be > 0")
        fh, fw = self.frame_size
        x_max, y_max = self.slide_size[1] - fw, self.slide_size[0] - fh
        step = max(1.0, 0.75 * fh)
        rows = [min(i * step, y_max) for i in range(int(math.ceil(y_max / step)) + 1)] if y_max > 0 else [0.0]
        order = rows + rows[-2:0:-1] if len(rows) > 1 else rows
        x, direction = 0.0, 1.0
        i = 0
        while True:
            y = order[i % len(order)]
            y_next = order[(i + 1) % len(order)]
            target = x_max if direction > 0 else 0.0
            while (target - x) * direction > 0:
                yield x, y
                x = min(x + speed, x_max) if direction > 0 else max(x - speed, 0.0)
            yield x, y
            dy = 1.0 if y_next > y else -1.0
            while (y_next - y) * dy > 0:
                y = min(y + speed, y_next) if dy > 0 else max(y - speed, y_next)
                yield x, y
            direction = -direction
            i += 1


# --------------------------------------------------------------------------------------------- dataset


def _encode_jpeg(image_rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        int(quality),
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        cv2.IMWRITE_JPEG_OPTIMIZE,
        1,
    ]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:  # pragma: no cover - OpenCV failure
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _write_file(path: Path, data: bytes) -> None:
    """Temp file + rename, no fsync per image (the annotation files, written last, are durable); 0644, as
    images are meant to be shared."""
    atomic_write_bytes(path, data, 0o644, durable=False)


def split_indices(n_images: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic 80/20 train/val split of ``range(n_images)`` (val has >= 1 image when n >= 2)."""
    n_val = int(round(0.2 * n_images))
    if n_images >= 2:
        n_val = max(1, n_val)
    perm = np.random.default_rng([int(seed), 0x5B117]).permutation(n_images)
    val = sorted(int(i) for i in perm[:n_val])
    val_set = set(val)
    return [i for i in range(n_images) if i not in val_set], val


def generate_dataset(
    out_dir: str | os.PathLike[str],
    n_images: int,
    seed: int,
    size: tuple[int, int] = (768, 1024),
    preview: bool = False,
    *,
    progress: bool = True,
    quality: int = JPEG_QUALITY,
) -> dict:
    """Render ``n_images`` frames into ``out_dir/images/`` and write COCO ``train``/``val`` annotations.

    Images are JPEG (quality 95, 4:4:4 chroma). The split is 80/20 and deterministic; the same arguments
    give byte-identical files. With ``preview`` a contact sheet is written to ``out_dir/preview.png``.
    An existing ``out_dir`` is written over; its earlier ``train``/``val`` annotations and preview are
    removed before the first frame, so a run cut short (Ctrl-C, a full disk) leaves no annotation file
    describing other pixels.
    Returns a summary: counts per split and class, file paths, and the mean render time per frame.
    """
    from smearsight.train.datasets.coco import write_coco
    from smearsight.train.datasets.records import DetectionDataset, ImageRecord

    n_images = int(n_images)
    if n_images < 1:
        raise InputError(f"--images: {n_images} must be at least 1")
    if int(seed) < 0:
        raise InputError(f"--seed: {seed} must be 0 or more")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder (expected an output folder for the dataset)")
    check_output_dir(out)
    if (out / "images").exists() and not (out / "images").is_dir():
        raise InputError(f"--out {out}: {out / 'images'} is a file; expected a folder for the frames")
    synth = SmearSynthesizer(seed, size)
    # Annotations of an earlier run go first: were this run cut short, they would describe its new pixels.
    for old in (out / "annotations" / "train.json", out / "annotations" / "val.json", out / "preview.png"):
        old.unlink(missing_ok=True)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    h, w = synth.size
    records: list[ImageRecord] = []
    counts = np.zeros(len(TPS_CLASS_NAMES), np.int64)
    keep: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    render_s = 0.0
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("rendering smears", total=n_images)
        for i in range(n_images):
            t0 = time.perf_counter()
            image, boxes, labels = synth.render(i)
            render_s += time.perf_counter() - t0
            path = images_dir / f"synth_{i:05d}.jpg"
            _write_file(path, _encode_jpeg(image, quality))
            records.append(ImageRecord(path, w, h, boxes, labels, image_id=i + 1))
            counts += np.bincount(labels, minlength=len(counts))
            if preview and len(keep) < 4:
                keep.append((image, boxes, labels))
            bar.advance(task)
    train_idx, val_idx = split_indices(n_images, seed)
    names = list(TPS_CLASS_NAMES)
    paths = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        ds = DetectionDataset(names, [records[i] for i in idx], root=out, split=split)
        paths[split] = str(write_coco(ds, out, split))
    preview_path = None
    if preview:
        preview_path = str(make_preview(keep, out / "preview.png"))
    return {
        "images": n_images,
        "train_images": len(train_idx),
        "val_images": len(val_idx),
        "boxes": int(counts.sum()),
        "boxes_per_class": {n: int(c) for n, c in zip(names, counts, strict=True)},
        "annotations": paths,
        "preview": preview_path,
        "render_ms_per_frame": 1000.0 * render_s / n_images,
        "size": [h, w],
    }


# --------------------------------------------------------------------------------------------- preview


def _rgb_color(k: int) -> tuple[int, int, int]:
    b, g, r = TPS_CLASSES[k].color_bgr
    return int(r), int(g), int(b)


def _draw_boxes(
    img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scale: float, ox: float = 0.0, oy: float = 0.0
) -> None:
    for (x1, y1, x2, y2), k in zip(boxes, labels, strict=True):
        p1 = (int(round((x1 - ox) * scale)), int(round((y1 - oy) * scale)))
        p2 = (int(round((x2 - ox) * scale)) - 1, int(round((y2 - oy) * scale)) - 1)
        cv2.rectangle(img, p1, p2, _rgb_color(int(k)), 1, cv2.LINE_8)


def make_preview(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | os.PathLike[str], width: int = 1280
) -> Path:
    """Contact sheet PNG: up to 4 frames with boxes, 3x zooms on one cell of each class, and a legend."""
    if not samples:
        raise InputError("preview: no images to show")
    cols = 2
    tw = width // cols
    h0, w0 = samples[0][0].shape[:2]
    th = int(round(h0 * tw / w0))
    rows = math.ceil(len(samples) / cols)
    grid = np.full((rows * th, width, 3), 255, np.uint8)
    for n, (img, boxes, labels) in enumerate(samples):
        s = tw / img.shape[1]
        thumb = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        _draw_boxes(thumb, boxes, labels, s)
        r, c = divmod(n, cols)
        grid[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = thumb
    # Zooms: one instance of each class (largest first), centred, 3x nearest-neighbour.
    zoom, crop = 3, max(24, min(96, h0 // 2, w0 // 2))
    cell = crop * zoom
    per_row = width // cell
    tiles = []
    for k in range(len(TPS_CLASSES)):
        for img, boxes, labels in samples:
            hits = np.flatnonzero(labels == k)
            inside = [
                i
                for i in hits
                if boxes[i, 0] > 1
                and boxes[i, 1] > 1
                and boxes[i, 2] < img.shape[1] - 1
                and boxes[i, 3] < img.shape[0] - 1
            ]
            if inside:
                i = inside[len(inside) // 2]
                cx, cy = (boxes[i, 0] + boxes[i, 2]) / 2, (boxes[i, 1] + boxes[i, 3]) / 2
                x0 = int(min(max(cx - crop / 2, 0), img.shape[1] - crop))
                y0 = int(min(max(cy - crop / 2, 0), img.shape[0] - crop))
                z = cv2.resize(img[y0 : y0 + crop, x0 : x0 + crop], (cell, cell), interpolation=cv2.INTER_NEAREST)
                _draw_boxes(z, boxes, labels, zoom, x0, y0)
                cv2.putText(
                    z, TPS_CLASSES[k].display, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA
                )
                tiles.append(z)
                break
    zrows = math.ceil(len(tiles) / per_row) if tiles else 0
    zgrid = np.full((zrows * cell, width, 3), 255, np.uint8)
    for n, z in enumerate(tiles):
        r, c = divmod(n, per_row)
        zgrid[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = z
    counts = np.bincount(np.concatenate([s[2] for s in samples]), minlength=len(TPS_CLASSES))
    legend = np.full((34, width, 3), 255, np.uint8)
    x = 8
    for k, cls in enumerate(TPS_CLASSES):
        cv2.rectangle(legend, (x, 9), (x + 16, 25), _rgb_color(k), -1)
        text = f"{cls.display} ({counts[k]})"
        cv2.putText(legend, text, (x + 22, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += 30 + cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0]
    sheet = np.concatenate([legend, grid, zgrid], axis=0)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    path = Path(path)
    _write_file(path, buf.tobytes())
    return path
