"""Annotation: boxes in class colours, morphology flags, counts panel, banners; checked pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2")

from smearsight.catalog import TPS_CLASS_NAMES, class_color  # noqa: E402
from smearsight.runtime.annotate import (  # noqa: E402
    annotate,
    count_classes,
    morphology_flags,
    plain_ascii,
    sperm_tally,
)

GREY = 90


def _canvas(h: int = 768, w: int = 1024) -> np.ndarray:
    return np.full((h, w, 3), GREY, np.uint8)


def _rgb(name: str) -> tuple[int, int, int]:
    b, g, r = class_color(name, TPS_CLASS_NAMES.index(name))
    return (r, g, b)


def _dets(rows: list[tuple[float, float, float, float, float, int]], max_det: int = 8) -> np.ndarray:
    out = np.zeros((max_det, 6), np.float32)
    out[:, 5] = -1
    out[: len(rows)] = np.array(rows, np.float32).reshape(-1, 6)
    return out


def test_boxes_in_class_colours_with_scores() -> None:
    img = _canvas()
    dets = _dets([(600, 400, 640, 430, 0.87, 0), (700, 500, 712, 510, 0.51, 5)])
    out = annotate(img, dets, TPS_CLASS_NAMES, None, {})
    assert out is img, "drawn in place"
    assert tuple(img[400, 620]) == _rgb("sertoli")  # top edge, RGB order
    assert tuple(img[415, 600]) == _rgb("sertoli")  # left edge
    assert tuple(img[505, 712]) == _rgb("mature_sperm")
    assert tuple(img[415, 620]) == (GREY, GREY, GREY), "inside the box untouched"
    above = img[386:400, 600:640].reshape(-1, 3)
    assert (above == _rgb("sertoli")).all(1).sum() > 10, "score label drawn above the box"


def test_unused_rows_draw_nothing_and_inplace_false() -> None:
    img = _canvas()
    before = img.copy()
    out = annotate(img, _dets([]), TPS_CLASS_NAMES, None, {"counts": {}}, inplace=False)
    assert np.array_equal(img, before)
    assert np.array_equal(out, before), "nothing valid, no counts, no banner: nothing drawn"


def test_morphology_flags_abnormal_normal_na() -> None:
    img = _canvas()
    dets = _dets([(300, 300, 320, 320, 0.9, 5), (400, 300, 420, 320, 0.9, 5), (500, 300, 520, 320, 0.9, 4)])
    morph = [{"det": 0, "part": "head", "score": 0.8, "abnormal": True},
             {"index": 1, "parts": {"head": {"score": 0.1, "abnormal": False}}},
             {"det_index": 2, "status": "n/a"}]
    annotate(img, dets, TPS_CLASS_NAMES, morph, {"counts": {}})
    red = np.array([235, 40, 40])
    assert (img[298, 300:320] == red).all(), "abnormal: red outline around the box"
    below = img[323:345, 300:360].reshape(-1, 3)
    assert (below == red).all(1).sum() > 10, "abnormal part named under the box"
    assert tuple(img[300, 420]) == (60, 220, 90), "normal: green dot on the corner"
    assert not (img[298, 400:420] == red).all(1).any()
    na = img[323:345, 500:540].reshape(-1, 3)
    assert (na == (170, 170, 170)).all(1).sum() > 5, "N/A badge"


def test_sperm_tally_counts_each_sperm_once() -> None:
    morph = [{"det": 0, "part": "head", "score": 0.8, "abnormal": True},
             {"det": 0, "part": "vacuole", "score": 0.9, "abnormal": True},  # two parts, one sperm
             {"det": 1, "parts": {"head": {"score": 0.1, "abnormal": False}, "tail": {"score": 0.7, "abnormal": True}}},
             {"det": 2, "part": "head", "score": 0.2, "abnormal": False},
             {"det": 3, "status": "pending"},  # not judged yet: not counted
             {"det": 4, "parts": {"head": {"score": 0.3, "abnormal": None}, "tail": {"score": 0.1, "abnormal": False}}}]
    assert sperm_tally(morphology_flags(morph)) == (2, 4)
    assert sperm_tally({}) == (0, 0)


def test_counts_panel_fps_and_banners() -> None:
    img = _canvas()
    dets = _dets([(600, 400, 640, 430, 0.9, 0), (700, 500, 712, 510, 0.5, 0)])
    annotate(img, dets, TPS_CLASS_NAMES, None, {"fps": 12.3, "latency_ms": {"det": 40.0}})
    panel = img[5:100, 5:150]
    assert (panel < GREY).any(), "panel darkens the background"
    sertoli = (img[0:200, 0:300].reshape(-1, 3) == _rgb("sertoli")).all(1).sum()
    assert sertoli > 20, "count line written in the class colour"

    every_frame = _canvas()
    annotate(every_frame, dets, TPS_CLASS_NAMES, None, {"fps": 12.3, "detect_every": 1})
    carried = _canvas()
    annotate(carried, dets, TPS_CLASS_NAMES, None, {"fps": 12.3, "detect_every": 4})
    plain = _canvas()
    annotate(plain, dets, TPS_CLASS_NAMES, None, {"fps": 12.3})
    assert (every_frame == plain).all()  # an interval of 1 adds nothing to the FPS line
    # 4 adds "detector 1/4 frames" to it
    assert (carried[:200, :600] != every_frame[:200, :600]).any(2).sum() > 50
    background = _canvas()  # async: "boxes 250 ms old", another line than the interval's
    annotate(background, dets, TPS_CLASS_NAMES, None, {"fps": 12.3, "detect_every": "async", "boxes_age_ms": 250})
    older = _canvas()
    annotate(older, dets, TPS_CLASS_NAMES, None, {"fps": 12.3, "detect_every": "async", "boxes_age_ms": 900})
    assert (background[:200, :600] != every_frame[:200, :600]).any(2).sum() > 50
    assert (background[:200, :600] != carried[:200, :600]).any(2).sum() > 50
    assert (background[:200, :600] != older[:200, :600]).any(2).sum() > 10

    status = _canvas()
    annotate(status, _dets([]), TPS_CLASS_NAMES, None, {"status": "camera lost — retrying in 4 s", "counts": {}})
    assert tuple(status[2, 1000]) == (230, 150, 20)
    assert (status[5:25, 5:300] == 255).all(2).any(), "white banner text"
    err = _canvas()
    annotate(err, _dets([]), TPS_CLASS_NAMES, None, {"status": "x", "error": "model missing", "counts": {}})
    assert tuple(err[2, 1000]) == (235, 40, 40)


def test_small_frames_and_boxes_outside_are_clipped() -> None:
    img = _canvas(120, 160)
    dets = _dets([(-20, -20, 500, 500, 0.9, 2), (150, 110, 170, 130, 0.4, 1)])
    annotate(img, dets, TPS_CLASS_NAMES, None, {"status": "end of stream", "fps": 1.0})
    assert img.shape == (120, 160, 3)
    assert tuple(img[119, 80]) == _rgb("round_spermatid")


def test_helpers() -> None:
    dets = _dets([(0, 0, 1, 1, 0.5, 1), (0, 0, 1, 1, 0.5, 1), (0, 0, 1, 1, 0.5, 5)])
    ref = np.bincount(dets[dets[:, 5] >= 0, 5].astype(int), minlength=6)
    assert list(count_classes(dets, TPS_CLASS_NAMES).values()) == ref.tolist()
    flags = morphology_flags([{"det": 3, "part": "tail", "score": 0.5, "abnormal": False},
                              {"detection": 3, "parts": {"head": {"score": 0.9, "abnormal": True}}},
                              {"det": "x"}, "junk", {"det": 4, "status": "N/A"}])
    assert flags == {3: [("tail", 0.5, False), ("head", 0.9, True)], 4: [("", None, None)]}
    assert plain_ascii("camera lost — retrying in 4 s") == "camera lost - retrying in 4 s"
    # a score that is not a number is a malformed entry: ignored, not a crash of the frame loop
    bad = [{"det": 5, "part": "head", "score": "high", "abnormal": True},
           {"det": 6, "parts": {"head": {"score": [1], "abnormal": True}, "tail": {"score": 0.2}}}]
    assert morphology_flags(bad) == {6: [("tail", 0.2, None)]}
    img = _canvas(120, 160)
    annotate(img, _dets([(10, 10, 50, 50, 0.9, 1)] * 7), TPS_CLASS_NAMES, bad, {})


def test_non_contiguous_view_is_copied_not_failed() -> None:
    big = _canvas(200, 400)
    view = big[:, ::2]
    out = annotate(view, _dets([(10, 10, 50, 50, 0.9, 1)]), TPS_CLASS_NAMES, None, {"counts": {}})
    assert out.shape == (200, 200, 3) and tuple(out[10, 30]) == _rgb("spermatocyte")


def test_text_masks_stay_bounded_and_the_used_ones_stay_cached():
    """The FPS/latency line is new text every frame: before, its masks piled up to 4096 of them before the cache
    was cleared (about 1 GB at 2160x3840, 80 MB at 768x1024), then every label was rendered again."""
    from smearsight.runtime.annotate import _TextCache

    cache = _TextCache()
    score, _ = cache.get("0.87", 1.3, 2)
    for frame in range(400):  # a 2160x3840 frame's perf line (scale 1.9), one a frame: about 40 MB of masks
        cache.get(f"{10 + frame / 100:.1f} FPS  latency capture 0.6 / preprocess 2.0 / infer {frame} / decode_nms "
                  f"0.7 / morphology 0.4 / annotate 1.0 ms  frame {frame}", 1.9, 2)
        assert cache.get("0.87", 1.3, 2)[0] is score  # drawn on every frame: never evicted
    assert sum(mask.nbytes for mask, _ in cache._cache.values()) <= 16 << 20
