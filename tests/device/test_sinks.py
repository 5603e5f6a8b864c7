"""Sinks for real: an HTTP client reading the MJPEG stream on 127.0.0.1, video files and image folders
read back through the sources, and the display refusal without a display or GUI build."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from smearsight.device.sinks import HttpSink, open_sink, x_display_problem  # noqa: E402
from smearsight.device.sources import open_source  # noqa: E402
from smearsight.errors import InputError  # noqa: E402


def _solid(rgb: tuple[int, int, int], h: int = 120, w: int = 160) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rgb
    return img


def _read_part(stream) -> tuple[dict[str, str], bytes]:
    """Read one multipart/x-mixed-replace part: boundary line, headers, body of Content-Length bytes."""
    line = stream.readline()
    while line in (b"\r\n", b"\n"):
        line = stream.readline()
    assert line.startswith(b"--smearsightframe"), line
    headers: dict[str, str] = {}
    while True:
        line = stream.readline().strip()
        if not line:
            break
        key, value = line.decode().split(":", 1)
        headers[key.strip().lower()] = value.strip()
    body = stream.read(int(headers["content-length"]))
    return headers, body


@contextlib.contextmanager
def _feeder(sink: HttpSink, colors: list[tuple[int, int, int]], period: float = 0.02) -> Iterator[None]:
    stop = threading.Event()

    def run() -> None:
        i = 0
        while not stop.is_set():
            sink.write(_solid(colors[i % len(colors)]), {"frame": i, "fps": 12.5, "counts": {"sertoli": 3},
                                                          "status": "", "score": np.float32(0.5)})
            i += 1
            time.sleep(period)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_http_mjpeg_stream_status_and_page() -> None:
    sink = open_sink("http://127.0.0.1:0")
    assert isinstance(sink, HttpSink) and sink.port > 0
    try:
        with _feeder(sink, [(200, 30, 30)]):
            with urllib.request.urlopen(f"{sink.url}/stream.mjpg", timeout=10) as resp:
                assert resp.headers["Content-Type"].startswith("multipart/x-mixed-replace; boundary=")
                for _ in range(3):
                    headers, body = _read_part(resp)
                    assert headers["content-type"] == "image/jpeg"
                    bgr = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
                    assert bgr.shape == (120, 160, 3)
                    rgb = bgr[60, 80][::-1].astype(int)
                    assert np.all(np.abs(rgb - [200, 30, 30]) < 12), rgb
            with urllib.request.urlopen(f"{sink.url}/status.json", timeout=10) as resp:
                status = json.loads(resp.read())
            assert status["counts"] == {"sertoli": 3} and status["fps"] == 12.5 and status["score"] == 0.5
            with urllib.request.urlopen(f"{sink.url}/", timeout=10) as resp:
                page = resp.read().decode()
            assert "/stream.mjpg" in page and "/status.json" in page
            with urllib.request.urlopen(f"{sink.url}/snapshot.jpg", timeout=10) as resp:
                assert resp.headers["Content-Type"] == "image/jpeg"
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"{sink.url}/nothing", timeout=10)
            assert err.value.code == 404
    finally:
        sink.close()


def test_http_encodes_once_per_frame_for_many_clients() -> None:
    sink = open_sink("http://127.0.0.1:0")
    try:
        clients = [urllib.request.urlopen(f"{sink.url}/stream.mjpg", timeout=10) for _ in range(3)]
        deadline = time.monotonic() + 5
        while sink.clients < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.clients == 3
        colors = [(10, 10, 240), (240, 240, 10)]
        for i in range(6):
            sink.write(_solid(colors[i % 2]), {"frame": i})
            time.sleep(0.05)
        for resp in clients:
            _, body = _read_part(resp)
            assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR) is not None
        assert sink.encodes <= 6, "each frame is encoded at most once, whatever the number of clients"
        for resp in clients:
            resp.close()
    finally:
        sink.close()


def test_http_client_that_stops_reading_is_dropped() -> None:
    """A viewer that never reads (a sleeping tablet) must not pin a server thread and socket forever."""
    sink = HttpSink("http://127.0.0.1:0", client_timeout=0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect(("127.0.0.1", sink.port))
        sock.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
        deadline = time.monotonic() + 5
        while sink.clients < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.clients == 1
        noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)  # ~300 kB JPEGs
        deadline = time.monotonic() + 10
        i = 0
        while sink.clients and time.monotonic() < deadline:
            noise[0, 0] = i % 256
            sink.write(noise, {"frame": i})
            i += 1
            time.sleep(0.02)
        assert sink.clients == 0, "the stalled stream was not ended"
    finally:
        sock.close()
        sink.close()


def test_http_status_says_how_old_the_picture_is_and_head_works() -> None:
    sink = open_sink("http://127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"{sink.url}/status.json", timeout=10) as resp:
            assert json.loads(resp.read()) == {}  # nothing written yet
        sink.write(_solid((1, 2, 3)), {"frame": 7, "counts": {"sertoli": 1}})
        time.sleep(0.3)
        with urllib.request.urlopen(f"{sink.url}/status.json", timeout=10) as resp:
            status = json.loads(resp.read())
        assert status["frame"] == 7 and 0.2 <= status["age_s"] < 5  # a hung run shows as a growing age
        page = urllib.request.urlopen(f"{sink.url}/", timeout=10).read().decode()
        assert "age_s" in page and "frozen" in page and "no connection to the device" in page
        head = urllib.request.urlopen(urllib.request.Request(f"{sink.url}/status.json", method="HEAD"), timeout=10)
        assert head.status == 200 and head.read() == b""
    finally:
        sink.close()


_PAGE_HARNESS = """
const els = {b: {textContent: '', className: ''}, s: {innerHTML: ''}, v: {src: '/stream.mjpg'}};
let now = 1.7e12;
Date.now = () => now;
global.document = {getElementById: id => els[id]};
let replies = [];
global.fetch = async (url, opts) => {
  const r = replies.shift();
  if (r === null) throw new Error('refused');
  if (r === 'hang')  // the network went away: no answer, no error, until the page gives up waiting
    return new Promise((_, reject) => opts?.signal?.addEventListener('abort', () => reject(new Error('aborted'))));
  return {json: async () => r};
};
global.setInterval = () => {};
const page = require('fs').readFileSync(process.argv[2], 'utf8');
eval(page.replace('tick();', '').replace(/WAIT_MS=[0-9]+/, 'WAIT_MS=50'));  // its wait for an answer, shortened
(async () => {
  const out = [];
  for (const reply of JSON.parse(require('fs').readFileSync(process.argv[3], 'utf8'))) {
    if (reply && reply.after_ms) now += reply.after_ms;  // the tablet slept this long before this tick
    now += 1000;
    replies = [reply]; await tick(); out.push([els.b.textContent, els.s.innerHTML, els.v.src]);
  }
  console.log(JSON.stringify(out));
})();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_status_page_script_shows_frozen_stale_and_unreachable(tmp_path: Path) -> None:
    """The tablet page's own JavaScript, run under node with a stand-in DOM and fetch."""
    from smearsight.device.sinks import _PAGE

    script = _PAGE.format(body="").split("<script>")[1].split("</script>")[0]
    (tmp_path / "page.js").write_text(script)
    (tmp_path / "harness.js").write_text(_PAGE_HARNESS)
    replies = [{"frame": 5, "fps": 10, "counts": {"rbc": 3}, "frozen": True, "age_s": 0.2},
               {"frame": 6, "fps": 10, "counts": {"rbc": 3}, "age_s": 7.4},
               None,  # the device went away
               {"frame": 7, "fps": 10, "counts": {"rbc": 4}, "age_s": 0.1}]
    (tmp_path / "replies.json").write_text(json.dumps(replies))
    proc = subprocess.run(["node", str(tmp_path / "harness.js"), str(tmp_path / "page.js"),
                           str(tmp_path / "replies.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (frozen, frozen_body, _), (stale, _, _), (gone, gone_body, _), (live, live_body, _) = json.loads(proc.stdout)
    assert frozen.startswith("FROZEN") and "<td>rbc</td><td>3</td>" in frozen_body
    assert stale == "no new picture for 7 s"
    assert gone.startswith("no connection to the device") and "<td>3</td>" in gone_body  # last counts stay
    assert live == "" and "<td>rbc</td><td>4</td>" in live_body


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_status_page_says_the_device_is_unreachable_when_the_network_hangs(tmp_path: Path) -> None:
    """Wi-Fi gone: /status.json neither answers nor fails (a browser waits a minute or more), the picture
    froze and the page went on showing the last status as if live; it must give up and say so."""
    from smearsight.device.sinks import _PAGE

    script = _PAGE.format(body="").split("<script>")[1].split("</script>")[0]
    assert "WAIT_MS=" in script
    (tmp_path / "page.js").write_text(script)
    (tmp_path / "harness.js").write_text(_PAGE_HARNESS)
    replies = [{"frame": 5, "fps": 10, "counts": {"rbc": 3}, "age_s": 0.2}, "hang",
               {"frame": 6, "fps": 10, "counts": {"rbc": 3}, "age_s": 0.1}]
    (tmp_path / "replies.json").write_text(json.dumps(replies))
    proc = subprocess.run(["node", str(tmp_path / "harness.js"), str(tmp_path / "page.js"),
                           str(tmp_path / "replies.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout, proc.stderr or "the page waited for ever"
    (live, _, _), (hung, _, _), (back, _, _) = json.loads(proc.stdout)
    assert live == "" and hung.startswith("no connection to the device") and back == ""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_status_page_asks_once_at_a_time_while_the_network_hangs(tmp_path: Path) -> None:
    """Ticks come every second and a hung /status.json is given up only after WAIT_MS: the ticks between
    must not open more requests (they piled up to four, beside the picture's stream)."""
    from smearsight.device.sinks import _PAGE

    script = _PAGE.format(body="").split("<script>")[1].split("</script>")[0]
    (tmp_path / "page.js").write_text(script)
    (tmp_path / "harness.js").write_text("""
const els = {b: {textContent: '', className: ''}, s: {innerHTML: ''}, v: {src: '/stream.mjpg'}};
global.document = {getElementById: id => els[id]};
let open = 0, most = 0;
global.fetch = (url, opts) => { open += 1; most = Math.max(most, open);
  return new Promise((_, reject) => opts.signal.addEventListener('abort', () => {
    open -= 1; reject(new Error('x')); })); };
global.setInterval = () => {};
const page = require('fs').readFileSync(process.argv[2], 'utf8');
eval(page.replace('tick();', '').replace(/WAIT_MS=[0-9]+/, 'WAIT_MS=200'));
const ticks = [tick(), tick(), tick(), tick()];  // four ticks while the first request hangs
Promise.all(ticks).then(() => console.log(JSON.stringify({most, banner: els.b.textContent})));
""")
    proc = subprocess.run(["node", str(tmp_path / "harness.js"), str(tmp_path / "page.js")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    result = json.loads(proc.stdout)
    assert result["most"] == 1 and result["banner"].startswith("no connection to the device")


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_status_page_reopens_the_stream_after_losing_the_device_or_sleeping(tmp_path: Path) -> None:
    """A browser never reopens an MJPEG stream that broke: after a Wi-Fi drop, a device restart or the tablet
    sleeping (the device drops a viewer that stops reading), the picture stayed frozen under live counts."""
    from smearsight.device.sinks import _PAGE

    script = _PAGE.format(body="").split("<script>")[1].split("</script>")[0]
    (tmp_path / "page.js").write_text(script)
    (tmp_path / "harness.js").write_text(_PAGE_HARNESS)
    ok = {"frame": 5, "fps": 10, "counts": {"rbc": 3}, "age_s": 0.1}
    replies = [ok, ok, None, ok, ok, {**ok, "after_ms": 60000}, ok]
    (tmp_path / "replies.json").write_text(json.dumps(replies))
    proc = subprocess.run(["node", str(tmp_path / "harness.js"), str(tmp_path / "page.js"),
                           str(tmp_path / "replies.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    src = [entry[2] for entry in json.loads(proc.stdout)]
    assert src[0] == src[1] == src[2] == "/stream.mjpg"  # live, then the device is lost
    assert src[3].startswith("/stream.mjpg?") and src[4] == src[3]  # back: reopened once
    assert src[5].startswith("/stream.mjpg?") and src[5] != src[4] and src[6] == src[5]  # woke up: reopened


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_status_page_shows_the_slides_running_summary_escaped(tmp_path: Path) -> None:
    """The page's "This slide so far" section, drawn by its own JavaScript under node: every figure of the
    session summary, text escaped, the last summary kept while the device is unreachable or the field frozen,
    and numbers that the JSON holds as null (not finite) shown as 0, never NaN or undefined."""
    from smearsight.device.sinks import _PAGE

    script = _PAGE.format(body="").split("<script>")[1].split("</script>")[0]
    (tmp_path / "page.js").write_text(script)
    (tmp_path / "harness.js").write_text(
        _PAGE_HARNESS.replace("v: {src: '/stream.mjpg'}}", "v: {src: '/stream.mjpg'}, t: {innerHTML: ''}}")
        .replace("els.v.src]", "els.v.src, els.t.innerHTML]"))
    session = {"frames": 3, "duration_s": 125.4, "detections": 5,
               "counts_per_class": {"mature_sperm": 4, "<b>odd</b>": 1}, "fields_with_mature_sperm": 2,
               "sperm_judged": 4, "sperm_abnormal": 1, "abnormal_by_part": {"head": 1, 'vac"<u>': 2}}
    replies = [{"frame": 5, "counts": {"mature_sperm": 2}, "session": session, "age_s": 0.1},
               None,  # the device went away
               {"frame": 6, "counts": {"mature_sperm": 2}, "session": session, "frozen": True, "age_s": 0.1},
               {"frame": 7, "counts": {}, "age_s": 0.1,
                "session": {"frames": 1, "duration_s": None, "counts_per_class": {"rbc": None},
                            "fields_with_mature_sperm": None, "sperm_judged": 0, "sperm_abnormal": None}}]
    (tmp_path / "replies.json").write_text(json.dumps(replies))
    proc = subprocess.run(["node", str(tmp_path / "harness.js"), str(tmp_path / "page.js"),
                           str(tmp_path / "replies.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    (_, _, _, live), (gone, _, _, kept), (frozen, _, _, held), (_, _, _, nulls) = json.loads(proc.stdout)
    assert "3 frames in 2 min 5 s" in live and "<td>mature_sperm</td><td>4</td>" in live
    assert "<td>&lt;b&gt;odd&lt;/b&gt;</td><td>1</td>" in live and "<b>" not in live
    assert "fields with mature sperm: 2 of 3" in live
    assert "sperm judged: 4 &middot; abnormal: 1 (25 %)" in live
    assert "abnormal by part: head 1, vac&quot;&lt;u&gt; 2" in live
    assert gone.startswith("no connection to the device") and kept == live
    assert frozen.startswith("FROZEN") and held == live
    assert "1 frames in 0 s" in nulls and "<td>rbc</td><td>0</td>" in nulls and "abnormal: 0</p>" in nulls
    assert not any(word in nulls for word in ("NaN", "null", "undefined"))


def test_status_page_has_the_slide_section_and_status_json_the_summary() -> None:
    sink = open_sink("http://127.0.0.1:0")
    try:
        summary = {"frames": 2, "counts_per_class": {"mature_sperm": 3}, "duration_s": float("nan")}
        sink.write(_solid((1, 2, 3)), {"frame": 1, "counts": {"mature_sperm": 1}, "session": summary})
        with urllib.request.urlopen(f"{sink.url}/status.json", timeout=10) as resp:
            status = json.loads(resp.read())
        assert status["session"] == {**summary, "duration_s": None}
        page = urllib.request.urlopen(f"{sink.url}/", timeout=10).read().decode()
        assert '<section id="slide"><h2>This slide so far</h2><div id="t">' in page
    finally:
        sink.close()


def test_http_viewers_that_reset_leave_no_traceback(capfd) -> None:
    import struct

    sink = open_sink("http://127.0.0.1:0")
    try:
        sink.write(_solid((9, 9, 9), 480, 640), {"frame": 1})
        for path in ("/", "/status.json", "/snapshot.jpg", "/stream.mjpg"):
            sock = socket.create_connection(("127.0.0.1", sink.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
            sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            sock.close()
        for i in range(5):
            sink.write(_solid((9, 9, i), 480, 640), {"frame": i})
            time.sleep(0.05)
    finally:
        sink.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def test_http_many_viewers_connect_at_once_and_extra_ones_get_503() -> None:
    sink = open_sink("http://127.0.0.1:0")
    held = []
    try:
        for _ in range(sink._server.max_connections):  # noqa: SLF001 - fill every slot with an idle client
            sock = socket.create_connection(("127.0.0.1", sink.port))
            sock.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
            held.append(sock)
        deadline = time.monotonic() + 10
        while sink.clients < len(held) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.clients == len(held)
        extra = socket.create_connection(("127.0.0.1", sink.port), timeout=5)
        extra.sendall(b"GET /status.json HTTP/1.0\r\n\r\n")
        assert extra.recv(64).startswith(b"HTTP/1.0 503")
        extra.close()
    finally:
        for sock in held:
            sock.close()
        sink.close()


def test_http_sink_on_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:  # a container without an IPv6 loopback
        pytest.skip(f"no IPv6 loopback here: {exc}")
    sink = open_sink("http://[::1]:0")
    try:
        assert sink.url == f"http://[::1]:{sink.port}"
        sink.write(_solid((5, 6, 7)), {"frame": 3})
        with urllib.request.urlopen(f"{sink.url}/status.json", timeout=10) as resp:
            assert json.loads(resp.read())["frame"] == 3
    finally:
        sink.close()


def test_http_port_in_use_is_an_input_error() -> None:
    first = open_sink("http://127.0.0.1:0")
    try:
        with pytest.raises(InputError, match="cannot listen"):
            open_sink(f"http://127.0.0.1:{first.port}")
        with pytest.raises(InputError, match="http://:PORT"):
            open_sink("http://127.0.0.1")
    finally:
        first.close()


def test_video_file_sink_roundtrip(tmp_path: Path) -> None:
    out = tmp_path / "out" / "annotated.mp4"
    colors = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]
    sink = open_sink(f"file://{out}", fps=10, fullscreen=True)  # fullscreen does not apply: ignored
    for i in range(9):
        sink.write(_solid(colors[i % 3]), {})
    assert not out.exists(), "the video appears under its name only when complete"
    sink.close()
    assert out.exists() and not sink.error
    assert not list(out.parent.glob(".*partial*"))
    frames = list(open_source(f"file://{out}"))
    assert len(frames) == 9
    for i, f in enumerate(frames):
        assert np.all(np.abs(f.image[60, 80].astype(int) - colors[i % 3]) < 25), (i, f.image[60, 80])


def test_video_sink_keeps_every_pixel_of_an_odd_sized_frame(tmp_path: Path) -> None:
    out = tmp_path / "odd.mp4"
    sink = open_sink(f"file://{out}", fps=10)
    frame = _solid((200, 40, 40), h=121, w=161)
    frame[:, -1] = (40, 40, 200)  # the last column, which a silent crop would lose
    for _ in range(3):
        sink.write(frame, {})
    sink.close()
    back = next(iter(open_source(f"file://{out}")))
    assert back.image.shape == (122, 162, 3)
    assert np.abs(back.image[60, 160].astype(int) - (40, 40, 200)).max() < 40, back.image[60, 158:]


def test_readable_video_frames_refuses_a_cut_short_file(tmp_path: Path) -> None:
    from smearsight.device.sinks import readable_video_frames

    out = tmp_path / "whole.mp4"
    sink = open_sink(f"file://{out}", fps=10)
    for i in range(6):
        sink.write(_solid((40 * i, 30, 200)), {})
    sink.close()
    assert readable_video_frames(out) == 6
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])  # what a full disk leaves: no index at the end
    assert readable_video_frames(cut) == 0
    assert readable_video_frames(tmp_path / "missing.mp4") == 0


def test_video_sink_on_a_full_disk_keeps_no_broken_file(tmpfs) -> None:
    rng = np.random.default_rng(0)
    with tmpfs("small", "size=96k") as small:  # a real, nearly full disk
        out = small / "run.mp4"
        sink = open_sink(f"file://{out}", fps=10)
        for _ in range(40):  # noise does not compress: far more than 96 KiB
            sink.write(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), {})
        sink.close()
        assert not out.exists(), "a truncated video must not appear under its name"
        assert not list(small.glob(".*partial*")), "nor be left behind half-written"
        assert "not kept" in sink.error and "disk full" in sink.error


def test_image_dir_sink_roundtrip(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    sink = open_sink(f"file://{out}/", ext="png")
    imgs = [_solid((i * 40, 255 - i * 40, 7)) for i in range(4)]
    for img in imgs:
        sink.write(img, {})
    sink.close()
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"frame_{i:06d}.png" for i in range(4)]
    back = [f.image for f in open_source(f"file://{out}/")]
    assert all(np.array_equal(a, b) for a, b in zip(imgs, back, strict=True))


@contextlib.contextmanager
def _readonly_dir(tmp_path: Path, tmpfs) -> Iterator[Path]:
    """A directory nobody can write into: chmod for ordinary users, a read-only tmpfs mount for root."""
    if os.geteuid() != 0:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
        try:
            yield target
        finally:
            target.chmod(0o755)
        return
    with tmpfs("ro", "ro,size=64k") as ro:
        yield ro


def test_file_sinks_refuse_read_only_folder(tmp_path: Path, tmpfs) -> None:
    with _readonly_dir(tmp_path, tmpfs) as ro:
        with pytest.raises(InputError, match="cannot write in"):
            open_sink(f"file://{ro}/")
        with pytest.raises(InputError, match="cannot create the folder"):
            open_sink(f"file://{ro}/frames/")
        with pytest.raises(InputError, match="cannot (write in|create)"):
            open_sink(f"file://{ro}/out.mp4")


def test_unknown_sinks_and_options(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown output"):
        open_sink("rtsp://0.0.0.0:8554")
    with pytest.raises(InputError, match="unknown output option"):
        open_sink("null://", colour="red")
    with pytest.raises(InputError, match="unknown video type"):
        open_sink(f"file://{tmp_path}/out.gif")
    null = open_sink("null://")
    null.write(_solid((1, 2, 3)), {})
    assert null.frames == 1


def test_display_refused_without_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(InputError, match=r"no display.*http://:8080"):
        open_sink("display://0")
    with pytest.raises(InputError, match="--headless"):
        open_sink("display://0", headless=True)


def test_display_refused_on_headless_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    from smearsight.opencv_setup import inspect_opencv

    if inspect_opencv().gui:
        pytest.skip("this OpenCV has GUI support")
    monkeypatch.setenv("DISPLAY", ":99")  # a display is claimed, but the build cannot open windows
    with pytest.raises(InputError, match="no window support"):
        open_sink("display://0")


def test_x_display_problem_probes_the_server() -> None:
    """A DISPLAY with no X server behind it is reported in words (Qt would abort the process)."""
    number = 4000 + os.getpid() % 1000
    assert f"no X server answers on DISPLAY=:{number}" in x_display_problem(f":{number}", timeout=0.2)
    assert "not a display name" in x_display_problem("nonsense")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:  # a listening X socket, abstract namespace
        server.bind(f"\0/tmp/.X11-unix/X{number}")
        server.listen(1)
        assert x_display_problem(f":{number}") == ""
        assert x_display_problem(f"unix:{number}.0") == ""
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        port = tcp.getsockname()[1]
        if port > 6000:
            assert x_display_problem(f"127.0.0.1:{port - 6000}") == ""


def test_display_waits_for_the_screen_then_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    """--wait-for-display at boot: no X server yet -> frames dropped with a plain status; a server that
    answers but where no window opens (here: a bare listening socket, and the real test window in a child
    process fails) -> still waiting; once the test window opens, the sink opens its own. The sink's own
    OpenCV window is replaced here (this OpenCV may be the headless build; a real window opens under Xvfb
    in test_display_window_under_xvfb)."""
    import smearsight.device.sinks as sinks
    import smearsight.opencv_setup as ocv
    from smearsight.device.sinks import DisplaySink

    real = ocv.inspect_opencv()
    monkeypatch.setattr(ocv, "inspect_opencv", lambda: dataclasses.replace(real, importable=True, gui=True))
    opened: list[str] = []
    monkeypatch.setattr(DisplaySink, "_open_window", lambda self: (opened.append(self.title),
                                                                  setattr(self, "waiting", False)))
    number = 5000 + os.getpid() % 1000
    monkeypatch.setenv("DISPLAY", f":{number}")
    with pytest.raises(InputError, match="no X server answers"):
        open_sink("display://0")  # without wait: refused at once
    sink = open_sink("display://0", wait=True)
    sink.retry_s = sink._next_probe = 0.0  # probe on every frame
    sink.write(_solid((1, 2, 3)), {})
    assert sink.waiting and not opened and sink.frames == 0
    assert sink.error.startswith(f"waiting for the screen: no X server answers on DISPLAY=:{number}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(f"\0/tmp/.X11-unix/X{number}")
        server.listen(8)
        sink._next_probe = 0.0
        sink.write(_solid((1, 2, 3)), {})  # the socket answers, but the child's test window cannot open
        assert sink.waiting and not opened
        assert sink.error.startswith("waiting for the screen: a test window")  # failed, or timed out
        monkeypatch.setattr(sinks, "window_probe", lambda timeout=20.0: "")
        sink._next_probe = 0.0
        sink.write(_solid((1, 2, 3)), {})
    assert opened == ["SmearSight"] and not sink.waiting
    monkeypatch.setattr(ocv, "inspect_opencv", lambda: dataclasses.replace(real, importable=True, gui=False))
    with pytest.raises(InputError, match="no window support"):  # that never gets better: no waiting
        open_sink("display://0", wait=True)
    monkeypatch.delenv("DISPLAY")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(InputError, match="DISPLAY and WAYLAND_DISPLAY are not set"):
        open_sink("display://0", wait=True)


def _can_open_window() -> str:
    from smearsight.opencv_setup import inspect_opencv

    if shutil.which("Xvfb") is None:
        return "Xvfb is not installed"
    if not inspect_opencv().gui:
        return "OpenCV has no GUI support (opencv-python-headless)"
    return ""


@pytest.mark.hw
@pytest.mark.skipif(bool(_can_open_window()), reason=_can_open_window() or "ok")
def test_display_window_under_xvfb(tmp_path: Path) -> None:
    proc = subprocess.Popen(["Xvfb", ":97", "-screen", "0", "1024x768x24"], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        env_display = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = ":97"
        try:
            sink = open_sink("display://0", fullscreen=True)
            for _ in range(5):
                sink.write(_solid((0, 128, 255)), {})
            assert sink.frames == 5 and not sink.error and not sink.should_stop  # window visible
            sink.close()
        finally:
            if env_display is None:
                os.environ.pop("DISPLAY", None)
            else:
                os.environ["DISPLAY"] = env_display
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_plain_paths_mean_files(tmp_path: Path) -> None:
    sink = open_sink(f"{tmp_path}/frames/")
    sink.write(_solid((5, 6, 7)), {})
    sink.close()
    assert (tmp_path / "frames" / "frame_000000.jpg").exists()
    assert open_sink(str(tmp_path / "v.mp4")).uri == f"file://{tmp_path}/v.mp4"


def test_avi_sink_cut_short_by_a_full_disk_is_kept_and_says_how_much(tmpfs) -> None:
    """An .avi or .mkv cut short still plays the frames it holds: kept, and the sink says it is incomplete
    (before: kept without a word, the stats claiming every frame)."""
    from smearsight.device.sinks import DISK_CHECK_FRAMES, readable_video_frames

    rng = np.random.default_rng(1)
    with tmpfs("small", "size=3m") as small:
        out = small / "run.avi"
        sink = open_sink(f"file://{out}", fps=10, fourcc="MJPG")
        warned_at = None
        for i in range(40):  # noise frames of ~200 KB: the disk fills after about 15
            sink.write(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), {})
            if sink.error and warned_at is None:
                warned_at = i + 1
        sink.close()
        saved = readable_video_frames(out)
        assert 0 < saved < 40 and out.exists()
        assert warned_at == DISK_CHECK_FRAMES  # said while running, not only at the end
        assert f"only {saved} of the 40 frames were saved" in sink.error


def test_readable_video_frames_counts_an_avi_without_its_index(tmp_path: Path) -> None:
    import re

    from smearsight.device.sinks import readable_video_frames

    out = tmp_path / "whole.avi"
    sink = open_sink(f"file://{out}", fps=10, fourcc="MJPG")
    for i in range(12):
        sink.write(_solid((20 * i, 30, 200)), {})
    sink.close()
    data = out.read_bytes()
    chunks = [m.start() for m in re.finditer(b"00dc", data)][1:]
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: chunks[5]])  # frames 0-4 and no index: OpenCV's count says 0
    assert readable_video_frames(out) == 12
    assert readable_video_frames(cut) == 5


def test_image_dir_sink_continues_after_an_earlier_runs_frames(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    first = open_sink(f"file://{out}/")
    for i in range(3):
        first.write(_solid((i * 40, 0, 0)), {})
    first.close()
    second = open_sink(f"file://{out}/")
    assert "frame_000003.jpg" in second.note
    second.write(_solid((0, 200, 0)), {})
    second.close()
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:06d}.jpg" for i in range(4)]
    fresh = open_sink(f"file://{tmp_path / 'new'}/")
    assert fresh.note == "" and fresh.index == 0


def test_image_dir_sink_failing_frames_give_one_message(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    sink = open_sink(f"file://{out}/", start=0)
    for i in range(2, 6):  # frames 2-5 cannot be written: a folder stands where each file would go
        (out / f"frame_{i:06d}.jpg").mkdir(parents=True)
    messages = set()
    for _ in range(7):
        sink.write(_solid((10, 20, 30)), {})
        messages.add(sink.error)
    sink.close()
    assert sink.frames == 3 and sink.error == ""  # frame 6 was saved again
    failures = messages - {""}
    assert len(failures) == 1 and "since frame_000002.jpg" in failures.pop()


def test_a_video_named_folder_is_not_silently_an_image_sink(tmp_path: Path) -> None:
    (tmp_path / "x.mp4").mkdir()
    with pytest.raises(InputError, match="is a folder, not a video file"):
        open_sink(f"file://{tmp_path / 'x.mp4'}")
    assert open_sink(f"file://{tmp_path / 'x.mp4'}/").directory == tmp_path / "x.mp4"  # asked for: a folder


def test_http_clients_that_trickle_their_headers_are_cut_off_and_free_their_slots() -> None:
    """Slowloris: clients that send a header byte now and then, each well within the per-read timeout, must not
    hold the connection slots forever (a full house of them locked the lab tablet out)."""
    import select

    sink = HttpSink("http://127.0.0.1:0", header_timeout=0.5)
    held = []
    try:
        sink.write(_solid((4, 5, 6)), {"frame": 1})
        for _ in range(sink._server.max_connections):  # noqa: SLF001 - every slot
            sock = socket.create_connection(("127.0.0.1", sink.port))
            sock.sendall(b"GET /status.json HTTP/1.1\r\n")
            held.append(sock)
        open_ = set(held)
        deadline = time.monotonic() + 8
        while open_ and time.monotonic() < deadline:
            for sock in list(open_):
                try:
                    sock.sendall(b"X")  # one more byte of a header that never ends
                except OSError:
                    open_.discard(sock)
            readable, _, _ = select.select(list(open_), [], [], 0.1)
            for sock in readable:  # closed by the server (an end of file or a reset)
                with contextlib.suppress(OSError):
                    assert sock.recv(4096) == b"", "a trickled request was answered"
                open_.discard(sock)
        assert not open_, f"{len(open_)} trickling connection(s) still open after the header deadline"
        with urllib.request.urlopen(f"{sink.url}/status.json", timeout=5) as resp:  # a slot is free again
            assert json.loads(resp.read())["frame"] == 1
    finally:
        for sock in held:
            sock.close()
        sink.close()


def _strict_json(body: bytes) -> dict:
    """Parse JSON as a browser's JSON.parse does: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in the status JSON: {body[:200]!r}")

    return json.loads(body, parse_constant=refuse)


def test_http_status_json_has_no_nan_or_infinity() -> None:
    """A NaN or infinite number in the status (a model gone wrong, a clock step) must not make /status.json
    invalid JSON: the page's JSON.parse would fail and say 'no connection to the device'."""
    sink = HttpSink("http://127.0.0.1:0")
    try:
        sink.write(_solid((1, 2, 3)), {"frame": 4, "fps": float("nan"), "boxes_age_ms": float("inf"),
                                       "score": np.float32("nan"), "latency_ms": {"detect": -float("inf")},
                                       "box": np.array([1.5, np.nan]), "counts": {"rbc": 2}})
        with urllib.request.urlopen(f"{sink.url}/status.json", timeout=10) as resp:
            body = resp.read()
            assert resp.headers["Content-Type"] == "application/json"
            assert int(resp.headers["Content-Length"]) == len(body)
            assert resp.headers["Cache-Control"] == "no-store"
        status = _strict_json(body)
        assert status["frame"] == 4 and status["counts"] == {"rbc": 2}
        assert status["fps"] is None and status["boxes_age_ms"] is None and status["score"] is None
        assert status["latency_ms"] == {"detect": None} and status["box"] == [1.5, None]
    finally:
        sink.close()


@pytest.mark.parametrize("uri", ["http://:99999", "http://:abc", "http://:-1", "http://[zz]:8080", "http://[::1:8080",
                                 "http://[::1]"])
def test_http_sink_uri_mistakes_are_one_line_input_errors(uri: str) -> None:
    with pytest.raises(InputError) as info:
        open_sink(uri)
    message = str(info.value)
    assert message.startswith(f"{uri}: ") and "\n" not in message


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("line", [b"GARBAGE", b"GET / HTTP/2.0", b"GET / FOO/1.0", b"GET / HTTP/1.0 extra"])
def test_http_malformed_request_lines_get_a_proper_error_reply(line: bytes) -> None:
    """The error reply to a malformed request line starts with a status line (http.server sent a bare HTML
    body, which clients read as garbage or an HTTP/0.9 reply)."""
    sink = HttpSink("http://127.0.0.1:0")
    try:
        reply = _raw_request(sink.port, line + b"\r\n\r\n")
        assert reply.startswith((b"HTTP/1.0 400 ", b"HTTP/1.0 505 ")), reply[:80]
        head, _, body = reply.partition(b"\r\n\r\n")
        assert f"Content-Length: {len(body)}".encode() in head
    finally:
        sink.close()



def test_http_methods_and_paths() -> None:
    sink = HttpSink("http://127.0.0.1:0")
    try:
        sink.write(_solid((7, 8, 9)), {"frame": 2})
        assert _raw_request(sink.port, b"POST /status.json HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}").startswith(
            b"HTTP/1.0 501 ")
        assert _raw_request(sink.port, b"GET /nothing-here HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404 ")
        reply = _raw_request(sink.port, b"GET /status.json?t=123 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.0 200 ") and _strict_json(reply.partition(b"\r\n\r\n")[2])["frame"] == 2
        head = _raw_request(sink.port, b"HEAD /snapshot.jpg HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 ") and head.endswith(b"\r\n\r\n") and b"image/jpeg" in head
        assert _raw_request(sink.port, b"GET /" + b"a" * 70000 + b" HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 414 ")
        assert _raw_request(sink.port, b"GET / HTTP/1.0\r\nX: " + b"a" * 70000 + b"\r\n\r\n").startswith(
            b"HTTP/1.0 431 ")
    finally:
        sink.close()


def test_http_port_in_use_or_privileged_says_what_to_do() -> None:
    first = open_sink("http://127.0.0.1:0")
    try:
        with pytest.raises(InputError, match=r"cannot listen on port \d+ \(Address already in use\): another "
                                             r"program .* uses it; .*choose another port"):
            open_sink(f"http://127.0.0.1:{first.port}")
    finally:
        first.close()
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not start.is_file() or int(start.read_text()) <= 80:
        pytest.skip("needs root, setpriv and privileged ports below 1024 to try port 80 as another user")
    code = ("from smearsight.device.sinks import open_sink\nfrom smearsight.errors import InputError\n"
            "try:\n    open_sink('http://127.0.0.1:80')\nexcept InputError as exc:\n    print(exc)\n")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert "cannot listen on port 80 (Permission denied): ports below 1024 need root" in proc.stdout, proc.stderr
    assert "http://127.0.0.1:8080" in proc.stdout


def test_http_viewers_that_never_read_do_not_hold_up_the_pipeline_or_other_viewers() -> None:
    """Stalled viewers (a tablet asleep with the stream open) lose frames; the frame loop's writes go on and a
    viewer that reads still gets the newest frames."""
    sink = HttpSink("http://127.0.0.1:0", client_timeout=60.0)  # the stalled ones are not dropped in this test
    stalled = []
    try:
        for _ in range(3):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", sink.port))
            sock.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
            stalled.append(sock)
        viewer = urllib.request.urlopen(f"{sink.url}/stream.mjpg", timeout=10)
        deadline = time.monotonic() + 10
        while sink.clients < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.clients == 4
        rng = np.random.default_rng(1)
        frames = 40

        def loop() -> None:  # the pipeline: one write per frame, ~300 kB JPEGs that fill the stalled sockets
            for i in range(frames):
                img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
                img[:96, :96] = 6 * i
                sink.write(img, {"frame": i})
                time.sleep(0.01)

        writer = threading.Thread(target=loop, daemon=True)
        writer.start()
        seen: list[int] = []
        while not seen or abs(seen[-1] - 6 * (frames - 1)) > 3:  # until the newest frame (JPEG: +-3 levels)
            _, body = _read_part(viewer)  # a stream that stops raises TimeoutError
            seen.append(int(cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)[48, 48]))
        writer.join(timeout=30)
        assert not writer.is_alive(), "the frame loop was held up by viewers that do not read"
        assert sink.frames == frames and sink.clients == 4  # the stalled ones are still connected
        assert len(seen) >= 2 and seen == sorted(seen)
        viewer.close()
    finally:
        for sock in stalled:
            sock.close()
        sink.close()


def test_http_sink_on_every_interface_answers_ipv6_and_ipv4_viewers() -> None:
    """http://:PORT is "every interface": a tablet that reaches the device over IPv6 (a .local name often
    resolves to an IPv6 link-local address first) was refused, the sink listened on IPv4 only."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:  # a container without an IPv6 loopback
        pytest.skip(f"no IPv6 loopback here: {exc}")
    sink = open_sink("http://:0")
    try:
        sink.write(_solid((5, 6, 7)), {"frame": 9})
        for url in (f"http://127.0.0.1:{sink.port}", f"http://[::1]:{sink.port}"):
            with urllib.request.urlopen(f"{url}/status.json", timeout=10) as resp:
                assert json.loads(resp.read())["frame"] == 9, url
        assert sink.uri == f"http://:{sink.port}" and sink.url == f"http://127.0.0.1:{sink.port}"
        with pytest.raises(InputError, match="Address already in use"):  # taken for IPv4 too
            open_sink(f"http://0.0.0.0:{sink.port}")
    finally:
        sink.close()


_DNS_PROBE = """
import socket, sys, threading
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 53))  # a name server that never answers (a lab network whose DNS is down)
queries = []
threading.Thread(target=lambda: [queries.append(udp.recvfrom(4096)) for _ in iter(int, 1)], daemon=True).start()
from smearsight.device.sinks import open_sink
sink = open_sink("http://127.0.0.2:0")
sink.close()
print(len(queries))
"""


def test_http_sink_opens_without_asking_dns(tmp_path: Path) -> None:
    """http.server looks the listening address up in DNS (getfqdn) for a name nothing uses: with the lab's name
    server down, opening http://192.168.1.20:8080 waited ~10 s for two unanswered queries."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip for a private network with a silent name server")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (tmp_path / "probe.py").write_text(_DNS_PROBE)
    script = (f"mount --bind {tmp_path / 'resolv.conf'} /etc/resolv.conf && ip link set lo up && "
              f"(ip addr add 127.0.0.2/8 dev lo 2>/dev/null; true) && echo private-network-ready && "
              f"{sys.executable} {tmp_path / 'probe.py'}")
    proc = subprocess.run(["unshare", "-mn", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    _, ready, probed = proc.stdout.partition("private-network-ready\n")
    if not ready:  # unshare, the bind mount or ip failed (a rootless container, say): nothing was tested
        pytest.skip(f"cannot make a private network here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert probed.strip() == "0", "opening the sink asked the name server"


def test_local_path_of_uris_plain_paths_and_a_camera_index(tmp_path) -> None:
    """What the output checks compare: a bare number is a camera (smearsight run 0), not a file named 0."""
    from smearsight.device.sinks import local_path

    assert local_path(f"file://{tmp_path}/out.mp4") == tmp_path / "out.mp4"
    assert local_path(str(tmp_path / "dir")) == tmp_path / "dir"
    assert local_path("0") is None and local_path("http://:8080") is None and local_path("v4l2:///dev/video0") is None
