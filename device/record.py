"""Session record: every frame's detections and morphology results, and a per-session summary, in SQLite.

Durability: WAL journal, ``synchronous=FULL``, and one transaction per ``batch_frames`` frames (plus one at
``end_session``/``close``). In WAL mode ``synchronous=NORMAL`` already survives a killed process, but a power
cut may roll back the last commits; ``FULL`` fsyncs the WAL at every commit, so a pulled plug (common beside
a microscope) also loses at most the batch in progress. With commits batched every ~1-3 s the extra fsync
is cheap (measured: 38 vs 29 ms per 30-frame x 300-detection commit, ~0.3 ms a frame). After ``kill -9`` at
most the last uncommitted batch is lost (tested).

``background=True`` moves the commits to a writer thread so that the frame loop never waits on the disk
(a commit of 30 frames x 300 detections takes ~30-80 ms here, more on an SD card). The batch handed over
is committed before the next one is, so a kill -9 then loses at most the batch being committed plus the
frames buffered since. ``sync()`` waits for the writer.

Failures after opening (a full disk, a card turned read-only, I/O errors) never raise: the batch is dropped,
``.error`` holds a plain-words message for the screen, and recording resumes when writes succeed again.
Opening a record that cannot be written raises :class:`RecordError` (an :class:`InputError`).

Schema (``schema_version`` 3)::

    sessions(id, started_at, ended_at, source, meta_json, class_names_json, summary_json)
    frames(session_id, frame_index, timestamp, n_detections, detected, boxes_age_ms)
    detections(session_id, frame_index, det, class_id, class_name, score, x1, y1, x2, y2)
    morphology(session_id, frame_index, det, part, score, abnormal)   -- abnormal NULL = not judged (N/A)

``det`` is the detection's row in the frame's ``[K, 6]`` array. ``detected`` is 1 when the detector ran on
the frame and 0 when its boxes were found on an earlier frame and moved with the stage (``smearsight run
--detect-every``); ``boxes_age_ms`` says how much earlier that frame came in (0 when detected; with
``--detect-every async`` nearly every frame shows a background result of a few hundred ms). Older records
gain the missing columns (``detected`` as 1, ``boxes_age_ms`` as 0) when opened for writing, after which
older SmearSight builds can no longer write to them (a record of a newer version is refused). Read helpers
(:func:`list_sessions`, :func:`get_session`, :func:`session_frames`) back ``smearsight sessions``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from smearsight.errors import InputError
from smearsight.runtime.annotate import morphology_flags

SCHEMA_VERSION = 3
DB_ENV = "SMEARSIGHT_SESSIONS_DB"
MATURE_SPERM = "mature_sperm"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_info (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    ended_at REAL,
    source TEXT NOT NULL DEFAULT '',
    meta_json TEXT NOT NULL DEFAULT '{}',
    class_names_json TEXT NOT NULL DEFAULT '[]',
    summary_json TEXT
);
CREATE TABLE IF NOT EXISTS frames (
    session_id INTEGER NOT NULL,
    frame_index INTEGER NOT NULL,
    timestamp REAL NOT NULL,
    n_detections INTEGER NOT NULL,
    detected INTEGER NOT NULL DEFAULT 1,
    boxes_age_ms REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, frame_index)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS detections (
    session_id INTEGER NOT NULL,
    frame_index INTEGER NOT NULL,
    det INTEGER NOT NULL,
    class_id INTEGER NOT NULL,
    class_name TEXT NOT NULL,
    score REAL NOT NULL,
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
    PRIMARY KEY (session_id, frame_index, det)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS morphology (
    session_id INTEGER NOT NULL,
    frame_index INTEGER NOT NULL,
    det INTEGER NOT NULL,
    part TEXT NOT NULL,
    score REAL,
    abnormal INTEGER,
    PRIMARY KEY (session_id, frame_index, det, part)
) WITHOUT ROWID;
"""


class RecordError(InputError):
    """The session record cannot be opened or created."""


def default_db_path() -> Path:
    """``$SMEARSIGHT_SESSIONS_DB``, else ``$XDG_DATA_HOME/smearsight/sessions.db`` (~/.local/share/...)."""
    env = os.environ.get(DB_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "smearsight" / "sessions.db"


def explain_db_error(path: Path | str, exc: BaseException) -> str:
    """Plain words for an SQLite/OS failure on the record."""
    text = str(exc).lower()
    if "full" in text or getattr(exc, "errno", None) == 28:
        why = "the disk is full"
    elif "readonly" in text or "read-only" in text or getattr(exc, "errno", None) in (13, 30):
        why = "the disk or file is read-only"
    elif "unable to open" in text or "no such file" in text:
        why = "the file cannot be opened"
    elif "i/o" in text:
        why = "a disk read/write error happened"
    elif "locked" in text or "busy" in text:
        why = "another program holds the record locked"
    elif "not a database" in text or "malformed" in text:
        why = "the file is not a SmearSight record (or it is damaged)"
    else:
        why = str(exc)
    return f"session record {path}: {why}"


def detection_rows(detections: np.ndarray, class_names: Sequence[str]) -> list[tuple[int, int, str, list[float]]]:
    """The detections of a ``[K, 6]`` array as ``(row, class id, class name, [x1, y1, x2, y2, score])``.

    Unused rows (class -1) and rows a broken model filled with NaN/Inf are not detections (a NaN would also
    fail the record's NOT NULL columns and lose the whole batch); a class beyond ``class_names`` is
    ``class_<id>``.
    """
    dets = np.asarray(detections, dtype=np.float64).reshape(-1, 6)
    finite = np.isfinite(dets).all(axis=1).tolist()
    out = []
    for k, row in enumerate(dets.tolist()):
        if not finite[k] or row[5] < 0:
            continue
        c = int(row[5])
        out.append((k, c, str(class_names[c]) if c < len(class_names) else f"class_{c}", row[:5]))
    return out


class SessionSummary:
    """The running summary of one session (one slide), the single implementation of its figures: what the
    status page and ``/status.json`` show as ``session`` while ``smearsight run`` goes on (with or without
    ``--record``), what a recorded session stores when it ends, and ``--stats-json``'s ``session_summary``.

    ``counts_per_class`` are detections summed over the frames (a cell in view for ten frames counts ten
    times), ``fields_with_mature_sperm`` the frames with at least one mature sperm, ``sperm_judged`` /
    ``sperm_abnormal`` sperm (per frame) with a result on at least one part / flagged on any part,
    ``abnormal_by_part`` the flags per part, ``duration_s`` from the first frame's timestamp to the last's.
    """

    def __init__(self, class_names: Sequence[str] = ()) -> None:
        self.class_names = [str(n) for n in class_names]
        self.frames = 0
        self.detections = 0
        self.counts: dict[str, int] = {}
        self.fields_with_mature = 0
        self.sperm_judged = 0
        self.sperm_abnormal = 0
        self.abnormal_by_part: dict[str, int] = {}
        self.first_ts: float | None = None
        self.last_ts: float | None = None

    def add_frame(self, timestamp: float, detections: np.ndarray, class_names: Sequence[str],
                  morphology: list[dict[str, Any]] | None = None) -> None:
        """Add one shown frame: its ``[K, 6]`` detections and its morphology results (as the pipeline has them)."""
        self.add(timestamp, [name for _, _, name, _ in detection_rows(detections, class_names)],
                 morphology_flags(morphology))

    def add(self, timestamp: float, names: list[str], flags: dict[int, list[tuple[str, Any, Any]]]) -> None:
        """Add one frame given its detections' class names and its :func:`morphology_flags`."""
        self.frames += 1
        self.detections += len(names)
        for name in names:
            self.counts[name] = self.counts.get(name, 0) + 1
        if MATURE_SPERM in names:
            self.fields_with_mature += 1
        for parts in flags.values():
            judged = [a for _, _, a in parts if a is not None]
            if judged:
                self.sperm_judged += 1
                if any(judged):
                    self.sperm_abnormal += 1
            for part, _, abnormal in parts:
                if abnormal:
                    self.abnormal_by_part[part] = self.abnormal_by_part.get(part, 0) + 1
        self.first_ts = timestamp if self.first_ts is None else self.first_ts
        self.last_ts = timestamp

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """The figures as a JSON-ready dict; every class of ``class_names`` (default: the constructor's) is
        listed, with 0 when none was seen, followed by any other class seen."""
        counts = {name: self.counts.get(name, 0) for name in (self.class_names if class_names is None
                                                               else class_names)}
        counts.update({k: v for k, v in self.counts.items() if k not in counts})
        return {
            "frames": self.frames,
            "detections": self.detections,
            "counts_per_class": counts,
            "fields_with_mature_sperm": self.fields_with_mature,
            "sperm_judged": self.sperm_judged,
            "sperm_abnormal": self.sperm_abnormal,
            "abnormal_by_part": dict(self.abnormal_by_part),
            "duration_s": round((self.last_ts or 0.0) - (self.first_ts or 0.0), 3),
        }


class SessionRecorder:
    """Append-only recorder of sessions into one SQLite file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], batch_frames: int = 30, *, background: bool = False) -> None:
        if batch_frames < 1:
            raise InputError(f"batch_frames: must be at least 1, got {batch_frames}")
        self.path = Path(path).expanduser()
        self.batch_frames = int(batch_frames)
        self.background = bool(background)
        self.error = ""
        self.frames_lost = 0  # frames of every session so far whose batch could not be committed
        self._lost_before_session = 0  # frames_lost when the open (or last) session started
        self.commits = 0
        self.session_id: int | None = None
        self._class_names: list[str] = []
        self._summary = SessionSummary()
        self._last_index: int | None = None
        self._frames: list[tuple] = []
        self._dets: list[tuple] = []
        self._morph: list[tuple] = []
        self._pending = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                                         timeout=5.0)
        except (OSError, sqlite3.Error) as exc:
            raise RecordError(explain_db_error(self.path, exc)) from exc
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self._prepare()
                break
            except sqlite3.OperationalError as exc:
                # switching to WAL or upgrading can meet another writer doing the same: SQLite then answers
                # "locked" at once instead of waiting, so wait here
                if "locked" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self._conn.close()
                raise RecordError(explain_db_error(self.path, exc)) from exc
            except RecordError:
                self._conn.close()
                raise
            except sqlite3.Error as exc:
                self._conn.close()
                raise RecordError(explain_db_error(self.path, exc)) from exc
        self._db_lock = threading.Lock()
        self._handoff: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._writer: threading.Thread | None = None
        if self.background:
            self._writer = threading.Thread(target=self._writer_loop, name="session-record", daemon=True)
            self._writer.start()

    # ---- writing
    @property
    def pending(self) -> int:
        """Frames buffered since the last commit."""
        return self._pending

    def start_session(self, meta: dict[str, Any] | None = None) -> int:
        """Start a session (committed at once) and return its id; ends an open one first.

        ``meta`` is stored as JSON; ``meta["source"]`` and ``meta["class_names"]`` are also kept in columns.
        Returns -1 (and sets ``.error``) if the record cannot be written.
        """
        if self.session_id is not None:
            self.end_session()
        meta = dict(meta or {})
        self._class_names = [str(n) for n in meta.get("class_names", [])]
        self._summary = SessionSummary()
        self._last_index = None
        self._lost_before_session = self.frames_lost  # the last session's batches are all done (end_session)
        try:
            with self._db_lock:
                cur = self._conn.execute(
                    "INSERT INTO sessions(started_at, source, meta_json, class_names_json) VALUES (?, ?, ?, ?)",
                    (time.time(), str(meta.get("source", "")), json.dumps(meta, default=str),
                     json.dumps(self._class_names)),
                )
        except sqlite3.Error as exc:
            self.error = explain_db_error(self.path, exc) + " — this session is not being recorded"
            self.session_id = None
            return -1
        self.session_id = int(cur.lastrowid)
        return self.session_id

    def _prepare(self) -> None:
        """WAL, durable commits, the tables; check and upgrade the schema version as one writer."""
        conn = self._conn
        tables = _tables(conn)
        if tables and "schema_info" not in tables:
            raise RecordError(f"{self.path}: an SQLite file of another program (tables {sorted(tables)[:5]}); "
                              "record into another file")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL (journal mode is {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("SELECT MAX(version) FROM schema_info").fetchone()[0]
            if version is None:
                conn.execute("INSERT INTO schema_info(version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise RecordError(f"{self.path}: written by a newer SmearSight (record schema version {version}; "
                                  f"this one writes version {SCHEMA_VERSION}); record into another file")
            columns = _frame_columns(conn)
            for name, sql_type, default in _ADDED_FRAME_COLUMNS:  # what older versions lack
                if name not in columns:
                    conn.execute(f"ALTER TABLE frames ADD COLUMN {name} {sql_type} NOT NULL DEFAULT {default}")
            if version is not None and version < SCHEMA_VERSION:
                conn.execute("UPDATE schema_info SET version = ?", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def record_frame(
        self,
        frame_index: int,
        timestamp: float,
        detections: np.ndarray,
        class_names: Sequence[str],
        morphology: list[dict[str, Any]] | None = None,
        detected: bool = True,
        boxes_age_s: float = 0.0,
    ) -> bool:
        """Buffer one frame; commits every ``batch_frames`` frames. Never raises for disk problems.

        ``detected`` False: the detections were found on an earlier frame, ``boxes_age_s`` earlier, and
        moved with the stage, not inferred on this one.

        Returns False when there is no open session, or the frame index is negative or repeats the previous
        one (stale frames shown while a camera is lost), or the batch commit failed (see ``.error``).
        """
        if self.session_id is None or frame_index < 0:
            return False
        if self._last_index is not None and frame_index == self._last_index:
            return False
        self._last_index = int(frame_index)
        sid = self.session_id
        if not self._class_names:
            self._class_names = [str(n) for n in class_names]
        names: list[str] = []
        for k, c, name, (x1, y1, x2, y2, score) in detection_rows(detections, class_names):
            names.append(name)
            self._dets.append((sid, int(frame_index), k, c, name, score, x1, y1, x2, y2))
        flags = morphology_flags(morphology)
        for det, parts in flags.items():
            for part, score, abnormal in parts:
                self._morph.append((sid, int(frame_index), int(det), part, score,
                                    None if abnormal is None else int(abnormal)))
        age_ms = round(1000.0 * float(boxes_age_s), 1) if np.isfinite(boxes_age_s) else 0.0
        self._frames.append((sid, int(frame_index), float(timestamp), len(names), int(bool(detected)), age_ms))
        self._summary.add(float(timestamp), names, flags)
        self._pending += 1
        if self._pending >= self.batch_frames:
            return self.flush()
        return True

    def flush(self) -> bool:
        """Commit the buffered frames in one durable transaction; False (and ``.error``) on failure.

        With ``background=True`` the batch goes to the writer thread instead (after the previous batch is
        committed, so at most one batch is in flight) and the result reflects the batches before it.
        """
        if not self._pending:
            return not self.error
        batch = (self._frames, self._dets, self._morph)
        self._frames, self._dets, self._morph = [], [], []
        self._pending = 0
        if self._writer is not None:
            self._handoff.join()  # the previous batch is committed (or failed) before the next one goes
            self._handoff.put(batch)
            return not self.error
        return self._commit(*batch)

    def sync(self) -> bool:
        """Wait until every batch handed to the writer thread is committed; False if the last one failed."""
        if self._writer is not None:
            self._handoff.join()
        return not self.error

    def _writer_loop(self) -> None:
        while True:
            batch = self._handoff.get()
            try:
                if batch is None:
                    return
                self._commit(*batch)
            finally:
                self._handoff.task_done()

    def _commit(self, frames: list[tuple], dets: list[tuple], morph: list[tuple]) -> bool:
        with self._db_lock:
            conn = self._conn
            try:
                conn.execute("BEGIN")
                conn.executemany("INSERT OR REPLACE INTO frames(session_id, frame_index, timestamp, n_detections, "
                                 "detected, boxes_age_ms) VALUES (?, ?, ?, ?, ?, ?)", frames)
                conn.executemany("INSERT OR REPLACE INTO detections VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", dets)
                conn.executemany("INSERT OR REPLACE INTO morphology VALUES (?, ?, ?, ?, ?, ?)", morph)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self.frames_lost += len(frames)
                self.error = (explain_db_error(self.path, exc)
                              + f" — {self.frames_lost} frame(s) not saved; the picture goes on")
                return False
            self.commits += 1
            self.error = ""
            return True

    def summary(self) -> dict[str, Any]:
        """The running summary of the open (or last) session."""
        out = self._summary.to_dict(self._class_names)
        out["frames_not_saved"] = self.frames_lost - self._lost_before_session
        return out

    def end_session(self, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Commit what is buffered and store the summary (the running one, updated with ``summary``)."""
        final = self.summary()
        final.update(summary or {})
        if self.session_id is None:
            return final
        self.flush()
        self.sync()
        final["frames_not_saved"] = self.frames_lost - self._lost_before_session
        try:
            with self._db_lock:
                self._conn.execute(
                    "UPDATE sessions SET ended_at = ?, summary_json = ? WHERE id = ?",
                    (time.time(), json.dumps(final, default=str), self.session_id),
                )
        except sqlite3.Error as exc:
            self.error = explain_db_error(self.path, exc) + " — the session summary was not saved"
        self.session_id = None
        return final

    def close(self) -> None:
        """End an open session and close the file (idempotent; never raises for disk problems)."""
        if getattr(self, "_conn", None) is None:
            return
        if self.session_id is not None:
            self.end_session()
        self.flush()
        if self._writer is not None:
            self._handoff.join()
            self._handoff.put(None)
            self._writer.join(timeout=30)
            self._writer = None
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass
        self._conn.close()
        self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> SessionRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- reading
# frames columns added after version 1, in order: (name, type, what older rows read as)
_ADDED_FRAME_COLUMNS = (("detected", "INTEGER", 1), ("boxes_age_ms", "REAL", 0))


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _frame_columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(frames)")}


_READ_COLUMNS = {  # what the readers query; older records lack frames.detected / boxes_age_ms (read as defaults)
    "sessions": {"id", "started_at", "ended_at", "source", "meta_json", "class_names_json", "summary_json"},
    "frames": {"session_id", "frame_index", "timestamp", "n_detections"},
    "detections": {"session_id", "frame_index", "det", "class_id", "class_name", "score", "x1", "y1", "x2", "y2"},
    "morphology": {"session_id", "frame_index", "det", "part", "score", "abnormal"},
}


def _open_readonly(path: Path, immutable: bool) -> sqlite3.Connection:
    flags = "mode=ro&immutable=1" if immutable else "mode=ro"
    conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?{flags}", uri=True, timeout=5.0)
    conn.row_factory = sqlite3.Row
    try:
        tables = _tables(conn)
    except BaseException:
        conn.close()
        raise
    for table, needed in _READ_COLUMNS.items():
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")} if table in tables else set()
        if not needed <= columns:
            version = _schema_version(conn) if "schema_info" in tables else None
            conn.close()
            what = f"no table {table!r}" if not columns else f"table {table!r} lacks {sorted(needed - columns)}"
            if version is not None and version > SCHEMA_VERSION:  # a newer record that changed what is read here
                raise InputError(f"session record {path}: written by a newer SmearSight (record schema version "
                                 f"{version}; this one reads versions up to {SCHEMA_VERSION}: {what}); update "
                                 "SmearSight to read it")
            raise InputError(f"session record {path}: not a SmearSight session record ({what})")
    return conn


def _schema_version(conn: sqlite3.Connection) -> int | None:
    """The record's schema version, or None when it has none that reads as a number."""
    try:
        version = conn.execute("SELECT MAX(version) FROM schema_info").fetchone()[0]
    except sqlite3.Error:
        return None
    return version if isinstance(version, int) else None


def connect_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open a record for reading; InputError naming the file when it is missing or not a record.

    A record on read-only media (a write-protected card) opens too: SQLite's WAL mode wants to create a
    ``-shm`` file beside it, so when that fails and no ``-wal`` file holds unmerged frames the file is read
    as immutable.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no session record here (record one with smearsight run --record FILE)")
    try:
        return _open_readonly(path, immutable=False)
    except sqlite3.Error as exc:
        wal = path.with_name(path.name + "-wal")
        if "unable to open" not in str(exc).lower():
            raise InputError(explain_db_error(path, exc)) from exc
        if wal.exists():
            raise InputError(f"session record {path}: cannot be read where it is (its folder is read-only and "
                             f"{wal.name} holds frames not yet merged); copy both files to a writable folder") from exc
    try:
        return _open_readonly(path, immutable=True)
    except sqlite3.Error as exc:
        raise InputError(explain_db_error(path, exc)) from exc


def _session_dict(conn: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
    sid = row["id"]
    frames = conn.execute("SELECT COUNT(*) FROM frames WHERE session_id = ?", (sid,)).fetchone()[0]
    dets = conn.execute("SELECT COUNT(*) FROM detections WHERE session_id = ?", (sid,)).fetchone()[0]
    return {
        "id": sid,
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
        "status": "complete" if row["ended_at"] is not None else "interrupted or running",
        "source": row["source"],
        "frames_saved": int(frames),
        "detections_saved": int(dets),
    }


def summary_from_rows(conn: sqlite3.Connection, session_id: int, class_names: Sequence[str]) -> dict[str, Any]:
    """Rebuild a summary from the saved rows (for sessions cut off before their end)."""
    counts = {name: 0 for name in class_names}
    for name, n in conn.execute(
        "SELECT class_name, COUNT(*) FROM detections WHERE session_id = ? GROUP BY class_name", (session_id,)
    ):
        counts[name] = int(n)
    frames, first, last = conn.execute(
        "SELECT COUNT(*), MIN(timestamp), MAX(timestamp) FROM frames WHERE session_id = ?", (session_id,)
    ).fetchone()
    mature = conn.execute(
        "SELECT COUNT(DISTINCT frame_index) FROM detections WHERE session_id = ? AND class_name = ?",
        (session_id, MATURE_SPERM),
    ).fetchone()[0]
    judged, abnormal = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(a), 0) FROM (SELECT MAX(abnormal) AS a FROM morphology "
        "WHERE session_id = ? AND abnormal IS NOT NULL GROUP BY frame_index, det)",
        (session_id,),
    ).fetchone()
    by_part = {
        part: int(n)
        for part, n in conn.execute(
            "SELECT part, COUNT(*) FROM morphology WHERE session_id = ? AND abnormal = 1 GROUP BY part",
            (session_id,),
        )
    }
    return {
        "frames": int(frames),
        "detections": int(sum(counts.values())),
        "counts_per_class": counts,
        "fields_with_mature_sperm": int(mature),
        "sperm_judged": int(judged),
        "sperm_abnormal": int(abnormal),
        "abnormal_by_part": by_part,
        "duration_s": round((last or 0.0) - (first or 0.0), 3),
        "rebuilt_from_saved_frames": True,
    }


def _json_field(row: sqlite3.Row, field: str, default: str, where: str) -> Any:
    """A JSON column of the sessions table, of the same type as ``default`` (an object or a list)."""
    try:
        value = json.loads(row[field] or default)
    except (json.JSONDecodeError, TypeError):
        raise InputError(f"{where}: {field} is damaged (not JSON)") from None
    expected = type(json.loads(default))
    if not isinstance(value, expected):
        raise InputError(f"{where}: {field} is damaged (expected a JSON {'object' if expected is dict else 'list'}, "
                         f"got {type(value).__name__})")
    return value


FRAMES_PER_READ = 32  # frames a RecordReader reads per short transaction


class RecordReader:
    """A read-only view of a record as of one moment: the queries run in one read transaction up to the first
    :meth:`frames`, which then reads the frames of that moment in batches (see there), so an export taken
    while ``smearsight run`` is still recording agrees with itself (summary, frames, rows).

    Use as a context manager. Frames are streamed (:meth:`frames`), so a long session is never held in
    memory at once. SQLite errors become one-line InputErrors naming the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.conn = connect_readonly(self.path)
        try:
            self._query("BEGIN")
        except BaseException:
            self.conn.close()
            raise

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """SQLite errors inside the block become one-line InputErrors naming the record."""
        try:
            yield
        except sqlite3.Error as exc:
            raise InputError(explain_db_error(self.path, exc)) from exc

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._sqlite_errors():
            return self.conn.execute(sql, args)

    def sessions(self) -> list[dict[str, Any]]:
        """All sessions, oldest first."""
        with self._sqlite_errors():
            return [_session_dict(self.conn, row) for row in self._query("SELECT * FROM sessions ORDER BY id")]

    def _session_row(self, session_id: int) -> sqlite3.Row:
        row = None
        if 0 <= session_id < 2**63:
            row = self._query("SELECT * FROM sessions WHERE id = ?", (int(session_id),)).fetchone()
        if row is None:
            ids = [r[0] for r in self._query("SELECT id FROM sessions ORDER BY id")]
            known = ", ".join(map(str, ids[-10:])) or "none"
            raise InputError(f"{self.path}: no session {session_id} (sessions: {known})")
        return row

    def session(self, session_id: int) -> dict[str, Any]:
        """One session: columns, meta, class names and summary (rebuilt from rows if it never ended)."""
        row = self._session_row(session_id)
        where = f"{self.path} session {session_id}"
        with self._sqlite_errors():
            out = _session_dict(self.conn, row)
            out["meta"] = _json_field(row, "meta_json", "{}", where)
            out["class_names"] = _json_field(row, "class_names_json", "[]", where)
            if row["summary_json"]:
                out["summary"] = _json_field(row, "summary_json", "{}", where)
            else:
                out["summary"] = summary_from_rows(self.conn, row["id"], out["class_names"])
        return out

    def parts(self, session_id: int) -> list[str]:
        """Morphology parts present in a session, sorted."""
        return [r[0] for r in self._query(
            "SELECT DISTINCT part FROM morphology WHERE session_id = ? ORDER BY part", (int(session_id),))]

    def frames(self, session_id: int) -> Iterator[dict[str, Any]]:
        """Frames of a session in order, each with its detections and their morphology by part.

        Streamed: the frames up to the session's last one in this reader's snapshot are read
        :data:`FRAMES_PER_READ` at a time, each batch in its own short read transaction (the three tables read
        side by side in frame order). A slow consumer (a pager, a stalled pipe) so never holds a read
        transaction open, which would keep a device recording into the same file from checkpointing its
        write-ahead log, and the frames stay those of the snapshot: rows are only ever appended, a frame's
        detections and morphology in the same commit as the frame.
        """
        sid = int(session_id)
        last = self._query("SELECT MAX(frame_index) FROM frames WHERE session_id = ?", (sid,)).fetchone()[0]
        columns = _frame_columns(self.conn)
        added = ", ".join(name if name in columns else str(default) for name, _, default in _ADDED_FRAME_COLUMNS)
        if self.conn.in_transaction:
            self.conn.commit()  # the snapshot's end: from here on each batch is read in its own transaction
        lo = None if last is None else -(2**63)
        while lo is not None:
            with self._sqlite_errors():
                self.conn.execute("BEGIN")
                try:
                    batch, hi = self._frame_batch(sid, lo, last, added)
                finally:
                    self.conn.commit()
            yield from batch
            lo = hi + 1 if hi is not None and hi < last else None

    def _frame_batch(self, sid: int, lo: int, last: int, added: str) -> tuple[list[dict[str, Any]], int | None]:
        """Up to :data:`FRAMES_PER_READ` frames of session ``sid`` from frame index ``lo`` (at most ``last``),
        built from the three tables' rows read in frame order, and the last frame index read."""
        frame_rows = self.conn.execute(
            f"SELECT frame_index, timestamp, n_detections, {added} FROM frames WHERE session_id = ? AND "
            "frame_index BETWEEN ? AND ? ORDER BY frame_index LIMIT ?", (sid, lo, last, FRAMES_PER_READ)).fetchall()
        if not frame_rows:
            return [], None
        span = (sid, lo, frame_rows[-1][0])
        det_rows = iter(self.conn.execute(
            "SELECT frame_index, det, class_id, class_name, score, x1, y1, x2, y2 FROM detections "
            "WHERE session_id = ? AND frame_index BETWEEN ? AND ? ORDER BY frame_index, det", span).fetchall())
        morph_rows = iter(self.conn.execute(
            "SELECT frame_index, det, part, score, abnormal FROM morphology WHERE session_id = ? AND "
            "frame_index BETWEEN ? AND ? ORDER BY frame_index, det, part", span).fetchall())
        batch = []
        next_det, next_morph = next(det_rows, None), next(morph_rows, None)
        for r in frame_rows:
            frame_index = r[0]
            dets: list[dict[str, Any]] = []
            while next_det is not None and next_det[0] <= frame_index:
                d = next_det
                next_det = next(det_rows, None)
                if d[0] < frame_index:
                    continue  # rows of a frame whose frame row is missing
                while next_morph is not None and (next_morph[0], next_morph[1]) < (d[0], d[1]):
                    next_morph = next(morph_rows, None)
                morphology: dict[str, dict[str, Any]] = {}
                while next_morph is not None and (next_morph[0], next_morph[1]) == (d[0], d[1]):
                    morphology[next_morph[2]] = {
                        "score": next_morph[3], "abnormal": None if next_morph[4] is None else bool(next_morph[4])}
                    next_morph = next(morph_rows, None)
                dets.append({"det": d[1], "class_id": d[2], "class_name": d[3], "score": d[4],
                             "box": [d[5], d[6], d[7], d[8]], "morphology": morphology})
            batch.append({"frame_index": frame_index, "timestamp": r[1], "n_detections": r[2],
                          "detected": bool(r[3]), "boxes_age_ms": float(r[4]), "detections": dets})
        return batch, frame_rows[-1][0]


def list_sessions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All sessions in a record, oldest first."""
    with RecordReader(path) as reader:
        return reader.sessions()


def get_session(path: str | os.PathLike[str], session_id: int) -> dict[str, Any]:
    """One session (see :meth:`RecordReader.session`)."""
    with RecordReader(path) as reader:
        return reader.session(session_id)


def session_frames(path: str | os.PathLike[str], session_id: int) -> Iterator[dict[str, Any]]:
    """Frames of a session in order (see :meth:`RecordReader.frames`)."""
    with RecordReader(path) as reader:
        reader._session_row(session_id)
        yield from reader.frames(session_id)
