"""Frame sources: real videos and image folders written with OpenCV, read back through file:// URIs;
camera loss/reconnect through a fake ``cv2.VideoCapture`` (the hardware edge: no camera on CI)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from smearsight.device.sources import Frame, open_source, to_rgb_frame  # noqa: E402
from smearsight.errors import InputError  # noqa: E402

# RGB colours; frames are written as BGR by OpenCV and must come back as RGB.
COLORS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220)]


def _frame_rgb(i: int, h: int = 96, w: int = 128) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = COLORS[i % len(COLORS)]
    return img


def _write_video(path: Path, n: int, fps: float = 10.0) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (128, 96))
    assert writer.isOpened()
    for i in range(n):
        writer.write(cv2.cvtColor(_frame_rgb(i), cv2.COLOR_RGB2BGR))
    writer.release()


def _close_to(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 25) -> bool:
    centre = img[img.shape[0] // 4 : 3 * img.shape[0] // 4, img.shape[1] // 4 : 3 * img.shape[1] // 4]
    return bool(np.all(np.abs(centre.reshape(-1, 3).mean(0) - np.array(rgb)) < tol))


def test_video_file_roundtrip_rgb_order(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    _write_video(video, 12)
    with open_source(f"file://{video}") as src:
        frames = list(src)
    assert len(frames) == 12
    assert [f.index for f in frames] == list(range(12))
    for i, f in enumerate(frames):
        assert isinstance(f, Frame) and not f.stale
        assert f.image.dtype == np.uint8 and f.image.shape == (96, 128, 3)
        assert _close_to(f.image, COLORS[i % len(COLORS)]), (i, f.image[48, 64])
    assert src.stats.dropped == 0
    assert src.finished and src.status == "" and src.error == ""  # a normal end is not a problem


def test_video_file_loop(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    _write_video(video, 5)
    src = open_source(f"file://{video}", loop=True)
    try:
        frames = [next(src) for _ in range(13)]
    finally:
        src.close()
    assert [f.index for f in frames] == list(range(13))
    for i, f in enumerate(frames):
        assert _close_to(f.image, COLORS[(i % 5) % len(COLORS)])


def test_image_dir_sorted_with_corrupt_and_wrong_size(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), cv2.cvtColor(_frame_rgb(i), cv2.COLOR_RGB2BGR))
    (folder / "img_002b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    cv2.imwrite(str(folder / "img_003b.png"), np.zeros((50, 60, 3), np.uint8))  # wrong size
    (folder / "notes.txt").write_text("ignored: not an image extension")
    with open_source(f"file://{folder}/", expect_size=(96, 128)) as src:
        frames = list(src)
    assert len(frames) == 5
    for i, f in enumerate(frames):
        assert _close_to(f.image, COLORS[i], tol=2)
    assert src.stats.skipped == 2
    assert "img_002b.png" in src.status or "60x50" in src.status  # the last warning is still shown
    # every skip is kept, not only the latest, and counted once per frame skipped
    assert len(src.stats.problems) == 2 and sum(src.stats.problems.values()) == 2
    assert any("img_002b.png" in m for m in src.stats.problems) and any("60x50" in m for m in src.stats.problems)


def test_image_dir_loop_and_grayscale(tmp_path: Path) -> None:
    folder = tmp_path / "gray"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((40, 50), 50 * (i + 1), np.uint8))
    src = open_source(f"file://{folder}", loop=True)
    frames = [next(src) for _ in range(7)]
    src.close()
    assert [int(f.image[0, 0, 0]) for f in frames] == [50, 100, 150, 50, 100, 150, 50]
    assert all(f.image.shape == (40, 50, 3) for f in frames)


def test_bad_uris_raise_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        open_source(f"file://{tmp_path}/missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        open_source(f"file://{tmp_path}/empty/")
    with pytest.raises(InputError, match="unknown source"):
        open_source("rtsp://camera/stream")
    with pytest.raises(InputError, match="csi://N"):
        open_source("csi://front")
    with pytest.raises(InputError, match="unknown parameter"):
        open_source("synth://?seed=1&colour=red")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(InputError, match="cannot open it as a video"):
        open_source(f"file://{bad}")
    for size in ("0x0", "-640x480", "640x8"):
        with pytest.raises(InputError, match="at least 16 pixels"):
            open_source(f"synth://?size={size}")


def test_folder_of_only_unreadable_images_ends_with_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"garbage, not a jpeg")
    with open_source(f"file://{tmp_path}/") as src:
        assert list(src) == []
        assert src.finished
        assert "no readable frames" in src.error
        assert src.stats.skipped == 1


def test_looped_video_that_vanishes_ends_with_an_error(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    _write_video(video, 3)
    src = open_source(f"file://{video}", loop=True, queue_size=1)
    try:
        first = next(src)
        video.unlink()  # gone before the second pass: the capture thread must not die with a traceback
        rest = list(src)
    finally:
        src.close()
    assert first.index == 0 and len(rest) == 2
    assert "could not start it again" in src.error and "clip.mp4" in src.error


def test_gstreamer_sources_refused_without_gstreamer() -> None:
    from smearsight.opencv_setup import inspect_opencv

    if inspect_opencv().gstreamer:
        pytest.skip("this OpenCV has GStreamer; the refusal path cannot be exercised")
    with pytest.raises(InputError, match="without GStreamer"):
        open_source("csi://0")
    with pytest.raises(InputError, match="without GStreamer"):
        open_source("videotestsrc ! videoconvert ! appsink")


def test_to_rgb_frame_validation() -> None:
    from smearsight.device.sources import CorruptFrame

    bgr = np.zeros((20, 20, 3), np.uint8)
    bgr[..., 0] = 255  # blue in BGR
    assert tuple(to_rgb_frame(bgr, bgr=True)[0, 0]) == (0, 0, 255)
    assert to_rgb_frame(np.zeros((20, 20, 4), np.uint8), bgr=True).shape == (20, 20, 3)
    assert to_rgb_frame(np.full((20, 20), 4096, np.uint16), bgr=True)[0, 0, 0] == 16
    for bad in (np.zeros((0, 0, 3), np.uint8), np.zeros((20, 20, 2), np.uint8), np.zeros((8, 8, 3), np.uint8),
                np.zeros((20, 20, 3), np.float32), None):
        with pytest.raises(CorruptFrame):
            to_rgb_frame(bad, bgr=True)


# ------------------------------------------------------------------ live cameras (fake capture at the edge)
class FakeCamera:
    """Stands in for cv2.VideoCapture on a V4L2 device node: works while ``node`` exists."""

    opens = 0

    def __init__(self, node: Path, fail_first_opens: int = 0) -> None:
        self.node = node
        self.fail_first_opens = fail_first_opens
        self.count = 0

    def factory(self, target: object, api: int) -> FakeCamera.Handle:
        assert api == cv2.CAP_V4L2
        FakeCamera.opens += 1
        return FakeCamera.Handle(self, ok=self.node.exists() and FakeCamera.opens > self.fail_first_opens)

    class Handle:
        def __init__(self, cam: FakeCamera, ok: bool) -> None:
            self.cam, self.ok = cam, ok

        def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
            return self.ok

        def set(self, prop: int, value: float) -> bool:
            return True

        def read(self) -> tuple[bool, np.ndarray | None]:
            time.sleep(0.005)
            if not self.cam.node.exists():
                return False, None
            self.cam.count += 1
            img = np.zeros((48, 64, 3), np.uint8)
            img[..., 2] = min(self.cam.count, 255)  # red channel in BGR order = frame counter
            return True, img

        def release(self) -> None:
            self.ok = False


def test_camera_loss_and_reconnect(tmp_path: Path) -> None:
    node = tmp_path / "video0"
    node.write_text("")
    FakeCamera.opens = 0
    cam = FakeCamera(node)
    src = open_source(f"v4l2://{node}", capture_factory=cam.factory, backoff_initial=0.05, backoff_max=0.2,
                      stall_s=0.1)
    try:
        first = [next(src) for _ in range(3)]
        assert all(not f.stale for f in first)
        assert first[-1].image[0, 0, 0] > 0  # RGB: red carries the counter
        node.unlink()  # the camera is unplugged
        statuses, stale = set(), 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and stale < 3:
            f = next(src)
            statuses.add(src.status)
            stale += f.stale
        assert stale >= 3, "a lost camera must keep yielding stale frames for the screen"
        assert src.lost
        assert any(s.startswith("camera lost") and "retrying in" in s for s in statuses), statuses
        assert any("not found" in s or "disconnected" in s for s in statuses), statuses
        node.write_text("")  # plugged back in
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            f = next(src)
            if not f.stale:
                break
        assert not f.stale and f.index >= 3
        assert src.stats.reconnects == 1
        assert not src.lost
        assert src.status == "camera reconnected"
    finally:
        src.close()


def test_camera_not_there_at_start_then_appears(tmp_path: Path) -> None:
    node = tmp_path / "video1"
    FakeCamera.opens = 0
    cam = FakeCamera(node)
    src = open_source(f"v4l2://{node}", capture_factory=cam.factory, backoff_initial=0.05, backoff_max=0.1,
                      stall_s=0.05)
    try:
        f = next(src)
        assert f.stale and f.index == -1 and f.image.shape == (480, 640, 3)
        assert "not found" in src.status
        threading.Timer(0.2, node.write_text, args=("",)).start()
        deadline = time.monotonic() + 5
        while f.stale and time.monotonic() < deadline:
            f = next(src)
        assert not f.stale and f.index == 0
    finally:
        src.close()


def test_live_source_keeps_only_latest_and_counts_drops(tmp_path: Path) -> None:
    node = tmp_path / "video2"
    node.write_text("")
    FakeCamera.opens = 0
    cam = FakeCamera(node)
    src = open_source(f"v4l2://{node}", capture_factory=cam.factory)
    try:
        a = next(src)
        time.sleep(0.3)  # a slow consumer: ~60 frames were captured meanwhile
        b = next(src)
        assert b.index - a.index > 5
        assert src.stats.dropped > 5
        assert src.stats.captured >= b.index + 1
    finally:
        src.close()


def test_gstreamer_pipeline_string_goes_to_cap_gstreamer() -> None:
    seen: dict[str, object] = {}

    class Pipe:
        def __init__(self, target: str, api: int) -> None:
            seen["target"], seen["api"] = target, api

        def isOpened(self) -> bool:  # noqa: N802
            return True

        def read(self) -> tuple[bool, np.ndarray]:
            time.sleep(0.01)
            return True, np.zeros((32, 32, 3), np.uint8)

        def release(self) -> None:
            pass

    src = open_source("videotestsrc ! videoconvert", capture_factory=Pipe)
    try:
        next(src)
    finally:
        src.close()
    assert seen["api"] == cv2.CAP_GSTREAMER
    assert str(seen["target"]).startswith("videotestsrc ! videoconvert") and "appsink" in str(seen["target"])
    # a long pipeline is no file name (the path probe raised "File name too long")
    long = "videotestsrc is-live=true ! " + "videoconvert ! queue max-size-buffers=1 leaky=downstream ! " * 6
    with open_source(long + "appsink drop=true", capture_factory=Pipe) as src:
        next(src)
    assert seen["target"] == long + "appsink drop=true"


def _synth_available() -> bool:
    try:
        from smearsight.train.datasets.synth import SyntheticSlide  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _synth_available(), reason="smearsight.train.datasets.synth.SyntheticSlide not present yet")
def test_synth_source_moving_stage() -> None:
    src = open_source("synth://?seed=3&speed=8&size=256x192&slide=1024x768")
    try:
        frames = [next(src) for _ in range(4)]
    finally:
        src.close()
    assert all(f.image.shape == (192, 256, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert not np.array_equal(frames[0].image, frames[3].image), "the stage must move"
    again = open_source("synth://?seed=3&speed=8&size=256x192&slide=1024x768")
    try:
        assert np.array_equal(next(again).image, frames[0].image), "same seed, same first frame"
    finally:
        again.close()


def test_plain_paths_mean_files(tmp_path: Path) -> None:
    video = tmp_path / "plain.mp4"
    _write_video(video, 3)
    with open_source(str(video)) as src:
        assert src.uri == f"file://{video}"
        assert len(list(src)) == 3
    with pytest.raises(InputError, match="no such file"):
        open_source(str(tmp_path / "missing.avi"))


def test_read_with_timeout_and_finished(tmp_path: Path) -> None:
    video = tmp_path / "r.mp4"
    _write_video(video, 2)
    src = open_source(f"file://{video}")
    got = []
    deadline = time.monotonic() + 10
    while not src.finished and time.monotonic() < deadline:
        f = src.read(timeout=0.5)
        if f is not None:
            got.append(f.index)
    assert got == [0, 1] and src.finished
    assert src.read(timeout=0.01) is None
    with pytest.raises(StopIteration):
        next(src)
    src.close()


def test_image_dir_natural_order(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((20, 20), i, np.uint8))
    cv2.imwrite(str(tmp_path / "f20\u00b21.png"), np.full((20, 20), 99, np.uint8))  # '²' is a digit, not decimal
    with open_source(f"file://{tmp_path}/") as src:
        assert [int(f.image[0, 0, 0]) for f in src] == [1, 2, 10, 99]


def test_v4l2_device_names_map_to_indices(tmp_path: Path) -> None:
    from smearsight.device.sources import v4l2_index

    link = tmp_path / "usb-Microscope_Cam-video-index0"
    link.symlink_to("/dev/video7")
    assert v4l2_index(str(link)) == 7
    assert v4l2_index("/dev/video12") == 12
    assert v4l2_index(str(tmp_path)) is None


# ------------------------------------------------------------------ damaged files, odd names, rescans
def _write_numbered_avi(path: Path, n: int = 15) -> bytes:
    """An MJPG .avi of ``n`` frames (frame i shows the number i); returns its bytes."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for i in range(n):
        img = np.full((240, 320, 3), 200, np.uint8)
        cv2.putText(img, str(i), (50, 150), 0, 3, (0, 0, 0), 5)
        writer.write(img)
    writer.release()
    return path.read_bytes()


def _frame_chunks(data: bytes) -> list[int]:
    import re

    return [m.start() for m in re.finditer(b"00dc", data)][1:]  # the first is the header's stream list


def test_a_damaged_frame_mid_video_is_skipped_and_the_rest_read(tmp_path: Path) -> None:
    data = bytearray(_write_numbered_avi(tmp_path / "clip.avi"))
    start = _frame_chunks(bytes(data))[7] + 8 + 200  # inside frame 7's JPEG data
    data[start:start + 300] = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.avi"
    damaged.write_bytes(bytes(data))
    with open_source(f"file://{damaged}") as src:
        frames = list(src)
    assert len(frames) == 14  # before: the video ended silently at frame 7
    assert src.stats.skipped == 1 and src.error == ""
    assert any("damaged frame" in msg for msg in src.stats.problems)


def test_a_video_cut_short_says_so(tmp_path: Path) -> None:
    data = _write_numbered_avi(tmp_path / "clip.avi")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:_frame_chunks(data)[7]])  # the index still promises 15 frames
    with open_source(f"file://{cut}") as src:
        frames = list(src)
    assert len(frames) == 7
    assert "ended early, after 7 of its 15 frames" in src.error
    with open_source(f"file://{tmp_path / 'clip.avi'}") as whole:  # a whole file ends without a word
        assert len(list(whole)) == 15 and whole.error == "" and whole.stats.skipped == 0
    looping = open_source(f"file://{cut}", loop=True)
    try:
        assert len([next(looping) for _ in range(20)]) == 20  # a looping cut-short file starts again
    finally:
        looping.close()
    assert any("ended early" in msg for msg in looping.stats.problems)


def test_a_file_name_with_an_exclamation_mark_is_a_file_not_a_pipeline(tmp_path: Path) -> None:
    folder = tmp_path / "slide 3!"
    folder.mkdir()
    video = folder / "take!.mp4"
    _write_video(video, 3)
    for uri in (f"file://{video}", str(video)):
        with open_source(uri) as src:
            assert len(list(src)) == 3
    cv2.imwrite(str(folder / "0.png"), _frame_rgb(0))
    with open_source(f"file://{folder}/") as src:
        assert len(list(src)) == 1


def test_a_video_file_tells_its_frame_rate(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    _write_video(video, 3, fps=30.0)
    with open_source(f"file://{video}") as src:
        assert src.nominal_fps == pytest.approx(30.0)
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "0.png"), _frame_rgb(0))
    with open_source(f"file://{tmp_path}/images/") as folder:  # a folder of images has no rate
        assert folder.nominal_fps is None


def test_synth_uri_bad_seed_and_slide_are_one_line_errors() -> None:
    with pytest.raises(InputError, match=r"synth://\?seed=-1: seed must be 0 or more"):
        open_source("synth://?seed=-1")
    if not _synth_available():
        return
    with pytest.raises(InputError, match=r"synth://\?slide=100x100: the frame \(1024x768, WxH\) does not fit"):
        open_source("synth://?slide=100x100")


def test_looping_folder_is_read_again_each_pass(tmp_path: Path) -> None:
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((20, 30, 3), 50 * (i + 1), np.uint8))
    src = open_source(f"file://{tmp_path}/", loop=True, queue_size=1)
    try:
        first = [int(next(src).image[0, 0, 0]) for _ in range(2)]
        cv2.imwrite(str(tmp_path / "2.png"), np.full((20, 30, 3), 150, np.uint8))  # added during the run
        shown = [int(next(src).image[0, 0, 0]) for _ in range(8)]
        for p in tmp_path.glob("*.png"):
            p.unlink()
        list(src)
    finally:
        src.close()
    assert first == [50, 100] and 150 in shown
    assert "could not start it again" in src.error and "no images found" in src.error


@pytest.mark.parametrize(("pipeline", "live"), [
    ("filesrc location=slide.mp4 ! decodebin ! videoconvert", False),
    ("multifilesrc location=f%05d.png ! pngdec ! videoconvert", False),
    ("uridecodebin uri=file:///data/slide.mp4 ! videoconvert", False),
    ("uridecodebin uri=rtsp://cam/stream ! videoconvert", True),
    ("v4l2src device=/dev/video0 ! videoconvert", True),
])
def test_a_gstreamer_pipeline_from_a_file_ends_instead_of_reconnecting(pipeline: str, live: bool) -> None:
    """A filesrc pipeline that ends was taken for a lost camera and reopened for ever ("camera lost")."""

    class TwoFrames:  # what a pipeline gives: two frames, then the end of the stream
        frames = 0

        def __init__(self, target: str, api: int) -> None:
            pass

        def isOpened(self) -> bool:  # noqa: N802
            return True

        def read(self) -> tuple[bool, np.ndarray | None]:
            TwoFrames.frames += 1
            return (True, np.zeros((16, 16, 3), np.uint8)) if TwoFrames.frames <= 2 else (False, None)

        def get(self, prop: int) -> float:
            return 0.0  # no rate or frame count known

        def set(self, prop: int, value: float) -> bool:
            return False

        def release(self) -> None:
            pass

    src = open_source(pipeline, capture_factory=TwoFrames)
    try:
        assert src.live is live
        if not live:
            assert len(list(src)) == 2 and src.finished and not src.error
    finally:
        src.close()


def test_image_names_equal_as_numbers_sort_the_same_whatever_the_listing_order() -> None:
    from pathlib import Path

    from smearsight.device.sources import _natural_key

    names = [Path("f10.png"), Path("f01.png"), Path("f1.png"), Path("f2.png")]
    assert [p.name for p in sorted(names, key=_natural_key)] == ["f01.png", "f1.png", "f2.png", "f10.png"]
    assert sorted(names, key=_natural_key) == sorted(reversed(names), key=_natural_key)


def test_a_source_never_closed_does_not_abort_python_at_exit(tmp_path) -> None:
    """A library user who forgets close(): the capture thread, still decoding the video inside OpenCV when
    Python finalised, made the C++ runtime abort the process (exit 134, every time)."""
    import subprocess
    import sys

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 240))
    rng = np.random.default_rng(0)
    for _ in range(60):
        writer.write(rng.integers(0, 255, (240, 320, 3), np.uint8))
    writer.release()
    script = ("import sys; from smearsight.device.sources import open_source; "
              "src = open_source(sys.argv[1], drop=True); next(src)")
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", script, f"file://{video}"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr[-500:]


def test_stopping_a_capture_from_its_own_thread_does_not_try_to_join_it() -> None:
    """A source dropped without close() is collected on its capture thread as that thread ends; its finalizer
    then ran there and raised 'cannot join current thread' (an unraisable exception in the log)."""
    import queue
    import threading

    from smearsight.device.sources import _stop_capture

    stop, q, errors = threading.Event(), queue.Queue(), []

    def capture() -> None:
        try:
            _stop_capture(stop, q, threading.current_thread())
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=capture)
    thread.start()
    thread.join(5)
    assert stop.is_set() and errors == []
