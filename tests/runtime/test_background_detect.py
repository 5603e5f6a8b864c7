"""The detector on its own thread (``--detect-every async``): the thread's hand-over rules with a simple
detect function, then a real slide through a real ONNX detector and the CLI."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from smearsight.cli import main
from smearsight.device.record import session_frames
from smearsight.runtime import pipeline as pl
from smearsight.runtime.background_detect import BackgroundDetector
from smearsight.runtime.postprocess import EMPTY_ROW

pytest.importorskip("onnx")


class GatedDetect:
    """``detect`` that writes the frame's first pixel as a score and waits for a gate per call."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)  # released as each call starts
        self.seen: list[int] = []
        self.fail_on: int | None = None

    def __call__(self, frame: np.ndarray, out: np.ndarray, times: dict[str, float]) -> int:
        self.entered.release()
        assert self.gate.acquire(timeout=10)
        value = int(frame[0, 0, 0])
        self.seen.append(value)
        if value == self.fail_on:
            raise ValueError(f"frame {value} is corrupt")
        out[:] = EMPTY_ROW
        out[0] = (1, 2, 3, 4, value, 0)
        times["infer"] = 0.001
        return 1


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def frame(value: int) -> np.ndarray:
    return np.full((4, 6, 3), value, np.uint8)


def test_latest_offered_frame_wins_and_results_are_taken_once():
    detect = GatedDetect()
    bg = BackgroundDetector(detect, max_det=5)
    try:
        assert bg.take() is None and not bg.busy
        bg.offer(frame(1), "one")
        assert detect.entered.acquire(timeout=10) and bg.busy
        for value in (2, 3, 4):  # offered while frame 1 is being detected: only the last one is kept
            bg.offer(frame(value), value)
        src = frame(9)
        bg.offer(src, "nine")
        src[:] = 0  # the offer was copied
        detect.gate.release()
        wait_until(lambda: bg.results == 1)
        first = bg.take()
        assert first.tag == "one" and first.count == 1 and first.detections[0, 4] == 1 and first.error is None
        assert first.times == {"infer": 0.001} and first.detections.shape == (5, 6)
        assert bg.take() is None  # once
        detect.gate.release()
        wait_until(lambda: bg.results == 2)
        second = bg.take()
        assert second.tag == "nine" and second.detections[0, 4] == 9
        assert detect.seen == [1, 9] and not bg.busy
    finally:
        for _ in range(3):
            detect.gate.release()
        assert bg.close()


def test_drain_waits_for_the_running_detection_and_drops_the_rest():
    detect = GatedDetect()
    bg = BackgroundDetector(detect, max_det=3)
    try:
        bg.offer(frame(1), 1)
        assert detect.entered.acquire(timeout=10)
        bg.offer(frame(2), 2)
        assert not bg.drain(timeout=0.05)  # frame 1 still running
        threading.Timer(0.05, detect.gate.release).start()
        assert bg.drain(timeout=10)
        assert bg.take() is None and not bg.busy and detect.seen == [1]  # frame 2 dropped, 1's result too
    finally:
        detect.gate.release()
        assert bg.close()


def test_a_failing_detection_comes_back_as_an_error():
    detect = GatedDetect()
    detect.fail_on = 7
    bg = BackgroundDetector(detect, max_det=3)
    try:
        bg.offer(frame(7), "bad")
        detect.gate.release()
        wait_until(lambda: bg.results == 1)
        result = bg.take()
        assert isinstance(result.error, ValueError) and "frame 7 is corrupt" in str(result.error)
        assert result.tag == "bad" and result.count == 0
        bg.offer(frame(8), "good")  # the thread keeps going
        detect.gate.release()
        wait_until(lambda: bg.results == 2)
        assert bg.take().detections[0, 4] == 8
    finally:
        assert bg.close()
    assert not bg._thread.is_alive()


def moved(dets: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Detections of a frame seen from a camera moved by (dx, dy): content moves the other way, clipped."""
    want = dets.copy()
    want[:, [0, 2]] = np.clip(want[:, [0, 2]] - dx, 0, 512)
    want[:, [1, 3]] = np.clip(want[:, [1, 3]] - dy, 0, 384)
    return want[(want[:, 2] - want[:, 0] >= 2) & (want[:, 3] - want[:, 1] >= 2)]


def test_async_results_are_moved_from_their_frame_to_the_frame_shown(head_models, stage_slide):
    """Each result is found on the frame offered before and shown on the next one, moved by the stage's
    shift between the two; a jump is detected in the loop itself."""
    reference = pl.open_pipeline(head_models, "onnx", morphology=False)
    pipe = pl.open_pipeline(head_models, "onnx", morphology=False, detect_every="async")
    try:
        x0, y0 = 400, 300
        path = [(0, 0), (4, -1), (9, -3), (13, -4), (20, -6), (60, 600), (64, 598)]  # the 6th jumps
        shown = []
        for dx, dy in path:
            runs = pipe.detector_runs
            dets, n, _, times = pipe.process(stage_slide.frame_at(x0 + dx, y0 + dy))
            shown.append((dets[:n].copy(), pipe.detected_last, pipe.detector_runs - runs, dict(times)))
            wait_until(lambda: not pipe.background.busy)  # let the detector finish before the next frame
        truth = []
        for dx, dy in path:
            dets, n, _, _ = reference.process(stage_slide.frame_at(x0 + dx, y0 + dy))
            truth.append(dets[:n].copy())
        got, in_loop, runs, times = shown[0]  # the first frame: detected in the loop
        assert in_loop and runs == 1 and "infer" in times
        np.testing.assert_array_equal(got, truth[0])
        got, in_loop, runs, times = shown[1]  # nothing offered yet: frame 0's boxes carried
        assert not in_loop and "infer" not in times
        for i in (2, 3, 4):  # frame i shows what was found on frame i - 1, moved by the camera's step
            got, in_loop, runs, times = shown[i]
            assert not in_loop and "infer" in times  # the background run's times come with its result
            step = (path[i][0] - path[i - 1][0], path[i][1] - path[i - 1][1])
            want = moved(truth[i - 1], *step)
            assert got.shape == want.shape and len(want) > 0
            np.testing.assert_allclose(got[:, :4], want[:, :4], atol=1.5)
            np.testing.assert_array_equal(got[:, 4:], want[:, 4:])
        got, in_loop, runs, times = shown[5]  # the jump: frame 4's result is dropped, frame 5 detected here
        assert in_loop and runs == 1 and "infer" in times and "detector_wait" in times
        np.testing.assert_array_equal(got, truth[5])
        assert pipe.detect_mode == "async" and pipe.detect_interval == "async"
        assert pipe.shift_unknown == 1  # the jump (the first frame has nothing to compare with)
        small = stage_slide.frame_at(x0, y0)[:192, :256].copy()  # a new frame size: detected in the loop too
        wait_until(lambda: not pipe.background.busy)
        runs = pipe.detector_runs
        dets, n, _, times = pipe.process(small)
        assert pipe.detected_last and pipe.detector_runs == runs + 1 and "infer" in times
        want, m, _, _ = reference.process(small)
        np.testing.assert_array_equal(dets[:n], want[:m])
    finally:
        pipe.close()
        reference.close()
    assert not pipe.background.alive


def test_a_slow_result_lands_frames_later_moved_by_the_whole_way(head_models, stage_slide):
    """Frame 1's detection is held while frames 2 and 3 come (3 replaces 2 as the next to detect), and
    lands on frame 4, moved by the stage's way from frame 1 to frame 4; frame 3's lands on frame 5."""
    reference = pl.open_pipeline(head_models, "onnx", morphology=False)
    pipe = pl.open_pipeline(head_models, "onnx", morphology=False, detect_every="async")
    gates = [threading.Event(), threading.Event(), threading.Event()]  # the third holds frame 4's detection
    seen = []
    detect = pipe.background._detect

    def gated(frame, out, times):
        seen.append(frame[0, :8].copy())
        assert gates[len(seen) - 1].wait(10)
        return detect(frame, out, times)

    pipe.background._detect = gated
    try:
        path = [(0, 0), (4, -1), (8, -2), (12, -3), (16, -4), (20, -5)]
        frames = [stage_slide.frame_at(400 + dx, 300 + dy) for dx, dy in path]
        truth = []
        for f in frames:
            d, n, _, _ = reference.process(f)
            truth.append(d[:n].copy())
        pipe.process(frames[0])  # in the loop
        ages = []
        for f in frames[1:4]:  # frame 0's boxes carried; frame 1 held at the gate, then 2, then 3 offered
            dets, n, _, _ = pipe.process(f)
            ages.append(pipe.boxes_age_s)
            np.testing.assert_allclose(dets[:n, :4], moved(truth[0], *np.subtract(path[len(ages)], path[0]))[:, :4],
                                       atol=2.0)
            wait_until(lambda: len(seen) == 1)
        assert 0 < ages[0] < ages[1] < ages[2]  # the boxes grow older while the detector is busy
        gates[0].set()
        wait_until(lambda: pipe.background.results == 1 and len(seen) == 2)  # frame 3's detection now held
        np.testing.assert_array_equal(seen[1], frames[3][0, :8])  # frame 2 was replaced
        dets, n, _, _ = pipe.process(frames[4])  # takes frame 1's result
        want = moved(truth[1], *np.subtract(path[4], path[1]))
        assert dets[:n].shape == want.shape and len(want) > 0
        np.testing.assert_allclose(dets[:n, :4], want[:, :4], atol=2.0)
        np.testing.assert_array_equal(dets[:n, 4:], want[:, 4:])
        assert pipe.boxes_age_s > 0
        gates[1].set()
        wait_until(lambda: pipe.background.results == 2)
        dets, n, _, _ = pipe.process(frames[5])  # takes frame 3's result
        want = moved(truth[3], *np.subtract(path[5], path[3]))
        assert dets[:n].shape == want.shape
        np.testing.assert_allclose(dets[:n, :4], want[:, :4], atol=2.0)
    finally:
        for g in gates:
            g.set()
        pipe.close()
        reference.close()


def test_a_failed_background_detection_makes_the_next_frame_a_loop_detection(head_models, stage_slide, caplog):
    pipe = pl.open_pipeline(head_models, "onnx", morphology=False, detect_every="async")
    try:
        pipe.process(stage_slide.frame_at(400, 300))
        pipe.background.offer(np.zeros((384, 512), np.uint8), (pipe._epoch, 0.0, 0.0, 0.0))  # not RGB: fails
        wait_until(lambda: not pipe.background.busy)
        _, _, _, times = pipe.process(stage_slide.frame_at(404, 300))  # takes the error, carries, flags a redo
        assert not pipe.detected_last and "infer" not in times
        assert not pipe.background.busy  # and offers nothing: the next frame is detected here anyway
        _, _, _, times = pipe.process(stage_slide.frame_at(408, 300))
        assert pipe.detected_last and "infer" in times
        failed = [r.getMessage() for r in caplog.records if "background detection failed" in r.getMessage()]
        assert len(failed) == 1 and "\n" not in failed[0], failed  # one line in the journal
    finally:
        pipe.close()


@pytest.mark.parametrize("overlap", ["--sequential", "--overlap"])
def test_run_cli_async_reports_the_boxes_age_and_paces_the_frames(head_models, tmp_path, overlap):
    stats = tmp_path / "stats.json"
    rc = main(["run", "synth://?seed=5&size=512x384", "null://", "--models", str(head_models), "--backend", "onnx",
               "--headless", "--max-frames", "16", "--detect-every", "async", "--target-fps", "20",
               "--stats-json", str(stats), "--record", str(tmp_path / "rec.db"), overlap])
    assert rc == 0
    data = json.loads(stats.read_text())
    assert data["frames"] == 16 and data["detect_every"] == "async" and data["detect_every_last"] == "async"
    assert data["frame_interval_ms"]["median"] >= 45  # paced to --target-fps 20 (the models alone run faster)
    assert data["detector_runs"] >= 2 and data["boxes_age_ms"] > 0
    recorded = list(session_frames(tmp_path / "rec.db", data["session_id"]))
    assert len(recorded) == 16 and recorded[0]["detected"]  # the first frame is detected in the loop
    assert sum(f["detected"] for f in recorded) == data["detector_frames"] < data["detector_runs"]
    assert recorded[0]["boxes_age_ms"] == 0 and max(f["boxes_age_ms"] for f in recorded) > 0
