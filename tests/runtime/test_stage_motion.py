"""Detections carried with the stage between key frames: unit cases and a real slide through real ONNX models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smearsight.cli import main
from smearsight.device.record import session_frames
from smearsight.errors import InputError
from smearsight.runtime import pipeline as pl
from smearsight.runtime.postprocess import EMPTY_ROW
from smearsight.runtime.stage_motion import DetectionCarry, StageShift

pytest.importorskip("onnx")

FRAME_HW = (100, 200)


def rows(*boxes_scores_classes):
    return np.array([[*b, s, c] for b, s, c in boxes_scores_classes], np.float32)


def test_carry_moves_clips_and_drops_boxes_in_score_order():
    dets = rows(((10, 10, 30, 20), 0.9, 2), ((170, 40, 195, 60), 0.8, 1), ((50, 50, 60, 70), 0.7, 0))
    carry = DetectionCarry(3)
    assert carry.should_detect(None, FRAME_HW)
    carry.keyframe(dets, 3, FRAME_HW)
    out = np.full((8, 6), 5.0, np.float32)
    assert not carry.should_detect((4.0, -2.0), FRAME_HW)
    n = carry.carry((4.0, -2.0), out)
    want = dets.copy()
    want[:, [0, 2]] += 4.0
    want[:, [1, 3]] -= 2.0
    want[:, [0, 2]] = np.clip(want[:, [0, 2]], 0, FRAME_HW[1])
    assert n == 3
    np.testing.assert_allclose(out[:3], want)
    assert (out[3:] == EMPTY_ROW).all()
    # the second box leaves on the right: clipped, then dropped once under 2 px remain; order is kept
    n = carry.carry((4.0, 0.0), out)
    assert n == 3 and out[1, 2] == FRAME_HW[1] and out[1, 0] == pytest.approx(178.0)
    carry._since_key = 0  # keep carrying to push it out of view
    n = carry.carry((30.0, 0.0), out)
    assert n == 2 and out[:2, 4].tolist() == pytest.approx([0.9, 0.7]) and (out[2:] == EMPTY_ROW).all()


def test_key_frames_are_forced_by_interval_unknown_shift_size_and_travel():
    carry = DetectionCarry(3, max_travel_px=20.0)
    carry.keyframe(np.zeros((0, 6), np.float32), 0, FRAME_HW)
    out = np.zeros((4, 6), np.float32)
    assert not carry.should_detect((3.0, 4.0), FRAME_HW)
    carry.carry((3.0, 4.0), out)
    assert carry.should_detect(None, FRAME_HW)  # the shift could not be measured
    assert carry.should_detect((3.0, 4.0), (100, 201))  # another frame size
    assert not carry.should_detect((3.0, 4.0), FRAME_HW)
    carry.carry((3.0, 4.0), out)
    assert carry.should_detect((0.0, 0.0), FRAME_HW)  # the third frame since the key frame: detect
    carry.keyframe(np.zeros((0, 6), np.float32), 0, FRAME_HW)
    assert not carry.should_detect((12.0, 16.0), FRAME_HW)  # 20 px: max_travel_px, still carried
    assert carry.should_detect((12.0, 17.0), FRAME_HW)  # 20.8 px: more than max_travel_px
    assert DetectionCarry(1).should_detect((0.0, 0.0), FRAME_HW)
    carry.reset()
    assert carry.should_detect((0.0, 0.0), FRAME_HW)


@pytest.mark.parametrize(("key", "carried", "want"), [
    (0.05, 0.01, 1),  # a fast detector keeps up: every frame
    (0.30, 0.03, 4),  # (0.30 + 3 * 0.03) / 4 = 0.0975 <= 0.1; with 3: 0.12
    (0.25, 0.02, 3),  # (0.25 + 2 * 0.02) / 3 = 0.0967
    (0.20, 0.12, 4),  # carried frames alone miss the target: the longest interval allowed
    (0.20, 0.17, 1),  # a carried frame costs nearly as much as a key frame: nothing to gain
])
def test_auto_interval_is_the_smallest_that_meets_the_target(key, carried, want):
    carry = DetectionCarry("auto", target_fps=10.0, max_auto=4)
    assert carry.detect_every == 1 and carry.enabled
    carry.observe(key, detected=True)
    assert carry.detect_every == (1 if key <= 0.1 else 2)  # carries one frame to learn its cost
    carry.observe(carried, detected=False)
    assert carry.detect_every == want
    if carried < 0.8 * key and carried < 0.1:  # the interval meets the target, one less would not
        assert (key + (want - 1) * carried) / want <= 0.1 + 1e-9
        assert want == 1 or (key + (want - 2) * carried) / (want - 1) > 0.1


def test_auto_goes_back_to_every_frame_with_a_margin():
    carry = DetectionCarry("auto", target_fps=10.0)
    carry.observe(0.30, detected=True)
    carry.observe(0.03, detected=False)
    assert carry.detect_every == 4
    for _ in range(20):  # the detector got faster (a cooler CPU): just under the target is not enough
        carry.observe(0.095, detected=True)
    assert carry.detect_every == 2
    for _ in range(20):
        carry.observe(0.08, detected=True)
    assert carry.detect_every == 1
    for _ in range(20):  # and at every frame, a key frame within the target keeps it there
        carry.observe(0.095, detected=True)
    assert carry.detect_every == 1


def test_fixed_interval_ignores_observations_and_bad_values_are_clear():
    carry = DetectionCarry(2)
    carry.observe(5.0, detected=True)
    assert carry.detect_every == 2 and not carry.auto
    for bad in (0, -1, 1.5, "3", True):
        with pytest.raises(InputError, match="detect_every"):
            DetectionCarry(bad)
    with pytest.raises(InputError, match="target_fps"):
        DetectionCarry("auto", target_fps=0)


def test_pipeline_carries_the_key_frame_detections_with_the_camera(head_models, stage_slide):
    pipe = pl.open_pipeline(head_models, "onnx", detect_every=3)
    try:
        x0, y0 = 400, 300
        moves = [(0, 0), (5, -2), (9, -3), (12, -3), (40, 500)]  # camera positions; the last one jumps
        results = []
        for dx, dy in moves:
            dets, n, morph, times = pipe.process(stage_slide.frame_at(x0 + dx, y0 + dy))
            results.append((dets[:n].copy(), pipe.detected_last, times))
        key, detected, times = results[0]
        assert detected and len(key) > 0 and {"infer", "motion"} <= set(times)
        for (dx, dy), (got, detected, times) in zip(moves[1:3], results[1:3], strict=True):
            assert not detected and "infer" not in times
            want = key.copy()  # content moves opposite to the camera
            want[:, [0, 2]] = np.clip(want[:, [0, 2]] - dx, 0, 512)
            want[:, [1, 3]] = np.clip(want[:, [1, 3]] - dy, 0, 384)
            sides = (want[:, 2] - want[:, 0] >= 2) & (want[:, 3] - want[:, 1] >= 2)
            want = want[sides]
            assert got.shape == want.shape
            # phase correlation at 1/4 scale; the camera's fixed vignetting pulls it toward no motion a little
            np.testing.assert_allclose(got[:, :4], want[:, :4], atol=1.5)
            np.testing.assert_array_equal(got[:, 4:], want[:, 4:])
        assert results[3][1]  # the third frame after the key frame is detected again
        assert results[4][1]  # and so is a jump (the shift cannot be measured)
    finally:
        pipe.close()


@pytest.mark.parametrize("overlap", ["--sequential", "--overlap"])
def test_run_cli_detects_every_nth_frame_and_reports_it(head_models, tmp_path, capfd, overlap):
    stats = tmp_path / "stats.json"
    rc = main(["run", "synth://?seed=5&size=512x384", "null://", "--models", str(head_models), "--backend", "onnx",
               "--headless", "--max-frames", "9", "--detect-every", "3", "--stats-json", str(stats),
               "--record", str(tmp_path / "rec.db"), overlap])
    assert rc == 0
    data = json.loads(stats.read_text())
    assert data["frames"] == 9 and data["detect_every"] == 3 and data["detector_frames"] == 3
    recorded = list(session_frames(tmp_path / "rec.db", data["session_id"]))
    assert [f["detected"] for f in recorded] == [True, False, False] * 3
    assert data["latency_ms"]["motion"] > 0
    rc = main(["run", "synth://", "null://", "--models", str(head_models), "--max-frames", "1", "--detect-every", "0"])
    assert rc == 1 and "--detect-every: expected auto, async or a whole number" in capfd.readouterr().err


def test_auto_does_not_carry_because_the_camera_is_slow(head_models, tmp_path):
    """A 5 FPS camera makes every frame take 200 ms, but the frames cost little: detect every one."""
    stats = tmp_path / "stats.json"
    rc = main(["run", "synth://?seed=5&size=512x384&fps=5", "null://", "--models", str(head_models),
               "--backend", "onnx", "--headless", "--max-frames", "8", "--stats-json", str(stats)])
    assert rc == 0
    data = json.loads(stats.read_text())
    assert data["detect_every"] == "auto" and data["frames"] == 8 and data["detector_frames"] == 8


def test_stage_shift_trusts_neighbouring_frames_but_not_unrelated_fields():
    """Consecutive frames give the camera's step; two far-apart fields of one slide give no shift (None)
    or, where they happen to overlap, the true offset, never a wrong one."""
    cv2 = pytest.importorskip("cv2")
    synth = pytest.importorskip("smearsight.train.datasets.synth")
    slide = synth.SyntheticSlide(seed=5, slide_size=(2048, 4096), frame_size=(384, 512))
    rng = np.random.default_rng(7)
    wrong = measured = 0
    for _ in range(40):
        (x, y), (x2, y2) = rng.integers(0, 3500, 2) % [3500, 1600], rng.integers(0, 3500, 2) % [3500, 1600]
        shift = StageShift()
        shift(cv2.cvtColor(slide.frame_at(x, y), cv2.COLOR_RGB2GRAY))
        step = shift(cv2.cvtColor(slide.frame_at(x + 5, y - 3), cv2.COLOR_RGB2GRAY))
        assert step is not None and abs(step[0] + 5) < 1.5 and abs(step[1] - 3) < 1.5
        jump = shift(cv2.cvtColor(slide.frame_at(x2, y2), cv2.COLOR_RGB2GRAY))
        if jump is not None:
            measured += 1
            wrong += abs(jump[0] - (x + 5 - x2)) > 8 or abs(jump[1] - (y - 3 - y2)) > 8
    assert wrong == 0 and measured < 40


BCCD_PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "data" / "bccd" / "JPEGImages"


@pytest.mark.skipif(not BCCD_PHOTOS.is_dir(), reason="BCCD photographs not beside the repository (../shared)")
def test_stage_shift_on_real_micrographs_steps_with_defocus_pass_jumps_do_not():
    """Real blood-smear photographs (BCCD): two windows of one photograph 24 px apart, the second defocused,
    give the true step; windows of two different photographs give no shift."""
    cv2 = pytest.importorskip("cv2")
    photos = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(BCCD_PHOTOS.glob("*.jpg"))[:40:2]]
    assert len(photos) >= 10
    for i, g in enumerate(photos):
        shift = StageShift()
        shift(g[40:424, 50:562])
        step = shift(cv2.GaussianBlur(g[40 + 24:424 + 24, 50 - 20:562 - 20], (0, 0), 2.0))
        assert step is not None and abs(step[0] - 20) < 2 and abs(step[1] + 24) < 2, (i, step)
        assert shift(photos[(i + 1) % len(photos)][64:448, 30:542]) is None, i
