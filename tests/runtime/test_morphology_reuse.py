"""Carrying morphology results along with the stage's motion: real slide frames, real ONNX models."""

from __future__ import annotations

import numpy as np
import pytest

from smearsight.catalog import SPERM_CLASS_NAMES, TPS_CLASS_NAMES
from smearsight.runtime.backends import open_backend
from smearsight.runtime.morphology_stage import MorphologyStage, StageShift

pytest.importorskip("onnx")
SyntheticSlide = pytest.importorskip("smearsight.train.datasets.synth").SyntheticSlide

FRAME = (384, 512)


@pytest.fixture(scope="module")
def slide():
    return SyntheticSlide(seed=11, slide_size=(1024, 2048), frame_size=FRAME)


@pytest.fixture(scope="module")
def head_backend(tiny, tmp_path_factory):
    models = tiny.build_model_set(tmp_path_factory.mktemp("models"), image_size=(64, 96), seed=1)
    backend = open_backend(models / "morphology_head", "onnx")
    yield backend
    backend.close()


def sperm_detections(slide, x, y):
    """Ground-truth sperm boxes of the frame at (x, y) as detector rows (score, class), best first."""
    image, boxes, labels = slide.frame_at(x, y, with_boxes=True)
    sperm = np.array([TPS_CLASS_NAMES[int(k)] in SPERM_CLASS_NAMES for k in labels], bool)
    dets = np.zeros((int(sperm.sum()), 6), np.float32)
    dets[:, :4] = boxes[sperm]
    dets[:, 4] = np.linspace(0.99, 0.5, len(dets))
    dets[:, 5] = labels[sperm]
    return image, dets


def slide_key(det, x, y):
    """The cell's position on the slide (independent of the frame), rounded."""
    return (round(float(det[0] + x)), round(float(det[1] + y)))


def test_stage_shift_matches_the_camera_move(slide):
    shift = StageShift()
    assert shift(slide.frame_at(200, 300)[..., 1]) is None  # first frame
    dx, dy = shift(slide.frame_at(206, 297)[..., 1])  # camera right 6, up 3: content moves left 6, down 3
    assert dx == pytest.approx(-6, abs=0.75) and dy == pytest.approx(3, abs=0.75)


def test_same_cells_keep_their_result_and_only_new_ones_are_judged(slide, head_backend):
    stage = MorphologyStage([head_backend], TPS_CLASS_NAMES, reuse=True)
    x0, y0 = 300, 300
    img1, d1 = sperm_detections(slide, x0, y0)
    assert len(d1) >= 20
    r1 = stage(img1, d1, len(d1))
    assert stage.judged_last == len(d1) and all(r["tracked"] == 0 for r in r1)
    first = {slide_key(d1[r["det"]], x0, y0): r["parts"]["head"] for r in r1}

    img2, d2 = sperm_detections(slide, x0 + 5, y0)
    r2 = stage(img2, d2, len(d2))
    keys2 = [slide_key(d2[r["det"]], x0 + 5, y0) for r in r2]
    carried = [r for r, k in zip(r2, keys2, strict=True) if r["tracked"] == 1]
    fresh = [r for r in r2 if r["tracked"] == 0]
    assert len(carried) >= len(d2) - 3 and stage.judged_last == len(fresh)
    for r, k in zip(r2, keys2, strict=True):
        if r["tracked"] == 1:
            # a clipped edge cell's box changes with the frame; interior cells keep their slide position
            assert any(abs(k[0] - a) <= 6 and abs(k[1] - b) <= 1 for a, b in first)
            near = min(first, key=lambda q: abs(q[0] - k[0]) + abs(q[1] - k[1]))
            assert r["parts"]["head"] == first[near]


def test_max_new_leaves_the_rest_pending_for_later_frames(slide, head_backend):
    stage = MorphologyStage([head_backend], TPS_CLASS_NAMES, reuse=True, max_new=3)
    img, dets = sperm_detections(slide, 900, 100)
    assert len(dets) > 9
    stage(img, dets[:2], 2)  # the first frame (no shift yet) judges what it has
    assert stage.judged_last == 2
    r2 = stage(img, dets, len(dets))  # the stage stopped; many cells appear at once: 3 judged, rest pending
    assert stage.judged_last == 3
    assert [r.get("status") for r in r2].count("pending") == len(dets) - 5
    r3 = stage(img, dets, len(dets))
    assert stage.judged_last == 3 and sum(r.get("tracked", 0) >= 1 for r in r3) == 5


def test_a_jump_or_reuse_off_judges_everything(slide, head_backend):
    stage = MorphologyStage([head_backend], TPS_CLASS_NAMES, reuse=True)
    img, dets = sperm_detections(slide, 0, 0)
    stage(img, dets, len(dets))
    img_far, dets_far = sperm_detections(slide, 1200, 500)  # another field: nothing to carry
    stage(img_far, dets_far, len(dets_far))
    assert stage.judged_last == len(dets_far)

    plain = MorphologyStage([head_backend], TPS_CLASS_NAMES)
    for _ in range(2):
        res = plain(img, dets, len(dets))
        assert plain.judged_last == len(dets) and all("tracked" not in r for r in res)


def test_a_cell_missed_for_a_frame_keeps_its_result(slide, head_backend):
    stage = MorphologyStage([head_backend], TPS_CLASS_NAMES, reuse=True, memory_frames=2)
    img, dets = sperm_detections(slide, 900, 100)
    first = stage(img, dets, len(dets))
    for _ in range(2):  # the detector misses every other sperm on memory_frames frames
        stage(img, dets[::2], len(dets[::2]))
    again = stage(img, dets, len(dets))
    assert stage.judged_last == 0
    assert [r["parts"] for r in again] == [r["parts"] for r in first]
    for _ in range(3):  # unseen for longer than memory_frames: forgotten, judged afresh
        stage(img, dets[::2], len(dets[::2]))
    stage(img, dets, len(dets))
    assert stage.judged_last == len(dets[1::2])


def test_reset_forgets_everything(slide, head_backend):
    stage = MorphologyStage([head_backend], TPS_CLASS_NAMES, reuse=True)
    img, dets = sperm_detections(slide, 900, 100)
    stage(img, dets, len(dets))
    stage(img, dets, len(dets))
    assert stage.judged_last == 0
    stage.reset()  # a new session (slide) from the panel
    stage(img, dets, len(dets))
    assert stage.judged_last == len(dets)


def test_without_a_measurable_shift_every_sperm_is_judged(slide, head_backend):
    """A field the phase correlation cannot follow (shift None) must not leave cells pending for ever."""
    stage = MorphologyStage([head_backend], TPS_CLASS_NAMES, reuse=True, max_new=3)
    stage.shift = lambda gray: None
    img, dets = sperm_detections(slide, 900, 100)
    for _ in range(2):
        res = stage(img, dets, len(dets))
        assert stage.judged_last == len(dets) and not any(r.get("status") == "pending" for r in res)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowBackend:
    """The real tiny ONNX backend, timed as if it were a heavy model: each crop advances a fake clock.

    A test double for time only (the scores are the real model's): the supervised morphology models take
    ~40 ms a crop on the CI CPUs, and a fake clock keeps the test independent of the machine's load.
    """

    def __init__(self, inner, clock: FakeClock, seconds_per_crop: float) -> None:
        self.inner = inner
        self.clock = clock
        self.seconds_per_crop = seconds_per_crop

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def infer(self, x):
        self.clock.now += self.seconds_per_crop * len(x)
        return self.inner.infer(x)


def test_a_slow_model_fills_the_field_in_over_frames_within_its_budget(slide, head_backend):
    clock = FakeClock()
    slow = SlowBackend(head_backend, clock, seconds_per_crop=0.005)
    budgeted = MorphologyStage([slow], TPS_CLASS_NAMES, reuse=True, budget_s=0.05, clock=clock)
    x0, y0 = 300, 300
    img, dets = sperm_detections(slide, x0, y0)
    assert len(dets) >= 20
    # the first frame (no shift: no max_new cap) would judge every sperm; the budget stops it after a
    # first chunk of 2 crops (10 ms, which sets the cost of a crop) and a second one of 8 (40 ms)
    res = budgeted(img, dets, len(dets))
    assert budgeted.judged_last == 10 and clock.now == pytest.approx(0.05)
    assert [r.get("status") for r in res].count("pending") == len(dets) - 10
    assert all("parts" in r for r in res[:10])  # the best scoring first
    frames = 1
    while any(r.get("status") == "pending" for r in res):  # the stage moves on: the rest follow
        img, dets = sperm_detections(slide, x0 + frames, y0)
        res = budgeted(img, dets, len(dets))
        assert budgeted.judged_last <= 10
        frames += 1
        assert frames <= 12, "still pending after 12 frames"
    # the same results as judging everything at once
    whole = MorphologyStage([head_backend], TPS_CLASS_NAMES, reuse=True, budget_s=None)
    res_whole = whole(img, dets, len(dets))
    assert whole.judged_last == len(dets)
    for a, b in zip(res, res_whole, strict=True):
        assert a["parts"]["head"]["abnormal"] == b["parts"]["head"]["abnormal"]
        assert a["parts"]["head"]["score"] == pytest.approx(b["parts"]["head"]["score"], abs=0.05)


def test_the_budget_is_lifted_when_the_stage_stays_lost(slide, head_backend):
    clock = FakeClock()
    slow = SlowBackend(head_backend, clock, seconds_per_crop=0.005)
    stage = MorphologyStage([slow], TPS_CLASS_NAMES, reuse=True, budget_s=0.05, clock=clock)
    img, dets = sperm_detections(slide, 900, 100)
    assert len(dets) > 10
    stage(img, dets, len(dets), shift=None)  # lost once (like the first frame): budgeted
    assert stage.judged_last == 10
    res = stage(img, dets, len(dets), shift=None)  # still lost: nothing carries, so all are judged
    assert stage.judged_last == len(dets) and not any(r.get("status") == "pending" for r in res)
    stage(img, dets, len(dets), shift=(0.0, 0.0))  # followed again: everything carried
    assert stage.judged_last == 0


def test_a_morphology_model_that_fails_stops_alone(slide, head_backend, tmp_path):
    """A model that raises while judging (here: its graph only takes one crop at a time) stops, and says so;
    the other parts are still judged and the frame keeps its boxes (before: every frame was lost)."""
    from onnx import TensorProto, helper, numpy_helper

    from smearsight.manifest import InputSpec, Manifest, MorphologySpec, TensorSpec

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["crops", "axes"], ["m"], keepdims=0),
         helper.make_node("Reshape", ["m", "one"], ["scores"])],  # fails for a batch of more than one crop
        "one_crop_only",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["batch", 1, 64, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
         numpy_helper.from_array(np.array([1], np.int64), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    import onnx

    from smearsight.fileio import sha256_file

    folder = tmp_path / "morphology_vacuole"
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    Manifest(kind="morphology", name="broken", model_version="0",
             input=InputSpec(name="crops", shape=[-1, 1, 64, 64], color="gray", mean=[0.5], std=[0.5],
                             resize="stretch"),
             outputs=[TensorSpec(name="scores", shape=[-1])],
             morphology=MorphologySpec(part="vacuole", threshold=0.0),
             onnx_sha256=sha256_file(folder / "model.onnx")).save(folder)
    broken = open_backend(folder, "onnx")
    try:
        stage = MorphologyStage([head_backend, broken], TPS_CLASS_NAMES)
        image, dets = sperm_detections(slide, 300, 300)
        results = stage(image, dets, len(dets))
        assert len(results) == len(dets) and all(set(r["parts"]) == {"head"} for r in results)
        assert "morphology model for the vacuole stopped" in stage.failed["vacuole"]
        assert all(set(r["parts"]) == {"head"} for r in stage(image, dets, len(dets)))
    finally:
        broken.close()


def test_a_huge_budget_judges_every_sperm(slide, head_backend):
    """--morphology-budget-ms 1e308 is a finite number, but crops-that-fit = budget / cost-of-a-crop overflowed
    to infinity and int() of it failed every frame with more than two new sperm."""
    stage = MorphologyStage([head_backend], TPS_CLASS_NAMES, reuse=True, budget_s=1e305)
    img, dets = sperm_detections(slide, 300, 300)
    res = stage(img, dets, len(dets))
    assert stage.judged_last == len(dets) >= 20 and all("parts" in r for r in res)
