"""decode_nms (NumPy reference) against an independent torch/torchvision computation of the same contract."""

from __future__ import annotations

import numpy as np
import pytest

from smearsight.anchors import AnchorConfig, decode_boxes, generate_anchors
from smearsight.runtime.postprocess import decode_nms, sigmoid32, synthetic_raw_outputs

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def reference(logits, deltas, anchors, *, score_threshold, iou_threshold, pre_nms_topk, max_detections,
              image_size=None):
    """The contract, step by step, with torch for selection and torchvision.ops.batched_nms for NMS."""
    a, c = logits.shape
    scores = torch.from_numpy(sigmoid32(logits))
    sel_anchor, sel_class, sel_score = [], [], []
    for k in range(c):
        s = scores[:, k]
        idx = torch.nonzero(s > float(np.float32(score_threshold))).flatten()
        # stable sort by score desc keeps lower anchor index first among ties
        order = torch.sort(s[idx], descending=True, stable=True).indices[:pre_nms_topk]
        idx = idx[order]
        sel_anchor.append(idx)
        sel_class.append(torch.full_like(idx, k))
        sel_score.append(s[idx])
    anc = torch.cat(sel_anchor)
    cls = torch.cat(sel_class)
    sc = torch.cat(sel_score)
    empty = np.tile(np.array([0, 0, 0, 0, 0, -1], np.float32), (max_detections, 1))
    if anc.numel() == 0:
        return empty, 0
    boxes = torch.from_numpy(decode_boxes(deltas[anc.numpy()], anchors[anc.numpy()]))
    if image_size is not None:
        h, w = image_size
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    keep = torchvision.ops.batched_nms(boxes, sc, cls, iou_threshold).numpy()
    # contract's tie order: score desc, class asc, anchor asc
    keep = keep[np.lexsort((anc.numpy()[keep], cls.numpy()[keep], -sc.numpy()[keep]))][:max_detections]
    out = empty.copy()
    n = keep.size
    out[:n, :4] = boxes.numpy()[keep]
    out[:n, 4] = sc.numpy()[keep]
    out[:n, 5] = cls.numpy()[keep]
    return out, n


def check(logits, deltas, anchors, **kw):
    got, n = decode_nms(logits, deltas, anchors, **kw)
    want, m = reference(logits, deltas, anchors, **kw)
    assert got.shape == (kw["max_detections"], 6) and got.dtype == np.float32
    assert n == m
    np.testing.assert_array_equal(got[:, 5], want[:, 5])
    np.testing.assert_array_equal(got[:, 4], want[:, 4])
    np.testing.assert_array_equal(got[:, :4], want[:, :4])  # same float32 decode: bit-identical
    return got, n


@pytest.fixture(scope="module")
def small_anchors():
    return generate_anchors((128, 160), AnchorConfig(levels=[3, 4, 5], base_sizes=[8, 16, 32]))


@pytest.mark.parametrize("seed", range(6))
def test_random_against_torchvision(small_anchors, seed):
    rng = np.random.default_rng(seed)
    a = small_anchors.shape[0]
    logits, deltas, _, _ = synthetic_raw_outputs(small_anchors, 4, int(rng.integers(5, 60)), (128, 160), seed=seed,
                                                 background_logit=-3.0)
    _, n = check(logits, deltas, small_anchors, score_threshold=0.3, iou_threshold=float(rng.uniform(0.2, 0.8)),
                 pre_nms_topk=int(rng.integers(20, 300)), max_detections=200, image_size=(128, 160))
    assert n > 0 and a > 1000


def test_dense_scene_against_torchvision(small_anchors):
    logits, deltas, _, _ = synthetic_raw_outputs(small_anchors, 6, 120, (128, 160), seed=11, background_logit=-2.0)
    _, n = check(logits, deltas, small_anchors, score_threshold=0.2, iou_threshold=0.5, pre_nms_topk=500,
                 max_detections=1000, image_size=None)
    assert n > 100


def test_class_candidates_count_scores_above_threshold_before_the_cap(small_anchors):
    logits, deltas, _, _ = synthetic_raw_outputs(small_anchors, 5, 80, (128, 160), seed=4, background_logit=-2.0)
    counts = np.full(5, -1, np.int64)
    check(logits, deltas, small_anchors, score_threshold=0.2, iou_threshold=0.5, pre_nms_topk=50,
          max_detections=300)
    decode_nms(logits, deltas, small_anchors, score_threshold=0.2, iou_threshold=0.5, pre_nms_topk=50,
               max_detections=300, class_candidates=counts)
    want = (torch.sigmoid(torch.from_numpy(logits).double()) > 0.2).sum(0).numpy()
    np.testing.assert_array_equal(counts, want)
    assert counts.max() > 50  # the cap was binding here, and the counts say so
    decode_nms(np.full_like(logits, -20.0), deltas, small_anchors, score_threshold=0.2, iou_threshold=0.5,
               pre_nms_topk=50, max_detections=300, class_candidates=counts)
    assert not counts.any()


def test_empty_and_all_below_threshold(small_anchors):
    a = small_anchors.shape[0]
    logits = np.full((a, 3), -20.0, np.float32)
    deltas = np.zeros((a, 4), np.float32)
    det, n = decode_nms(logits, deltas, small_anchors, score_threshold=0.5, iou_threshold=0.5, pre_nms_topk=10,
                        max_detections=7)
    assert n == 0
    np.testing.assert_array_equal(det, np.tile([0, 0, 0, 0, 0, -1], (7, 1)).astype(np.float32))
    # zero anchors
    det, n = decode_nms(np.zeros((0, 3), np.float32), np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32),
                        score_threshold=0.1, iou_threshold=0.5, pre_nms_topk=10, max_detections=3)
    assert n == 0 and det.shape == (3, 6)
    # threshold 1.0: nothing can pass
    logits[:] = 50.0
    _, n = decode_nms(logits, deltas, small_anchors, score_threshold=1.0, iou_threshold=0.5, pre_nms_topk=10,
                      max_detections=7)
    assert n == 0


def test_ties_identical_boxes_and_scores():
    # 6 identical anchors, identical scores in 2 classes: one survivor per class, the lowest anchor index
    anchors = np.tile(np.array([[10, 10, 30, 30]], np.float32), (6, 1))
    logits = np.zeros((6, 2), np.float32)
    deltas = np.zeros((6, 4), np.float32)
    det, n = check(logits, deltas, anchors, score_threshold=0.1, iou_threshold=0.5, pre_nms_topk=100,
                   max_detections=10)
    assert n == 2
    assert det[0, 5] == 0 and det[1, 5] == 1  # tie on score: lower class first
    # top-k ties: only 3 per class kept, the lowest anchor indices; then NMS keeps anchor 0
    det2, n2 = decode_nms(logits, deltas, anchors, score_threshold=0.1, iou_threshold=0.99, pre_nms_topk=3,
                          max_detections=10)
    assert n2 == 2


def test_iou_exactly_at_threshold_is_not_suppressed():
    # two boxes with IoU exactly 1/3 (areas 2 and 2 overlapping 1): IoU > 1/3 is false in float32
    anchors = np.array([[0, 0, 2, 1], [1, 0, 3, 1], [0, 0, 2, 1]], np.float32)
    logits = np.array([[3.0], [2.0], [1.0]], np.float32)
    deltas = np.zeros((3, 4), np.float32)
    det, n = check(logits, deltas, anchors, score_threshold=0.5, iou_threshold=float(np.float32(1 / 3)),
                   pre_nms_topk=10, max_detections=5)
    assert n == 2  # box 1 survives (IoU = threshold); box 2 duplicates box 0 and goes


def test_max_detections_truncation_and_clip(small_anchors):
    logits, deltas, _, _ = synthetic_raw_outputs(small_anchors, 3, 40, (128, 160), seed=5, background_logit=-1.0)
    deltas[:, 2:] += 1.5  # big boxes that need clipping
    det, n = check(logits, deltas, small_anchors, score_threshold=0.3, iou_threshold=0.6, pre_nms_topk=300,
                   max_detections=25, image_size=(128, 160))
    assert n == 25
    assert det[:, 0].min() >= 0 and det[:, 2].max() <= 160 and det[:, 3].max() <= 128
    assert np.all(np.diff(det[:, 4]) <= 0)


def test_long_suppression_chain_matches_sequential():
    # a chain: each box overlaps only its neighbours with IoU > t; greedy keeps every other box
    n = 300
    x = np.arange(n, dtype=np.float32) * 2
    anchors = np.stack([x, np.zeros(n, np.float32), x + 10, np.full(n, 10, np.float32)], axis=1)
    logits = np.linspace(5, 1, n, dtype=np.float32)[:, None]
    deltas = np.zeros((n, 4), np.float32)
    _, kept = check(logits, deltas, anchors, score_threshold=0.5, iou_threshold=0.5, pre_nms_topk=1000,
                    max_detections=n)
    assert kept == n // 2


def test_accepts_batched_shapes_and_out_buffer(small_anchors):
    logits, deltas, _, _ = synthetic_raw_outputs(small_anchors, 2, 10, (128, 160), seed=3)
    buf = np.empty((50, 6), np.float32)
    det, n = decode_nms(logits[None], deltas[None], small_anchors, score_threshold=0.3, iou_threshold=0.5,
                        pre_nms_topk=100, max_detections=50, out=buf)
    assert det is buf
    ref, m = decode_nms(logits, deltas, small_anchors, score_threshold=0.3, iou_threshold=0.5, pre_nms_topk=100,
                        max_detections=50)
    assert n == m and np.array_equal(det, ref)
    with pytest.raises(ValueError, match="shapes disagree"):
        decode_nms(logits, deltas[:-1], small_anchors, score_threshold=0.3, iou_threshold=0.5, pre_nms_topk=1,
                   max_detections=1)


def test_sigmoid_matches_torch():
    x = np.linspace(-30, 30, 10001, dtype=np.float32)
    np.testing.assert_allclose(sigmoid32(x), torch.sigmoid(torch.from_numpy(x)).numpy(), rtol=5e-7, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_nms_fuzz_against_torchvision(seed):
    """Greedy NMS on random boxes of very mixed sizes, degenerate boxes and many classes."""
    from smearsight.runtime.postprocess import _nms_sorted

    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 1500))
    ctr = rng.uniform(-50, 400, size=(n, 2))
    wh = np.exp(rng.uniform(np.log(0.5), np.log(300), size=(n, 2))) * (rng.random((n, 1)) > 0.02)  # some empty
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(np.float32)
    if seed % 3 == 0:  # clusters of near-duplicates
        rep = np.repeat(boxes[: max(n // 10, 1)], 10, axis=0)
        boxes = rep + rng.normal(0, 1, size=rep.shape).astype(np.float32)
        n = boxes.shape[0]
    cls = np.sort(rng.integers(0, int(rng.integers(1, 8)), size=n))
    scores = rng.random(n).astype(np.float32)
    order = np.lexsort((-scores, cls))  # class-major, score desc
    boxes, cls, scores = boxes[order], cls[order], scores[order]
    t = float(rng.choice([0.1, 0.3, 0.5, 0.7, 0.95]))
    keep = _nms_sorted(boxes, cls.astype(np.int64), np.float32(t))
    want = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(cls), t)
    assert np.array_equal(np.sort(keep), np.sort(want.numpy()))


@pytest.mark.parametrize("seed", range(4))
def test_nms_extreme_spans_against_torchvision(seed):
    """Sub-pixel boxes beside boxes millions of pixels away: the sweep's integer x keys get coarse there."""
    from smearsight.runtime.postprocess import _nms_sorted

    rng = np.random.default_rng(200 + seed)
    n = 400
    ctr = rng.uniform(0, 50, size=(n, 2))
    ctr[: n // 4] *= 1e5  # far away
    wh = np.exp(rng.uniform(np.log(0.01), np.log(40), size=(n, 2)))
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(np.float32)
    boxes = np.concatenate([boxes, boxes + rng.normal(0, 0.01, size=boxes.shape).astype(np.float32)])
    cls = np.sort(rng.integers(0, 3, size=boxes.shape[0]))
    scores = rng.random(boxes.shape[0]).astype(np.float32)
    order = np.lexsort((-scores, cls))
    boxes, cls, scores = boxes[order], cls[order], scores[order]
    keep = _nms_sorted(boxes, cls.astype(np.int64), np.float32(0.5))
    # per class: batched_nms offsets the classes' coordinates, which loses float32 precision this far out
    want = np.concatenate([
        np.flatnonzero(cls == c)[torchvision.ops.nms(torch.from_numpy(boxes[cls == c]),
                                                     torch.from_numpy(scores[cls == c]), 0.5).numpy()]
        for c in np.unique(cls)
    ])
    assert np.array_equal(np.sort(keep), np.sort(want))



def test_to_frame_pixels_maps_clips_and_drops_padding_boxes() -> None:
    from smearsight.runtime.postprocess import EMPTY_ROW, to_frame_pixels

    rng = np.random.default_rng(5)
    n, cap = 300, 320
    dets = np.tile(EMPTY_ROW, (cap, 1))
    xy = rng.uniform(-20, 260, (n, 2)).astype(np.float32)  # model canvas 256x256; frame letterboxed into it
    wh = rng.uniform(0, 30, (n, 2)).astype(np.float32)
    dets[:n, 0:2], dets[:n, 2:4] = xy, xy + wh
    dets[:n, 4] = np.sort(rng.uniform(0.2, 1.0, n))[::-1]
    dets[:n, 5] = rng.integers(0, 6, n)
    scale, offset, frame = (0.5, 0.5), (0.0, 64.0), (256, 512)  # a 512x256 frame, padded above and below
    out, kept = to_frame_pixels(dets, n, scale=scale, offset=offset, frame_size=frame)
    expected = []
    for x1, y1, x2, y2, score, cls in dets[:n].tolist():  # the same mapping, one box at a time
        fx1, fx2 = (min(max((v - offset[0]) / scale[0], 0.0), frame[1]) for v in (x1, x2))
        fy1, fy2 = (min(max((v - offset[1]) / scale[1], 0.0), frame[0]) for v in (y1, y2))
        if fx2 - fx1 >= 1 and fy2 - fy1 >= 1:
            expected.append((fx1, fy1, fx2, fy2, score, cls))
    assert 0 < kept == len(expected) < n
    np.testing.assert_allclose(out[:kept], np.array(expected, np.float32), rtol=1e-6, atol=1e-4)
    assert (out[kept:] == EMPTY_ROW).all()
    same = np.tile(EMPTY_ROW, (cap, 1))  # writing into a given array gives the same
    out2, kept2 = to_frame_pixels(dets, n, scale=scale, offset=offset, frame_size=frame, out=same)
    assert out2 is same and kept2 == kept and np.array_equal(out2, out)
    assert to_frame_pixels(dets, 0, scale=scale, offset=offset, frame_size=frame)[1] == 0


def test_a_nan_box_neither_changes_nms_nor_makes_it_quadratic(small_anchors):
    """One NaN box regression (an FP16 engine overflowing) put NaN in the sweep's band and x keys: every
    same-class box became a candidate pair of every other (2.8 s instead of 5 ms a frame at 1000 candidates)."""
    from smearsight.runtime.postprocess import _overlap_pairs, to_frame_pixels

    logits, deltas, _, _ = synthetic_raw_outputs(small_anchors, 3, 40, (128, 160), seed=4)
    kw = dict(score_threshold=0.2, iou_threshold=0.5, pre_nms_topk=1000, max_detections=300, image_size=(128, 160))
    weak = np.flatnonzero(sigmoid32(logits).max(axis=1) > 0.2)[3]
    without = logits.copy()
    without[weak] = -50.0  # the same frame without that anchor's candidates
    expected, n_expected = decode_nms(without, deltas, small_anchors, **kw)
    broken = deltas.copy()
    broken[weak] = np.nan
    got, n = decode_nms(logits, broken, small_anchors, **kw)
    got, n = to_frame_pixels(got, n, scale=(1.0, 1.0), offset=(0.0, 0.0), frame_size=(128, 160))  # drops NaN rows
    assert n == n_expected and np.array_equal(got[:n], expected[:n_expected])

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, size=(400, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + 10], axis=1)
    cls = np.zeros(400, np.int64)
    clean = set(zip(*(a.tolist() for a in _overlap_pairs(boxes[1:], cls[1:], 0.5)), strict=True))
    boxes[0] = np.nan
    pairs = set(zip(*(a.tolist() for a in _overlap_pairs(boxes, cls, 0.5)), strict=True))
    assert pairs == {(a + 1, b + 1) for a, b in clean}  # before: all 79,800 pairs
