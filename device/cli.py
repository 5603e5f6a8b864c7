"""``smearsight sessions list|show|export`` and ``smearsight device info`` (import-light: no cv2 at import)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import stat
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from smearsight.cli_app import device_app, sessions_app
from smearsight.errors import InputError

if TYPE_CHECKING:
    from smearsight.device.record import RecordReader

_DB_HELP = "Session record (SQLite). Default: $SMEARSIGHT_SESSIONS_DB or ~/.local/share/smearsight/sessions.db."


def _db(path: Path | None) -> Path:
    from smearsight.device.record import default_db_path

    return path if path is not None else default_db_path()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _dumps(obj: Any, **kwargs: Any) -> str:
    """JSON text of a record's rows: NaN and infinities (an overflowed score) as null, dates as text."""
    from smearsight.fileio import dumps_finite

    return dumps_finite(obj, default=str, **kwargs)


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


@sessions_app.command("list")
def sessions_list(
    db: Path | None = typer.Option(None, "--db", help=_DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the recorded sessions: id, start, end, source, frames and detections saved."""
    from rich.markup import escape
    from rich.table import Table

    from smearsight.device.record import list_sessions

    sessions = list_sessions(_db(db))
    if as_json:
        typer.echo(_dumps(sessions, indent=2))
        return
    if not sessions:
        typer.echo(f"{_db(db)}: no sessions recorded yet")
        return
    table = Table(title=str(_db(db)))
    for col in ("id", "started", "ended", "source", "frames", "detections"):
        table.add_column(col, justify="right" if col in ("id", "frames", "detections") else "left")
    for s in sessions:
        ended = _when(s["ended_at"]) if s["ended_at"] else "[yellow]interrupted / running[/]"
        table.add_row(str(s["id"]), _when(s["started_at"]), ended, escape(s["source"] or "-"),
                      str(s["frames_saved"]), str(s["detections_saved"]))
    _console().print(table)


@sessions_app.command("show")
def sessions_show(
    session_id: int = typer.Argument(..., help="Session id (see `smearsight sessions list`)."),
    db: Path | None = typer.Option(None, "--db", help=_DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Show one session's summary: counts per class, frames, fields with mature sperm, abnormal sperm."""
    from rich.markup import escape

    from smearsight.device.record import get_session

    s = get_session(_db(db), session_id)
    if as_json:
        typer.echo(_dumps(s, indent=2))
        return
    summ = s["summary"]
    con = _console()
    con.print(f"[bold]session {s['id']}[/]  source {escape(s['source'] or '-')}  started {_when(s['started_at'])}  "
              f"ended {_when(s['ended_at']) if s['ended_at'] else 'never (interrupted or still running)'}")
    if summ.get("rebuilt_from_saved_frames"):
        con.print("[yellow]summary rebuilt from the saved frames (the session did not end normally)[/]")
    con.print(f"frames {summ.get('frames', 0)}  detections {summ.get('detections', 0)}  "
              f"fields with mature sperm {summ.get('fields_with_mature_sperm', 0)}")
    for name, n in summ.get("counts_per_class", {}).items():
        con.print(f"  {name:<22} {n}", markup=False)
    if summ.get("sperm_judged"):
        con.print(f"sperm judged {summ['sperm_judged']}, abnormal {summ.get('sperm_abnormal', 0)}  "
                  + "  ".join(f"{p}: {n}" for p, n in summ.get("abnormal_by_part", {}).items()), markup=False)
    if summ.get("frames_not_saved"):
        con.print(f"[red]{summ['frames_not_saved']} frame(s) could not be saved (disk problem)[/]")


def _csv_chunks(reader: RecordReader, session_id: int) -> Iterator[str]:
    """The CSV export, one detection a row, a frame at a time."""
    parts = reader.parts(session_id)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["session_id", "frame_index", "timestamp", "det", "class_id", "class_name", "score",
              "x1", "y1", "x2", "y2"]
    for part in parts:
        header += [f"{part or 'morphology'}_score", f"{part or 'morphology'}_abnormal"]
    # 0: the frame's boxes were found on a frame boxes_age_ms earlier, moved with the stage (--detect-every)
    header += ["detected", "boxes_age_ms"]
    writer.writerow(header)
    for frame in reader.frames(session_id):
        for d in frame["detections"]:
            row = [session_id, frame["frame_index"], f"{frame['timestamp']:.6f}", d["det"], d["class_id"],
                   d["class_name"], f"{d['score']:.5f}", *(f"{v:.2f}" for v in d["box"])]
            for part in parts:
                m = d["morphology"].get(part)
                if m is None:
                    row += ["", ""]
                else:
                    row += ["" if m["score"] is None else f"{m['score']:.5f}",
                            "n/a" if m["abnormal"] is None else int(m["abnormal"])]
            row += [int(frame["detected"]), f"{frame['boxes_age_ms']:.1f}"]
            writer.writerow(row)
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    yield buf.getvalue()


def _json_chunks(reader: RecordReader, session_id: int) -> Iterator[str]:
    """The JSON export: the session's fields, then ``frames`` as a list written one frame a line."""
    marker = '"__frames__"'
    head, _, tail = _dumps({**reader.session(session_id), "frames": "__frames__"},
                           indent=1).rpartition(marker)  # "frames" is the last key
    yield head + "["
    for n, frame in enumerate(reader.frames(session_id)):
        yield ("," if n else "") + "\n  " + _dumps(frame)
    yield "\n ]" + tail + "\n"


def _refuse_the_record_itself(out: Path, record: Path) -> None:
    """InputError when ``out`` is the record or one of SQLite's files beside it (its write-ahead log): the
    export would replace the sessions it is read from."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        part = record.with_name(record.name + suffix)
        same = os.path.realpath(out) == os.path.realpath(part)
        with contextlib.suppress(OSError):
            same = same or os.path.samefile(out, part)  # a hard link
        if same:
            raise InputError(f"--out {out}: is the session record {part} itself; write the export elsewhere")


@sessions_app.command("export")
def sessions_export(
    session_id: int = typer.Argument(..., help="Session id (see `smearsight sessions list`)."),
    fmt: str = typer.Option("csv", "--format", help="csv (one row per detection) or json (session + frames)."),
    out: Path | None = typer.Option(
        None, "--out", help="Output file (written atomically); default (or -) stdout."
    ),
    db: Path | None = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Export a session's detections and morphology results as CSV or JSON.

    The export is one consistent snapshot even while the session is still being recorded, and it is
    streamed: a long session is never held in memory whole.
    """
    from smearsight.device.record import RecordReader
    from smearsight.fileio import atomic_open, check_output_file, write_stdout

    if out is not None and str(out) == "-":
        out = None
    fmt = fmt.lower()
    if fmt not in ("csv", "json"):
        raise InputError(f"--format: expected csv or json, got {fmt!r}")
    record = _db(db)
    if out is not None:
        check_output_file(out, "--out")
        _refuse_the_record_itself(out, record)
    with RecordReader(record) as reader:
        reader.session(session_id)  # an unknown id is refused before anything is written
        chunks = _csv_chunks(reader, session_id) if fmt == "csv" else _json_chunks(reader, session_id)
        if out is None:
            for chunk in chunks:
                write_stdout(chunk)
            return
        made = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]
        try:
            # an export replacing an earlier one keeps its permissions (one kept private stays private)
            mode = stat.S_IMODE(out.stat().st_mode) if out.is_file() else None
            with atomic_open(out, mode) as handle:
                for chunk in chunks:
                    handle.write(chunk.encode("utf-8"))
        except BaseException as exc:
            for folder in made:  # innermost first: a failed export leaves no folders made for it either
                with contextlib.suppress(OSError):
                    folder.rmdir()
            if isinstance(exc, OSError):
                raise InputError(f"{out}: cannot write the export ({exc.strerror or exc})") from exc
            raise
    typer.echo(f"wrote {out}", err=True)


# --------------------------------------------------------------------------------------------- device
def device_report() -> dict[str, Any]:
    """What this machine offers SmearSight: OpenCV build, display, ONNX Runtime, TensorRT, pycuda."""
    import importlib.metadata as md
    import importlib.util

    from smearsight.opencv_setup import inspect_opencv

    report: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    model = Path("/proc/device-tree/model")
    try:
        report["board"] = model.read_text(errors="replace").strip("\x00\n ") if model.exists() else ""
    except OSError:
        report["board"] = ""
    cv = inspect_opencv()
    report["opencv"] = {"installed": cv.importable, "version": cv.version, "origin": cv.origin,
                        "gstreamer": cv.gstreamer, "gui": cv.gui, "problems": cv.problems}
    display_env = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or ""
    report["display"] = {"env": display_env, "window_possible": bool(display_env) and cv.gui}
    ort: dict[str, Any] = {"installed": importlib.util.find_spec("onnxruntime") is not None}
    if ort["installed"]:
        try:
            import onnxruntime

            ort["version"] = onnxruntime.__version__
            ort["providers"] = list(onnxruntime.get_available_providers())
        except Exception as exc:  # a broken install should not stop the report
            ort["error"] = str(exc)
    report["onnxruntime"] = ort
    for name in ("tensorrt", "pycuda"):
        entry: dict[str, Any] = {"installed": importlib.util.find_spec(name) is not None}
        if entry["installed"]:
            try:
                entry["version"] = md.version(name)
            except md.PackageNotFoundError:
                entry["version"] = "system package"
        report[name] = entry
    cams = sorted(str(p) for p in Path("/dev").glob("video*")) if Path("/dev").is_dir() else []
    report["cameras"] = cams
    return report


@device_app.command("info")
def device_info(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text.")) -> None:
    """Show OpenCV (version, pip wheel or system build, GStreamer, GUI), display, ONNX Runtime providers,
    TensorRT and pycuda presence, and the cameras found."""
    rep = device_report()
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    con = _console()
    yes = {True: "[green]yes[/]", False: "[yellow]no[/]"}
    cv = rep["opencv"]
    con.print(f"board: {rep['board'] or platform.node()} ({rep['machine']}), Python {rep['python']}")
    if cv["installed"]:
        con.print(f"OpenCV {cv['version']} from {cv['origin']}: GStreamer {yes[cv['gstreamer']]}, "
                  f"windows {yes[cv['gui']]}")
    else:
        con.print("OpenCV: [red]not installed[/] (pip install 'smearsight[headless]' or '[gui]')")
    for problem in cv["problems"]:
        con.print(f"  [red]problem:[/] {problem}")
    disp = rep["display"]
    con.print(f"display: {disp['env'] or 'none'}; window possible {yes[disp['window_possible']]}"
              + ("" if disp["window_possible"] else " (use http://:8080 or file://out.mp4)"))
    ort = rep["onnxruntime"]
    if ort["installed"]:
        con.print(f"ONNX Runtime {ort.get('version', '?')}: providers {', '.join(ort.get('providers', []))}")
    else:
        con.print("ONNX Runtime: [red]not installed[/]")
    for name in ("tensorrt", "pycuda"):
        e = rep[name]
        con.print(f"{name}: " + (f"[green]{e['version']}[/]" if e["installed"] else "[yellow]not installed[/]"))
    con.print("cameras: " + (", ".join(rep["cameras"]) or "none found under /dev/video*"))
