"""Decode live panel-protocol traffic from a serial port and show it (``smearsight device serial-monitor``)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from smearsight.device.panel.framing import DecodeError, Frame
from smearsight.device.panel.link import LinkState, LinkStats, SerialLink
from smearsight.device.panel.protocol import (
    PANEL_TO_RUNTIME,
    Alert,
    Counts,
    Freeze,
    Ping,
    Pong,
    StartSession,
    Status,
    Summary,
    UnknownMessage,
    describe,
)

_LEVEL_STYLE = {"INFO": "cyan", "WARNING": "yellow", "ERROR": "bold red"}


def summarize(frame: Frame) -> str:
    """A short human description of a frame's message (rich markup)."""
    m = frame.message
    if isinstance(m, Status):
        text = f" [italic]{escape(m.text)}[/]" if m.text else ""
        sess = f" session {escape(m.session_id)}" if m.session_id else ""
        return f"{m.state.name} {m.fps:.1f} fps frame {m.frame}{sess}{text}"
    if isinstance(m, Counts):
        total = sum(m.counts.values())
        body = " ".join(f"{escape(k)}={v}" for k, v in m.counts.items())
        return f"{body} (total {total}, frame {m.frame})"
    if isinstance(m, Summary):
        body = " ".join(f"{escape(k)}={v}" for k, v in m.counts.items())
        return f"session {escape(m.session_id)}: {m.frames} frames, {m.duration_s:.1f} s, {m.captures} captures; {body}"
    if isinstance(m, Alert):
        code = f" (code {m.code})" if m.code else ""
        return f"[{_LEVEL_STYLE[m.level.name]}]{m.level.name}[/] {escape(m.text)}{code}"
    if isinstance(m, (Ping, Pong)):
        return f"nonce {m.nonce}"
    if isinstance(m, StartSession):
        return f"label {escape(m.label)!r}" if m.label else ""
    if isinstance(m, Freeze):
        return m.mode.name
    if isinstance(m, UnknownMessage):
        return f"[yellow]unknown type[/] ({len(m.payload)} payload bytes)"
    return ""


def frame_line(frame: Frame, t: float) -> str:
    arrow = "panel→rt" if frame.type_code in PANEL_TO_RUNTIME else "rt→panel"
    return f"[dim]{t:8.3f}[/] [dim]#{frame.seq:<5}[/] {arrow} [bold]{frame.type_name:<13}[/] {summarize(frame)}"


def error_line(err: DecodeError, t: float) -> str:
    return f"[dim]{t:8.3f}[/] [bold red]{err.kind.upper():<13}[/] {escape(err.detail)} [dim]({err.nbytes} bytes)[/]"


def frame_record(frame: Frame, t: float) -> dict[str, Any]:
    return {"t": round(t, 4), "event": "frame", "seq": frame.seq, **describe(frame.message)}


def error_record(err: DecodeError, t: float) -> dict[str, Any]:
    return {"t": round(t, 4), "event": "error", "kind": err.kind, "detail": err.detail, "bytes": err.nbytes}


def stats_table(stats: LinkStats, title: str = "link statistics") -> Table:
    """The receive counters (and reconnects) as a two-column table; non-zero error counts in red."""
    rx = stats.rx
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("counter")
    table.add_column("value", justify="right")
    rows = [
        ("frames ok", rx.frames, False),
        ("CRC errors", rx.crc_errors, True),
        ("truncated frames", rx.truncated, True),
        ("garbage runs", rx.garbage, True),
        ("oversized runs", rx.oversized, True),
        ("unsupported version", rx.version_errors, True),
        ("malformed payloads", rx.malformed, True),
        ("unknown message types", rx.unknown_types, True),
        ("bytes received", rx.bytes, False),
        ("bytes discarded", rx.garbage_bytes, True),
        ("reconnects", stats.reconnects, True),
    ]
    for name, value, is_error in rows:
        table.add_row(name, f"[bold red]{value}[/]" if is_error and value else str(value))
    return table


def stats_record(stats: LinkStats) -> dict[str, Any]:
    return {"event": "stats", **stats.as_dict()}


def run_monitor(
    port: str,
    *,
    baudrate: int = 115200,
    duration: float | None = None,
    jsonl: bool = False,
    stats_every: float = 0.0,
    console: Console | None = None,
    stop: threading.Event | None = None,
) -> LinkStats:
    """Read ``port`` until ``duration`` passes (or ``stop`` is set), printing every frame and error.

    The port is (re)opened with backoff like any link; the monitor never writes to it.
    """
    console = console or Console(highlight=False, soft_wrap=True)
    stop = stop or threading.Event()
    t0 = time.monotonic()
    lock = threading.Lock()

    def emit(markup: str, record: dict[str, Any]) -> None:
        with lock:
            if jsonl:
                console.out(json.dumps(record, ensure_ascii=False), highlight=False)
            else:
                console.print(markup)

    link = SerialLink(port, baudrate=baudrate, name="serial-monitor")
    link.on_any(lambda f: emit(frame_line(f, time.monotonic() - t0), frame_record(f, time.monotonic() - t0)))
    link.on_error(lambda e: emit(error_line(e, time.monotonic() - t0), error_record(e, time.monotonic() - t0)))

    def on_state(state: LinkState, detail: str) -> None:
        style = "green" if state is LinkState.CONNECTED else "yellow"
        why = f": {escape(detail)}" if detail else ""
        record = {"event": "state", "state": state.value, "detail": detail}
        emit(f"[{style}]{escape(port)}: {state.value}{why}[/]", record)

    link.on_state(on_state)
    if not jsonl:
        console.print(f"[bold]serial-monitor[/] {escape(port)} @ {baudrate} baud — Ctrl-C to stop")
    link.start()
    next_stats = t0 + stats_every if stats_every > 0 else None
    try:
        while not stop.is_set():
            now = time.monotonic()
            if duration is not None and now - t0 >= duration:
                break
            if next_stats is not None and now >= next_stats:
                if jsonl:
                    emit("", stats_record(link.stats))
                else:
                    with lock:
                        console.print(stats_table(link.stats, f"after {now - t0:.1f} s"))
                next_stats = now + stats_every
            stop.wait(0.05)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends the monitor; the counters below are the point
    finally:
        link.close()
    if jsonl:
        emit("", stats_record(link.stats))
    else:
        console.print(stats_table(link.stats))
    return link.stats
