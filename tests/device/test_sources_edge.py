"""Frame-source edge cases a technician meets: odd files in an image folder, URIs copied from a file manager,
cameras named by their device path. Real files written with OpenCV; a fake ``cv2.VideoCapture`` only where
a camera would be needed."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from smearsight.device.sources import open_source  # noqa: E402


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width`` x ``height`` pixels (the data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_an_image_too_large_to_decode_is_skipped_not_the_end_of_the_folder(tmp_path: Path) -> None:
    for i in (0, 2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((40, 50, 3), 60 + i, np.uint8))
    (tmp_path / "1.png").write_bytes(_png_header_only(100_000, 100_000))  # over OpenCV's pixel limit
    with open_source(f"file://{tmp_path}/") as src:
        shown = [int(f.image[0, 0, 0]) for f in src]
    assert shown == [60, 62]  # before: reading stopped at 1.png with OpenCV's multi-line assertion text
    assert src.error == "" and src.stats.skipped == 1
    (problem,) = src.stats.problems
    assert problem.startswith("skipped 1.png:") and "\n" not in problem


class _RecordingCamera:
    """A fake ``cv2.VideoCapture`` (no camera on CI) that records how it was opened."""

    opened: list[tuple[object, int]] = []

    def __init__(self, target: object, api: int) -> None:
        _RecordingCamera.opened.append((target, api))

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True

    def set(self, prop: int, value: float) -> bool:
        return True

    def read(self) -> tuple[bool, np.ndarray]:
        return True, np.zeros((32, 32, 3), np.uint8)

    def release(self) -> None:
        pass


def test_a_camera_named_by_its_device_path_is_a_camera_not_a_video_file(tmp_path: Path) -> None:
    # /dev/video0 typed without v4l2:// was opened as a video file: no reconnect, the run ended at unplugging
    node = tmp_path / "usb-Microscope_Cam-video-index0"
    node.symlink_to("/dev/null")  # a character device, as a udev by-id link to /dev/videoN is
    _RecordingCamera.opened = []
    with open_source(str(node), capture_factory=_RecordingCamera) as src:
        assert src.live and src.uri == f"v4l2://{node}"
        assert not next(src).stale
    assert _RecordingCamera.opened[0][1] == cv2.CAP_V4L2
    # a camera not plugged in yet is waited for, not refused as an unknown source
    with open_source("/dev/video97", capture_factory=_RecordingCamera, backoff_initial=0.05, stall_s=0.05) as src:
        frame = next(src)
        assert frame.stale and src.live
        assert "/dev/video97 not found" in src.status


def test_a_file_uri_copied_from_a_file_manager_is_unescaped(tmp_path: Path) -> None:
    from urllib.parse import quote

    folder = tmp_path / "slide 3 (50%)"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), np.full((20, 30, 3), 70, np.uint8))
    # a file manager's "copy" gives file:///.../slide%203%20(50%25)/: before, "no such file"
    with open_source(f"file://{quote(str(folder))}/") as src:
        assert [int(f.image[0, 0, 0]) for f in src] == [70]
    literal = tmp_path / "a%20b"  # a name that really holds %20 is still found as it is
    literal.mkdir()
    cv2.imwrite(str(literal / "0.png"), np.full((20, 30, 3), 90, np.uint8))
    with open_source(f"file://{literal}/") as src:
        assert [int(f.image[0, 0, 0]) for f in src] == [90]


def test_a_single_image_file_is_read_like_an_image_in_a_folder(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255
    picture = Image.fromarray(pixels)
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90°": how a camera held upright marks a portrait JPEG
    picture.save(tmp_path / "upright.jpg", exif=exif)
    with open_source(f"file://{tmp_path}/upright.jpg") as single:
        one = [f.image.shape for f in single]
    with open_source(f"file://{tmp_path}/") as folder:
        assert [f.image.shape for f in folder] == [(80, 40, 3)]
    assert one == [(80, 40, 3)]  # before: (40, 80, 3), the video decoder ignores the orientation
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with open_source(f"file://{tmp_path}/bad.png") as bad:
        assert list(bad) == []
    assert bad.stats.problems == {"skipped bad.png: not a readable image": 1}
    looping = open_source(str(tmp_path / "upright.jpg"), loop=True)
    try:
        assert len([next(looping) for _ in range(3)]) == 3
    finally:
        looping.close()


class _SettingsCamera(_RecordingCamera):
    settings: dict[int, float] = {}

    def set(self, prop: int, value: float) -> bool:
        _SettingsCamera.settings[prop] = value
        return True


def test_a_camera_uri_asks_for_its_size_and_rate(tmp_path: Path) -> None:
    from smearsight.errors import InputError

    node = tmp_path / "video0"
    node.write_text("")
    _RecordingCamera.opened, _SettingsCamera.settings = [], {}
    # smearsight run passes only the URI: before, the query became part of the device path, and the
    # screen said "camera lost: ...video0?width=1920&height=1080 not found" for ever
    with open_source(f"v4l2://{node}?width=1920&height=1080&fps=15", capture_factory=_SettingsCamera) as src:
        assert not next(src).stale
    assert _RecordingCamera.opened[0][0] == str(node)
    assert _SettingsCamera.settings == {cv2.CAP_PROP_FRAME_WIDTH: 1920.0, cv2.CAP_PROP_FRAME_HEIGHT: 1080.0,
                                        cv2.CAP_PROP_FPS: 15.0}
    with open_source("csi://1?width=1280&height=720", capture_factory=_RecordingCamera) as src:
        next(src)
    assert "sensor-id=1 " in str(_RecordingCamera.opened[-1][0])
    assert "width=(int)1280, height=(int)720" in str(_RecordingCamera.opened[-1][0])
    with pytest.raises(InputError, match=r"unknown parameter\(s\) size \(expected width, height, fps\)"):
        open_source(f"v4l2://{node}?size=1920x1080", capture_factory=_SettingsCamera)
    with pytest.raises(InputError, match="width must be a whole number greater than 0, got 'wide'"):
        open_source(f"v4l2://{node}?width=wide", capture_factory=_SettingsCamera)


def test_hidden_files_in_an_image_folder_are_not_frames(tmp_path: Path) -> None:
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((20, 30, 3), 40 * (i + 1), np.uint8))
        # a folder copied from a Mac onto a USB stick: "._0.png" holds Finder metadata, not a picture
        (tmp_path / f"._{i}.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    with open_source(f"file://{tmp_path}/") as src:
        assert [int(f.image[0, 0, 0]) for f in src] == [40, 80]
    assert src.stats.skipped == 0 and src.stats.problems == {}  # before: one "not a readable image" per file
    (tmp_path / "0.png").unlink()
    (tmp_path / "1.png").unlink()
    from smearsight.errors import InputError

    with pytest.raises(InputError, match="no images found"):
        open_source(f"file://{tmp_path}/")
