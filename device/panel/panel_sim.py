"""A software panel for testing the runtime's serial link (``smearsight device panel-sim``).

It shows what the runtime sends (status, counts, summaries, alerts, pongs with their round-trip time)
and sends panel commands: from a script on a schedule (``ping,start,freeze,stop``), or from single
keys when run interactively in a terminal.
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

from smearsight.device.panel.framing import DecodeError, Frame
from smearsight.device.panel.link import LinkState, SerialLink
from smearsight.device.panel.monitor import error_record, frame_record, stats_record, summarize
from smearsight.device.panel.protocol import (
    Capture,
    Freeze,
    FreezeMode,
    Message,
    MsgType,
    Ping,
    Pong,
    StartSession,
    StopSession,
)

#: script words -> description (``wait`` sends nothing and just lets one interval pass)
COMMANDS: dict[str, str] = {
    "ping": "send a ping (the runtime answers with a pong)",
    "start": "start a session",
    "stop": "stop the session",
    "freeze": "freeze the displayed field",
    "unfreeze": "unfreeze",
    "toggle": "toggle freeze",
    "capture": "capture the current field",
    "wait": "send nothing for one interval",
}
KEYS: dict[str, str] = {"p": "ping", "s": "start", "x": "stop", "f": "toggle", "c": "capture"}


def parse_script(text: str) -> list[str]:
    """Split ``"ping,start,freeze,stop"`` into words; raise ValueError naming an unknown word."""
    words = [w.strip().lower() for w in text.replace(";", ",").split(",") if w.strip()]
    for w in words:
        if w not in COMMANDS:
            raise ValueError(f"unknown command {w!r} (expected one of: {', '.join(COMMANDS)})")
    return words


@dataclass
class SimResult:
    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    rtts_ms: list[float] = field(default_factory=list)
    errors: int = 0
    connected: bool = False


class PanelSim:
    """Plays the panel on ``port``: prints what arrives, sends commands with :meth:`command`."""

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 115200,
        label: str = "",
        jsonl: bool = False,
        console: Console | None = None,
    ) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.jsonl = jsonl
        self.label = label
        self.result = SimResult()
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._nonce = 0
        self._pings: dict[int, float] = {}
        self.link = SerialLink(port, baudrate=baudrate, coalesce=(), name="panel-sim")
        self.link.on_any(self._on_frame)
        self.link.on_error(self._on_error)
        self.link.on_state(self._on_state)

    def _emit(self, markup: str, record: dict[str, Any]) -> None:
        with self._lock:
            if self.jsonl:
                self.console.out(json.dumps(record, ensure_ascii=False), highlight=False)
            else:
                self.console.print(markup)

    def _t(self) -> float:
        return time.monotonic() - self.t0

    def _on_frame(self, frame: Frame) -> None:
        t = self._t()
        name = frame.type_name
        self.result.received[name] = self.result.received.get(name, 0) + 1
        extra = ""
        record = frame_record(frame, t)
        if isinstance(frame.message, Pong):
            sent = self._pings.pop(frame.message.nonce, None)
            if sent is not None:
                rtt = (time.monotonic() - sent) * 1000
                self.result.rtts_ms.append(rtt)
                extra = f" rtt {rtt:.1f} ms"
                record["rtt_ms"] = round(rtt, 2)
        self._emit(f"[dim]{t:8.3f}[/] [green]←[/] [bold]{name:<13}[/] {summarize(frame)}{extra}", record)

    def _on_error(self, err: DecodeError) -> None:
        self.result.errors += 1
        t = self._t()
        self._emit(f"[dim]{t:8.3f}[/] [bold red]{err.kind.upper()}[/] {escape(err.detail)}", error_record(err, t))

    def _on_state(self, state: LinkState, detail: str) -> None:
        if state is LinkState.CONNECTED:
            self.result.connected = True
        why = f": {escape(detail)}" if detail else ""
        self._emit(
            f"[yellow]{escape(self.link.port_name)}: {state.value}{why}[/]",
            {"event": "state", "state": state.value, "detail": detail},
        )

    def command(self, word: str) -> Message | None:
        """Send the command ``word`` (see :data:`COMMANDS`); returns the message sent (None for wait)."""
        message: Message | None
        if word == "ping":
            self._nonce = (self._nonce + 1) & 0xFFFFFFFF
            self._pings[self._nonce] = time.monotonic()
            message = Ping(self._nonce)
        elif word == "start":
            message = StartSession(self.label)
        elif word == "stop":
            message = StopSession()
        elif word in ("freeze", "unfreeze", "toggle"):
            mode = {"freeze": FreezeMode.ON, "unfreeze": FreezeMode.OFF, "toggle": FreezeMode.TOGGLE}[word]
            message = Freeze(mode)
        elif word == "capture":
            message = Capture()
        elif word == "wait":
            return None
        else:
            raise ValueError(f"unknown command {word!r}")
        self.link.send(message)
        name = MsgType(message.TYPE).name
        self.result.sent[name] = self.result.sent.get(name, 0) + 1
        t = self._t()
        detail = summarize(Frame(1, message.TYPE, 0, message, 0))
        self._emit(
            f"[dim]{t:8.3f}[/] [cyan]→[/] [bold]{name:<13}[/] {detail}",
            {"t": round(t, 4), "event": "sent", "type": name, **({"nonce": message.nonce} if word == "ping" else {})},
        )
        return message

    def run(
        self,
        *,
        script: list[str] | None = None,
        interval: float = 0.5,
        duration: float | None = None,
        repeat: bool = False,
        interactive: bool = False,
        stop: threading.Event | None = None,
    ) -> SimResult:
        """Run until ``duration`` passes, the script ends (plus one interval for replies), ``q`` or ``stop``."""
        stop = stop or threading.Event()
        self.t0 = time.monotonic()
        if not self.jsonl:
            keys = "  ".join(f"[bold]{k}[/] {v}" for k, v in KEYS.items())
            how = f"keys: {keys}  [bold]q[/] quit" if interactive else f"script: {','.join(script or []) or '(none)'}"
            self.console.print(f"[bold]panel-sim[/] {escape(self.link.port_name)} — {how}")
        keys = _KeyReader() if interactive else None  # before the link says "connected": no key is lost
        self.link.start()
        steps = list(script or [])
        step = 0
        next_at = self.t0 + interval
        script_done_at: float | None = None
        try:
            while not stop.is_set():
                now = time.monotonic()
                if duration is not None and now - self.t0 >= duration:
                    break
                if steps and now >= next_at and script_done_at is None:
                    if self.link.connected:
                        self.command(steps[step])
                        step += 1
                        if step == len(steps):
                            if repeat:
                                step = 0
                            else:
                                script_done_at = now
                    next_at = now + interval
                if script_done_at is not None and duration is None and now - script_done_at >= interval:
                    break
                if keys is not None:
                    key = keys.read(0.05)
                    if key == "q":
                        break
                    if key in KEYS:
                        self.command(KEYS[key])
                else:
                    stop.wait(0.02)
        except KeyboardInterrupt:
            pass
        finally:
            if keys is not None:
                keys.close()
            self.link.flush(1.0)
            self.link.close()
        if self.jsonl:
            self._emit("", {**stats_record(self.link.stats), "sim": vars(self.result)})
        else:
            rtt = ""
            if self.result.rtts_ms:
                r = sorted(self.result.rtts_ms)
                rtt = f", ping rtt median {r[len(r) // 2]:.1f} ms (n={len(r)})"
            rx = self.link.stats.rx
            self.console.print(
                f"sent {sum(self.result.sent.values())}, received {rx.frames} frames, "
                f"{rx.errors} bad ({rx.garbage_bytes} bytes discarded){rtt}"
            )
        return self.result


class _KeyReader:
    """Single key presses from a terminal (cbreak mode), restored on close."""

    def __init__(self) -> None:
        import termios
        import tty

        self._fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(self._fd)
        tty.setcbreak(self._fd, termios.TCSANOW)  # TCSAFLUSH (the default) would drop keys typed already

    def read(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(self._fd, 1)
        return data.decode("ascii", "ignore").lower() or "q"

    def close(self) -> None:
        import termios

        termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
