"""Frame sources behind one URI scheme (after jetson-utils), each captured on its own thread.

URIs:

- ``v4l2:///dev/videoN``, a plain ``/dev/...`` path or a camera index (``0``, ``"0"``, ``v4l2://0``):
  ``cv2.VideoCapture`` with ``CAP_V4L2``.
- ``csi://N``: an ``nvarguscamerasrc`` GStreamer pipeline (Jetson CSI camera); needs an OpenCV built with
  GStreamer (the Jetson system OpenCV; pip wheels have none).
- ``v4l2://...?width=W&height=H&fps=F`` (or ``csi://N?...``) asks the camera for that size and rate.
- a raw GStreamer pipeline (any other string containing ``!`` that is not an existing path), ending in
  ``appsink``; one that starts from a file (``filesrc``, ``multifilesrc``, ``uridecodebin uri=file://...``)
  ends at the file's end like a video file, any other is live (a camera: reconnected when it stops).
- ``file://video.mp4``: a video file; ``file://dir/``: an image sequence in natural order (2 before 10);
  ``file://image.png``: one image.
  ``loop=True`` restarts at the end (a folder is listed again for each pass; hidden files are not frames).
- ``synth://?seed=S&speed=P[&fps=F&size=WxH&slide=WxH]``: a synthetic smear slide under a slowly moving stage
  (:class:`smearsight.train.datasets.synth.SyntheticSlide`).

Every source yields :class:`Frame` objects (RGB uint8 HxWx3). Capture runs on a thread into a bounded
queue. Live sources (cameras, GStreamer) keep only the latest frame and count the dropped ones; files,
image folders and ``synth://`` deliver every frame (the consumer sets the pace) unless ``drop=True``.
A camera that vanishes is retried with exponential backoff while :attr:`FrameSource.status` says so in
plain words; while it is gone, iteration yields the last good picture about once a second with
``Frame.stale = True`` so that a display can keep showing the message (skip inference on stale frames).
Corrupt frames (an unreadable image, a wrong shape or size, a video frame that does not decode) are skipped
with a status message; a video file that ends well before the frame count in its index says so in
:attr:`FrameSource.error`.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from smearsight.errors import InputError, require
from smearsight.threads import put_until_stopped

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg")
_FILE_EXT = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
_WARNING_HOLD_S = 5.0
MAX_DISTINCT_PROBLEMS = 50
MIN_FRAME_SIDE = 16  # synth:// sizes below this are a typo, not a camera

log = logging.getLogger(__name__)


@dataclass
class Frame:
    """One captured picture: ``image`` is RGB uint8 HxWx3; ``stale`` marks a repeat shown while the camera is lost."""

    image: np.ndarray
    index: int
    timestamp: float
    source: str
    stale: bool = False


class SourceLost(Exception):
    """Raised by a reader when the device stopped delivering (retried with backoff)."""


class CorruptFrame(Exception):
    """Raised by a reader for one unusable frame (skipped)."""


class EndedEarly(Exception):
    """Raised by a file reader that ended well before the frame count in its index (the end, said so)."""


_END = object()
# a video file whose read fails is read on this far: frames after a damaged one still decode
FILE_LOOKAHEAD_FRAMES = 25


# --------------------------------------------------------------------------------------------- readers
class _Reader:
    """A blocking frame reader. ``read`` returns an image, ``None`` at end of stream, or raises."""

    live = False
    bgr = True
    name = "source"

    def open(self) -> None:  # raises SourceLost (live) or InputError (finite)
        pass

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def rewind(self) -> None:
        self.close()
        self.open()

    def close(self) -> None:
        pass

    @property
    def nominal_fps(self) -> float | None:
        """The rate the frames were taken at, when the source says (a video file, a paced synthetic slide)."""
        return None


class _CaptureReader(_Reader):
    """Anything read through ``cv2.VideoCapture``: V4L2 cameras, GStreamer pipelines, video files."""

    def __init__(
        self,
        target: str | int,
        api: int,
        *,
        live: bool,
        name: str,
        capture_factory: Callable[[Any, int], Any] | None = None,
        device_path: str | None = None,
        props: dict[int, float] | None = None,
    ) -> None:
        self.target = target
        self.api = api
        self.live = live
        self.name = name
        self.device_path = device_path
        self.props = props or {}
        self._factory = capture_factory
        self._cap: Any = None
        self._held: np.ndarray | None = None  # the good frame found past undecodable ones (files)
        self._fps: float | None = None
        self._read = 0  # frames read from a file in this pass, good or not

    def open(self) -> None:
        import cv2

        if self.device_path is not None and not os.path.exists(self.device_path):
            raise SourceLost(f"camera lost: {self.device_path} not found")
        target = self.target
        if isinstance(target, str) and self.device_path is not None:
            index = v4l2_index(target)
            target = target if index is None else index
        if self._factory is not None:
            cap = self._factory(target, self.api)
        else:
            cap = cv2.VideoCapture(target, self.api)
        if not cap.isOpened():
            cap.release()
            if self.live:
                raise SourceLost(f"camera lost: {self.name} could not be opened")
            raise InputError(f"{self.name}: cannot open it as a video (missing file, or a codec OpenCV lacks)")
        for prop, value in self.props.items():
            cap.set(prop, value)
        if not self.live:  # a file's rate, read here, before the capture thread reads frames
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
            self._fps = fps if 0.5 <= fps <= 1000.0 else None
        self._cap = cap

    def read(self) -> np.ndarray | None:
        if self._cap is None:
            self.open()
        if self._held is not None:
            image, self._held = self._held, None
            return image
        ok, image = self._cap.read()
        if ok and image is not None:
            self._read += 1
            return image
        if self.live:
            gone = self.device_path is not None and not os.path.exists(self.device_path)
            raise SourceLost(f"camera lost: {self.device_path} disconnected" if gone
                             else "camera lost: no frames coming")
        return self._past_failed_read()

    def _past_failed_read(self) -> np.ndarray | None:
        """A file's read failed: a damaged frame when a later one decodes (raises CorruptFrame, the good frame
        comes next), else the end; a file that ends well before its stated frame count raises EndedEarly."""
        import cv2

        for failed in range(1, FILE_LOOKAHEAD_FRAMES + 1):
            ok, image = self._cap.read()
            if ok and image is not None:
                self._held = image
                at, self._read = self._read, self._read + failed + 1
                raise CorruptFrame(f"skipped {failed} damaged frame{'s' if failed > 1 else ''} at frame {at}")
        stated = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if stated > 0 and self._read < stated - max(2, stated // 50):  # the count is an estimate in some containers
            raise EndedEarly(f"{self.name}: ended early, after {self._read} of its {stated} frames "
                             "(the rest is damaged or missing)")
        return None

    def rewind(self) -> None:
        self._held, self._read = None, 0
        super().rewind()

    @property
    def nominal_fps(self) -> float | None:
        return None if self.live else self._fps

    def close(self) -> None:
        if self._cap is not None:
            try:
                self._cap.release()
            finally:
                self._cap = None


def _is_existing_path(text: str) -> bool:
    """True when ``text`` names an existing file or folder (False for what cannot be a path: a long pipeline)."""
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):
        return False


def _is_camera_device(text: str) -> bool:
    """True for a plain path that names a camera node: anything under /dev/ (present or not yet), or a
    character device elsewhere (a udev link such as /dev/v4l/by-id/... copied to another place)."""
    if text.startswith("/dev/"):
        return True
    try:
        return stat.S_ISCHR(os.stat(text).st_mode)
    except (OSError, ValueError):
        return False


def v4l2_index(path: str) -> int | None:
    """N for /dev/videoN or a udev symlink to it (/dev/v4l/by-id/...); None otherwise.

    Some OpenCV builds cannot open a V4L2 device by name, so the index is what gets passed.
    """
    match = re.fullmatch(r"/dev/video(\d+)", os.path.realpath(path))
    return int(match.group(1)) if match else None


def _natural_key(path: Path) -> tuple[list[Any], str]:
    """Sort key putting frame2.png before frame10.png; names equal as numbers (a1, a01) by their text, so the
    order never depends on the order the filesystem lists them in."""
    return [(0, int(t), "") if t.isdecimal() else (1, 0, t) for t in re.split(r"(\d+)", path.name)], path.name


class _DirReader(_Reader):
    """A sorted image sequence in a folder, or one image file (decoded the same way: EXIF orientation)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.files: list[Path] = []
        self._pos = 0

    def open(self) -> None:
        if self.directory.suffix.lower() in IMAGE_EXTENSIONS and self.directory.is_file():
            self.files, self._pos = [self.directory], 0
            return
        if not self.directory.is_dir():
            raise InputError(f"{self.name}: not a folder of images")
        self.files = sorted(
            (p for p in self.directory.iterdir()  # hidden files: "._x.png" is a Mac's metadata, not a picture
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()),
            key=_natural_key,
        )
        if not self.files:
            raise InputError(
                f"{self.name}: no images found (expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
            )
        self._pos = 0

    def read(self) -> np.ndarray | None:
        import cv2

        if self._pos >= len(self.files):
            return None
        path = self.files[self._pos]
        self._pos += 1
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as exc:
            raise CorruptFrame(f"skipped {path.name}: cannot read it ({exc.strerror})") from exc
        try:
            image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        except cv2.error as exc:  # e.g. more pixels than OpenCV decodes (CV_IO_MAX_IMAGE_PIXELS)
            reason = "too large to decode" if "MAX_IMAGE_PIXELS" in str(exc) else "OpenCV cannot decode it"
            raise CorruptFrame(f"skipped {path.name}: {reason}") from exc
        if image is None:
            raise CorruptFrame(f"skipped {path.name}: not a readable image")
        return image

    def rewind(self) -> None:
        self.open()  # again: images added or removed since the last pass count


class _SynthReader(_Reader):
    """Frames from a :class:`SyntheticSlide` along its serpentine stage path."""

    bgr = False

    def __init__(
        self,
        *,
        seed: int,
        speed: float,
        fps: float | None,
        frame_size: tuple[int, int] | None,
        slide_size: tuple[int, int] | None,
        name: str,
    ) -> None:
        self.name = name
        self.seed = seed
        self.speed = speed
        self.period = 1.0 / fps if fps else 0.0
        self.frame_size = frame_size
        self.slide_size = slide_size
        self._slide: Any = None
        self._path: Iterator[tuple[float, float]] | None = None
        self._next_t = 0.0

    def open(self) -> None:
        try:
            from smearsight.train.datasets.synth import SyntheticSlide
        except ImportError as exc:
            raise InputError(f"{self.name}: the synthetic slide generator is not available ({exc})") from exc
        kwargs: dict[str, Any] = {}
        if self.frame_size:
            kwargs["frame_size"] = self.frame_size
        if self.slide_size:
            kwargs["slide_size"] = self.slide_size
        try:
            self._slide = SyntheticSlide(self.seed, **kwargs)
        except InputError as exc:
            raise InputError(f"{self.name}: {exc}") from exc
        self._path = iter(self._slide.stage_path(speed_px_per_frame=self.speed))

    def read(self) -> np.ndarray | None:
        if self._path is None:
            self.open()
        if self.period:
            now = time.monotonic()
            if self._next_t > now:
                time.sleep(self._next_t - now)
            self._next_t = max(now, self._next_t) + self.period
        x, y = next(self._path)  # type: ignore[arg-type]
        out = self._slide.frame_at(x, y)
        return out[0] if isinstance(out, tuple) else out

    def rewind(self) -> None:
        pass

    @property
    def nominal_fps(self) -> float | None:
        return 1.0 / self.period if self.period else None


# --------------------------------------------------------------------------------------------- source
@dataclass
class SourceStats:
    """Counters a source keeps (read them from :attr:`FrameSource.stats`)."""

    captured: int = 0
    delivered: int = 0
    dropped: int = 0
    skipped: int = 0
    reconnects: int = 0
    last_problem: str = ""
    problems: dict[str, int] = field(default_factory=dict)
    """Each distinct problem (skipped frame, camera lost) and how often it happened; at most
    :data:`MAX_DISTINCT_PROBLEMS` entries, the rest counted under "(other problems)"."""

    def count(self, message: str) -> bool:
        """Count one occurrence of ``message``; True the first time it is seen."""
        key = message if message in self.problems or len(self.problems) < MAX_DISTINCT_PROBLEMS \
            else "(other problems)"
        first = key not in self.problems
        self.problems[key] = self.problems.get(key, 0) + 1
        self.last_problem = message
        return first


def to_rgb_frame(image: Any, *, bgr: bool, expect_size: tuple[int, int] | None = None) -> np.ndarray:
    """Validate one raw frame and convert it to contiguous RGB uint8 HxWx3; raise CorruptFrame if unusable."""
    import cv2

    if not isinstance(image, np.ndarray) or image.size == 0:
        raise CorruptFrame("skipped an empty frame")
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        else:
            raise CorruptFrame(f"skipped a frame of type {image.dtype} (expected 8-bit)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(image)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    else:
        raise CorruptFrame(f"skipped a frame of shape {tuple(image.shape)} (expected HxW or HxWx3)")
    h, w = image.shape[:2]
    if h < 16 or w < 16:
        raise CorruptFrame(f"skipped a {w}x{h} frame (too small)")
    if expect_size is not None and (h, w) != tuple(expect_size):
        raise CorruptFrame(
            f"skipped a {w}x{h} frame (expected {expect_size[1]}x{expect_size[0]})"
        )
    return image


class FrameSource:
    """Iterator of :class:`Frame` fed by a capture thread; see the module docstring for the behaviour."""

    def __init__(
        self,
        reader: _Reader,
        *,
        uri: str,
        loop: bool = False,
        drop: bool | None = None,
        queue_size: int | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 8.0,
        stall_s: float = 1.0,
        expect_size: tuple[int, int] | None = None,
    ) -> None:
        self.uri = uri
        self.loop = loop
        self.live = reader.live
        self.drop = reader.live if drop is None else drop
        self.stats = SourceStats()
        self._reader = reader
        self._q: queue.Queue[Any] = queue.Queue(maxsize=queue_size or (1 if self.drop else 4))
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stall_s = stall_s
        self._expect_size = expect_size
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._lost_msg = ""
        self._lost_until = 0.0
        self._warning = ""
        self._warning_t = 0.0
        self._error = ""
        self._finished = False
        self._last: Frame | None = None
        self._last_stale_t = 0.0
        if not reader.live:
            reader.open()  # a missing file or an empty folder is an input error, raised here
        self._thread = threading.Thread(target=self._run, name=f"capture:{uri}", daemon=True)
        self._thread.start()
        # also at interpreter exit for a source never closed: a capture thread still inside OpenCV (a video being
        # decoded) when Python finalises makes the C++ runtime abort the process
        self._stop_capture = weakref.finalize(self, _stop_capture, self._stop, self._q, self._thread)

    # ---- status
    @property
    def status(self) -> str:
        """Plain-words state: empty while all is well, else e.g. "camera lost — retrying in 4 s"."""
        with self._lock:
            if self._lost_msg:
                left = max(0.0, self._lost_until - time.monotonic())
                return f"{self._lost_msg} — retrying in {max(1, round(left))} s"
            if self._warning and time.monotonic() - self._warning_t < _WARNING_HOLD_S:
                return self._warning
            return self.error

    @property
    def error(self) -> str:
        """Why reading stopped before the end: set once the end was delivered; empty after a normal end."""
        return self._error if self._finished else ""

    @property
    def lost(self) -> bool:
        """True while a live source is waiting to reconnect."""
        with self._lock:
            return bool(self._lost_msg)

    def _warn(self, message: str) -> None:
        with self._lock:
            self._warning = message
            self._warning_t = time.monotonic()
            first = self.stats.count(message)
        if first:
            log.warning("%s: %s", self.uri, message)

    # ---- capture thread
    def _put(self, item: Any, *, force_block: bool = False) -> bool:
        if self.drop and not force_block:
            while not self._stop.is_set():
                try:
                    self._q.put_nowait(item)
                    return True
                except queue.Full:
                    try:
                        self._q.get_nowait()
                        self.stats.dropped += 1
                    except queue.Empty:
                        pass
            return False
        return put_until_stopped(self._q, item, self._stop)

    def _lose(self, message: str, backoff: float) -> None:
        with self._lock:
            self._lost_msg = message
            self._lost_until = time.monotonic() + backoff
            first = self.stats.count(message)
        if first:
            log.warning("%s: %s", self.uri, message)

    def _run(self) -> None:
        reader = self._reader
        backoff = self._backoff_initial
        opened = not reader.live
        was_lost = False
        good_in_pass = 0
        try:
            while not self._stop.is_set():
                try:
                    if not opened:
                        reader.open()
                        opened = True
                    raw = reader.read()
                except SourceLost as exc:
                    reader.close()
                    opened = False
                    was_lost = True
                    self._lose(str(exc) if str(exc) else "camera lost", backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2.0, self._backoff_max)
                    continue
                except CorruptFrame as exc:
                    self.stats.skipped += 1
                    self._warn(str(exc))
                    continue
                except EndedEarly as exc:  # the end of this pass, said so: a looping file starts again
                    self._warn(str(exc))
                    if not self.loop:
                        self._error = str(exc)
                        break
                    raw = None
                except InputError as exc:
                    self._error = str(exc)
                    break
                except Exception as exc:  # an unexpected driver/codec error: keep a live camera going
                    if reader.live:
                        reader.close()
                        opened = False
                        was_lost = True
                        self._lose(f"camera lost: {type(exc).__name__}: {exc}", backoff)
                        self._stop.wait(backoff)
                        backoff = min(backoff * 2.0, self._backoff_max)
                        continue
                    self._error = f"{reader.name}: stopped reading ({type(exc).__name__}: {exc})"
                    break
                if raw is None:
                    if self.loop and good_in_pass > 0:
                        good_in_pass = 0
                        try:
                            reader.rewind()
                        except Exception as exc:  # the file vanished or changed between passes
                            self._error = f"{reader.name}: could not start it again ({type(exc).__name__}: {exc})"
                            break
                        continue
                    if self.stats.captured == 0:
                        self._error = f"{reader.name}: no readable frames"
                    break
                try:
                    image = to_rgb_frame(raw, bgr=reader.bgr, expect_size=self._expect_size)
                except CorruptFrame as exc:
                    self.stats.skipped += 1
                    self._warn(str(exc))
                    continue
                if was_lost:
                    was_lost = False
                    self.stats.reconnects += 1
                    with self._lock:
                        self._lost_msg = ""
                    self._warn("camera reconnected")
                backoff = self._backoff_initial
                good_in_pass += 1
                frame = Frame(image, self.stats.captured, time.time(), self.uri)
                self.stats.captured += 1
                self._put(frame)
        finally:
            reader.close()
            self._put(_END, force_block=True)

    # ---- consumer side
    @property
    def finished(self) -> bool:
        """True once the end of a file, folder or stream was delivered (or the source was closed)."""
        return self._finished

    def read(self, timeout: float | None = None) -> Frame | None:
        """Next frame; ``None`` when ``timeout`` passes first or at the end (then ``finished`` is True)."""
        if self._finished:
            return None
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            if not self._thread.is_alive() and self._q.empty():
                self._finished = True
            return None
        if item is _END:
            self._finished = True
            return None
        self.stats.delivered += 1
        self._last = item
        return item

    @property
    def nominal_fps(self) -> float | None:
        """The rate the source's frames were taken at, when it says (a video file, a paced ``synth://``)."""
        return self._reader.nominal_fps

    def __iter__(self) -> FrameSource:
        return self

    def __next__(self) -> Frame:
        while True:
            frame = self.read(timeout=self._stall_s)
            if frame is not None:
                return frame
            if self._finished:
                raise StopIteration
            if self.lost:
                now = time.monotonic()
                if now - self._last_stale_t >= self._stall_s:
                    self._last_stale_t = now
                    last = self._last
                    image = last.image if last is not None else np.full((480, 640, 3), 40, np.uint8)
                    index = last.index if last is not None else -1
                    return Frame(image, index, time.time(), self.uri, stale=True)

    def close(self) -> None:
        """Stop the capture thread and release the device (idempotent)."""
        self._finished = True
        self._stop_capture()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_capture(stop: threading.Event, q: queue.Queue[Any], thread: threading.Thread) -> None:
    stop.set()
    try:  # a reader blocked on a full queue sees the stop
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
    if thread is not threading.current_thread():  # collected on its own thread as it ended: nothing to wait for
        thread.join(timeout=5.0)


# --------------------------------------------------------------------------------------------- URIs
def csi_pipeline(sensor_id: int, width: int = 1920, height: int = 1080, fps: int = 30, flip: int = 0) -> str:
    """The nvarguscamerasrc pipeline for a Jetson CSI camera, ending in a BGR appsink that drops old buffers."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, framerate=(fraction){fps}/1 ! "
        f"nvvidconv flip-method={flip} ! video/x-raw, format=(string)BGRx ! "
        "videoconvert ! video/x-raw, format=(string)BGR ! appsink drop=true max-buffers=1 sync=false"
    )


def _pipeline_reads_a_file(pipeline: str) -> bool:
    """True when a GStreamer pipeline starts from a file (``filesrc``, ``multifilesrc``, a ``file://`` URI):
    it ends, like a video file, instead of being a camera to reconnect to when no frame comes."""
    first = pipeline.split("!", 1)[0].split()
    return bool(first) and (first[0] in ("filesrc", "multifilesrc")
                            or (first[0] in ("uridecodebin", "uridecodebin3", "playbin", "playbin3")
                                and any(arg.startswith("uri=file:") for arg in first[1:])))


def _require_gstreamer(uri: str) -> None:
    from smearsight.opencv_setup import inspect_opencv

    info = inspect_opencv()
    if not info.importable:
        require("cv2", "camera capture")
    if not info.gstreamer:
        raise InputError(
            f"{uri}: this OpenCV ({info.origin}) was built without GStreamer, which CSI cameras and pipelines need; "
            "on a Jetson use the system OpenCV (a venv made with --system-site-packages), or use v4l2:///dev/video0"
        )


def _parse_size(value: str, what: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError as exc:
        raise InputError(f"{what}: expected WIDTHxHEIGHT such as 1024x768, got {value!r}") from exc
    if min(w, h) < MIN_FRAME_SIDE:
        raise InputError(f"{what}: expected a width and height of at least {MIN_FRAME_SIDE} pixels, got {value!r}")
    return h, w


def _camera_request(uri: str) -> tuple[str, dict[str, int]]:
    """Split ``v4l2:///dev/video0?width=1920&height=1080&fps=30`` (or ``csi://0?...``) into the URI without
    its query and the size and rate asked for."""
    spec, _, query = uri.partition("?")
    params = parse_qs(query, keep_blank_values=True)
    unknown = set(params) - {"width", "height", "fps"}
    if unknown:
        raise InputError(f"{uri}: unknown parameter(s) {', '.join(sorted(unknown))} (expected width, height, fps)")
    request: dict[str, int] = {}
    for key, values in params.items():
        value = values[-1]
        if not value.isdigit() or int(value) == 0:
            raise InputError(f"{uri}: {key} must be a whole number greater than 0, got {value!r}")
        request[key] = int(value)
    return spec, request


def _file_path(uri: str) -> Path:
    """The path of a ``file://`` URI; %-escapes (``%20`` from a file manager's copy) are undone unless the
    name as written exists."""
    rest = uri[len("file://") :]
    path = Path(rest).expanduser()
    if "%" in rest and not path.exists():
        unquoted = Path(unquote(rest)).expanduser()
        if unquoted.exists():
            return unquoted
    return path


def open_source(uri: str | int, *, loop: bool = False, **opts: Any) -> FrameSource:
    """Open a frame source from a URI (see the module docstring); capture starts at once.

    Options: ``drop`` (keep only the latest frame; default True for cameras), ``queue_size``,
    ``backoff_initial``/``backoff_max`` (seconds), ``stall_s``, ``expect_size=(H, W)`` (skip other sizes),
    ``width``/``height``/``fps`` (camera request), ``capture_factory`` (replaces ``cv2.VideoCapture``).
    Raises :class:`InputError` for an unknown URI, a missing file or folder, or missing GStreamer support.
    """
    require("cv2", "reading cameras and video files")
    import cv2

    source_opts = {
        k: opts.pop(k)
        for k in ("drop", "queue_size", "backoff_initial", "backoff_max", "stall_s", "expect_size")
        if k in opts
    }
    factory = opts.pop("capture_factory", None)
    width, height, fps = opts.pop("width", None), opts.pop("height", None), opts.pop("fps", None)
    if opts:
        raise InputError(f"source options: unknown {', '.join(sorted(opts))}")
    text = str(uri).strip()
    spec = text
    if text.startswith(("v4l2://", "csi://")) and "?" in text:
        spec, request = _camera_request(text)
        width, height, fps = width or request.get("width"), height or request.get("height"), fps or request.get("fps")
    props: dict[int, float] = {}
    if width:
        props[cv2.CAP_PROP_FRAME_WIDTH] = float(width)
    if height:
        props[cv2.CAP_PROP_FRAME_HEIGHT] = float(height)
    if fps:
        props[cv2.CAP_PROP_FPS] = float(fps)

    reader: _Reader
    schemes = ("file://", "synth://", "v4l2://", "csi://")
    if "!" in text and not text.startswith(schemes) and not _is_existing_path(text):
        if factory is None:
            _require_gstreamer("GStreamer pipeline")
        pipeline = text if "appsink" in text else text + " ! videoconvert ! appsink drop=true max-buffers=1"
        reader = _CaptureReader(pipeline, cv2.CAP_GSTREAMER, live=not _pipeline_reads_a_file(text),
                                name="GStreamer pipeline", capture_factory=factory)
    elif text.isdigit() or text.startswith("v4l2://"):
        rest = spec[len("v4l2://") :] if text.startswith("v4l2://") else text
        if rest.isdigit():
            target: str | int = int(rest)
            # OpenCV's V4L2 backend maps index N to /dev/videoN: watch that node for unplugging.
            device_path = f"/dev/video{int(rest)}" if sys.platform.startswith("linux") and factory is None else None
        elif rest.startswith("/"):
            target, device_path = rest, rest
        else:
            raise InputError(f"{text}: expected v4l2:///dev/videoN or a camera index such as 0")
        reader = _CaptureReader(target, cv2.CAP_V4L2, live=True, name=str(rest), capture_factory=factory,
                                device_path=device_path, props=props)
    elif text.startswith("csi://"):
        rest = spec[len("csi://") :]
        if not rest.isdigit():
            raise InputError(f"{text}: expected csi://N with a sensor number such as csi://0")
        if factory is None:
            _require_gstreamer(text)
        pipeline = csi_pipeline(int(rest), int(width or 1920), int(height or 1080), int(fps or 30))
        reader = _CaptureReader(pipeline, cv2.CAP_GSTREAMER, live=True, name=f"CSI camera {rest}",
                                capture_factory=factory)
    elif text.startswith("file://"):
        path = _file_path(text)
        if text.endswith("/") or path.is_dir():
            reader = _DirReader(path, text)
        elif not path.exists():
            raise InputError(f"{text}: no such file (expected a video file or a folder of images)")
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            reader = _DirReader(path, text)
        else:
            reader = _CaptureReader(str(path), cv2.CAP_ANY, live=False, name=text, capture_factory=factory)
    elif text.startswith("synth://"):
        query = parse_qs(urlsplit(text).query)
        unknown = set(query) - {"seed", "speed", "fps", "size", "slide"}
        if unknown:
            raise InputError(f"{text}: unknown parameter(s) {', '.join(sorted(unknown))} "
                             "(expected seed, speed, fps, size=WxH, slide=WxH)")
        try:
            seed = int(query.get("seed", ["0"])[0])
            speed = float(query.get("speed", ["4"])[0])
            synth_fps = float(query["fps"][0]) if "fps" in query else (float(fps) if fps else None)
        except ValueError as exc:
            raise InputError(f"{text}: seed must be an integer, speed and fps numbers ({exc})") from exc
        if not speed > 0 or (synth_fps is not None and not synth_fps > 0):
            raise InputError(f"{text}: speed and fps must be greater than 0")
        if seed < 0:
            raise InputError(f"{text}: seed must be 0 or more, got {seed}")
        frame_size = _parse_size(query["size"][0], f"{text} size") if "size" in query else None
        slide_size = _parse_size(query["slide"][0], f"{text} slide") if "slide" in query else None
        reader = _SynthReader(seed=seed, speed=speed, fps=synth_fps, frame_size=frame_size,
                              slide_size=slide_size, name=text)
    elif "://" not in text and _is_camera_device(text):
        return open_source(f"v4l2://{text}", loop=loop, capture_factory=factory, width=width, height=height,
                           fps=fps, **source_opts)
    elif "://" not in text and (_is_existing_path(text) or Path(text).suffix.lower() in _FILE_EXT):
        return open_source(f"file://{text}", loop=loop, capture_factory=factory, width=width, height=height,
                           fps=fps, **source_opts)
    else:
        raise InputError(
            f"{text}: unknown source (expected v4l2:///dev/videoN, a camera index, csi://N, a GStreamer pipeline, "
            "file://video.mp4, file://folder/ or synth://)"
        )
    return FrameSource(reader, uri=text, loop=loop, **source_opts)
