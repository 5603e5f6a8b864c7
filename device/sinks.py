"""Frame sinks behind one URI scheme (after jetson-utils).

- ``display://0``: an OpenCV window (``fullscreen=True`` for the whole screen). A display server
  (``DISPLAY``/``WAYLAND_DISPLAY``) and an OpenCV with GUI support are checked *before* any window is
  created: without a display Qt aborts the whole process, and the headless wheel has no ``imshow``.
- ``http://:PORT`` (all interfaces, IPv6 and IPv4) or ``http://HOST:PORT``: ``/stream.mjpg`` (MJPEG of the
  latest frame, encoded once per frame whoever watches), ``/snapshot.jpg``, ``/status.json`` (the latest status
  dict) and ``/`` (a small page with the stream and the counts). Port 0 picks a free port (see ``.port``/``.url``).
- ``file://out.mp4`` (or .avi/.mkv): a video (``mp4v``; ``fps``, default 15), written under a temporary name and
  renamed on close; a disk filling up is reported while writing, and a video cut short by it is kept (an
  .avi/.mkv still plays the frames it holds) with ``.error`` saying how many frames it holds.
- ``file://dir/``: numbered frames ``frame_000000.jpg`` (``ext="png"`` for PNG), each written atomically; a
  folder holding an earlier run's frames is continued after the highest number (``.note`` says so).
- ``null://``: discards frames (benchmarks, ``--headless`` without output).

The status dict given to ``write`` is served as-is by ``/status.json``, NaN and infinities as ``null`` (what
``smearsight run`` puts in it: :func:`smearsight.runtime.pipeline.frame_status`); the page shows its ``error``
or ``status`` (as a banner), ``frame``, ``fps``, ``counts`` (class -> number), how the detector runs
(``detect_every``, ``boxes_age_ms``) and ``sperm_abnormal`` / ``sperm_judged``, and under "This slide so far"
``session``, the session's running summary (:class:`smearsight.device.record.SessionSummary`: frames, duration,
detections per class summed over the frames, fields with mature sperm, sperm judged / abnormal, abnormal by part).

``write`` never raises for a failing disk or a closed window; it records the problem in ``.error`` (plain
words) for the pipeline to show, and ``.should_stop`` turns true when the user closes the window or
presses q/Esc.
"""

from __future__ import annotations

import contextlib
import errno
import html
import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from smearsight.errors import InputError, first_line, require
from smearsight.fileio import atomic_write_bytes, dumps_finite, finite_json, fsync_dir, fsync_file


class FrameSink:
    """Base class: ``write(image_rgb, status)`` then ``close()``."""

    uri = ""

    def __init__(self) -> None:
        self.error = ""
        self.frames = 0
        self.should_stop = False

    def write(self, image_rgb: np.ndarray, status: dict[str, Any] | None = None) -> None:
        """Show or store one RGB uint8 frame with its status dict; problems go to ``.error``, never raised."""
        raise NotImplementedError

    def close(self) -> None:
        """Finish and release the output (idempotent)."""

    def __enter__(self) -> FrameSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullSink(FrameSink):
    """Discards every frame."""

    uri = "null://"

    def write(self, image_rgb: np.ndarray, status: dict[str, Any] | None = None) -> None:
        self.frames += 1


# --------------------------------------------------------------------------------------------- display
def display_problem() -> str:
    """Why a window cannot be opened here, in plain words, or "" when it can."""
    display = os.environ.get("DISPLAY")
    return _fixed_display_problem() or (x_display_problem(display) if display else "")


def _fixed_display_problem() -> str:
    """Problems no waiting can cure in this process: no display variable, an OpenCV without windows."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display is connected (DISPLAY and WAYLAND_DISPLAY are not set)"
    from smearsight.opencv_setup import inspect_opencv

    info = inspect_opencv()
    if not info.importable:
        return "OpenCV is not installed"
    if not info.gui:
        return f"this OpenCV ({info.origin}) has no window support (the headless build)"
    return ""


def window_probe(timeout: float = 20.0) -> str:
    """Open and close a test window in a child process: "" when that works, else why not, in words.

    An X server that accepts connections may still refuse this user (the kiosk session's ``xhost`` has not
    run yet), and OpenCV's Qt backend then aborts the whole process: a child takes that risk instead.
    """
    code = "import cv2; cv2.namedWindow('smearsight-probe'); cv2.waitKey(1); cv2.destroyAllWindows()"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return f"a test window did not open within {timeout:.0f} s"
    if proc.returncode == 0:
        return ""
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return f"a test window could not open ({(lines[-1] if lines else f'exit code {proc.returncode}')[:160]})"


def x_display_problem(display: str, timeout: float = 1.0) -> str:
    """Plain words when no X server accepts connections for ``display`` (e.g. ``:0``), else "".

    A set DISPLAY is not enough: with no server behind it (a kiosk session not started yet, a
    stale variable) OpenCV's Qt backend aborts the whole process instead of raising.
    """
    host, sep, rest = display.rpartition(":")
    number = rest.split(".")[0]
    if not sep or not number.isdigit():
        return f"DISPLAY={display!r} is not a display name such as :0"
    if host.startswith("/"):  # a socket path (XQuartz)
        targets: list[tuple[int, Any]] = [(socket.AF_UNIX, display)]
    elif host in ("", "unix"):
        path = f"/tmp/.X11-unix/X{number}"
        targets = [(socket.AF_UNIX, "\0" + path), (socket.AF_UNIX, path)]  # abstract socket first, like Xlib
    else:
        targets = [(socket.AF_INET, (host, 6000 + int(number)))]
    for family, address in targets:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
            return ""
        except OSError:
            continue
    return f"no X server answers on DISPLAY={display} (is the screen's session running?)"


class DisplaySink(FrameSink):
    """An OpenCV window; q or Esc (or closing the window) sets ``should_stop``.

    Before the window opens, the X server must answer on its socket and a test window must open in a
    child process (:func:`window_probe`: an X server that refuses this user makes OpenCV's Qt backend
    abort the whole process). With ``wait`` a screen that is not up yet (a kiosk session still starting
    at boot, its ``xhost`` not run yet) is not an error: frames are dropped, ``error`` says the sink is
    waiting, and both checks run again every ``retry_s`` seconds until the window opens. No DISPLAY /
    WAYLAND_DISPLAY variable or an OpenCV without window support is refused either way (waiting cannot
    cure those).
    """

    def __init__(self, uri: str, *, fullscreen: bool = False, title: str = "SmearSight", wait: bool = False,
                 retry_s: float = 2.0) -> None:
        super().__init__()
        self.uri = uri
        self.title = title
        self.fullscreen = fullscreen
        self.retry_s = retry_s
        self._open = False
        self._seen_visible = False
        self._next_probe = 0.0
        self.waiting = False
        fixed = _fixed_display_problem()
        problem = fixed or self._screen_problem()
        if problem and (not wait or fixed):
            raise InputError(
                f"{uri}: cannot open a window: {problem}; show the picture on another screen with "
                "http://:8080 (then open http://<device>:8080 in a browser) or save it with file://out.mp4"
            )
        if problem:
            self._wait_for_screen(problem)
        else:
            self._open_window()

    @staticmethod
    def _screen_problem() -> str:
        display = os.environ.get("DISPLAY")
        return (x_display_problem(display) if display else "") or window_probe()

    def _wait_for_screen(self, problem: str) -> None:
        self.waiting = True
        self.error = f"waiting for the screen: {problem}"
        self._next_probe = time.monotonic() + self.retry_s

    def _open_window(self) -> None:
        import cv2

        self._cv2 = cv2
        cv2.namedWindow(self.title, cv2.WINDOW_NORMAL)
        if self.fullscreen:
            cv2.setWindowProperty(self.title, cv2.WND_PROP_FULLSCREEN, cv2.WINDOW_FULLSCREEN)
        self._open = True
        self.waiting = False
        self.error = ""

    def _probe(self) -> None:
        if time.monotonic() < self._next_probe:
            return
        problem = self._screen_problem()
        if problem:
            self._wait_for_screen(problem)
            return
        try:
            self._open_window()
        except self._cv2_error() as exc:
            self._wait_for_screen(f"the window failed to open ({first_line(exc)[:160]})")

    @staticmethod
    def _cv2_error() -> type[Exception]:
        import cv2

        return cv2.error

    def write(self, image_rgb: np.ndarray, status: dict[str, Any] | None = None) -> None:
        if self.waiting:
            self._probe()
        if not self._open:
            return
        cv2 = self._cv2
        try:
            cv2.imshow(self.title, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
            key = cv2.waitKey(1) & 0xFF
            visible = cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE)
        except cv2.error as exc:
            self.error = f"the window failed: {first_line(exc)}"
            self.should_stop = True
            return
        self.frames += 1
        # Some GUI backends answer -1 (unsupported) for WND_PROP_VISIBLE: only a drop after a visible
        # window means the user closed it.
        closed = self._seen_visible and visible < 1
        self._seen_visible = self._seen_visible or visible >= 1
        if key in (ord("q"), 27) or closed:
            self.should_stop = True

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._cv2.destroyWindow(self.title)
                self._cv2.waitKey(1)
            except self._cv2.error:
                pass


# --------------------------------------------------------------------------------------------- http
_BOUNDARY = "smearsightframe"
_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>SmearSight</title>
<style>body{{margin:0;background:#111;color:#eee;font:16px sans-serif}} img{{max-width:100%;display:block}}
#s,#b{{padding:8px}} .err{{color:#f66;font-weight:bold}} .warn{{color:#fc3;font-weight:bold}}
td{{padding:2px 10px}} #slide{{padding:0 8px 8px}} h2{{font-size:18px;margin:8px 0 4px}}</style></head>
<body><div id="b"></div><img id="v" src="/stream.mjpg" alt="live picture"><div id="s">{body}</div>
<section id="slide"><h2>This slide so far</h2><div id="t"><p>no frame yet</p></div></section>
<script>
const esc=t=>String(t).replace(/&/g,'&amp;').replace(/</g,'&lt;').replace(/>/g,'&gt;').replace(/"/g,'&quot;');
const num=x=>Number.isFinite(Number(x))?Number(x):0;
function hms(x){{x=Math.max(0,Math.round(num(x)));const h=Math.floor(x/3600),m=Math.floor(x%3600/60);
return (h?h+' h ':'')+(h||m?m+' min ':'')+(x%60)+' s';}}
// the session's running summary (the same figures as the recorded session's and --stats-json's)
function slide(m){{let h='<p>'+esc(num(m.frames))+' frames in '+esc(hms(m.duration_s))+'</p>';
h+='<table><tr><th>class</th><th>detections, summed over the frames</th></tr>';
for(const[k,v]of Object.entries(m.counts_per_class||{{}}))h+='<tr><td>'+esc(k)+'</td><td>'+esc(num(v))+'</td></tr>';
h+='</table><p>fields with mature sperm: '+esc(num(m.fields_with_mature_sperm))+' of '+esc(num(m.frames))+'</p>';
const j=num(m.sperm_judged),a=num(m.sperm_abnormal);
h+='<p>sperm judged: '+esc(j)+' &middot; abnormal: '+esc(a)+(j?' ('+esc(Math.round(100*a/j))+' %)':'')+'</p>';
const parts=Object.entries(m.abnormal_by_part||{{}});
if(parts.length)h+='<p>abnormal by part: '+parts.map(([p,n])=>esc(p||'?')+' '+esc(num(n))).join(', ')+'</p>';
return h;}}
let seen=null,lost=false,last=0,busy=false;const WAIT_MS=4000;
// one request at a time: while the network hangs, ticks must not pile up fetches (a browser allows ~6 per host)
async function tick(){{if(busy)return;busy=true;
let s;const stop=new AbortController();const t=setTimeout(()=>stop.abort(),WAIT_MS);
const now=Date.now(),slept=last&&now-last>5000;last=now;
try{{const r=await fetch('/status.json',{{cache:'no-store',signal:stop.signal}});s=await r.json();}}
catch(e){{const b=document.getElementById('b');b.textContent='no connection to the device'+
(seen?' since '+seen.toLocaleTimeString():'')+': the picture is not live';b.className='err';lost=true;return;}}
finally{{clearTimeout(t);busy=false;}}
// a browser never reopens a stream that broke (Wi-Fi gone, device restarted, tablet asleep): open it again
if(lost||slept)document.getElementById('v').src='/stream.mjpg?t='+now;
lost=false;seen=new Date();const b=document.getElementById('b');
if(s.age_s>3){{b.textContent='no new picture for '+Math.round(s.age_s)+' s';b.className='err';}}
else if(s.frozen){{b.textContent='FROZEN: this field is held (release it on the panel)';b.className='warn';}}
else{{b.textContent='';b.className='';}}
let h='';const msg=s.error||s.status||'';if(msg)h+='<p class="err">'+esc(msg)+'</p>';
h+='<p>frame '+esc(s.frame??'-')+' &middot; '+(s.fps!=null?Number(s.fps).toFixed(1):'-')+' FPS';
if(s.detect_every==='async')h+=' &middot; boxes '+Number(s.boxes_age_ms||0).toFixed(0)+' ms old';
else if(s.detect_every>1)h+=' &middot; detector 1/'+esc(s.detect_every)+' frames';
h+='</p>';if(s.sperm_judged)h+='<p>abnormal sperm in view: '+esc(s.sperm_abnormal)+'/'+esc(s.sperm_judged)+'</p>';
if(s.counts){{h+='<table>';
for(const[k,v]of Object.entries(s.counts))h+='<tr><td>'+esc(k)+'</td><td>'+esc(v)+'</td></tr>';
h+='</table>';}}document.getElementById('s').innerHTML=h;
if(s.session&&typeof s.session==='object')document.getElementById('t').innerHTML=slide(s.session);}}
setInterval(tick,1000);tick();
</script></body></html>
"""


class _Latest:
    """The latest frame (raw and JPEG-encoded once) and status, shared with the HTTP threads."""

    def __init__(self, quality: int) -> None:
        self.cond = threading.Condition()
        self.seq = 0
        self.raw: np.ndarray | None = None
        self.jpeg: bytes | None = None
        self.jpeg_seq = -1
        self.status: dict[str, Any] = {}
        self.status_json = b"{}"
        self.written_at: float | None = None  # monotonic time of the last write: /status.json says its age
        self.clients = 0
        self.closed = False
        self.quality = quality
        self.encodes = 0

    def encode_locked(self) -> bytes | None:
        if self.raw is None:
            return None
        if self.jpeg_seq != self.seq:
            import cv2

            ok, buf = cv2.imencode(
                ".jpg", cv2.cvtColor(self.raw, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.quality]
            )
            if ok:
                self.jpeg, self.jpeg_seq = buf.tobytes(), self.seq
                self.encodes += 1
        return self.jpeg


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return finite_json(obj.item())
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    return str(obj)


HEADER_TIMEOUT_S = 5.0  # a client has this long for its whole request line and headers (HttpSink's header_timeout)


class _Handler(BaseHTTPRequestHandler):
    server_version = "SmearSight"
    # what a reply says when the request line is too broken to tell its version: http.server's default,
    # HTTP/0.9, sent error replies with no status line or headers (a bare HTML body clients read as garbage)
    default_request_version = "HTTP/1.0"
    latest: _Latest  # set on the per-server subclass
    # A client that stops reading (a tablet gone to sleep) must not pin a thread and a socket forever:
    # a send blocked this long raises TimeoutError and ends that stream (HttpSink's client_timeout).
    timeout = 15.0
    # ``timeout`` bounds each read, not the request: a client sending a header byte every few seconds
    # (slowloris) would hold its connection slot forever, and a few dozen of them every slot. The whole
    # request line and headers must come within this many seconds, else the connection is closed.
    header_timeout = HEADER_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        self._header_lock = threading.Lock()
        self._headers_read = False
        self._too_slow = False
        self._header_timer = threading.Timer(self.header_timeout, self._headers_too_slow)
        self._header_timer.daemon = True
        self._header_timer.start()

    def _headers_too_slow(self) -> None:
        with self._header_lock:
            if self._headers_read:
                return
            self._too_slow = True
        with contextlib.suppress(OSError):  # the blocked read returns at once: the request ends unanswered
            self.connection.shutdown(socket.SHUT_RDWR)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        with self._header_lock:
            self._headers_read = True
            too_slow = self._too_slow
        self._header_timer.cancel()
        if too_slow:
            self.close_connection = True
            return False
        return ok

    def finish(self) -> None:
        self._header_timer.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence per-request logging
        pass

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        # a viewer that leaves mid-reply (a reload, a closed tab, Wi-Fi) is _Server.handle_error's to ignore
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming; uptime checks use HEAD
        if urlsplit(self.path).path == "/stream.mjpg":
            self._send(200, f"multipart/x-mixed-replace; boundary={_BOUNDARY}", b"")
        else:
            self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path
        latest = self.latest
        if path == "/stream.mjpg":
            self._stream()
        elif path == "/status.json":
            with latest.cond:
                body, written_at = latest.status_json, latest.written_at
            if written_at is not None:  # how old the shown picture is: a hung or stopped run shows here
                status = {**json.loads(body), "age_s": round(time.monotonic() - written_at, 1)}
                body = json.dumps(status).encode("utf-8")
            self._send(200, "application/json", body)
        elif path == "/snapshot.jpg":
            with latest.cond:
                jpeg = latest.encode_locked()
            if jpeg is None:
                self._send(503, "text/plain; charset=utf-8", b"no frame yet\n")
            else:
                self._send(200, "image/jpeg", jpeg)
        elif path in ("/", "/index.html"):
            with latest.cond:
                status = dict(latest.status)
            msg = status.get("error") or status.get("status") or ""
            body = f'<p class="err">{html.escape(str(msg))}</p>' if msg else "<p>starting…</p>"
            self._send(200, "text/html; charset=utf-8", _PAGE.format(body=body).encode("utf-8"))
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

    def _stream(self) -> None:
        latest = self.latest
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={_BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        sent = -1
        with latest.cond:
            latest.clients += 1
        try:
            while True:
                with latest.cond:
                    if not latest.closed and (latest.raw is None or latest.seq == sent):
                        latest.cond.wait(timeout=1.0)
                    if latest.closed:
                        return
                    if latest.raw is None or latest.seq == sent:
                        continue
                    jpeg = latest.encode_locked()
                    sent = latest.seq
                if jpeg is None:
                    continue
                self.wfile.write(
                    f"--{_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                )
                self.wfile.write(jpeg)
                self.wfile.write(b"\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            return
        finally:
            with latest.cond:
                latest.clients -= 1


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once (more get a quick 503), a listen queue
    that lets a room of tablets connect together, and no traceback on stderr when a viewer drops."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    max_connections = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def server_bind(self) -> None:
        # not HTTPServer's: it looks the address up in DNS (getfqdn) for a server_name nothing here uses, and
        # with the lab's name server down that held the start for ~10 s
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _DualStackServer(_Server):
    """``http://:PORT``: every interface, IPv6 and IPv4 (IPv4 viewers arrive as ``::ffff:a.b.c.d``)."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _listen(host: str, port: int, handler: type[_Handler]) -> _Server:
    """The server for ``http://HOST:PORT``; with no host, on every interface, IPv6 too where the system has
    it (a tablet may reach the device over IPv6), else IPv4 only."""
    if ":" in host:  # http://[::1]:PORT: an IPv6 address
        return type("_Server6", (_Server,), {"address_family": socket.AF_INET6})((host, port), handler)
    if not host and socket.has_ipv6:
        try:
            return _DualStackServer(("::", port), handler)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise  # in use, not allowed: the same answer as for IPv4
    return _Server((host, port), handler)


class HttpSink(FrameSink):
    """MJPEG stream + status page + JSON over HTTP; serves from a background thread."""

    def __init__(self, uri: str, *, quality: int = 80, client_timeout: float = 15.0,
                 header_timeout: float = HEADER_TIMEOUT_S) -> None:
        super().__init__()
        require("cv2", "JPEG encoding")
        try:
            parts = urlsplit(uri)
        except ValueError as exc:  # http://[zz]:8080, http://[::1:8080
            raise InputError(f"{uri}: not an address to listen on ({exc}); expected http://:PORT, "
                             "http://HOST:PORT or http://[IPv6]:PORT") from exc
        try:
            port = parts.port
        except ValueError as exc:
            raise InputError(f"{uri}: the port must be a number from 0 to 65535") from exc
        if port is None:
            raise InputError(f"{uri}: expected http://:PORT such as http://:8080")
        host = parts.hostname or ""
        shown = f"[{host}]" if ":" in host else host
        self._latest = _Latest(quality)
        handler = type("Handler", (_Handler,), {"latest": self._latest, "timeout": float(client_timeout),
                                                "header_timeout": float(header_timeout)})
        try:
            self._server = _listen(host, port, handler)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EADDRINUSE:
                hint = (": another program (or another smearsight run) uses it; stop that or choose another port "
                        f"such as http://{shown}:{8081 if port == 8080 else 8080}")
            elif exc.errno == errno.EACCES and 0 < port < 1024:
                hint = f": ports below 1024 need root; use one such as http://{shown}:8080"
            raise InputError(f"{uri}: cannot listen on port {port} ({exc.strerror or exc}){hint}") from exc
        self.host = host or "0.0.0.0"
        self.port = int(self._server.server_address[1])
        self.uri = f"http://{shown}:{self.port}"
        self.url = f"http://{shown or '127.0.0.1'}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"http-sink:{self.port}", daemon=True)
        self._thread.start()

    @property
    def clients(self) -> int:
        """Open MJPEG connections."""
        return self._latest.clients

    @property
    def encodes(self) -> int:
        """How many JPEG encodes happened so far (at most one per written frame)."""
        return self._latest.encodes

    def write(self, image_rgb: np.ndarray, status: dict[str, Any] | None = None) -> None:
        latest = self._latest
        try:
            # NaN/Infinity are not JSON: the page's JSON.parse would fail and say "no connection to the device"
            status_json = dumps_finite(status or {}, default=_json_default).encode("utf-8")
        except (TypeError, ValueError) as exc:
            status_json = json.dumps({"error": f"status not serialisable: {exc}"}).encode("utf-8")
        with latest.cond:
            latest.raw = np.array(image_rgb, dtype=np.uint8, copy=True)
            latest.seq += 1
            latest.status = dict(status or {})
            latest.status_json = status_json
            latest.written_at = time.monotonic()
            if latest.clients:
                latest.encode_locked()  # once here, then shared by every client
            latest.cond.notify_all()
        self.frames += 1

    def close(self) -> None:
        with self._latest.cond:
            if self._latest.closed:
                return
            self._latest.closed = True
            self._latest.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


# --------------------------------------------------------------------------------------------- files
_VIDEO_EXT = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}


def _check_writable_dir(directory: Path, uri: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{uri}: cannot create the folder {directory} ({exc.strerror or exc})") from exc
    probe = directory / f".smearsight-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{uri}: cannot write in {directory} ({exc.strerror or exc})") from exc


class VideoFileSink(FrameSink):
    """A video file written with ``cv2.VideoWriter``; appears under its name only once closed."""

    def __init__(self, uri: str, path: Path, *, fps: float = 15.0, fourcc: str | None = None) -> None:
        super().__init__()
        require("cv2", "writing video files")
        self.uri = uri
        self.path = path
        self.fps = float(fps)
        self.fourcc = fourcc or _VIDEO_EXT.get(path.suffix.lower(), "mp4v")
        _check_writable_dir(path.parent, uri)
        self._tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        self._writer: Any = None
        self._size: tuple[int, int] | None = None

    def write(self, image_rgb: np.ndarray, status: dict[str, Any] | None = None) -> None:
        import cv2

        if self.error and self._writer is None and self._size is not None:
            return
        h, w = image_rgb.shape[:2]
        if (h | w) & 1:  # the codecs need even sizes and would crop silently: pad the last row/column instead
            image_rgb = cv2.copyMakeBorder(image_rgb, 0, h & 1, 0, w & 1, cv2.BORDER_REPLICATE)
            h, w = image_rgb.shape[:2]
        if self._writer is None:
            self._size = (w, h)
            self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*self.fourcc), self.fps, (w, h))
            if not self._writer.isOpened():
                self._writer = None
                self.error = f"{self.uri}: OpenCV cannot write {self.path.suffix} video with {self.fourcc}"
                return
        if (w, h) != self._size:
            image_rgb = cv2.resize(image_rgb, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))  # never reports a failed write
        self.frames += 1
        if self.frames % DISK_CHECK_FRAMES == 0 and not self.error and disk_full(self._tmp.parent):
            self.error = (f"{self.uri}: the disk is nearly full: the video may lose its frames from about "
                          f"frame {self.frames} on (free some space, or write elsewhere)")

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        try:
            saved = readable_video_frames(self._tmp)
            if saved > 0:
                fsync_file(self._tmp)
                os.replace(self._tmp, self.path)
                fsync_dir(self.path.parent)
                if saved < self.frames:  # cut short (a full disk): kept, for the frames it holds
                    self.error = (f"{self.uri}: only {saved} of the {self.frames} frames were saved "
                                  "(is the disk full?)")
                return
            self.error = (f"{self.uri}: the video could not be finished and was not kept "
                          f"({self.frames} frames; is the disk full?)")
        except OSError as exc:
            self.error = f"{self.uri}: could not finish the video ({exc.strerror or exc})"
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)


def readable_video_frames(path: Path) -> int:
    """How many frames a closed video file holds: the count in its index (exact in the files OpenCV writes)
    when its last frame reads, else (an .avi cut short by a full disk) the frames that decode; 0 when it cannot
    open it or read its first frame (an .mp4 cut short has no index and does not open)."""
    import cv2

    if not path.is_file() or path.stat().st_size == 0:
        return 0
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened() or not cap.read()[0]:
            return 0
        stated = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if stated == 1 or stated > 1 and cap.set(cv2.CAP_PROP_POS_FRAMES, stated - 1) and cap.read()[0]:
            return stated
        cap.release()
        cap = cv2.VideoCapture(str(path))
        count = 0
        while cap.grab():
            count += 1
        return count
    finally:
        cap.release()


DISK_CHECK_FRAMES = 25  # a video sink checks the free space this often (OpenCV's writer never reports a failure)
DISK_FULL_BYTES = 1 << 20


def disk_full(directory: Path) -> bool:
    """True when the file system holding ``directory`` has less than 1 MiB left for this user."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < DISK_FULL_BYTES


class ImageDirSink(FrameSink):
    """Numbered frames in a folder, each written under a temporary name and renamed (atomic for readers)."""

    def __init__(self, uri: str, directory: Path, *, ext: str = "jpg", quality: int = 90,
                 start: int | None = None) -> None:
        super().__init__()
        require("cv2", "writing images")
        ext = ext.lower().lstrip(".")
        if ext not in ("jpg", "jpeg", "png"):
            raise InputError(f"{uri}: ext must be jpg or png, got {ext!r}")
        self.uri = uri
        self.directory = directory
        self.ext = ext
        self.quality = quality
        _check_writable_dir(directory, uri)
        self.note = ""  # plain words on where this run's frames start when the folder held earlier ones
        if start is None:
            start = self._after_existing_frames()
            if start:
                self.note = (f"{uri}: the folder already holds frames up to frame_{start - 1:06d}.{ext}; this "
                             f"run's frames start at frame_{start:06d}.{ext}")
        self.index = start
        self._failing_since = ""  # the first frame that could not be saved, while saving fails

    def _after_existing_frames(self) -> int:
        """One past the highest ``frame_NNNNNN`` already in the folder (0 when none): a new run never
        overwrites an earlier one's frames."""
        numbers = [int(m.group(1)) for p in self.directory.iterdir()
                   if (m := re.fullmatch(r"frame_(\d+)\.(?:jpe?g|png)", p.name, re.IGNORECASE))]
        return max(numbers) + 1 if numbers else 0

    def write(self, image_rgb: np.ndarray, status: dict[str, Any] | None = None) -> None:
        import cv2

        params = [cv2.IMWRITE_JPEG_QUALITY, self.quality] if self.ext in ("jpg", "jpeg") else []
        ok, buf = cv2.imencode(f".{self.ext}", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)
        name = f"frame_{self.index:06d}.{self.ext}"
        self.index += 1
        if not ok:
            self.error = f"{self.uri}: could not encode {name}"
            return
        try:
            atomic_write_bytes(self.directory / name, buf.tobytes())
        except OSError as exc:
            # one message for the whole failure (the frame it began at), not one per frame
            self._failing_since = self._failing_since or name
            self.error = (f"{self.uri}: frames are not being saved since {self._failing_since} "
                          f"({exc.strerror or exc})")
            return
        self._failing_since = ""
        if self.error:
            self.error = ""
        self.frames += 1


# --------------------------------------------------------------------------------------------- factory
def local_path(uri: str) -> Path | None:
    """The path a ``file://`` URI (or a plain path) names; None for other schemes and for a bare camera index."""
    text = str(uri).strip()
    if text.isdigit():  # smearsight run 0: the first camera
        return None
    if text.startswith("file://"):
        return Path(text[len("file://") :]).expanduser()
    return Path(text).expanduser() if "://" not in text else None


def open_sink(uri: str, *, headless: bool = False, **opts: Any) -> FrameSink:
    """Open a sink from a URI (see the module docstring).

    Options: ``fullscreen``/``title``/``wait`` (display; ``wait``: keep running until the screen is up),
    ``quality`` (JPEG, http and image folders), ``fps``/``fourcc``
    (video files), ``ext``/``start`` (image folders: jpg or png). Options that do not apply to the chosen
    sink are ignored; unknown ones are refused. ``headless=True`` refuses ``display://``.
    Raises :class:`InputError` with a plain message when the sink cannot be opened.
    """
    text = str(uri).strip()
    unknown = set(opts) - _KNOWN_OPTS
    if unknown:
        raise InputError(f"{text}: unknown output option(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(_KNOWN_OPTS))})")

    def pick(*names: str) -> dict[str, Any]:
        return {k: opts[k] for k in names if k in opts and opts[k] is not None}

    if text.startswith("display://"):
        if headless:
            raise InputError(
                f"{text}: a window was asked for with --headless; use http://:8080 or file://out.mp4 instead"
            )
        return DisplaySink(text, **pick("fullscreen", "title", "wait"))
    if text.startswith("http://"):
        return HttpSink(text, **pick("quality"))
    if text.startswith("file://"):
        path = local_path(text)
        assert path is not None
        if path.is_dir() and not text.endswith("/") and path.suffix.lower() in _VIDEO_EXT:
            raise InputError(f"{text}: is a folder, not a video file (end the output with / to save image "
                             "frames in it)")
        if text.endswith("/") or path.is_dir() or not path.suffix:
            return ImageDirSink(text, path, **pick("ext", "quality", "start"))
        if path.suffix.lower() not in _VIDEO_EXT:
            raise InputError(f"{text}: unknown video type {path.suffix!r} (expected .mp4, .avi or .mkv, "
                             "or a folder ending in /)")
        return VideoFileSink(text, path, **pick("fps", "fourcc"))
    if text in ("null://", "null"):
        return NullSink()
    if "://" not in text and (text.endswith("/") or Path(text).suffix.lower() in _VIDEO_EXT):
        return open_sink(f"file://{text}", headless=headless, **opts)
    raise InputError(f"{text}: unknown output (expected display://0, http://:PORT, file://out.mp4, "
                     "file://folder/ or null://)")


_KNOWN_OPTS = {"fullscreen", "title", "wait", "quality", "fps", "fourcc", "ext", "start"}
