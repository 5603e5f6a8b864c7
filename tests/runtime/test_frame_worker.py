"""InferenceWorker: the real pipeline (tiny ONNX models) on its own thread, one frame ahead of the consumer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from smearsight.device.sources import Frame
from smearsight.runtime import pipeline as pl
from smearsight.runtime.frame_worker import InferenceWorker

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def pipe(tiny, tmp_path_factory):
    models = tiny.build_model_set(tmp_path_factory.mktemp("models"), image_size=(64, 96), seed=1,
                                  score_threshold=0.2)
    p = pl.open_pipeline(models, "onnx")
    yield p
    p.close()


def frames(n: int, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.full((120, 180, 3), 200, np.uint8)
        for _ in range(10):
            x, y = rng.integers(0, 160), rng.integers(0, 100)
            img[y : y + 16, x : x + 16] = rng.integers(0, 256, size=3)
        out.append(Frame(img, i, time.time(), "test://"))
    return out


@pytest.mark.parametrize("threaded", [True, False])
def test_results_equal_the_pipeline_called_directly_in_order(pipe, threaded):
    src = frames(6)
    want = []
    for f in src:
        dets, n, _, _ = pipe.process(f.image.copy())
        want.append(dets[:n].copy())
    pipe.reset()
    worker = InferenceWorker(pipe, iter(src), threaded=threaded)
    try:
        got = list(worker)
    finally:
        worker.close()
    assert [g.frame.index for g in got] == list(range(6))
    for g, w in zip(got, want, strict=True):
        assert g.error == "" and g.detections is not None
        np.testing.assert_array_equal(g.detections, w)
        # "motion": the stage's shift, for carrying morphology results
        assert set(g.times) == {"motion", "preprocess", "infer", "decode_nms", "morphology"} and g.detected
    # copies: the pipeline's own detection array is reused, the results must not change with it
    assert len({id(g.detections) for g in got}) == 6
    assert (worker._thread is not None) == threaded


def test_stale_held_and_failing_frames_pass_through(pipe):
    good = frames(3)
    stale = Frame(good[0].image, 0, time.time(), "test://", stale=True)
    bad = Frame(np.zeros((5, 5), np.uint8), 9, time.time(), "test://")  # not RGB: process() raises
    worker = InferenceWorker(pipe, iter([stale, bad, good[1]]))
    try:
        items = list(worker)
    finally:
        worker.close()
    assert items[0].detections is None and items[0].frame.stale and items[0].error == ""
    assert items[1].detections is None and items[1].error.startswith("frame skipped: frame: expected an RGB uint8")
    assert items[2].detections is not None and items[2].error == ""

    gate = threading.Event()

    def gated():
        gate.wait(5)
        yield from good

    worker = InferenceWorker(pipe, gated())
    worker.hold.set()  # a frozen screen: frames are drained, not processed
    gate.set()
    try:
        held = list(worker)
    finally:
        worker.close()
    assert [(h.detections is None, h.held) for h in held] == [(True, True)] * 3
    assert [h.frame.index for h in held] == [0, 1, 2]


@pytest.mark.parametrize("threaded", [True, False])
def test_morphology_reset_applies_before_the_next_frame_and_stamps_it(pipe, threaded):
    calls = []
    original = pipe.morphology.reset
    gate = threading.Event()
    src = frames(3)

    def gated():
        yield src[0]
        gate.wait(5)  # frame 1 is read only once the consumer has asked for the reset
        yield from src[1:]

    def spy() -> None:
        calls.append(threading.current_thread().name)
        original()

    pipe.morphology.reset = spy
    try:
        worker = InferenceWorker(pipe, gated(), threaded=threaded)
        first = next(worker)
        worker.reset_morphology()
        gate.set()
        rest = list(worker)
        worker.close()
    finally:
        del pipe.morphology.reset
    assert first.generation == 0 and worker.generation == 1
    assert [r.generation for r in rest] == [1, 1]
    assert calls == ["inference" if threaded else threading.current_thread().name]


def test_source_failure_is_raised_in_the_consumer(pipe):
    def source():
        yield from frames(2)
        raise RuntimeError("driver crashed")

    worker = InferenceWorker(pipe, source())
    try:
        assert next(worker).detections is not None
        assert next(worker).detections is not None
        with pytest.raises(RuntimeError, match="driver crashed"):
            next(worker)
        with pytest.raises(StopIteration):  # and stays ended
            next(worker)
    finally:
        worker.close()


def test_close_stops_an_endless_source_promptly(pipe):
    def endless():
        i = 0
        img = frames(1)[0].image
        while True:
            yield Frame(img, i, time.time(), "test://")
            i += 1

    worker = InferenceWorker(pipe, endless())
    next(worker)
    t0 = time.perf_counter()
    assert worker.close()
    assert time.perf_counter() - t0 < 5
    assert not worker._thread.is_alive()
    with pytest.raises(StopIteration):  # and does not wait for frames that will never come
        while True:
            next(worker)


def test_a_lost_camera_resets_what_is_carried_before_the_next_frame(pipe):
    src = frames(4)
    stale = Frame(src[1].image, 1, time.time(), "test://", stale=True)
    calls = []
    original = pipe.reset

    def spy() -> None:
        calls.append(len(calls))
        original()

    pipe.reset = spy
    try:
        worker = InferenceWorker(pipe, iter([src[0], stale, stale, src[2], src[3]]), threaded=False)
        got = list(worker)
        worker.close()
    finally:
        del pipe.reset
    assert [g.detections is None for g in got] == [False, True, True, False, False]
    assert len(calls) == 1  # once, before the first frame after the loss


class TimedSource:
    """Frames at once when asked, with the time each was asked for; one read is slow (a busy camera)."""

    def __init__(self, src: list[Frame], slow_index: int, slow_s: float) -> None:
        self.src, self.slow_index, self.slow_s = src, slow_index, slow_s
        self.asked: list[float] = []

    def __iter__(self):
        for i, f in enumerate(self.src):
            self.asked.append(time.perf_counter())
            if i == self.slow_index:
                time.sleep(self.slow_s)
            yield f


@pytest.mark.parametrize("threaded", [True, False])
def test_min_interval_reads_frames_on_a_schedule(pipe, threaded):
    """Reads follow a schedule one interval apart (a read is never before its time); after a read late by
    more than an interval the schedule restarts from it (no burst of catch-up reads)."""
    interval = 0.06
    source = TimedSource(frames(14), slow_index=5, slow_s=0.15)
    worker = InferenceWorker(pipe, source, threaded=threaded, min_interval_s=interval)
    try:
        got = list(worker)
    finally:
        worker.close()
    assert len(got) == 14
    asked = np.asarray(source.asked)
    tol = 0.002  # the schedule starts just before the first read is timed
    assert (asked[1:6] - asked[0] >= np.arange(1, 6) * interval - tol).all()  # never before its time
    assert asked[6] - asked[5] >= 0.15  # the slow read; the schedule restarts from the next one:
    assert (asked[7:] - asked[6] >= np.arange(1, 8) * interval - tol).all()
