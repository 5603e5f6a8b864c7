"""Session record on real SQLite files: batching, summary, kill -9 durability with a real subprocess,
read-only and full disks (tmpfs mounts when running as root)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from smearsight.catalog import TPS_CLASS_NAMES
from smearsight.device.record import (
    SCHEMA_VERSION,
    RecordError,
    SessionRecorder,
    SessionSummary,
    get_session,
    list_sessions,
    session_frames,
)

MATURE = TPS_CLASS_NAMES.index("mature_sperm")


def _dets(k: int, classes: list[int], max_det: int = 10) -> np.ndarray:
    out = np.zeros((max_det, 6), np.float32)
    out[:, 5] = -1
    for i, c in enumerate(classes[:k]):
        out[i] = (10 * i, 5, 10 * i + 8, 13, 0.9 - 0.01 * i, c)
    return out


def _saved_frames(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
    finally:
        conn.close()


def _fill_disk(directory: Path) -> Path:
    """Take all of the remaining space of the file system under ``directory``; return the filler file."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\1" * 4096)
        except OSError:
            pass
    return filler


def test_batched_commits_and_summary(tmp_path: Path) -> None:
    db = tmp_path / "rec" / "sessions.db"
    rec = SessionRecorder(db, batch_frames=3)
    sid = rec.start_session({"source": "synth://", "class_names": list(TPS_CLASS_NAMES)})
    assert sid == 1
    assert get_session(db, sid)["status"] == "interrupted or running"  # the start is durable at once
    frames = [[0, MATURE], [MATURE, MATURE, 4], [], [1, 2, 3], [MATURE], [5, 5, 5, 0], [2]]
    morph = [{"det": 1, "part": "head", "score": 0.9, "abnormal": True},
             {"det": 0, "parts": {"head": {"score": 0.1, "abnormal": False}, "tail": {"score": 0.8, "abnormal": True}}},
             {"det": 2, "status": "n/a"}]
    for i, classes in enumerate(frames):
        ok = rec.record_frame(i, 1000.0 + i, _dets(len(classes), classes), TPS_CLASS_NAMES,
                              morph if i == 1 else None)
        assert ok
        assert _saved_frames(db) == 3 * ((i + 1) // 3), f"after frame {i}"
    assert rec.pending == 1
    assert rec.record_frame(6, 1006.5, _dets(1, [2]), TPS_CLASS_NAMES) is False  # a repeat (stale) frame
    summary = rec.end_session({"fps": 11.5})
    rec.close()
    assert _saved_frames(db) == 7
    assert summary["frames"] == 7 and summary["fps"] == 11.5
    flat = [c for f in frames for c in f]
    expected = {name: flat.count(i) for i, name in enumerate(TPS_CLASS_NAMES)}
    assert summary["counts_per_class"] == expected
    assert summary["fields_with_mature_sperm"] == sum(MATURE in f for f in frames) == 4
    assert summary["sperm_judged"] == 2 and summary["sperm_abnormal"] == 2
    assert summary["abnormal_by_part"] == {"head": 1, "tail": 1}
    stored = get_session(db, sid)
    assert stored["status"] == "complete" and stored["summary"] == summary
    assert stored["class_names"] == list(TPS_CLASS_NAMES) and stored["meta"]["source"] == "synth://"
    fr = list(session_frames(db, sid))
    assert [f["frame_index"] for f in fr] == list(range(7))
    d1 = fr[1]["detections"]
    assert [d["class_name"] for d in d1] == ["mature_sperm", "mature_sperm", "immature_sperm"]
    assert d1[1]["morphology"] == {"head": {"score": 0.9, "abnormal": True}}
    assert d1[2]["morphology"] == {"": {"score": None, "abnormal": None}}
    assert d1[0]["box"] == [0.0, 5.0, 8.0, 13.0]


def test_non_finite_rows_are_skipped_not_losing_the_batch(tmp_path: Path) -> None:
    db = tmp_path / "nan.db"
    with SessionRecorder(db, batch_frames=2) as rec:
        sid = rec.start_session({"class_names": list(TPS_CLASS_NAMES)})
        assert rec.record_frame(0, 1.0, _dets(2, [0, 1]), TPS_CLASS_NAMES)
        broken = _dets(3, [0, 1, 2])
        broken[0, 0] = np.nan
        broken[2, 5] = np.nan  # a NaN class too
        assert rec.record_frame(1, 2.0, broken, TPS_CLASS_NAMES)  # the batch commits
        assert rec.error == "" and rec.frames_lost == 0
        assert rec.summary()["detections"] == 3
    fr = list(session_frames(db, sid))
    assert [f["n_detections"] for f in fr] == [2, 1]
    assert [d["det"] for d in fr[1]["detections"]] == [1]


def test_session_summary_without_a_record_equals_the_recorders(tmp_path: Path) -> None:
    """The summary the status page shows without --record is the recorder's, figure for figure, from the same
    frames (broken and unused rows, a class beyond the names and n/a morphology included)."""
    broken = _dets(3, [MATURE, 1, 2])
    broken[1, 2] = np.inf
    beyond = _dets(2, [0, len(TPS_CLASS_NAMES) + 1])
    frames = [(_dets(2, [MATURE, MATURE]), [{"det": 0, "part": "head", "score": 0.9, "abnormal": True},
                                              {"det": 1, "status": "n/a"}]),
              (broken, [{"det": 0, "parts": {"head": {"score": 0.1, "abnormal": False},
                                              "tail": {"score": 0.8, "abnormal": True}}}]),
              (beyond, None), (_dets(0, []), [])]
    live = SessionSummary(TPS_CLASS_NAMES)
    with SessionRecorder(tmp_path / "rec.db") as rec:
        rec.start_session({"class_names": list(TPS_CLASS_NAMES)})
        for i, (dets, morph) in enumerate(frames):
            assert rec.record_frame(i, 50.0 + 0.25 * i, dets, TPS_CLASS_NAMES, morph)
            live.add_frame(50.0 + 0.25 * i, dets, TPS_CLASS_NAMES, morph)
        recorded = rec.end_session()
    assert {k: v for k, v in recorded.items() if k != "frames_not_saved"} == live.to_dict()
    assert live.to_dict()["counts_per_class"] == {**dict.fromkeys(TPS_CLASS_NAMES, 0), "mature_sperm": 3,
                                                  "sertoli": 1, "round_spermatid": 1, "class_7": 1}
    assert live.to_dict()["fields_with_mature_sperm"] == 2 and live.to_dict()["duration_s"] == 0.75
    assert (live.sperm_judged, live.sperm_abnormal, live.abnormal_by_part) == (2, 2, {"head": 1, "tail": 1})


def test_multiple_sessions_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    with SessionRecorder(db, batch_frames=2) as rec:
        rec.start_session({"source": "a"})
        rec.record_frame(0, 1.0, _dets(1, [0]), TPS_CLASS_NAMES)
        rec.start_session({"source": "b"})  # ends "a" first
        rec.record_frame(0, 2.0, _dets(2, [1, 1]), TPS_CLASS_NAMES)
    with SessionRecorder(db) as rec:
        assert rec.start_session({"source": "c"}) == 3
    rows = list_sessions(db)
    assert [(r["source"], r["frames_saved"], r["status"]) for r in rows] == [
        ("a", 1, "complete"), ("b", 1, "complete"), ("c", 0, "complete")]


_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from smearsight.device.record import SessionRecorder
    path, mode = sys.argv[1], sys.argv[2]
    rec = SessionRecorder(path, batch_frames=5, background=mode == "background")
    rec.start_session({"source": "child"})
    names = ["a", "b"]
    dets = np.array([[1, 1, 9, 9, 0.9, 0], [2, 2, 8, 8, 0.8, 1], [0, 0, 0, 0, 0, -1]], np.float32)
    i = 0
    reported = 0
    while True:
        rec.record_frame(i, time.time(), dets, names, [{"det": 1, "part": "head", "score": 0.7, "abnormal": True}])
        i += 1
        if mode == "background":
            if rec.commits != reported:  # commits counts batches the writer thread has made durable
                reported = rec.commits
                print(f"committed {5 * reported}", flush=True)
        elif rec.pending == 0:
            print(f"committed {i}", flush=True)
        if mode == "stop" and i == 23:
            print("pending 3", flush=True)
            time.sleep(60)
    """
)


def _spawn(db: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(db), mode], stdout=subprocess.PIPE, text=True)


def test_kill9_loses_at_most_the_open_batch(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    proc = _spawn(db, "stop")
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line.strip())
            if line.startswith("pending"):
                break
        assert lines[-2:] == ["committed 20", "pending 3"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    s = get_session(db, 1)
    assert s["status"] == "interrupted or running"
    assert s["frames_saved"] == 20 and s["detections_saved"] == 40
    assert s["summary"]["rebuilt_from_saved_frames"] and s["summary"]["frames"] == 20
    assert s["summary"]["counts_per_class"] == {"a": 20, "b": 20}
    assert s["summary"]["sperm_abnormal"] == 20


@pytest.mark.parametrize("mode", ["run", "background"])
def test_kill9_while_writing_flat_out(tmp_path: Path, mode: str) -> None:
    db = tmp_path / "k2.db"
    proc = _spawn(db, mode)
    committed = 0
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            committed = int(line.split()[1])
            if committed >= 40:
                break
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    conn = sqlite3.connect(db)
    try:
        idx = [r[0] for r in conn.execute("SELECT frame_index FROM frames ORDER BY frame_index")]
        per_frame = dict(conn.execute("SELECT frame_index, COUNT(*) FROM detections GROUP BY frame_index"))
        morph = conn.execute("SELECT COUNT(*) FROM morphology").fetchone()[0]
    finally:
        conn.close()
    assert len(idx) >= committed, "every batch reported as committed survives kill -9"
    assert len(idx) % 5 == 0, "whole batches only: the interrupted batch is lost completely"
    assert idx == list(range(len(idx)))
    assert all(per_frame[i] == 2 for i in idx) and morph == len(idx)


def test_read_only_location_gives_a_clear_error(tmp_path: Path, tmpfs) -> None:
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(RecordError, match="read-only|cannot be opened"):
                SessionRecorder(ro / "s.db")
        finally:
            ro.chmod(0o755)
        return
    with tmpfs("ro", "ro,size=64k") as ro:
        pattern = r"session record .*s\.db: (the disk or file is read-only|the file cannot be opened)"
        with pytest.raises(RecordError, match=pattern):
            SessionRecorder(ro / "s.db")


def test_full_disk_is_reported_not_raised_and_recovers(tmp_path: Path, tmpfs) -> None:
    with tmpfs("tiny", "size=256k") as tiny:
        rec = SessionRecorder(tiny / "s.db", batch_frames=4)
        rec.start_session({"source": "x"})
        filler = _fill_disk(tiny)
        big = _dets(300, [i % 6 for i in range(300)], max_det=300)
        results = [rec.record_frame(i, float(i), big, TPS_CLASS_NAMES) for i in range(12)]
        assert results[3] is False and "the disk is full" in rec.error
        assert "frame(s) not saved" in rec.error and rec.frames_lost >= 4
        filler.unlink()  # space comes back: recording resumes by itself
        ok = [rec.record_frame(i, float(i), _dets(1, [0]), TPS_CLASS_NAMES) for i in range(12, 16)]
        assert ok[-1] is True and rec.error == ""
        summary = rec.end_session()
        rec.close()
        assert summary["frames"] == 16 and summary["frames_not_saved"] == rec.frames_lost
        assert get_session(tiny / "s.db", 1)["frames_saved"] == 16 - rec.frames_lost


def test_frames_not_saved_is_counted_per_session(tmp_path: Path, tmpfs) -> None:
    """A session's summary counts the frames lost in that session only: the next slide's summary said frames of
    the previous one were not saved."""
    with tmpfs("tiny_per_session", "size=256k") as tiny:
        rec = SessionRecorder(tiny / "s.db", batch_frames=4)
        rec.start_session({"source": "slide 1"})
        filler = _fill_disk(tiny)
        big = _dets(300, [i % 6 for i in range(300)], max_det=300)
        for i in range(8):
            rec.record_frame(i, float(i), big, TPS_CLASS_NAMES)
        first = rec.end_session()
        assert first["frames_not_saved"] == rec.frames_lost >= 4
        filler.unlink()
        rec.start_session({"source": "slide 2"})
        assert rec.summary()["frames_not_saved"] == 0
        for i in range(8):
            assert rec.record_frame(i, float(i), _dets(1, [0]), TPS_CLASS_NAMES)
        second = rec.end_session()
        rec.close()
        assert second["frames"] == 8 and second["frames_not_saved"] == 0
        assert get_session(tiny / "s.db", 2)["summary"]["frames_not_saved"] == 0
        assert get_session(tiny / "s.db", 2)["frames_saved"] == 8


def test_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RecordError, match="not a SmearSight record"):
        SessionRecorder(bad)


def test_background_writer_same_content_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = [[int(c) for c in rng.integers(0, 6, rng.integers(0, 9))] for _ in range(11)]
    morph = [{"det": 0, "part": "head", "score": 0.7, "abnormal": True}]
    outputs = []
    for background in (False, True):
        db = tmp_path / f"bg{background}.db"
        rec = SessionRecorder(db, batch_frames=3, background=background)
        rec.start_session({"source": "x", "class_names": list(TPS_CLASS_NAMES)})
        for i, classes in enumerate(frames):
            rec.record_frame(i, 10.0 + i, _dets(len(classes), classes), TPS_CLASS_NAMES, morph)
        assert rec.sync() and rec.commits == 3 and _saved_frames(db) == 9
        summary = rec.end_session()
        rec.close()
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = [conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall()
                    for t in ("frames", "detections", "morphology")]
        outputs.append((summary, rows))
    assert outputs[0] == outputs[1]
    assert outputs[0][0]["frames"] == 11


def test_background_writer_reports_full_disk(tmp_path: Path, tmpfs) -> None:
    with tmpfs("tiny_bg", "size=256k") as tiny:
        rec = SessionRecorder(tiny / "s.db", batch_frames=4, background=True)
        rec.start_session({"source": "x"})
        _fill_disk(tiny)
        big = _dets(300, [i % 6 for i in range(300)], max_det=300)
        for i in range(8):
            rec.record_frame(i, float(i), big, TPS_CLASS_NAMES)
        assert rec.sync() is False and "the disk is full" in rec.error and rec.frames_lost == 8
        summary = rec.end_session()
        rec.close()
        assert summary["frames"] == 8 and summary["frames_not_saved"] == 8


V1_SCHEMA = """
CREATE TABLE schema_info (version INTEGER NOT NULL);
INSERT INTO schema_info(version) VALUES (1);
CREATE TABLE sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, started_at REAL NOT NULL, ended_at REAL,
    source TEXT NOT NULL DEFAULT '', meta_json TEXT NOT NULL DEFAULT '{}',
    class_names_json TEXT NOT NULL DEFAULT '[]', summary_json TEXT);
CREATE TABLE frames (session_id INTEGER NOT NULL, frame_index INTEGER NOT NULL, timestamp REAL NOT NULL,
    n_detections INTEGER NOT NULL, PRIMARY KEY (session_id, frame_index)) WITHOUT ROWID;
CREATE TABLE detections (session_id INTEGER NOT NULL, frame_index INTEGER NOT NULL, det INTEGER NOT NULL,
    class_id INTEGER NOT NULL, class_name TEXT NOT NULL, score REAL NOT NULL, x1 REAL NOT NULL, y1 REAL NOT NULL,
    x2 REAL NOT NULL, y2 REAL NOT NULL, PRIMARY KEY (session_id, frame_index, det)) WITHOUT ROWID;
CREATE TABLE morphology (session_id INTEGER NOT NULL, frame_index INTEGER NOT NULL, det INTEGER NOT NULL,
    part TEXT NOT NULL, score REAL, abnormal INTEGER, PRIMARY KEY (session_id, frame_index, det, part)) WITHOUT ROWID;
INSERT INTO sessions(started_at, source) VALUES (100.0, 'old');
INSERT INTO frames(session_id, frame_index, timestamp, n_detections) VALUES (1, 0, 100.0, 0);
"""


def test_carried_frames_are_marked_and_version_1_records_are_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    conn = sqlite3.connect(db)
    conn.executescript(V1_SCHEMA)
    conn.close()
    assert [f["detected"] for f in session_frames(db, 1)] == [True]  # read as it is, not altered:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT version FROM schema_info").fetchall() == [(1,)]
        assert "detected" not in [row[1] for row in conn.execute("PRAGMA table_info(frames)")]
    finally:
        conn.close()
    with SessionRecorder(db, batch_frames=2) as rec:
        sid = rec.start_session({"class_names": list(TPS_CLASS_NAMES)})
        for i, detected in enumerate([True, False, False, True]):
            assert rec.record_frame(i, 200.0 + i, _dets(1, [MATURE]), TPS_CLASS_NAMES, detected=detected)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT version FROM schema_info").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        conn.close()
    assert [f["detected"] for f in session_frames(db, 1)] == [True]  # the old frame counts as detected
    assert [f["detected"] for f in session_frames(db, sid)] == [True, False, False, True]


def test_version_2_records_gain_the_boxes_age(tmp_path: Path) -> None:
    db = tmp_path / "v2.db"
    conn = sqlite3.connect(db)
    conn.executescript(V1_SCHEMA.replace("VALUES (1);", "VALUES (2);").replace(
        "n_detections INTEGER NOT NULL,", "n_detections INTEGER NOT NULL, detected INTEGER NOT NULL DEFAULT 1,"))
    conn.execute("INSERT INTO frames VALUES (1, 1, 100.1, 0, 0)")  # a carried frame of version 2
    conn.commit()
    conn.close()
    old = list(session_frames(db, 1))  # read as it is
    assert [(f["detected"], f["boxes_age_ms"]) for f in old] == [(True, 0.0), (False, 0.0)]
    with SessionRecorder(db, batch_frames=1) as rec:
        sid = rec.start_session({"class_names": list(TPS_CLASS_NAMES)})
        assert rec.record_frame(0, 200.0, _dets(1, [MATURE]), TPS_CLASS_NAMES)
        assert rec.record_frame(1, 200.1, _dets(1, [MATURE]), TPS_CLASS_NAMES, detected=False, boxes_age_s=0.3456)
        assert rec.record_frame(2, 200.2, _dets(1, [MATURE]), TPS_CLASS_NAMES, detected=False,
                                boxes_age_s=float("nan"))  # not a number: recorded as 0, the batch kept
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT version FROM schema_info").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        conn.close()
    assert [(f["detected"], f["boxes_age_ms"]) for f in session_frames(db, 1)] == [(True, 0.0), (False, 0.0)]
    assert [(f["detected"], f["boxes_age_ms"]) for f in session_frames(db, sid)] == [
        (True, 0.0), (False, 345.6), (False, 0.0)]


def test_two_recorders_upgrading_one_version_1_record_at_once(tmp_path: Path) -> None:
    import threading

    for attempt in range(8):
        db = tmp_path / f"v1_{attempt}.db"
        conn = sqlite3.connect(db)
        conn.executescript(V1_SCHEMA)
        conn.close()
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def open_it(db: Path = db, barrier: threading.Barrier = barrier, errors: list = errors) -> None:
            barrier.wait()
            try:
                SessionRecorder(db).close()
            except BaseException as exc:  # collected for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("SELECT version FROM schema_info").fetchall() == [(SCHEMA_VERSION,)]
        finally:
            conn.close()


def test_a_record_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    SessionRecorder(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_info SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(RecordError, match=rf"future.db: written by a newer SmearSight .*version {SCHEMA_VERSION + 1}"):
        SessionRecorder(db)


def test_a_slow_export_lets_the_recording_device_checkpoint_and_keeps_its_snapshot(tmp_path: Path) -> None:
    """An export read slowly (a pager) while the device records into the same file: the device's WAL can
    still be checkpointed, and the export holds exactly the frames there were when it started."""
    from smearsight.device.record import FRAMES_PER_READ, RecordReader

    path = tmp_path / "rec.db"
    rec = SessionRecorder(path, batch_frames=50)
    sid = rec.start_session({"source": "test"})
    first = 2 * FRAMES_PER_READ + 10
    for i in range(first):
        rec.record_frame(i, float(i), _dets(3, [MATURE, 0, 1]), TPS_CLASS_NAMES)
    rec.flush()
    with RecordReader(path) as reader:
        frames = reader.frames(sid)
        seen = [next(frames)]  # the consumer stalls here, as behind a pager
        for i in range(first, first + 300):  # the device goes on recording
            rec.record_frame(i, float(i), _dets(2, [MATURE, 0]), TPS_CLASS_NAMES)
        rec.flush()
        other = sqlite3.connect(path, timeout=0.2)
        try:
            busy, log_frames, checkpointed = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            other.close()
        seen.extend(frames)
    rec.close()
    assert busy == 0, "a reader held the write-ahead log (before: the whole export was one transaction)"
    assert [f["frame_index"] for f in seen] == list(range(first))  # nothing recorded after the export began
    assert all(len(f["detections"]) == 3 for f in seen)
    assert seen[-1]["detections"][0]["class_name"] == "mature_sperm"
