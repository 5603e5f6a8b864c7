import math

import numpy as np
import pytest

from smearsight.anchors import (
    AnchorConfig,
    box_iou,
    decode_boxes,
    encode_boxes,
    generate_anchors,
    xyxy_to_cxcywh,
)
from smearsight.errors import InputError


def test_default_count_matches_design_fact():
    # DESIGN.md: P3-P7 x 9 anchors at 768x1024 = 147,312 anchors.
    cfg = AnchorConfig()
    anchors = generate_anchors((768, 1024), cfg)
    assert anchors.shape == (147312, 4)
    assert cfg.num_anchors((768, 1024)) == 147312


def test_smallest_default_anchor_is_32px_and_8px_box_iou():
    cfg = AnchorConfig()
    anchors = generate_anchors((768, 1024), cfg)
    wh = anchors[:, 2:] - anchors[:, :2]
    square = np.isclose(wh[:, 0], wh[:, 1])
    assert wh[square].min() == pytest.approx(32.0)
    # An 8 px box centred on the first P3 anchor overlaps it at IoU 64/1024 = 0.0625.
    cx, cy = 4.0, 4.0
    box = np.array([[cx - 4, cy - 4, cx + 4, cy + 4]], np.float32)
    first = anchors[(np.arange(len(anchors)) < 9) & square][:1]
    assert box_iou(box, first)[0, 0] == pytest.approx(0.0625)


def test_anchor_order_level_then_row_then_col_then_shape():
    cfg = AnchorConfig(levels=[3, 4], scales=[1.0], aspect_ratios=[1.0, 2.0], anchor_scale=2.0)
    anchors = generate_anchors((16, 24), cfg)
    centres = xyxy_to_cxcywh(anchors)
    # level 3: 2 rows x 3 cols x 2 shapes; level 4: 1 x 2 x 2
    assert len(anchors) == 2 * 3 * 2 + 1 * 2 * 2
    np.testing.assert_allclose(centres[:6:2, :2], [[4, 4], [12, 4], [20, 4]])
    np.testing.assert_allclose(centres[6, :2], [4, 12])
    np.testing.assert_allclose(centres[12, :2], [8, 8])
    # shape order: ratio 1 then ratio 2 (w/h)
    np.testing.assert_allclose(centres[0, 2:], [16, 16])
    np.testing.assert_allclose(centres[1, 2:], [16 * math.sqrt(2), 16 / math.sqrt(2)], rtol=1e-6)


def test_base_sizes_override():
    cfg = AnchorConfig(levels=[2, 3], base_sizes=[6.0, 12.0], scales=[1.0], aspect_ratios=[1.0])
    anchors = generate_anchors((8, 8), cfg)
    wh = anchors[:, 2:] - anchors[:, :2]
    np.testing.assert_allclose(wh[:4], 6.0)
    np.testing.assert_allclose(wh[4:], 12.0)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    anchors = generate_anchors((64, 96), AnchorConfig(levels=[3, 4]))
    centres = rng.uniform(0, 96, size=(len(anchors), 2))
    sizes = rng.uniform(2, 80, size=(len(anchors), 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)
    deltas = encode_boxes(boxes, anchors)
    np.testing.assert_allclose(decode_boxes(deltas, anchors), boxes, atol=1e-3)


def test_encode_matches_independent_formula():
    anchor = np.array([[10.0, 20.0, 30.0, 60.0]])
    box = np.array([[12.0, 18.0, 40.0, 50.0]])
    d = encode_boxes(box, anchor)[0]
    # anchor centre (20, 40) size (20, 40); box centre (26, 34) size (28, 32)
    np.testing.assert_allclose(d, [6 / 20, -6 / 40, math.log(28 / 20), math.log(32 / 40)], rtol=1e-6)


def test_decode_is_float32_and_clamped_for_fp16_inputs():
    anchors = np.array([[0, 0, 16, 16]], np.float32)
    deltas = np.array([[0, 0, 50, 50]], np.float16)
    out = decode_boxes(deltas, anchors)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert out[0, 2] - out[0, 0] == pytest.approx(1000.0, rel=1e-4)


def test_box_iou_against_bruteforce():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 50, (7, 2))
    a = np.concatenate([a, a + rng.uniform(1, 30, (7, 2))], 1)
    b = rng.uniform(0, 50, (5, 2))
    b = np.concatenate([b, b + rng.uniform(1, 30, (5, 2))], 1)
    iou = box_iou(a, b)
    for i in range(7):
        for j in range(5):
            w = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            h = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            inter = w * h
            ua = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1]) + (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1]) - inter
            assert iou[i, j] == pytest.approx(inter / ua)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"levels": [4, 3]}, "levels"),
        ({"scales": [0.0]}, "scales"),
        ({"levels": [3, 4], "base_sizes": [8.0]}, "base_sizes"),
        ({"aspect": [1.0]}, "aspect"),
        ({"anchor_scale": -4.0}, "anchor_scale"),  # negative, zero, nan and inf sizes were accepted
        ({"anchor_scale": 0.0}, "anchor_scale"),
        ({"anchor_scale": float("nan")}, "anchor_scale"),
        ({"scales": [1.0, float("nan")]}, "scales"),
        ({"aspect_ratios": [float("inf")]}, "aspect_ratios"),
        ({"levels": [3, 4], "base_sizes": [8.0, float("inf")]}, "base_sizes"),
    ],
)
def test_bad_anchor_config_names_field(bad, field):
    with pytest.raises(InputError) as info:
        AnchorConfig.from_dict(bad, source="anchors.yaml")
    message = str(info.value)
    assert message.startswith("anchors.yaml")
    assert "\n" not in message
    if field != "base_sizes":
        assert field in message
    else:
        assert "base_sizes" in message or "levels" in message
