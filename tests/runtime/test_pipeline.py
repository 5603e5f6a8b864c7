"""The pipeline end to end on tiny real ONNX models: detections, morphology, run loop, stats, record."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from smearsight.errors import InputError
from smearsight.runtime import pipeline as pl
from smearsight.runtime.backends import open_backend
from smearsight.runtime.morphology_stage import MHSMA_CROP_SCALE, crop_square
from smearsight.runtime.postprocess import decode_nms
from smearsight.runtime.preprocess import geometry

pytest.importorskip("onnx")

SIZE = (64, 96)


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    return tiny.build_model_set(tmp_path_factory.mktemp("models"), image_size=SIZE, seed=1, score_threshold=0.2)


def frames(n=4, hw=(120, 180), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.full((*hw, 3), 200, np.uint8)
        for _ in range(12):
            x, y = rng.integers(0, hw[1] - 20), rng.integers(0, hw[0] - 20)
            img[y : y + 16, x : x + 16] = rng.integers(0, 256, size=3)
        out.append(img)
    return out


def test_find_models_layout_and_missing_demo(models, tmp_path, monkeypatch):
    found = pl.find_models(models)
    assert found.detector == models / "detector"
    assert [p.name for p in found.morphology] == ["morphology_head", "morphology_vacuole"]
    assert pl.find_models(models / "detector").detector == models / "detector"
    with pytest.raises(InputError, match="no detector model"):
        pl.find_models(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        pl.find_models(tmp_path / "missing")
    monkeypatch.setattr(pl, "packaged_models_root", lambda: tmp_path / "empty")
    with pytest.raises(InputError, match="demo models are not installed"):
        pl.find_models(None)


def test_detections_match_independent_computation(tiny, models):
    pipe = pl.open_pipeline(models, "onnx")
    try:
        spec = pipe.detector.manifest
        for img in frames(2):
            dets, n, morph, times = pipe.process(img)
            # independent: NumPy model outputs + decode_nms + inverse letterbox
            x = np.zeros((1, 3, *SIZE), np.float32)
            box, (nh, nw) = geometry(img.shape[:2], spec.input)
            resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
            canvas = np.zeros((*SIZE, 3), np.uint8)
            canvas[:nh, :nw] = resized
            x[0] = ((canvas / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
            logits, deltas = tiny.reference_detector_outputs(x, seed=1, num_classes=6)
            d = spec.detector
            want, m = decode_nms(logits, deltas, pipe.anchors, score_threshold=d.score_threshold,
                                 iou_threshold=d.iou_threshold, pre_nms_topk=d.pre_nms_topk,
                                 max_detections=d.max_detections, image_size=SIZE)
            assert n == m and n > 0
            # ONNX Runtime and NumPy logits differ in the last bits: near-equal scores may swap rows
            got = dets[:n][np.lexsort(np.round(dets[:n, [3, 2, 1, 0, 5]], 2).T)]
            ref = box.to_original(want[:n])
            ref = ref[np.lexsort(np.round(ref[:, [3, 2, 1, 0, 5]], 2).T)]
            np.testing.assert_array_equal(got[:, 5], ref[:, 5])
            np.testing.assert_allclose(got[:, :5], ref[:, :5], rtol=1e-4, atol=1e-3)
            assert (dets[n:, 5] == -1).all()
            assert set(times) == {"motion", "preprocess", "infer", "decode_nms", "morphology"}
            assert pipe.detected_last  # detect_every defaults to 1: every frame is detected
    finally:
        pipe.close()


def test_morphology_scores_each_sperm_detection(models):
    pipe = pl.open_pipeline(models, "onnx")
    try:
        for seed in range(30):  # a frame where the tiny detector finds sperm-class boxes
            img = frames(1, seed=seed)[0]
            dets, n, morph, _ = pipe.process(img)
            sperm = [r for r in range(n) if pipe.class_names[int(dets[r, 5])] in ("immature_sperm", "mature_sperm")]
            if sperm:
                break
        assert sperm and [m["det"] for m in morph] == sperm
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        for m in morph:
            crop = crop_square(gray, dets[m["det"]], MHSMA_CROP_SCALE, 16.0)
            interp = cv2.INTER_AREA if crop.shape[0] > 64 else cv2.INTER_LINEAR
            mean = ((cv2.resize(crop, (64, 64), interpolation=interp) / 255.0 - 0.5) / 0.5).mean()
            assert m["parts"]["head"]["score"] == pytest.approx(mean, abs=1e-4)
            assert m["parts"]["vacuole"]["score"] == pytest.approx(2 * mean, abs=1e-4)
            assert m["parts"]["head"]["abnormal"] == (m["parts"]["head"]["score"] >= 0.0)
    finally:
        pipe.close()


def test_crop_square_replicates_edges():
    img = np.arange(100, dtype=np.uint8).reshape(10, 10)
    crop = crop_square(img, np.array([0, 0, 4, 4]), 1.0, 6)
    assert crop.shape == (6, 6)
    assert crop[0, 0] == img[0, 0]  # replicated corner


@pytest.mark.parametrize("overlap", [True, False])
def test_run_folder_with_corrupt_and_odd_frames(models, tmp_path, overlap):
    src = tmp_path / "frames"
    src.mkdir()
    for i, img in enumerate(frames(4)):
        cv2.imwrite(str(src / f"f{i:02d}.png"), img[..., ::-1])
    (src / "f02b.png").write_bytes(b"this is not a png")
    cv2.imwrite(str(src / "f03b.png"), np.zeros((50, 70, 3), np.uint8))  # another size: still processed
    db = tmp_path / "rec.sqlite"
    stats_path = tmp_path / "stats.json"
    cfg = pl.RunConfig(source=f"file://{src}/", sink=f"file://{tmp_path / 'out'}/", models=models, backend="onnx",
                       headless=True, record=db, stats_json=stats_path, overlap=overlap)
    stats = pl.run(cfg)
    assert stats["frames"] == 5
    assert stats["overlap"] is overlap
    saved = json.loads(stats_path.read_text())
    assert saved["frames"] == 5 and saved["fps"] > 0
    assert {"capture", "preprocess", "infer", "decode_nms", "morphology", "annotate", "sink"} <= set(
        saved["latency_ms"])
    from smearsight.catalog import TPS_CLASS_NAMES

    assert list(saved["counts"]) == list(TPS_CLASS_NAMES)
    assert sum(saved["counts"].values()) > 0
    assert any("f02b.png" in p for p in saved["problems"]), saved["problems"]
    assert len(list((tmp_path / "out").glob("*.jpg"))) == 5
    from smearsight.device.record import list_sessions

    sessions = list_sessions(db)
    assert len(sessions) == 1


@pytest.mark.parametrize("overlap", [True, False])
def test_max_frames_holds_when_showing_a_frame_fails(models, tmp_path, monkeypatch, overlap):
    from smearsight.runtime import annotate as annotate_module

    real = annotate_module.annotate
    calls = []

    def flaky(img, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("drawing failed")
        return real(img, *args, **kwargs)

    monkeypatch.setattr(annotate_module, "annotate", flaky)
    src = tmp_path / "frames"
    src.mkdir()
    for i, img in enumerate(frames(6)):
        cv2.imwrite(str(src / f"f{i:02d}.png"), img[..., ::-1])
    stats = pl.run(pl.RunConfig(source=f"file://{src}/", sink="null://", models=models, backend="onnx",
                                headless=True, max_frames=3, overlap=overlap))
    assert stats["frames"] == 3
    assert any("could not show or record it (drawing failed)" in p for p in stats["problems"])


def test_run_refuses_unknown_source_in_plain_words(models):
    with pytest.raises(InputError, match="unknown source"):
        pl.run(pl.RunConfig(source="bogus://x", sink="null://", models=models, headless=True))


def test_choose_sink_without_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    uri, note = pl.choose_sink(None, headless=False)
    assert uri == pl.DEFAULT_FILE_SINK and "no display" in note
    assert pl.choose_sink(None, headless=True)[0] == pl.DEFAULT_FILE_SINK
    assert pl.choose_sink("null://", headless=True) == ("null://", "")


def test_backend_notes_reach_the_screen(models, tmp_path):
    det = open_backend(models / "detector", "onnx")
    det.notes.append("TensorRT not used: test note")
    pipe = pl.Pipeline(det, [])
    stats = pl.run(pl.RunConfig(source="synth://?size=96x64", sink="null://", headless=True, max_frames=2), pipe)
    pipe.close()
    assert stats["frames"] == 2
    assert "TensorRT not used: test note" in stats["problems"]


def test_a_binding_pre_nms_cap_is_reported(models):
    """More candidates of a class than the manifest's pre_nms_topk: the weakest are dropped before NMS, so
    the screen and the stats say that cells may be missing (a crowded field), naming the classes."""
    det = open_backend(models / "detector", "onnx")
    det.manifest.detector.pre_nms_topk = 3
    pipe = pl.Pipeline(det, [])
    try:
        img = frames(1)[0]
        pipe.process(img)
        x, _ = pipe.preprocess(img)
        outputs = det.infer(x)
        scores = 1.0 / (1.0 + np.exp(-outputs[pipe.spec.class_output][0].astype(np.float64)))
        above = (scores > pipe.spec.score_threshold).sum(axis=0)
        crowded = [name for name, count in zip(pipe.class_names, above, strict=True) if count > 3]
        assert crowded and pipe.capped_classes == crowded
        assert pipe.cap_warning().startswith(f"more {', '.join(crowded)} candidates")
        stats = pl.run(pl.RunConfig(source="synth://?size=96x64", sink="null://", headless=True, max_frames=2),
                       pipe)
        assert any("pre_nms_topk (3)" in p for p in stats["problems"]), stats["problems"]
        pipe.spec.pre_nms_topk = int(above.max())  # room for every candidate: nothing to report
        pipe.process(img)
        assert pipe.capped_classes == [] and pipe.cap_warning() == ""
    finally:
        pipe.close()


def test_unwritable_record_keeps_running(models, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    cfg = pl.RunConfig(source="synth://?size=96x64", sink="null://", models=models, backend="onnx", headless=True,
                       max_frames=2, record=blocker / "rec.sqlite")
    stats = pl.run(cfg)
    assert stats["frames"] == 2
    assert any(p.startswith("not recording:") for p in stats["problems"]), stats["problems"]
    assert "session_id" not in stats


def test_find_models_precision(models, tmp_path, monkeypatch):
    import shutil

    from smearsight.manifest import load_manifest

    root = tmp_path / "set"
    shutil.copytree(models, root)
    with pytest.raises(InputError, match="no .*detector_int8"):
        pl.find_models(root, "int8")
    assert pl.find_models(root, "auto").detector == root / "detector"  # no int8 model: the float one
    shutil.copytree(root / "detector", root / "detector_int8")
    manifest = load_manifest(root / "detector_int8")
    manifest.precision = "int8"
    manifest.save(root / "detector_int8")
    assert pl.find_models(root, "int8").detector == root / "detector_int8"
    assert pl.find_models(root, "fp32").detector == root / "detector"
    monkeypatch.setattr(pl, "cpu_only", lambda backend="auto": backend != "trt")
    assert pl.find_models(root, "auto").detector == root / "detector_int8"
    assert pl.find_models(root, "auto", "trt").detector == root / "detector"
    monkeypatch.setattr(pl, "cpu_only", lambda backend="auto": False)  # a GPU device: the float model
    assert pl.find_models(root, "auto").detector == root / "detector"
    with pytest.raises(InputError, match="--precision: 'fp8'"):
        pl.find_models(root, "fp8")
    # a detector folder given directly must have the precision asked for
    with pytest.raises(InputError, match=r"detector_int8/manifest.json: this detector's precision is 'int8'"):
        pl.find_models(root / "detector_int8", "fp32")
    assert pl.find_models(root / "detector_int8", "int8").detector == root / "detector_int8"
    # detector/ re-exported after quantization: the stale int8 model is refused, auto falls back to float
    from smearsight.manifest import QuantizationSpec

    manifest.quantization = QuantizationSpec(calibration="test", frames=1, float_onnx_sha256="0" * 64)
    manifest.save(root / "detector_int8")
    monkeypatch.setattr(pl, "cpu_only", lambda backend="auto": True)
    with pytest.raises(InputError, match="quantized from another float model"):
        pl.find_models(root, "int8")
    found = pl.find_models(root, "auto")
    assert found.detector == root / "detector" and "quantized from another float model" in found.notes[0]
    manifest.quantization.float_onnx_sha256 = load_manifest(root / "detector").onnx_sha256
    manifest.save(root / "detector_int8")
    pipe = pl.open_pipeline(root, "onnx", precision="int8")
    try:
        assert pipe.detector.manifest.precision == "int8" and pipe.morphology.reuse
    finally:
        pipe.close()


class _CountingHostDecoder:
    """Stands in for ``CudaDecodeNMS`` (no GPU here): the NumPy reference with the CUDA decoder's
    ``class_candidates`` attribute, so the pipeline's GPU-decoder path is exercised up to the hardware."""

    def __init__(self, pipe: pl.Pipeline) -> None:
        self.pipe = pipe
        self.class_candidates = np.zeros(len(pipe.class_names), np.int32)

    def __call__(self, logits: np.ndarray, deltas: np.ndarray) -> tuple[np.ndarray, int]:
        from smearsight.runtime.postprocess import decode_nms

        spec = self.pipe.spec
        counts = np.zeros(len(self.class_candidates), np.int64)
        result = decode_nms(logits, deltas, self.pipe.anchors, score_threshold=spec.score_threshold,
                            iou_threshold=spec.iou_threshold, pre_nms_topk=spec.pre_nms_topk,
                            max_detections=self.pipe.max_det, image_size=self.pipe.image_size,
                            class_candidates=counts)
        self.class_candidates[:] = counts
        return result


def test_a_binding_cap_is_reported_from_the_gpu_decoders_counts(models):
    det = open_backend(models / "detector", "onnx")
    det.manifest.detector.pre_nms_topk = 3
    pipe = pl.Pipeline(det, [])
    try:
        pipe.process(frames(1)[0])
        crowded = list(pipe.capped_classes)
        assert crowded
        pipe._gpu_decoder = _CountingHostDecoder(pipe)
        pipe.capped_classes = []
        pipe.process(frames(1)[0])
        assert pipe.capped_classes == crowded  # read from the decoder's counts, not the CPU path's
        pipe._gpu_decoder.class_candidates[:] = 0
        pipe._note_caps()
        assert pipe.cap_warning() == ""
    finally:
        pipe._gpu_decoder = None
        pipe.close()


@pytest.mark.parametrize("size", [(384, 512), (480, 640)])
def test_shipped_detector_keeps_cell_size_on_smaller_camera_frames(size):
    """The demo detector learned cells at their pixel size; a smaller camera frame (same optics) must not be
    enlarged to fill the 768x1024 input, or every cell doubles in size and the counts go wrong."""
    from smearsight.anchors import box_iou
    from smearsight.train.datasets.synth import SmearSynthesizer

    det = open_backend(pl.packaged_models_root() / "detector", "onnx")
    pipe = pl.Pipeline(det, [])
    try:
        matched = found = truth = 0
        smears = SmearSynthesizer(seed=777, size=size)
        for index in range(2):
            image, boxes, _ = smears.render(index)
            dets, n, _, _ = pipe.process(image)
            found, truth = found + n, truth + len(boxes)
            if n and len(boxes):
                matched += int((box_iou(boxes, dets[:n, :4]).max(axis=1) >= 0.5).sum())
        assert pipe.cap_warning() == ""  # smaller than the input: nothing is shrunk
    finally:
        pipe.close()
    assert matched / truth >= 0.9, (matched, truth)
    assert 0.85 <= found / truth <= 1.15, (found, truth)  # letterboxing 2x gave ~1.4 boxes a cell, recall 0.25


def test_bad_optional_models_are_skipped_with_a_note(tiny, tmp_path):
    """One bad morphology model, a misfiled one, an empty folder or a damaged int8 detector used to refuse the
    whole run (or run silently wrong); each is now left out, and the run says why."""
    import shutil

    root = tiny.build_model_set(tmp_path / "models", parts=("head",))
    good_head = root / "morphology_head"
    shutil.copytree(good_head, root / "morphology_vacuole")  # the head model filed as the vacuole's
    small = root / "morphology_acrosome"  # its manifest says 32x32 crops, its graph takes 64x64
    shutil.copytree(good_head, small)
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["morphology"]["part"] = "acrosome"
    manifest["input"]["shape"] = [-1, 1, 32, 32]
    (small / "manifest.json").write_text(json.dumps(manifest))
    (root / "morphology_tail").mkdir()  # a model that never arrived
    shutil.copytree(root / "detector", root / "detector_int8")
    manifest = json.loads((root / "detector_int8" / "manifest.json").read_text())
    manifest["precision"] = "int8"
    (root / "detector_int8" / "manifest.json").write_text(json.dumps(manifest))
    (root / "detector_int8" / "model.onnx").write_bytes(b"truncated")
    pipe = pl.open_pipeline(root, "onnx")
    try:
        notes = "\n".join(pipe.notes)
        assert [b.manifest.morphology.part for b in pipe.morphology_backends] == ["head"]
        assert pipe.detector.model_dir == root / "detector"
        assert "morphology_vacuole: holds the head model" in notes
        assert "morphology_acrosome/model.onnx: input 'crops' has shape ['batch', 1, 64, 64]" in notes
        assert "morphology_tail: no manifest.json there" in notes
        assert "detector_int8: not used" in notes and "sha256 does not match" in notes
    finally:
        pipe.close()


def test_morphology_without_sperm_classes_says_so(tiny, tmp_path):
    root = tiny.build_model_set(tmp_path / "models", parts=("head",), class_names=["rbc", "wbc"])
    pipe = pl.open_pipeline(root, "onnx")
    try:
        assert any("include no sperm, so no crop will be judged" in n for n in pipe.notes)
    finally:
        pipe.close()


def test_q_while_the_camera_is_lost_ends_the_run(models, tmp_path, monkeypatch, unplugged_camera):
    """The camera is unplugged (a V4L2 node that is not there; stand-in capture) and the technician presses q in
    the window (stand-in window: there is no screen here). Before, the frames the lost camera gives were shown
    without looking at the window's stop, so the run went on until the camera came back."""
    from smearsight.device import sinks

    class Window(sinks.FrameSink):  # q pressed on the first picture
        def __init__(self) -> None:
            super().__init__()
            self.uri = "display://0"
            self.shown: list[str] = []

        def write(self, image_rgb, status=None) -> None:
            self.shown.append((status or {}).get("error", ""))
            if len(self.shown) >= 20:
                raise KeyboardInterrupt  # the test's own stop: the run did not honour q
            self.should_stop = True

    window = Window()
    unplugged_camera(0.02)
    monkeypatch.setattr(sinks, "open_sink", lambda uri, **kw: window)
    stats = pl.run(pl.RunConfig(source=f"v4l2://{tmp_path / 'video9'}", sink="display://0", models=models,
                                backend="onnx", max_frames=5))
    assert len(window.shown) == 1 and "not found" in window.shown[0]
    assert stats["frames"] == 0


def test_a_lost_camera_is_what_the_screen_says_when_the_panel_is_gone_too(models, tmp_path, monkeypatch,
                                                                          unplugged_camera):
    """Camera unplugged and panel cable out at once: the screen said the panel's reconnect countdown, not that
    the camera is lost (the panel's line was reported after the source's)."""
    from smearsight.device import sinks

    class Screen(sinks.FrameSink):
        def __init__(self) -> None:
            super().__init__()
            self.uri = "null://"
            self.shown: list[str] = []

        def write(self, image_rgb, status=None) -> None:
            self.shown.append((status or {}).get("error", ""))
            if len(self.shown) >= 4:
                self.should_stop = True

    screen = Screen()
    unplugged_camera(0.02)
    monkeypatch.setattr(sinks, "open_sink", lambda uri, **kw: screen)
    pl.run(pl.RunConfig(source=f"v4l2://{tmp_path / 'video9'}", sink="null://", models=models, backend="onnx",
                        max_frames=5, panel=str(tmp_path / "ttyNOPE")))
    assert len(screen.shown) == 4 and all("not found" in said for said in screen.shown), screen.shown


def test_a_swallowed_ctrl_c_while_the_camera_is_lost_ends_the_run(models, tmp_path, monkeypatch, unplugged_camera):
    """A Ctrl-C that a finalizer swallowed (remembered by smearsight.interrupts; stand-in: set at the third look)
    while the camera is unplugged: before, only live frames looked at it, so the run went on until the camera
    came back."""
    import threading

    from smearsight import interrupts
    from smearsight.device import sinks

    class SetAtThirdLook(threading.Event):
        looks = 0

        def is_set(self) -> bool:
            self.looks += 1
            return self.looks >= 3 or super().is_set()

    class Screen(sinks.FrameSink):
        def __init__(self) -> None:
            super().__init__()
            self.uri = "null://"
            self.shown = 0

        def write(self, image_rgb, status=None) -> None:
            self.shown += 1
            if self.shown >= 50:
                raise RuntimeError("the test's own stop: the run did not honour the remembered Ctrl-C")

    screen = Screen()
    monkeypatch.setattr(interrupts, "_requested", SetAtThirdLook())
    unplugged_camera(0.02)
    monkeypatch.setattr(sinks, "open_sink", lambda uri, **kw: screen)
    stats = pl.run(pl.RunConfig(source=f"v4l2://{tmp_path / 'video9'}", sink="null://", models=models,
                                backend="onnx", max_frames=5))
    assert screen.shown == 2 and stats["frames"] == 0


def test_a_frame_that_cannot_be_shown_is_one_problem_on_one_line(models, tmp_path, monkeypatch, caplog):
    """Showing fails on every frame with OpenCV's several-line message: before, each frame added its own
    problem (the frame index was in it): a warning logged per frame and the stats' problems grew without bound,
    and the screen got OpenCV's whole message."""
    from smearsight.runtime import annotate as annotate_module

    def broken(img, *args, **kwargs):
        raise cv2.error("OpenCV(5.1.0) /src/imgproc/drawing.cpp:1: error: (-215:Assertion failed) ok\n"
                        "in function 'rectangle'\n")

    monkeypatch.setattr(annotate_module, "annotate", broken)
    with caplog.at_level("WARNING", logger="smearsight.runtime"):
        stats = pl.run(pl.RunConfig(source="synth://?size=96x64", sink="null://", models=models, backend="onnx",
                                    headless=True, max_frames=4))
    assert stats["frames"] == 4
    shown = [p for p in stats["problems"] if "could not show or record" in p]
    assert len(shown) == 1 and stats["problems"][shown[0]] == 4 and "\n" not in shown[0]
    assert "(-215:Assertion failed) ok" in shown[0]
    assert sum("could not show or record" in r.getMessage() for r in caplog.records) == 1


def test_models_naming_a_model_file_says_so(models):
    """Before, --models DIR/detector/model.onnx said 'no such folder' of a file that is there."""
    for path in (models / "detector" / "model.onnx", models / "detector" / "manifest.json"):
        with pytest.raises(InputError, match=f"--models {path}: is a file; expected the folder holding detector/"):
            pl.find_models(path)


def test_two_captures_of_one_field_within_a_second_are_two_files(tmp_path):
    """The panel's capture pressed twice on a frozen field: the second overwrote the first (same second, same
    frame in the name) while both were counted."""
    image = np.zeros((8, 8, 3), np.uint8)
    first = pl.save_capture(image, tmp_path, 7)
    second = pl.save_capture(image, tmp_path, 7)
    assert first != second and first.is_file() and second.is_file()
    assert len(list(tmp_path.glob("capture_*.png"))) == 2
