"""Reading images and their sizes for the dataset readers.

Sizes are read from the file header where the format allows it (PNG, JPEG, BMP; other formats
fall back to a full OpenCV decode), so that readers which must learn an image's size (YOLO) do not decode
every pixel. EXIF orientation is ignored everywhere: boxes are in the pixel grid of the stored raster,
which is what the header reports and what :func:`read_image_rgb` returns.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.errors import InputError, first_line, require
from smearsight.fileio import atomic_open

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# JPEG start-of-frame markers that carry the image size (not DHT C4, JPG C8, DAC CC).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _cv2():
    return require("cv2", "reading images")


_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_quiet_saved_level: int | None = None


@contextlib.contextmanager
def quiet_opencv(cv2: Any) -> Iterator[None]:
    """OpenCV's log off for a decode whose failure the caller reports in one line itself (OpenCV logs a broken
    file at its ERROR level, e.g. ``readHeader IHDR chunk shall be first``; only FATAL stays on).

    OpenCV's log level is process-wide: overlapping uses from several threads keep it off until the last one
    leaves, which restores the level found by the first.
    """
    global _quiet_depth, _quiet_saved_level
    log = getattr(getattr(cv2, "utils", None), "logging", None)
    if log is None:
        yield
        return
    with _QUIET_LOCK:
        if _quiet_depth == 0:
            _quiet_saved_level = log.getLogLevel()
            log.setLogLevel(log.LOG_LEVEL_FATAL)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved_level is not None:
                log.setLogLevel(_quiet_saved_level)


def read_image_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file into an ``HxWx3`` uint8 RGB array.

    Raises :class:`InputError` naming the file when it is missing or cannot be decoded. Grayscale and
    16-bit images are converted to 8-bit RGB; EXIF orientation is ignored (stored raster order).
    """
    cv2 = _cv2()
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read image file ({exc.strerror or exc})") from None
    image = None
    if data.size:
        try:
            with quiet_opencv(cv2):  # a broken file (TIFF, PNG) is logged by OpenCV; the InputError says it once
                image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        except cv2.error as exc:  # e.g. a header claiming more pixels than OpenCV will allocate
            why = "too many pixels for OpenCV" if "MAX_IMAGE_PIXELS" in str(exc) else first_line(exc)
            raise InputError(f"{path}: not a decodable image ({why})") from None
    if image is None:
        raise InputError(f"{path}: not a decodable image (expected a JPEG, PNG, BMP, TIFF or WebP file)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def low_bit_depth_note(path: str | os.PathLike[str]) -> str | None:
    """A note when a 16-bit PNG/TIFF holds only low values (12-bit camera data in a 16-bit file, say).

    Every reader here, like OpenCV's, keeps the top 8 of the 16 bits, so such an image trains and runs as
    nearly black; the note says so, with the brightest value found. None for other images.
    """
    path = Path(path)
    if path.suffix.lower() not in (".png", ".tif", ".tiff"):
        return None
    if path.suffix.lower() == ".png" and _png_bit_depth(path) not in (None, 16):
        return None  # an 8-bit (or lower) PNG, said by its header: not decoded a second time
    cv2 = _cv2()
    try:
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error):
        return None
    return low_bit_depth_problem(path, image)


def low_bit_depth_problem(path: str | os.PathLike[str], image: np.ndarray | None) -> str | None:
    """:func:`low_bit_depth_note`'s words for an image already decoded at its own depth (None unless it is a
    16-bit image whose brightest value is below 4096)."""
    if image is None or image.dtype != np.uint16:
        return None
    peak = int(image.max())
    if peak >= 4096:
        return None
    return (f"{path}: a 16-bit image whose brightest value is {peak} (at most {peak.bit_length()}-bit data): "
            f"it is read as 8-bit by keeping the top 8 bits, so it looks nearly black (max {peak >> 8}); "
            "rescale it to 8-bit by its real bit depth first")


def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        w, h = struct.unpack(">II", head[16:24])
        return int(w), int(h)
    return None


def _png_bit_depth(path: Path) -> int | None:
    """The bit depth in a PNG's IHDR header; None when it cannot be read or is no PNG header."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(25)
    except OSError:
        return None
    return head[24] if len(head) == 25 and _png_size(head) is not None else None


def _jpeg_size(handle) -> tuple[int, int] | None:
    handle.seek(2)
    while True:
        byte = handle.read(1)
        if not byte:
            return None
        if byte != b"\xff":
            continue
        marker = handle.read(1)
        while marker == b"\xff":  # fill bytes
            marker = handle.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in (0x01, 0x00) or 0xD0 <= code <= 0xD9:
            if code == 0xD9:
                return None
            continue
        raw = handle.read(2)
        if len(raw) < 2:
            return None
        length = struct.unpack(">H", raw)[0]
        if length < 2:
            return None
        if code in _SOF_MARKERS:
            seg = handle.read(5)
            if len(seg) < 5:
                return None
            h, w = struct.unpack(">HH", seg[1:5])
            return int(w), int(h)
        handle.seek(length - 2, os.SEEK_CUR)


def image_size_from_header(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG/JPEG/BMP header without decoding; None for other formats or a bad header.

    Raises OSError when the file cannot be opened.
    """
    with open(path, "rb") as handle:
        head = handle.read(32)
        if (size := _png_size(head)) is not None:
            return size
        if head[:2] == b"\xff\xd8":
            return _jpeg_size(handle)
        if head[:2] == b"BM" and len(head) >= 26:
            if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit width and height
                w, h = struct.unpack("<HH", head[18:22])
            else:
                w, h = struct.unpack("<ii", head[18:26])
            return int(w), abs(int(h))
    return None


def image_size(path: str | os.PathLike[str], decode: bool = False) -> tuple[int, int]:
    """``(width, height)`` of an image file.

    With ``decode=False`` the header is read where possible (cheap); with ``decode=True`` the whole image
    is decoded with OpenCV, which also proves the pixels are readable. Raises :class:`InputError` naming
    the file when it is missing or unreadable.
    """
    path = Path(path)
    if not decode:
        try:
            size = image_size_from_header(path)
        except FileNotFoundError:
            raise InputError(f"{path}: image file not found") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read image file ({exc.strerror or exc})") from None
        if size is not None and size[0] > 0 and size[1] > 0:
            return size
    image = read_image_rgb(path)
    return int(image.shape[1]), int(image.shape[0])


def list_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursively, into symlinked folders too, each folder once), sorted."""
    if not directory.is_dir():
        return []
    found: list[Path] = []
    seen: set[str] = set()
    for folder, subdirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or a folder linked twice
            subdirs.clear()
            continue
        seen.add(real)
        found.extend(Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p for p in found if p.is_file())


def _source_image_root(root: Path | None, path: Path) -> Path | None:
    if root is None:
        return None
    for candidate in (root / "images", root / "JPEGImages", root):
        try:
            path.relative_to(candidate)
            return candidate
        except ValueError:
            continue
    return None


def _copy_atomic(src: Path, dest: Path, link: bool) -> None:
    import shutil

    if link:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
        try:
            os.link(src, tmp)
            os.replace(tmp, dest)
            return
        except OSError:
            tmp.unlink(missing_ok=True)  # another filesystem: fall back to a copy
    with open(src, "rb") as source, atomic_open(dest) as target:
        shutil.copyfileobj(source, target)


def place_images(
    paths: list[Path], source_root: Path | None, dest_dir: Path, mode: str = "copy", flat: bool = False
) -> list[Path]:
    """Copy (``mode="copy"``) or hard-link (``"link"``, copying across file systems) images into ``dest_dir``.

    Paths under the source dataset's image folder keep their relative sub-folders (unless ``flat``);
    names that would collide (same relative path without suffix) get ``_<n>`` appended to the stem.
    Each file is written to a temporary name and renamed. Files already in place are left alone.
    Returns the destination paths, in order. ``mode="none"`` returns ``paths`` unchanged.
    """
    if mode == "none":
        return [Path(p) for p in paths]
    if mode not in ("copy", "link"):
        raise ValueError(f"mode must be copy, link or none, not {mode!r}")
    out: list[Path] = []
    used: set[str] = set()
    for src in paths:
        src = Path(src)
        base = _source_image_root(source_root, src)
        rel = Path(src.name) if flat or base is None else Path(os.path.normpath(src.relative_to(base)))
        if rel.parts and rel.parts[0] == "..":  # a name like "../x.png" must not escape dest_dir
            rel = Path(src.name)
        key = rel.with_suffix("").as_posix().lower()
        n = 1
        while key in used:
            rel = rel.with_name(f"{src.stem}_{n}{src.suffix}")
            key = rel.with_suffix("").as_posix().lower()
            n += 1
        used.add(key)
        dest = dest_dir / rel
        if not (dest.exists() and src.exists() and os.path.samefile(src, dest)):
            if not src.is_file():
                raise InputError(f"{src}: image file not found (cannot copy it to {dest_dir})")
            _copy_atomic(src, dest, link=(mode == "link"))
        out.append(dest)
    return out
