"""`smearsight run` through the real CLI entry point on tiny ONNX models."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import cv2
import numpy as np
import pytest

from smearsight.cli import main
from smearsight.runtime import pipeline as pl

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    return tiny.build_model_set(tmp_path_factory.mktemp("models"), image_size=(64, 96), seed=2,
                                score_threshold=0.2)


def test_run_folder_to_null_with_stats(models, tmp_path):
    src = tmp_path / "frames"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(src / f"{i}.png"), rng.integers(0, 256, size=(96, 144, 3), dtype=np.uint8))
    stats = tmp_path / "stats.json"
    rc = main(["run", f"file://{src}/", "null://", "--models", str(models), "--backend", "onnx", "--headless",
               "--max-frames", "2", "--stats-json", str(stats), "--record", str(tmp_path / "rec.db")])
    assert rc == 0
    data = json.loads(stats.read_text())
    assert data["frames"] == 2 and data["fps"] > 0 and data["backend"] == "onnxruntime-cpu"
    assert data["morphology_parts"] == ["head", "vacuole"]
    assert data["latency_ms"]["infer"] > 0 and "decode_nms" in data["latency_ms"]
    assert data["session_id"] >= 1


def test_no_arguments_runs_builtin_default(models, tmp_path, monkeypatch, capfd):
    # the packaged demo models are placed by the lead; stand a tiny set in their place
    monkeypatch.setattr(pl, "packaged_models_root", lambda: models)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--max-frames", "2", "--stats-json", "s.json"])
    assert rc == 0
    err = capfd.readouterr().err
    assert "no display" in err and "smearsight-out.mp4" in err
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["source"] == "synth://" and data["frames"] == 2
    assert (tmp_path / "smearsight-out.mp4").stat().st_size > 0


def test_missing_models_and_bad_flags_are_one_line_errors(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(pl, "packaged_models_root", lambda: tmp_path / "none")
    assert main(["run", "--headless", "--max-frames", "1"]) == 1
    assert "demo models are not installed" in capfd.readouterr().err
    assert main(["run", "--backend", "tpu", "--max-frames", "1"]) == 1
    assert "--backend" in capfd.readouterr().err
    assert main(["run", "--models", str(tmp_path / "nope"), "--headless"]) == 1
    assert "no such folder" in capfd.readouterr().err


def test_headless_refuses_a_window(models, capfd):
    rc = main(["run", "synth://", "display://0", "--models", str(models), "--headless", "--max-frames", "1"])
    assert rc == 1
    assert "--headless" in capfd.readouterr().err


def test_builtin_demo_models_int8_and_carried_morphology(tmp_path):
    """The shipped demo pair on synth:// for real: the int8 detector on a CPU-only machine, and each sperm
    judged about once while the stage moves (far fewer crops than sperm detections)."""
    from smearsight.runtime.backends import cpu_only

    stats = tmp_path / "s.json"
    assert main(["run", "synth://", "null://", "--max-frames", "12", "--stats-json", str(stats)]) == 0
    data = json.loads(stats.read_text())
    assert data["frames"] == 12 and data["fps_steady"] > 0
    assert data["precision"] == ("int8" if cpu_only() else "fp32")
    sperm = data["counts"]["immature_sperm"] + data["counts"]["mature_sperm"]
    assert data["morphology_reuse"] and 0 < data["morphology_crops_judged"] < sperm / 3
    assert main(["run", "synth://", "null://", "--max-frames", "3", "--precision", "fp32",
                 "--morphology-every-frame", "--stats-json", str(stats)]) == 0
    data = json.loads(stats.read_text())
    sperm = data["counts"]["immature_sperm"] + data["counts"]["mature_sperm"]
    assert data["precision"] == "fp32" and data["morphology_crops_judged"] == sperm and data["fps_steady"] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_status_json_tells_how_the_boxes_were_found():
    """A tablet polling /status.json while the demo models run async: each status says whether the detector
    ran on that frame, how old the boxes are otherwise, and how many sperm in view are abnormal."""
    port = _free_port()
    rc: list[int] = []
    runner = threading.Thread(target=lambda: rc.append(main(
        ["run", "synth://?seed=3&fps=10", f"http://127.0.0.1:{port}", "--max-frames", "30",
         "--detect-every", "async", "--headless"])), daemon=True)
    runner.start()
    seen: list[dict] = []
    page = ""
    deadline = time.monotonic() + 120
    while runner.is_alive() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as resp:
                status = json.loads(resp.read())
            if not page:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    page = resp.read().decode()
        except OSError:  # not serving yet, or just closed
            time.sleep(0.05)
            continue
        if status.get("frame") is not None and (not seen or status["frame"] != seen[-1]["frame"]):
            seen.append(status)
        time.sleep(0.03)
    runner.join(timeout=30)
    assert rc == [0]
    assert len(seen) >= 5, seen
    assert all(s["detect_every"] == "async" for s in seen)
    carried = [s for s in seen if not s["detected"]]
    assert carried and all(s["boxes_age_ms"] > 0 for s in carried)
    assert all(s["boxes_age_ms"] == 0 for s in seen if s["detected"])
    runs = [s["detector_runs"] for s in seen]
    assert runs == sorted(runs) and runs[-1] >= 2
    assert any(s["sperm_judged"] > 0 for s in seen)
    assert all(0 <= s["sperm_abnormal"] <= s["sperm_judged"] for s in seen)
    assert all(s["sperm_judged"] <= s["counts"]["immature_sperm"] + s["counts"]["mature_sperm"] for s in seen)
    assert "infer" in seen[-1]["latency_ms"]
    assert "boxes_age_ms" in page and "sperm_abnormal" in page


def test_source_that_gives_no_frame_is_an_error(models, tmp_path, capfd):
    src = tmp_path / "frames"
    src.mkdir()
    (src / "x.jpg").write_bytes(b"not a jpeg")
    stats = tmp_path / "stats.json"
    rc = main(["run", f"file://{src}/", "null://", "--models", str(models), "--backend", "onnx", "--headless",
               "--stats-json", str(stats)])
    assert rc == 1
    err = capfd.readouterr().err
    assert "no frame was processed" in err and "no readable frames" in err
    data = json.loads(stats.read_text())  # the stats still say what happened
    assert data["frames"] == 0 and "no readable frames" in data["source_error"]
    assert data["source_stats"]["skipped"] == 1 and sum(data["source_stats"]["problems"].values()) == 1


def test_unwritable_stats_json_fails_before_running(models, tmp_path, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target, expected in ((tmp_path, "is a folder"), (blocker / "stats.json", "is not a folder")):
        rc = main(["run", "synth://", "null://", "--models", str(models), "--backend", "onnx", "--headless",
                   "--max-frames", "2", "--stats-json", str(target)])
        assert rc == 1
        err = capfd.readouterr().err
        assert expected in err and "--stats-json" in err and "Traceback" not in err


def test_sigterm_ends_the_run_cleanly(models, tmp_path):
    """systemctl stop: the video is finished, the session ended and the stats written, exit 0."""
    import os
    import signal
    import subprocess
    import sys

    out, stats, rec = tmp_path / "out.mp4", tmp_path / "stats.json", tmp_path / "rec.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "smearsight.cli", "run", "synth://", f"file://{out}", "--models", str(models),
         "--backend", "onnx", "--headless", "--stats-json", str(stats), "--record", str(rec)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        partial = tmp_path / ".out.partial.mp4"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and partial.stat().st_size > 0:
                break
            time.sleep(0.1)
        time.sleep(1.0)  # a few more frames
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err
    data = json.loads(stats.read_text())
    # the signal may land between counting a frame and recording it
    assert data["frames"] >= 1 and data["frames"] - 1 <= data["session_summary"]["frames"] <= data["frames"]
    assert out.exists() and not partial.exists()
    frames = 0
    cap = cv2.VideoCapture(str(out))
    while cap.read()[0]:
        frames += 1
    cap.release()
    assert frames >= data["frames"] - 1


def _write_clip(path, frames: int, fps: float) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (144, 96))
    rng = np.random.default_rng(1)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, size=(96, 144, 3), dtype=np.uint8))
    writer.release()


def test_output_over_the_source_video_is_refused(models, tmp_path, capfd):
    clip = tmp_path / "slide.mp4"
    _write_clip(clip, 5, 10.0)
    before = clip.read_bytes()
    for sink in (f"file://{clip}", str(clip)):
        rc = main(["run", f"file://{clip}", sink, "--models", str(models), "--backend", "onnx", "--max-frames", "3"])
        err = capfd.readouterr().err
        assert rc == 1 and "is the source" in err and "Traceback" not in err
    assert clip.read_bytes() == before  # before: replaced by the 3 annotated frames


def test_output_video_plays_at_the_source_rate(models, tmp_path):
    clip, out = tmp_path / "in.mp4", tmp_path / "out.mp4"
    _write_clip(clip, 6, 30.0)
    assert main(["run", f"file://{clip}", f"file://{out}", "--models", str(models), "--backend", "onnx"]) == 0
    cap = cv2.VideoCapture(str(out))
    try:
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(30.0)  # before: always 15
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    finally:
        cap.release()


def test_models_that_fail_on_every_frame_show_why_and_end_the_run(models_failing_every_frame, tmp_path, monkeypatch,
                                                                  capfd):
    """A manifest whose anchors disagree with its graph (the output's anchor dimension left free, so nothing
    catches it at open): before, every frame was skipped, nothing reached the screen, the problems grew by one
    entry a frame and the run never ended (it counts processed frames) and exited 0."""
    models = models_failing_every_frame
    monkeypatch.setattr(pl, "MAX_FAILED_FRAMES", 6)
    stats, shown = tmp_path / "stats.json", tmp_path / "shown"
    rc = main(["run", "synth://?size=96x64", f"file://{shown}/", "--models", str(models), "--backend", "onnx",
               "--max-frames", "3", "--stats-json", str(stats)])
    err = capfd.readouterr().err
    assert rc == 1 and "failed on the first 6 frames" in err and "Traceback" not in err
    problems = json.loads(stats.read_text())["problems"]
    assert len(problems) == 1 and list(problems.values()) == [6]  # one message, counted
    assert "shapes disagree" in next(iter(problems))
    assert len(list(shown.glob("frame_*.jpg"))) == 6  # each failed frame was shown with the reason


def test_a_manifest_input_that_differs_from_the_graph_is_refused(tiny, tmp_path, capfd):
    models = tiny.build_model_set(tmp_path / "models", image_size=(64, 96), parts=())
    manifest = json.loads((models / "detector" / "manifest.json").read_text())
    manifest["input"].update(shape=[1, 1, 64, 96], color="gray", mean=[0.5], std=[0.5])
    (models / "detector" / "manifest.json").write_text(json.dumps(manifest))
    rc = main(["run", "synth://?size=96x64", "null://", "--models", str(models), "--backend", "onnx",
               "--max-frames", "1"])
    err = capfd.readouterr().err
    assert rc == 1 and "input 'images' has shape [1, 3, 64, 96] but the manifest says [1, 1, 64, 96]" in err


def test_run_stops_at_a_ctrl_c_that_a_finalizer_swallowed(models, tmp_path, monkeypatch):
    """Python drops a KeyboardInterrupt raised inside a finalizer; the request is remembered, and the frame loop
    stops at it as at any Ctrl-C (the stats are written). Stand-in: the remembered flag turns on at the third
    frame's look, before that frame is shown."""
    import threading

    from smearsight import interrupts

    class _SetAtThirdLook(threading.Event):
        looks = 0

        def is_set(self) -> bool:
            self.looks += 1
            return self.looks >= 3 or super().is_set()

    monkeypatch.setattr(interrupts, "_requested", _SetAtThirdLook())
    stats = tmp_path / "stats.json"
    rc = main(["run", "synth://", "null://", "--models", str(models), "--backend", "onnx", "--headless",
               "--max-frames", "50", "--stats-json", str(stats)])
    assert rc == 0 and json.loads(stats.read_text())["frames"] == 2


def test_infinite_rates_and_budgets_are_refused(models, tmp_path, capfd):
    """inf passed typer's min=: before, --target-fps inf made the video sink's writer hang (SIGTERM did not stop
    it), above 65535 the video was not written ('OpenCV cannot write .mp4 video'), and --morphology-budget-ms inf
    failed every frame ('cannot convert float infinity to integer')."""
    for value in ("inf", "70000"):
        rc = main(["run", "synth://", "null://", "--models", str(models), "--backend", "onnx", "--headless",
                   "--max-frames", "2", "--target-fps", value])
        assert rc == 2 and "less than or equal to 1000" in capfd.readouterr().err
    rc = main(["run", "synth://", "null://", "--models", str(models), "--backend", "onnx", "--headless",
               "--max-frames", "2", "--morphology-budget-ms", "inf"])
    err = capfd.readouterr().err
    assert rc == 1 and "--morphology-budget-ms: expected a finite number, got inf" in err and "Traceback" not in err



def test_stats_and_record_files_that_are_the_source_or_the_output_are_refused(models, tmp_path, capfd):
    """Before, each was written over at the end: --stats-json on the source video replaced the video with JSON,
    on --record the session record, on the output video the video; --record on the output video lost the
    session record to the finished video."""
    clip, out, rec = tmp_path / "slide.mp4", tmp_path / "out.mp4", tmp_path / "rec.db"
    _write_clip(clip, 3, 10.0)
    before = clip.read_bytes()
    cases = (
        (["null://", "--stats-json", str(clip)], f"--stats-json {clip}: is also the source file://{clip}"),
        ([f"file://{out}", "--stats-json", str(out)], f"--stats-json {out}: is also the output file://{out}"),
        (["null://", "--record", str(rec), "--stats-json", str(rec)], f"--record {rec}: is also the --stats-json file"),
        ([f"file://{out}", "--record", str(out)], f"--record {out}: is also the output file://{out}"),
    )
    for args, expected in cases:
        rc = main(["run", f"file://{clip}", *args, "--models", str(models), "--backend", "onnx", "--headless"])
        err = capfd.readouterr().err
        assert rc == 1 and expected in err and "Traceback" not in err, err
    assert clip.read_bytes() == before and not out.exists() and not rec.exists()
