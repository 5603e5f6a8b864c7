"""The serial link: a non-blocking sender, a dispatching receiver and automatic reconnection.

:class:`SerialLink` owns one serial port (any pyserial URL: ``/dev/ttyUSB0``, ``loop://``,
``socket://host:port``) and two threads:

* the **writer** drains a bounded queue. :meth:`SerialLink.send` only takes a lock and appends, so the
  video pipeline never waits on the wire: a newer status (or counts) replaces the one still waiting
  ("coalesced"), and when the queue is full the oldest message is dropped; both are counted.
* the **reader** opens the port, reads, decodes frames and calls the handlers registered with
  :meth:`SerialLink.on`. When the port fails (cable pulled, USB adapter re-enumerated) it is closed and
  reopened with exponential backoff; :attr:`SerialLink.state` and :meth:`SerialLink.status_line` say
  what is going on, for the on-screen status.

:class:`PanelLink` is the runtime's end: it answers pings and has helpers for the runtime's messages.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import serial

from smearsight.device.panel.framing import BinaryCodec, Codec, DecodeError, DecoderStats, Frame
from smearsight.device.panel.protocol import (
    Alert,
    AlertLevel,
    Counts,
    Message,
    MsgType,
    Ping,
    Pong,
    RunState,
    Status,
    Summary,
    type_code,
)

log = logging.getLogger(__name__)

Opener = Callable[[], Any]
FrameHandler = Callable[[Frame], None]


class LinkState(str, enum.Enum):
    """Where a :class:`SerialLink` stands; shown on screen through :meth:`SerialLink.status_line`."""

    STOPPED = "stopped"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@dataclass
class LinkStats:
    """Send, reconnection and handler counters of a link; ``rx`` holds the decoder's receive counters."""

    enqueued: int = 0
    sent: int = 0
    sent_bytes: int = 0
    dropped: int = 0  # oldest message pushed out of a full queue, or lost with a failed port
    coalesced: int = 0  # status/counts replaced by a newer one before it was sent
    write_timeouts: int = 0
    opens: int = 0
    open_failures: int = 0
    reconnects: int = 0
    port_errors: int = 0
    handler_errors: int = 0
    unhandled: int = 0
    open_error: str = ""  # why the port last failed to open ("Permission denied"), empty once it opened
    rx: DecoderStats = field(default_factory=DecoderStats)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rx"}
        out["rx"] = self.rx.as_dict()
        return out


def default_opener(port: str, baudrate: int, read_timeout: float, write_timeout: float) -> Opener:
    """An opener for ``serial.serial_for_url`` (plain device paths and pyserial URLs alike)."""

    def _open() -> Any:
        return serial.serial_for_url(port, baudrate=baudrate, timeout=read_timeout, write_timeout=write_timeout)

    return _open


class SerialLink:
    """One end of the panel protocol over a serial port (see the module docstring).

    ``coalesce``: message types of which only the newest waiting copy is kept. ``backoff_initial`` /
    ``backoff_max``: reconnection delays in seconds (doubling). ``opener``: a callable returning an open
    pyserial-like port (tests and special transports); by default ``serial.serial_for_url(port, ...)``.
    ``silence_warning``: after this many seconds without a good frame from a peer that has spoken
    before, :meth:`status_line` says the panel is silent (a panel that pings now and then is alive).
    ``codec``: the wire format, by default :class:`~smearsight.device.panel.framing.BinaryCodec` (the
    SmearSight protocol); :class:`~smearsight.device.panel.nextion.NextionCodec` drives a Nextion display.
    """

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 115200,
        queue_size: int = 64,
        coalesce: tuple[int, ...] = (MsgType.STATUS, MsgType.COUNTS),
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        read_timeout: float = 0.05,
        write_timeout: float = 0.5,
        opener: Opener | None = None,
        codec: Codec | None = None,
        silence_warning: float = 10.0,
        name: str = "panel-link",
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.port_name = port
        self.name = name
        self.queue_size = queue_size
        self.coalesce = frozenset(int(c) for c in coalesce)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stats = LinkStats()
        self._opener = opener or default_opener(port, baudrate, read_timeout, write_timeout)
        self.codec: Codec = codec or BinaryCodec()
        self._decoder = self.codec.new_decoder()
        self.stats.rx = self._decoder.stats
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, bytes]] = deque()
        self._port: Any = None
        self._state = LinkState.STOPPED
        self._last_error = ""
        self._retry_at: float | None = None
        self._seq = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._handlers: dict[int, list[FrameHandler]] = {}
        self._any_handlers: list[FrameHandler] = []
        self._error_handlers: list[Callable[[DecodeError], None]] = []
        self._state_handlers: list[Callable[[LinkState, str], None]] = []
        self.silence_warning = silence_warning
        self._last_rx: float | None = None
        #: delays (s) the reconnection waited, newest last (for status and tests)
        self.retry_delays: deque[float] = deque(maxlen=64)

    # -- handlers ---------------------------------------------------------------------------------
    def on(self, code: int, handler: FrameHandler) -> FrameHandler:
        """Call ``handler(frame)`` on the reader thread for every frame of type ``code``."""
        self._handlers.setdefault(int(code), []).append(handler)
        return handler

    def on_any(self, handler: FrameHandler) -> FrameHandler:
        """Call ``handler(frame)`` for every good frame (before the per-type handlers)."""
        self._any_handlers.append(handler)
        return handler

    def on_error(self, handler: Callable[[DecodeError], None]) -> None:
        """Call ``handler(error)`` for every bad frame, CRC error or run of garbage."""
        self._error_handlers.append(handler)

    def on_state(self, handler: Callable[[LinkState, str], None]) -> None:
        """Call ``handler(state, detail)`` whenever the link's state changes."""
        self._state_handlers.append(handler)

    # -- state ------------------------------------------------------------------------------------
    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def connected(self) -> bool:
        return self._state is LinkState.CONNECTED

    def seconds_since_rx(self) -> float | None:
        """Seconds since the last good frame arrived (None before the first one)."""
        return None if self._last_rx is None else time.monotonic() - self._last_rx

    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue)

    def status_line(self) -> str:
        """One line in plain words for the device screen, e.g. ``panel: not connected, retrying in 0.8 s (...)``."""
        state = self._state
        if state is LinkState.RECONNECTING or (state is LinkState.CONNECTING and self._retry_at):
            wait = max(0.0, (self._retry_at or time.monotonic()) - time.monotonic())
            why = f" ({self._last_error})" if self._last_error else ""
            return f"panel: not connected, retrying in {wait:.1f} s{why}"
        if state is LinkState.CONNECTED:
            quiet = self.seconds_since_rx()
            if quiet is not None and quiet > self.silence_warning:
                return f"panel: connected on {self.port_name}, but silent for {quiet:.0f} s"
            return f"panel: connected on {self.port_name}"
        return f"panel: {state.value}"

    def _set_state(self, state: LinkState, detail: str = "") -> None:
        if state is self._state:
            return
        self._state = state
        for handler in self._state_handlers:
            try:
                handler(state, detail)
            except Exception:  # a display callback must not kill the link
                self.stats.handler_errors += 1
                log.exception("%s: state handler failed", self.name)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> SerialLink:
        """Start the reader and writer threads (the port is opened by the reader, with retries)."""
        if self._threads:
            raise RuntimeError(f"{self.name} already started")
        self._stop.clear()
        self._set_state(LinkState.CONNECTING)
        self._threads = [
            threading.Thread(target=self._reader_loop, name=f"{self.name}-reader", daemon=True),
            threading.Thread(target=self._writer_loop, name=f"{self.name}-writer", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Stop both threads and close the port (messages still queued are discarded)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        with self._cond:
            port, self._port = self._port, None
        _close_quietly(port)
        self._set_state(LinkState.CLOSED)

    def __enter__(self) -> SerialLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the port to be open; True when it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._state is LinkState.CONNECTED:
                return True
            time.sleep(0.005)
        return self._state is LinkState.CONNECTED

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every queued message was handed to the port (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    _writing = False

    # -- sending ----------------------------------------------------------------------------------
    def send(self, message: Message) -> bool:
        """Queue ``message`` for sending; never blocks on the port.

        Returns False when something had to give way: an older copy of a coalesced type was replaced
        or the oldest queued message was dropped (both counted in :attr:`stats`).
        """
        code = type_code(message)
        payload = self.codec.prepare(message)
        with self._cond:
            self.stats.enqueued += 1
            ok = True
            if code in self.coalesce:
                for i, (c, _) in enumerate(self._queue):
                    if c == code:
                        self._queue[i] = (code, payload)
                        self.stats.coalesced += 1
                        return False
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self.stats.dropped += 1
                ok = False
            self._queue.append((code, payload))
            self._cond.notify_all()
            return ok

    def _writer_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and (not self._queue or self._port is None):
                    self._cond.wait(0.1)
                if self._stop.is_set():
                    return
                code, payload = self._queue.popleft()
                port = self._port
                seq = self._seq
                self._seq = (self._seq + 1) & 0xFFFF
                self._writing = True
            try:
                data = self.codec.wire(code, payload, seq)
                if not data:
                    continue  # nothing this codec shows (e.g. a pong for a display)
                port.write(data)
                self.stats.sent += 1
                self.stats.sent_bytes += len(data)
            except serial.SerialTimeoutException:
                # A stalled port: this frame may be partly on the wire; the next frame's leading
                # delimiter resynchronises the receiver.
                with self._cond:
                    self.stats.write_timeouts += 1
                    self.stats.dropped += 1
            except (serial.SerialException, OSError, ValueError, TypeError, AttributeError) as exc:
                with self._cond:
                    self.stats.dropped += 1
                self._port_failed(port, exc)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    # -- receiving and reconnection ---------------------------------------------------------------
    def _port_failed(self, port: Any, exc: BaseException) -> None:
        with self._cond:
            if self._port is not port or port is None:
                return
            self._port = None
            self.stats.port_errors += 1
            self._last_error = _short_error(exc)
        _close_quietly(port)
        if not self._stop.is_set():
            log.warning("%s: port %s failed: %s", self.name, self.port_name, self._last_error)
            self._set_state(LinkState.RECONNECTING, self._last_error)

    def _open_with_backoff(self) -> Any:
        delay = self.backoff_initial
        first = self.stats.opens == 0
        if not first:
            # wait before the first reopen too: an unplugged adapter needs a moment to come back
            if not self._sleep_backoff(delay):
                return None
            delay = min(delay * 2, self.backoff_max)
        while not self._stop.is_set():
            try:
                port = self._opener()
            except (serial.SerialException, OSError, ValueError) as exc:
                self.stats.open_failures += 1
                self.stats.open_error = _short_error(exc)
                self._last_error = f"{self.port_name}: {self.stats.open_error}"
                self._set_state(LinkState.CONNECTING if first else LinkState.RECONNECTING, self._last_error)
                if not self._sleep_backoff(delay):
                    return None
                delay = min(delay * 2, self.backoff_max)
                continue
            self._retry_at = None
            self.stats.open_error = ""
            return port
        return None

    def _sleep_backoff(self, delay: float) -> bool:
        self.retry_delays.append(delay)
        self._retry_at = time.monotonic() + delay
        return not self._stop.wait(delay)

    def _reader_loop(self) -> None:
        while not self._stop.is_set():
            port = self._open_with_backoff()
            if port is None:
                return
            self._decoder.reset()
            with self._cond:
                self._port = port
                self._cond.notify_all()
            if self.stats.opens:
                self.stats.reconnects += 1
            self.stats.opens += 1
            self._last_error = ""
            self._set_state(LinkState.CONNECTED)
            while not self._stop.is_set() and self._port is port:
                try:
                    data = port.read(port.in_waiting or 1)
                except (serial.SerialException, OSError, ValueError, TypeError, AttributeError) as exc:
                    self._port_failed(port, exc)
                    break
                if data:
                    self._dispatch(self._decoder.feed(data))

    def _dispatch(self, events: list[Frame | DecodeError]) -> None:
        for event in events:
            if isinstance(event, DecodeError):
                log.debug("%s: %s: %s", self.name, event.kind, event.detail)
                handlers: list = self._error_handlers
            else:
                self._last_rx = time.monotonic()
                handlers = self._any_handlers + self._handlers.get(event.type_code, [])
                if not handlers:
                    self.stats.unhandled += 1
            for handler in handlers:
                try:
                    handler(event)
                except Exception:
                    self.stats.handler_errors += 1
                    log.exception("%s: handler for %s failed", self.name, event)


class PanelLink(SerialLink):
    """The runtime's end of the link: answers pings; helpers for status, counts, summary and alerts.

    Register the panel's commands with ``link.on(MsgType.START_SESSION, fn)`` (and STOP_SESSION,
    FREEZE, CAPTURE); handlers run on the reader thread and get the :class:`Frame`.
    """

    def __init__(self, port: str, **kwargs: Any) -> None:
        kwargs.setdefault("name", "panel-link")
        super().__init__(port, **kwargs)
        self.on(MsgType.PING, self._answer_ping)

    def _answer_ping(self, frame: Frame) -> None:
        assert isinstance(frame.message, Ping)
        self.send(Pong(frame.message.nonce))

    def send_status(self, state: RunState, fps: float, frame: int = 0, session_id: str = "", text: str = "") -> bool:
        """Queue a :class:`Status` (coalesced: only the newest waiting one is sent)."""
        return self.send(Status(state, fps, frame, session_id, text))

    def send_counts(self, counts: dict[str, int], session_id: str = "", frame: int = 0) -> bool:
        """Queue per-class :class:`Counts` (coalesced); ValueError for more classes or longer names than fit."""
        return self.send(Counts(dict(counts), session_id, frame))

    def send_summary(self, summary: Summary) -> bool:
        """Queue a session :class:`Summary`."""
        return self.send(summary)

    def send_alert(self, text: str, level: AlertLevel = AlertLevel.WARNING, code: int = 0) -> bool:
        """Queue an :class:`Alert` (text longer than its field is cut)."""
        return self.send(Alert(level, text, code))


def _close_quietly(port: Any) -> None:
    if port is None:
        return
    try:
        port.close()
    except Exception:
        pass


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:  # pyserial repeats errno and port: "[Errno 2] could not open ..."
        return os.strerror(exc.errno)
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:160]
