"""The session's running summary of ``smearsight run``: read over real HTTP from ``/status.json`` while a
``synth://`` run goes on, and checked against the frames the run recorded (the figures computed here, apart
from :class:`smearsight.device.record.SessionSummary`), the recorded summary and ``--stats-json``."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smearsight.device.record import get_session, session_frames
from smearsight.runtime import pipeline as pl

pytest.importorskip("cv2")
pytest.importorskip("onnx")

# the tiny detector's class order chosen so that its boxes on synth:// frames are mature sperm (judged by the
# morphology models) and elongated spermatids
CLASSES = ["sertoli", "spermatocyte", "round_spermatid", "mature_sperm", "immature_sperm", "elongated_spermatid"]
FRAMES = 30
MAX_DET = 26  # few enough boxes that some frames hold no mature sperm


@pytest.fixture(scope="module")
def sperm_models(tiny, tmp_path_factory) -> Path:
    """The tiny detector + a head model that flags about half of those sperm and a vacuole one that flags none."""
    root = tmp_path_factory.mktemp("sperm_models")
    tiny.build_detector(root / "detector", image_size=(64, 96), seed=8, score_threshold=0.2, class_names=CLASSES,
                        max_detections=MAX_DET)
    tiny.build_morphology(root / "morphology_head", part="head", threshold=0.72)
    tiny.build_morphology(root / "morphology_vacuole", part="vacuole", threshold=100.0)
    return root


def _summary_of(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """What a session summary of these recorded frames must say, counted from their rows."""
    counts = dict.fromkeys(CLASSES, 0)
    mature = judged = abnormal = 0
    by_part: dict[str, int] = {}
    for frame in frames:
        names = [d["class_name"] for d in frame["detections"]]
        for name in names:
            counts[name] += 1
        mature += "mature_sperm" in names
        for det in frame["detections"]:
            verdicts = [m["abnormal"] for m in det["morphology"].values() if m["abnormal"] is not None]
            judged += bool(verdicts)
            abnormal += any(verdicts)
            for part, m in det["morphology"].items():
                by_part[part] = by_part.get(part, 0) + bool(m["abnormal"])
    return {"frames": len(frames), "detections": sum(counts.values()), "counts_per_class": counts,
            "fields_with_mature_sperm": mature, "sperm_judged": judged, "sperm_abnormal": abnormal,
            "abnormal_by_part": {part: n for part, n in by_part.items() if n},
            "duration_s": round(frames[-1]["timestamp"] - frames[0]["timestamp"], 3)}


def _run_and_watch(cfg: pl.RunConfig, on_status: Callable[[dict[str, Any]], None] | None = None,
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Run ``cfg`` on a thread; meanwhile read /status.json (and the page once) as a tablet would, handing
    each status to ``on_status``."""
    said: list[str] = []
    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result["stats"] = pl.run(cfg, echo=said.append)
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
            result["error"] = exc

    runner = threading.Thread(target=go, daemon=True)
    runner.start()
    seen: list[dict[str, Any]] = []
    page = ""
    deadline = time.monotonic() + 120
    while runner.is_alive() and time.monotonic() < deadline:
        url = next((m.group(1) for m in map(re.compile(r" -> (http://\S+)").search, said) if m), None)
        if url:
            with contextlib.suppress(OSError):  # the sink closes when the run ends
                with urllib.request.urlopen(f"{url}/status.json", timeout=5) as resp:
                    seen.append(json.loads(resp.read()))
                if on_status is not None:
                    on_status(seen[-1])
                if not page:
                    with urllib.request.urlopen(f"{url}/", timeout=5) as resp:
                        page = resp.read().decode()
        time.sleep(0.02)
    runner.join(timeout=30)
    assert "error" not in result, result.get("error")
    return result["stats"], seen, page


def test_status_json_holds_the_sessions_running_summary_equal_to_the_recorded_frames(sperm_models: Path,
                                                                                      tmp_path: Path) -> None:
    record = tmp_path / "rec.sqlite"
    cfg = pl.RunConfig(source="synth://?size=96x64&fps=20", sink="http://127.0.0.1:0", models=sperm_models,
                       backend="onnx", headless=True, max_frames=FRAMES, record=record, detect_every=1,
                       stats_json=tmp_path / "stats.json")
    stats, seen, page = _run_and_watch(cfg)
    frames = list(session_frames(record, stats["session_id"]))
    assert stats["frames"] == len(frames) == FRAMES
    final = _summary_of(frames)
    assert 0 < final["fields_with_mature_sperm"] < FRAMES and 0 < final["sperm_abnormal"] < final["sperm_judged"]
    assert list(final["abnormal_by_part"]) == ["head"]
    assert final["counts_per_class"] == stats["counts"]  # the per-frame counts summed over the run

    live = [s for s in seen if s.get("frame") is not None]
    assert len(live) >= 5, seen
    position = {f["frame_index"]: i for i, f in enumerate(frames)}
    for status in live:  # each one: the summary of the frames up to the one it was shown with
        upto = frames[: position[status["frame"]] + 1]
        assert status["session"] == _summary_of(upto), status["frame"]
        shown = [d["class_name"] for d in upto[-1]["detections"]]
        assert status["counts"] == {name: shown.count(name) for name in CLASSES}
    assert {live[0]["frame"], live[-1]["frame"]} != {live[0]["frame"]}  # it grew while being watched

    recorded = get_session(record, stats["session_id"])["summary"]
    assert recorded == stats["session_summary"] == json.loads((tmp_path / "stats.json").read_text())[
        "session_summary"]
    assert {k: v for k, v in recorded.items() if k != "frames_not_saved"} == final
    assert '<section id="slide">' in page and "This slide so far" in page


def test_a_run_without_record_still_has_the_session_summary(sperm_models: Path) -> None:
    cfg = pl.RunConfig(source="synth://?size=96x64&fps=20", sink="http://127.0.0.1:0", models=sperm_models,
                       backend="onnx", headless=True, max_frames=12, detect_every=1)
    stats, seen, _ = _run_and_watch(cfg)
    summary = stats["session_summary"]
    assert "session_id" not in stats
    assert summary["frames"] == stats["frames"] == 12
    assert summary["counts_per_class"] == stats["counts"] and summary["detections"] == sum(stats["counts"].values())
    live = [s["session"] for s in seen if "session" in s]
    assert live and all(s["frames"] <= 12 for s in live)
    assert [s["frames"] for s in live] == sorted(s["frames"] for s in live)


def test_a_session_started_from_the_panel_starts_a_new_summary(sperm_models: Path, tmp_path: Path) -> None:
    """The panel's "start session" is a new slide: the page's summary starts again from that frame, as the
    recorded session does; after "stop session" it stays as that session ended (it went on counting frames
    no session holds), and --stats-json holds the panel's session."""
    from smearsight.device.panel.link import SerialLink
    from smearsight.device.panel.nullmodem import VirtualNullModem
    from smearsight.device.panel.protocol import StartSession, StopSession

    modem = VirtualNullModem().start()
    panel = SerialLink(modem.b, name="test-panel")
    panel.start()
    started: list[int] = []
    stopped: list[int] = []

    def operator(status: dict[str, Any]) -> None:
        if not started and (status.get("frame") or 0) >= 8:
            panel.send(StartSession("slide-2"))
            started.append(status["frame"])
        elif started and not stopped and (status.get("frame") or 0) >= started[0] + 8:
            panel.send(StopSession())
            stopped.append(status["frame"])

    record = tmp_path / "rec.sqlite"
    cfg = pl.RunConfig(source="synth://?size=96x64&fps=20", sink="http://127.0.0.1:0", models=sperm_models,
                       backend="onnx", headless=True, max_frames=2 * FRAMES, record=record, detect_every=1,
                       panel=modem.a)  # 3 s: time for the watcher to press start, then stop, then see the result
    try:
        stats, seen, _ = _run_and_watch(cfg, operator)
    finally:
        panel.close()
        modem.close()
    assert started and stopped and "session_id" not in stats  # no session is open at the end
    first, second = (list(session_frames(record, sid)) for sid in (1, 2))
    assert first and second and len(first) + len(second) < stats["frames"] == 2 * FRAMES
    where = {f["frame_index"]: (frames, i) for frames in (first, second) for i, f in enumerate(frames)}
    live = [s for s in seen if s.get("frame") is not None]
    assert any(s["frame"] in {f["frame_index"] for f in second} for s in live)
    after = [s for s in live if s["frame"] > second[-1]["frame_index"]]
    assert after and all(s["session"] == _summary_of(second) for s in after)
    for status in live:
        frames, i = where.get(status["frame"], (second, len(second) - 1))
        assert status["session"] == _summary_of(frames[: i + 1]), status["frame"]
    assert {k: v for k, v in stats["session_summary"].items() if k != "frames_not_saved"} == _summary_of(second)
