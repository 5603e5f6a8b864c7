"""`smearsight sessions list|show|export` and `smearsight device info` through the real CLI entry point."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smearsight.catalog import TPS_CLASS_NAMES
from smearsight.cli import main
from smearsight.device.record import SessionRecorder


def _dets(classes: list[int]) -> np.ndarray:
    out = np.zeros((8, 6), np.float32)
    out[:, 5] = -1
    for i, c in enumerate(classes):
        out[i] = (10 * i, 5, 10 * i + 8, 13, 0.5 + 0.05 * i, c)
    return out


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    path = tmp_path / "sessions.db"
    rec = SessionRecorder(path, batch_frames=2)
    rec.start_session({"source": "file://a.mp4", "class_names": list(TPS_CLASS_NAMES)})
    rec.record_frame(0, 100.0, _dets([5, 4]), TPS_CLASS_NAMES,
                     [{"det": 0, "parts": {"head": {"score": 0.9, "abnormal": True},
                                           "vacuole": {"score": 0.2, "abnormal": False}}},
                      {"det": 1, "status": "n/a", "part": "head"}])
    rec.record_frame(1, 100.1, _dets([0]), TPS_CLASS_NAMES, detected=False, boxes_age_s=0.1)  # frame 0's boxes
    rec.record_frame(2, 100.2, _dets([5, 5, 1]), TPS_CLASS_NAMES)
    rec.end_session({"fps": 10.0})
    rec.start_session({"source": "v4l2:///dev/video0"})  # cut off: never ended
    rec.record_frame(0, 200.0, _dets([2, 3]), TPS_CLASS_NAMES)
    rec.record_frame(1, 200.1, _dets([5]), TPS_CLASS_NAMES)
    rec.session_id = None  # simulate the process dying after the commit (end_session never runs)
    rec.close()
    return path


def test_list_and_show(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sessions", "list", "--db", str(db), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["frames_saved"], r["detections_saved"], r["status"]) for r in rows] == [
        (1, 3, 6, "complete"), (2, 2, 3, "interrupted or running")]
    assert main(["sessions", "list", "--db", str(db)]) == 0
    table = capsys.readouterr().out
    assert "file://a.mp4" in table and "interrupted" in table

    assert main(["sessions", "show", "1", "--db", str(db), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["summary"]["counts_per_class"]["mature_sperm"] == 3
    assert s["summary"]["fields_with_mature_sperm"] == 2 and s["summary"]["fps"] == 10.0
    assert main(["sessions", "show", "2", "--db", str(db)]) == 0
    text = capsys.readouterr().out
    assert "rebuilt from the saved frames" in text and "fields with mature sperm 1" in text


def test_sources_with_brackets_are_printed_verbatim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "b.db"
    with SessionRecorder(db) as rec:  # a file name rich would otherwise read as markup
        rec.start_session({"source": "a[/b][red]", "class_names": ["[bold]odd"]})
        rec.record_frame(0, 1.0, _dets([0]), ["[bold]odd"])
    assert main(["sessions", "list", "--db", str(db)]) == 0
    assert "a[/b][red]" in capsys.readouterr().out
    assert main(["sessions", "show", "1", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "source a[/b][red]" in out and "[bold]odd" in out


def test_export_csv_and_json(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_csv = tmp_path / "exports" / "s1.csv"
    assert main(["sessions", "export", "1", "--format", "csv", "--out", str(out_csv), "--db", str(db)]) == 0
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert len(rows) == 6
    assert rows[0]["class_name"] == "mature_sperm" and rows[0]["head_abnormal"] == "1"
    assert rows[0]["vacuole_abnormal"] == "0" and float(rows[0]["head_score"]) == pytest.approx(0.9)
    assert rows[1]["head_abnormal"] == "n/a" and rows[2]["head_abnormal"] == ""
    assert [r["frame_index"] for r in rows] == ["0", "0", "1", "2", "2", "2"]
    assert float(rows[3]["x2"]) == pytest.approx(8.0)
    assert [r["detected"] for r in rows] == ["1", "1", "0", "1", "1", "1"]
    assert [r["boxes_age_ms"] for r in rows] == ["0.0", "0.0", "100.0", "0.0", "0.0", "0.0"]
    assert list(rows[0])[-2:] == ["detected", "boxes_age_ms"]  # after the morphology columns (read by position)
    assert not list(out_csv.parent.glob(".*tmp"))

    assert main(["sessions", "export", "2", "--format", "json", "--db", str(db)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [f["frame_index"] for f in data["frames"]] == [0, 1]
    assert [f["detected"] for f in data["frames"]] == [True, True]
    assert [f["boxes_age_ms"] for f in data["frames"]] == [0.0, 0.0]
    assert [d["class_name"] for d in data["frames"][0]["detections"]] == ["round_spermatid", "elongated_spermatid"]


def test_bad_input_exits_1(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sessions", "show", "99", "--db", str(db)]) == 1
    assert "no session 99" in capsys.readouterr().err
    assert main(["sessions", "export", "1", "--format", "xml", "--db", str(db)]) == 1
    assert "--format" in capsys.readouterr().err
    assert main(["sessions", "list", "--db", str(tmp_path / "none.db")]) == 1
    assert "no session record here" in capsys.readouterr().err
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"nope" * 500)
    assert main(["sessions", "list", "--db", str(junk)]) == 1
    assert "not a SmearSight record" in capsys.readouterr().err


def test_default_db_from_environment(db: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SMEARSIGHT_SESSIONS_DB", str(db))
    assert main(["sessions", "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_device_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["device", "info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    import cv2
    import onnxruntime

    assert rep["opencv"]["version"] == cv2.__version__
    assert rep["onnxruntime"]["providers"] == onnxruntime.get_available_providers()
    assert set(rep) >= {"tensorrt", "pycuda", "display", "cameras"}
    assert main(["device", "info"]) == 0
    text = capsys.readouterr().out
    assert f"OpenCV {cv2.__version__}" in text and "CPUExecutionProvider" in text


def test_cli_module_is_import_light() -> None:
    code = ("import sys; import smearsight.device.cli; "
            "bad = [m for m in ('cv2', 'torch', 'tensorrt', 'pycuda', 'onnxruntime') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _long_session(path: Path, frames: int) -> Path:
    rec = SessionRecorder(path, batch_frames=50)
    rec.start_session({"source": "synth://", "class_names": list(TPS_CLASS_NAMES)})
    for i in range(frames):
        rec.record_frame(i, 100.0 + i / 10, _dets([5, 4, 3, 2, 1, 0, 5, 5]), TPS_CLASS_NAMES)
    rec.end_session({})
    rec.close()
    return path


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smearsight.cli", *args], capture_output=True, text=True, **kw)


def test_export_to_stdout_on_a_full_disk_fails_instead_of_cutting_the_file(tmp_path: Path, tmpfs) -> None:
    db = _long_session(tmp_path / "long.db", 300)  # ~2,400 CSV rows, ~190 kB
    with tmpfs("full", "size=64k") as full:
        with open(full / "x.csv", "w") as target:
            proc = subprocess.run([sys.executable, "-m", "smearsight.cli", "sessions", "export", "1", "--db", str(db)],
                                  stdout=target, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "cannot write (No space left on device)" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_export_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    db = _long_session(tmp_path / "long.db", 300)
    proc = subprocess.Popen([sys.executable, "-m", "smearsight.cli", "sessions", "export", "1", "--db", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(100)  # "| head -c 100"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and err == ""  # click's convention for a closed pipe: quiet, exit 1


def test_record_on_read_only_media_is_readable(tmp_path: Path, tmpfs) -> None:
    db = _long_session(tmp_path / "long.db", 3)
    with tmpfs("card", "size=1m") as card:
        (card / "s.db").write_bytes(db.read_bytes())  # still marked WAL in its header, as every record is
        subprocess.run(["mount", "-o", "remount,ro", str(card)], check=True)
        proc = _cli("sessions", "list", "--db", str(card / "s.db"), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)[0]["frames_saved"] == 3
    with tmpfs("card2", "size=1m") as card:
        (card / "s.db").write_bytes(db.read_bytes())
        (card / "s.db-wal").write_bytes(b"\0" * 32)  # a run killed before its frames were merged
        subprocess.run(["mount", "-o", "remount,ro", str(card)], check=True)
        proc = _cli("sessions", "list", "--db", str(card / "s.db"))
        assert proc.returncode == 1 and "copy both files to a writable folder" in proc.stderr


def test_json_export_of_a_source_named_like_its_placeholder(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rec = SessionRecorder(tmp_path / "s.db")
    rec.start_session({"source": "__frames__", "class_names": list(TPS_CLASS_NAMES)})
    rec.record_frame(0, 1.0, _dets([5]), TPS_CLASS_NAMES)
    rec.end_session({})
    rec.close()
    assert main(["sessions", "export", "1", "--format", "json", "--db", str(tmp_path / "s.db")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == "__frames__" and len(data["frames"]) == 1


def test_export_is_one_snapshot_while_a_run_records(tmp_path: Path) -> None:
    from smearsight.device.record import RecordReader

    db = tmp_path / "live.db"
    rec = SessionRecorder(db, batch_frames=1)
    sid = rec.start_session({"source": "synth://", "class_names": list(TPS_CLASS_NAMES)})
    for i in range(3):
        rec.record_frame(i, float(i), _dets([5, 4]), TPS_CLASS_NAMES)
    with RecordReader(db) as reader:
        before = reader.session(sid)["summary"]
        for i in range(3, 6):  # the run goes on while the export is being read
            rec.record_frame(i, float(i), _dets([5, 4]), TPS_CLASS_NAMES)
        frames = list(reader.frames(sid))
        assert before["frames"] == len(frames) == 3 and before["detections"] == 6
        assert sum(len(f["detections"]) for f in frames) == 6
    rec.end_session({})
    rec.close()
    with RecordReader(db) as reader:
        assert len(list(reader.frames(sid))) == 6


def test_files_that_are_not_records_are_one_line_errors(tmp_path: Path, db: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE sessions (id INTEGER PRIMARY KEY, name TEXT)")
    for command in (["list"], ["show", "1"], ["export", "1"]):
        assert main(["sessions", *command, "--db", str(other)]) == 1
        assert "not a SmearSight session record" in capsys.readouterr().err
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE sessions SET summary_json = '{broken' WHERE id = 1")
    assert main(["sessions", "show", "1", "--db", str(db)]) == 1
    assert "summary_json is damaged" in capsys.readouterr().err
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE sessions SET summary_json = '[1]' WHERE id = 1")  # JSON, but not an object
    assert main(["sessions", "show", "1", "--db", str(db)]) == 1
    assert "summary_json is damaged (expected a JSON object, got list)" in capsys.readouterr().err
    assert main(["sessions", "show", "99999999999999999999999", "--db", str(db)]) == 1
    assert "no session 99999999999999999999999" in capsys.readouterr().err


def test_recording_refuses_another_programs_database(tmp_path: Path) -> None:
    import sqlite3

    from smearsight.device.record import RecordError

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE foo (x)")
    with pytest.raises(RecordError, match="an SQLite file of another program"):
        SessionRecorder(other)
    with sqlite3.connect(other) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["foo"]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


@pytest.mark.parametrize("target", ["sessions.db", "sessions.db-wal", "link.db"])
def test_export_refuses_to_write_over_the_record_itself(db: Path, target: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--out naming the record (or its write-ahead log, or a link to it) replaced the record with the CSV:
    every session in it was lost."""
    (db.parent / "link.db").symlink_to(db.name)
    before = db.read_bytes()
    assert main(["sessions", "export", "1", "--db", str(db), "--out", str(db.parent / target)]) == 1
    err = capsys.readouterr().err
    assert "is the session record" in err and len(err.strip().splitlines()) == 1
    assert db.read_bytes() == before
    assert main(["sessions", "list", "--db", str(db), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_a_record_from_a_newer_smearsight_says_so(db: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A record whose newer schema still holds the columns read here reads; one that changed them is named
    as a newer SmearSight's record (it was called 'not a SmearSight session record', as if foreign or broken)."""
    import shutil
    import sqlite3

    from smearsight.device.record import SCHEMA_VERSION

    additive = tmp_path / "additive.db"
    shutil.copy(db, additive)
    with sqlite3.connect(additive) as conn:
        conn.execute("UPDATE schema_info SET version = ?", (SCHEMA_VERSION + 1,))
        conn.execute("ALTER TABLE frames ADD COLUMN focus REAL")
    assert main(["sessions", "list", "--db", str(additive), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2

    changed = tmp_path / "changed.db"
    shutil.copy(db, changed)
    with sqlite3.connect(changed) as conn:
        conn.execute("UPDATE schema_info SET version = ?", (SCHEMA_VERSION + 1,))
        conn.execute("ALTER TABLE frames RENAME COLUMN n_detections TO detections_count")
    for command in (["list"], ["show", "1"], ["export", "1"]):
        assert main(["sessions", *command, "--db", str(changed)]) == 1
        err = capsys.readouterr().err
        assert f"written by a newer SmearSight (record schema version {SCHEMA_VERSION + 1}" in err, err
        assert "update SmearSight" in err and len(err.strip().splitlines()) == 1


def _strict_json(text: str) -> object:
    """Parse JSON as jq or a browser would: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in the JSON output")

    return json.loads(text, parse_constant=refuse)


def test_json_outputs_hold_no_nan_or_infinity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A morphology score that overflowed (an FP16 engine gone wrong) was exported as Infinity, a summary value
    as NaN: not JSON, so jq, a spreadsheet import or a browser refused the whole export."""
    import sqlite3

    db = tmp_path / "s.db"
    rec = SessionRecorder(db, batch_frames=1)
    rec.start_session({"source": "synth://", "class_names": list(TPS_CLASS_NAMES)})
    rec.record_frame(0, 100.0, _dets([5, 5]), TPS_CLASS_NAMES,
                     [{"det": 0, "part": "head", "score": float("inf"), "abnormal": True},
                      {"det": 1, "part": "head", "score": 0.25, "abnormal": False}])
    rec.end_session({})
    rec.close()
    with sqlite3.connect(db) as conn:  # a summary written with a NaN in it (json.dumps writes NaN by default)
        conn.execute("UPDATE sessions SET summary_json = json_set(summary_json, '$.fps', 'x')")
        conn.execute("UPDATE sessions SET summary_json = replace(summary_json, '\"x\"', 'NaN')")
    assert main(["sessions", "export", "1", "--format", "json", "--db", str(db)]) == 0
    data = _strict_json(capsys.readouterr().out)
    assert data["summary"]["fps"] is None and data["summary"]["frames"] == 1
    morph = [d["morphology"]["head"] for d in data["frames"][0]["detections"]]
    assert morph == [{"score": None, "abnormal": True}, {"score": 0.25, "abnormal": False}]
    assert main(["sessions", "show", "1", "--json", "--db", str(db)]) == 0
    assert _strict_json(capsys.readouterr().out)["summary"]["fps"] is None
    assert main(["sessions", "list", "--json", "--db", str(db)]) == 0
    _strict_json(capsys.readouterr().out)


def test_export_over_an_existing_file_replaces_it_whole_and_keeps_its_permissions(
        db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An export file kept private (chmod 600: patients' slides) was replaced by a world-readable one."""
    out = tmp_path / "private.csv"
    out.write_text("an older export\n")
    out.chmod(0o600)
    assert main(["sessions", "export", "1", "--db", str(db), "--out", str(out)]) == 0
    assert out.read_text().startswith("session_id,frame_index,") and "an older export" not in out.read_text()
    assert out.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_export_that_fails_on_a_full_disk_leaves_nothing_behind(tmp_path: Path, tmpfs) -> None:
    db = _long_session(tmp_path / "long.db", 300)  # ~190 kB of CSV
    with tmpfs("full", "size=64k") as full:
        out = full / "new" / "folders" / "x.csv"
        proc = _cli("sessions", "export", "1", "--db", str(db), "--out", str(out))
        assert proc.returncode == 1 and "cannot write the export (No space left on device)" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert list(full.iterdir()) == [], "the folders made for the export were left behind"


def test_export_out_dash_writes_to_stdout(db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`--out -` is the usual spelling of standard output: no file named "-" appears."""
    monkeypatch.chdir(tmp_path)
    assert main(["sessions", "export", "1", "--format", "json", "--out", "-", "--db", str(db)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["id"] == 1 and len(exported["frames"]) == 3
    assert not (tmp_path / "-").exists()
