"""The run loop driven by a panel over a real pseudo-terminal pair: sessions, capture, freeze, status."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from smearsight.device.panel.link import SerialLink
from smearsight.device.panel.nullmodem import VirtualNullModem
from smearsight.device.panel.protocol import Capture, Freeze, FreezeMode, MsgType, StartSession
from smearsight.runtime import pipeline as pl

pytest.importorskip("onnx")


@pytest.fixture()
def modem():
    pair = VirtualNullModem().start()
    yield pair
    pair.close()


def test_panel_commands_drive_the_run(tiny, tmp_path, modem, monkeypatch):
    from smearsight.device import sinks

    written: list[dict] = []
    real_open_sink = sinks.open_sink

    def recording_sink(uri, **opts):  # the real null sink, noting each status the pipeline hands it
        sink = real_open_sink(uri, **opts)
        write = sink.write
        sink.write = lambda image, status=None: (written.append(dict(status or {})), write(image, status))[1]
        return sink

    monkeypatch.setattr(sinks, "open_sink", recording_sink)
    models = tiny.build_model_set(tmp_path / "models", image_size=(64, 96), seed=1, score_threshold=0.2)
    received: dict[int, list] = {}
    panel = SerialLink(modem.b, name="test-panel")
    panel.on_any(lambda frame: received.setdefault(frame.message.TYPE, []).append(frame.message))
    panel.start()

    def operator() -> None:
        deadline = time.monotonic() + 10
        while MsgType.STATUS not in received and time.monotonic() < deadline:
            time.sleep(0.02)
        panel.send(StartSession("slide-7"))
        panel.send(Capture())
        time.sleep(0.3)
        panel.send(Freeze(FreezeMode.ON))
        while not (any(s.state.name == "FROZEN" for s in received.get(MsgType.STATUS, []))
                   and any(w.get("frozen") for w in written)):  # the screen has shown the held field
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        panel.send(Freeze(FreezeMode.OFF))  # a frozen field holds the run until it is released

    thread = threading.Thread(target=operator)
    thread.start()
    db = tmp_path / "rec.sqlite"
    cfg = pl.RunConfig(source="synth://?size=96x64&fps=25", sink="null://", models=models, backend="onnx",
                       headless=True, max_frames=40, record=db, panel=modem.a, captures=tmp_path / "captures")
    try:
        stats = pl.run(cfg)
    finally:
        thread.join()
        panel.flush(1.0)
        time.sleep(0.2)
        panel.close()

    assert len(list((tmp_path / "captures").glob("capture_*.png"))) == 1
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
    assert rows == 2  # the session started with --record, then the one the panel started
    statuses = received[MsgType.STATUS]
    assert statuses and any(s.state.name == "FROZEN" for s in statuses)
    assert received[MsgType.COUNTS][-1].counts.keys() >= {"mature_sperm"}
    frozen = [w for w in written if w.get("frozen")]
    live = [w for w in written if not w.get("frozen")]
    assert frozen and all("counts" in w for w in frozen)  # the held field keeps its counts on the tablet
    assert {w["frame"] for w in frozen} <= {w["frame"] for w in live}  # a shown frame's index, not a count
    summary = received[MsgType.SUMMARY][-1]
    assert summary.captures == 1 and summary.frames == stats["frames"]


def test_q_on_a_frozen_field_ends_the_run(tiny, tmp_path, modem, monkeypatch):
    """The panel froze the field and the technician presses q in the window (stand-in window: no screen here).
    Before, the frozen field was shown again and again without looking at the window's stop: the run went on
    until the field was released."""
    from smearsight.device import sinks

    real_open_sink = sinks.open_sink
    frozen_shown = []

    def window(uri, **opts):  # the real null sink, with q pressed on the first frozen picture
        sink = real_open_sink("null://", **opts)
        write = sink.write

        def write_and_press_q(image, status=None):
            write(image, status)
            if (status or {}).get("frozen"):
                frozen_shown.append(1)
                if len(frozen_shown) >= 20:
                    raise KeyboardInterrupt  # the test's own stop: the run did not honour q
                sink.should_stop = True

        sink.write = write_and_press_q
        return sink

    monkeypatch.setattr(sinks, "open_sink", window)
    models = tiny.build_model_set(tmp_path / "models", image_size=(64, 96), seed=1, score_threshold=0.2, parts=())
    panel = SerialLink(modem.b, name="test-panel")
    status_seen = threading.Event()
    panel.on_any(lambda frame: status_seen.set() if frame.message.TYPE == MsgType.STATUS else None)
    panel.start()
    operator = threading.Thread(target=lambda: status_seen.wait(10) and panel.send(Freeze(FreezeMode.ON)))
    operator.start()
    cfg = pl.RunConfig(source="synth://?size=96x64&fps=25", sink="display://0", models=models, backend="onnx",
                       headless=True, max_frames=400, panel=modem.a)
    try:
        stats = pl.run(cfg)
    finally:
        operator.join()
        panel.close()
    assert len(frozen_shown) == 1 and 1 <= stats["frames"] < 400


def test_a_missing_panel_is_one_problem_not_one_per_countdown_step(tiny, tmp_path):
    """Before, the screen's 'retrying in 0.2 s' line was also what was logged and counted: each countdown step
    was a new warning and a new entry in the stats' problems."""
    models = tiny.build_model_set(tmp_path / "models", image_size=(64, 96), seed=1, score_threshold=0.2, parts=())
    cfg = pl.RunConfig(source="synth://?size=96x64&fps=25", sink="null://", models=models, backend="onnx",
                       headless=True, max_frames=15, panel=str(tmp_path / "ttyNOPE"))
    stats = pl.run(cfg)
    panel = {msg: n for msg, n in stats["problems"].items() if msg.startswith("panel:")}
    assert len(panel) == 1, panel
    msg, n = next(iter(panel.items()))
    assert "not connected" in msg and "ttyNOPE" in msg and "retrying" not in msg and 10 <= n <= 15


def test_the_panel_hears_that_the_camera_is_lost(tiny, tmp_path, modem, monkeypatch, unplugged_camera):
    """The camera is not there (a V4L2 node that does not exist; stand-in capture): the screen says so, and the
    panel must too. Before, nothing was published while the camera was lost: the panel kept its last 'running'
    status (here, having had none, it heard nothing at all)."""
    from smearsight.device import sinks

    real_open_sink = sinks.open_sink
    unplugged_camera(0.05)
    received: list = []
    panel = SerialLink(modem.b, name="test-panel")
    panel.on_any(lambda frame: received.append(frame.message) if frame.message.TYPE == MsgType.STATUS else None)
    panel.start()

    def screen(uri, **opts):  # the real null sink; the run ends once the panel has heard (or after 200 frames)
        sink = real_open_sink(uri, **opts)
        write = sink.write

        def write_until_heard(image, status=None):
            write(image, status)
            sink.should_stop = sink.frames >= 200 or any(s.state.name == "ERROR" for s in received)

        sink.write = write_until_heard
        return sink

    monkeypatch.setattr(sinks, "open_sink", screen)
    models = tiny.build_model_set(tmp_path / "models", image_size=(64, 96), seed=1, score_threshold=0.2, parts=())
    cfg = pl.RunConfig(source=f"v4l2://{tmp_path / 'video9'}", sink="null://", models=models, backend="onnx",
                       headless=True, panel=modem.a)
    try:
        stats = pl.run(cfg)
    finally:
        panel.close()
    assert stats["frames"] == 0
    errors = [s for s in received if s.state.name == "ERROR"]
    assert errors and "not found" in errors[-1].text and errors[-1].frame == 0


def test_the_panel_hears_why_frames_are_skipped(models_failing_every_frame, tmp_path, modem, monkeypatch):
    """Models that fail on every frame (anchors that disagree with the graph): the screen shows why, and before,
    the panel heard nothing."""
    from smearsight.errors import InputError

    models = models_failing_every_frame
    monkeypatch.setattr(pl, "MAX_FAILED_FRAMES", 6)
    received: list = []
    panel = SerialLink(modem.b, name="test-panel")
    panel.on_any(lambda frame: received.append(frame.message) if frame.message.TYPE == MsgType.STATUS else None)
    panel.start()
    cfg = pl.RunConfig(source="synth://?size=96x64&fps=25", sink="null://", models=models, backend="onnx",
                       headless=True, max_frames=3, panel=modem.a)
    try:
        with pytest.raises(InputError, match="failed on the first 6 frames"):
            pl.run(cfg)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        panel.close()
    assert any(s.state.name == "ERROR" and s.text.startswith("frame skipped: ") for s in received), received


def test_capture_on_a_frozen_field_saves_that_field(tiny, tmp_path, modem, monkeypatch):
    """Freeze, look, capture: before, the capture waited until the field was released and then saved the next
    live frame instead of the field on screen."""
    import cv2
    import numpy as np

    from smearsight.device import sinks

    frozen_images: list = []
    real_open_sink = sinks.open_sink

    def screen(uri, **opts):  # the real null sink, keeping a copy of the frozen field it shows
        sink = real_open_sink(uri, **opts)
        write = sink.write

        def keep_frozen(image, status=None):
            if (status or {}).get("frozen") and not frozen_images:
                frozen_images.append(image.copy())
            write(image, status)

        sink.write = keep_frozen
        return sink

    monkeypatch.setattr(sinks, "open_sink", screen)
    models = tiny.build_model_set(tmp_path / "models", image_size=(64, 96), seed=1, score_threshold=0.2, parts=())
    captures = tmp_path / "captures"
    saved_while_frozen: list = []
    status_seen = threading.Event()
    panel = SerialLink(modem.b, name="test-panel")
    panel.on_any(lambda frame: status_seen.set() if frame.message.TYPE == MsgType.STATUS else None)
    panel.start()

    def operator() -> None:
        deadline = time.monotonic() + 10
        status_seen.wait(10)
        panel.send(Freeze(FreezeMode.ON))
        while not frozen_images and time.monotonic() < deadline:
            time.sleep(0.02)
        panel.send(Capture())
        until = time.monotonic() + 2
        while not saved_while_frozen and time.monotonic() < until:
            saved_while_frozen.extend(captures.glob("capture_*.png"))
            time.sleep(0.02)
        panel.send(Freeze(FreezeMode.OFF))

    thread = threading.Thread(target=operator)
    thread.start()
    cfg = pl.RunConfig(source="synth://?size=96x64&fps=25", sink="null://", models=models, backend="onnx",
                       headless=True, max_frames=30, panel=modem.a, captures=captures)
    try:
        pl.run(cfg)
    finally:
        thread.join()
        panel.close()
    assert len(saved_while_frozen) == 1 and len(list(captures.glob("capture_*.png"))) == 1
    saved = cv2.cvtColor(cv2.imread(str(saved_while_frozen[0])), cv2.COLOR_BGR2RGB)
    assert np.array_equal(saved, frozen_images[0])


def test_a_capture_that_cannot_be_saved_says_where_and_is_not_counted(tiny, tmp_path, modem):
    """Before, the failure read 'frame N: could not show or record it (...)' and the summary counted the capture."""
    models = tiny.build_model_set(tmp_path / "models", image_size=(64, 96), seed=1, score_threshold=0.2, parts=())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    summaries: list = []
    status_seen = threading.Event()
    panel = SerialLink(modem.b, name="test-panel")
    panel.on_any(lambda frame: status_seen.set() if frame.message.TYPE == MsgType.STATUS else None)
    panel.on(MsgType.SUMMARY, lambda frame: summaries.append(frame.message))
    panel.start()
    operator = threading.Thread(target=lambda: status_seen.wait(10) and panel.send(Capture()))
    operator.start()
    cfg = pl.RunConfig(source="synth://?size=96x64&fps=25", sink="null://", models=models, backend="onnx",
                       headless=True, max_frames=30, panel=modem.a, captures=blocker / "captures")
    try:
        stats = pl.run(cfg)
        deadline = time.monotonic() + 5
        while not summaries and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        operator.join()
        panel.close()
    expected = f"--captures {blocker / 'captures'}: could not save the field ("
    assert any(p.startswith(expected) for p in stats["problems"]), stats["problems"]
    assert summaries and summaries[-1].captures == 0
