"""Pre-processing from the manifest against an independent NumPy computation, and the inverse box mapping."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from smearsight.errors import InputError
from smearsight.manifest import InputSpec
from smearsight.runtime.preprocess import Letterbox, Preprocessor, geometry, preprocess_frame, shrink_note

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def spec(h=96, w=128, color="rgb", resize="letterbox", pad_value=0.0):
    ch = 1 if color == "gray" else 3
    return InputSpec(name="images", shape=[1, ch, h, w], color=color, mean=MEAN[:ch], std=STD[:ch], resize=resize,
                     pad_value=pad_value)


def normalise(img_hwc: np.ndarray, mean, std) -> np.ndarray:
    x = img_hwc.astype(np.float64) / 255.0
    return ((x - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1).astype(np.float32)


@pytest.fixture()
def frame():
    return np.random.default_rng(0).integers(0, 256, size=(60, 100, 3), dtype=np.uint8)


def test_letterbox_upscale_and_pad(frame):
    s = spec(96, 128, pad_value=127)
    x, box = preprocess_frame(frame, s)
    scale = min(96 / 60, 128 / 100)  # 1.28 -> 77 x 128
    nh, nw = round(60 * scale), round(100 * scale)
    assert box == Letterbox(nw / 100, nh / 60, 0.0, 0.0, (60, 100))  # the resized pixels' scales
    content = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
    want = np.empty((3, 96, 128), np.float32)
    pad = np.full((96, 128, 3), 127, np.uint8)
    pad[:nh, :nw] = content
    want[:] = normalise(pad, MEAN, STD)
    assert x.shape == (1, 3, 96, 128) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], want, atol=1e-6)
    # the pad rows hold the normalised pad value
    np.testing.assert_allclose(x[0, :, nh:, :], normalise(np.full((1, 1, 3), 127, np.uint8), MEAN, STD)
                               .reshape(3, 1, 1) * np.ones((1, 96 - nh, 128)), atol=1e-6)


def test_letterbox_downscale_uses_area(frame):
    s = spec(24, 40)
    x, box = preprocess_frame(frame, s)
    assert box.scale_x == pytest.approx(0.4)
    want = normalise(cv2.resize(frame, (40, 24), interpolation=cv2.INTER_AREA), MEAN, STD)
    np.testing.assert_allclose(x[0], want, atol=1e-6)


def test_stretch_bgr_and_gray(frame):
    x, box = preprocess_frame(frame, spec(30, 50, color="bgr", resize="stretch"))
    assert (box.scale_x, box.scale_y) == (0.5, 0.5)
    resized = cv2.resize(frame, (50, 30), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(x[0], normalise(resized[..., ::-1], MEAN, STD), atol=1e-6)
    g, _ = preprocess_frame(frame, spec(60, 100, color="gray", resize="stretch"))
    gray = frame.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    want = (gray / 255.0 - MEAN[0]) / STD[0]
    assert np.abs(g[0, 0] - want).max() <= 1.0 / 255 / STD[0] + 1e-6  # within one grey level of rounding


def test_pad_mode_pads_and_shrinks_a_larger_frame_to_fit(frame):
    x, box = preprocess_frame(frame, spec(64, 128, resize="pad", pad_value=0))  # 60x100 fits: no resize
    assert (box.scale_x, box.scale_y, box.offset_x) == (1.0, 1.0, 0.0)
    canvas = np.zeros((64, 128, 3), np.uint8)
    canvas[:60, :100] = frame
    np.testing.assert_allclose(x[0], normalise(canvas, MEAN, STD), atol=1e-6)
    assert shrink_note((60, 100), spec(64, 128, resize="pad")) is None
    # 60x100 into 64x96: wider than the input, so shrunk to fit (0.96x), never cropped
    x, box = preprocess_frame(frame, spec(64, 96, resize="pad", pad_value=0))
    small = cv2.resize(frame, (96, 58), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((64, 96, 3), np.uint8)
    canvas[:58, :96] = small
    np.testing.assert_allclose(x[0], normalise(canvas, MEAN, STD), atol=1e-6)
    assert box.scale_x == pytest.approx(96 / 100) and box.scale_y == pytest.approx(58 / 60)
    note = shrink_note((60, 100), spec(64, 96, resize="pad"))
    assert note.startswith("frames of 60x100 are larger than the detector's 64x96 input") and "0.96x" in note
    assert shrink_note((60, 100), spec(64, 96, resize="letterbox")) is None  # letterbox scales by design


def test_inverse_box_mapping_round_trip():
    s = spec(96, 128)
    box, _ = geometry((600, 1000), s)
    boxes = np.array([[10, 20, 30, 40, 0.9, 2], [0, 0, 1000, 600, 0.5, 0]], np.float32)
    model = box.to_model(boxes)
    # 600x1000 -> 77x128 pixels (600 * 0.128 = 76.8 rounds to 77): boxes follow the pixels per axis
    np.testing.assert_allclose(model[0, :4], np.array([10 * 0.128, 20 * 77 / 600, 30 * 0.128, 40 * 77 / 600]),
                               rtol=1e-6)
    back = box.to_original(model)
    np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=1e-4)
    outside = box.to_original(np.array([[-5, -5, 500, 500]], np.float32))  # beyond the canvas: clipped
    assert outside[0, 0] == 0 and outside[0, 2] == 1000 and outside[0, 3] == 600
    stretch, _ = geometry((600, 1000), spec(96, 128, resize="stretch"))
    np.testing.assert_allclose(stretch.to_original(np.array([[12.8, 9.6, 128, 96]], np.float32)),
                               [[100, 60, 1000, 600]], rtol=1e-5)


def test_buffers_reused_and_frame_size_changes(frame):
    p = Preprocessor(spec(96, 128, pad_value=127))
    x1, b1 = p(frame)
    ptr = x1.ctypes.data
    big = np.random.default_rng(1).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    x2, b2 = p(big)
    assert x2 is x1 and x2.ctypes.data == ptr and b2.scale_x == 1.0
    np.testing.assert_allclose(x2[0], normalise(big, MEAN, STD), atol=1e-6)
    x3, _ = p(frame)  # back to the letterboxed size: pad restored
    np.testing.assert_allclose(x3[0, :, 90:], normalise(np.full((6, 128, 3), 127, np.uint8), MEAN, STD), atol=1e-6)


def test_bad_frames_are_refused(frame):
    p = Preprocessor(spec())
    with pytest.raises(InputError, match="RGB uint8"):
        p(frame.astype(np.float32))
    with pytest.raises(InputError, match="RGB uint8"):
        p(frame[..., 0])
