"""Small-anchor decode + class-aware NMS: the NumPy reference (no torch).

:func:`decode_nms` turns the detector's raw outputs into a fixed ``[max_detections, 6]`` array of
``(x1, y1, x2, y2, score, class)`` rows. The CUDA kernels in ``runtime/kernels/decode_nms.cu``
implement the same steps and are tested against this function.

Exact semantics (the contract in ``notes/INTERFACES.md``):

1. ``scores = sigmoid(logits)`` as float32: ``1 / (1 + exp(-x))`` evaluated in float64 and rounded
   once to float32 (the correctly rounded sigmoid in practice, and what the CUDA kernel computes bit
   for bit, whereas float32 ``exp`` implementations differ in the last bit and would reorder near-equal
   scores). Candidates are the (anchor, class) pairs with ``score > score_threshold`` (compared as float32).
2. Per class, keep the ``pre_nms_topk`` highest scores (ties: lower anchor index first).
3. Decode those boxes in float32 (:func:`smearsight.anchors.decode_boxes`), clip to ``image_size``
   (H, W) when given.
4. Greedy NMS per class, in (score desc, anchor asc) order: a box is suppressed when a kept box of
   the same class overlaps it with IoU > ``iou_threshold``. IoU is computed in float32 exactly as
   torchvision's kernels do: ``inter / ((area_i + area_j) - inter)``, and compared with the threshold
   rounded to float32 (as the CUDA kernel does; torchvision compares with the double, which differs only
   for an IoU exactly equal to ``float32(t)`` when ``t`` itself is not a float32, e.g. 0.3).
5. Sort the kept boxes by score desc (ties: lower class, then lower anchor index) and keep
   ``max_detections``; unused rows are ``(0, 0, 0, 0, 0, -1)``.

Speed: the score threshold is applied in logit space first (one comparison per element, no
``exp`` over all anchors); candidates are ordered by value sorts of packed 64-bit integer keys (NumPy's
SIMD sort; an argsort is about 4x slower); NMS finds candidate pairs with a sweep over x, computes IoU
first for the pairs of boxes nothing can suppress (in a cluster the best box usually settles the rest)
and resolves the remaining greedy suppression in a few vectorised rounds.
"""

from __future__ import annotations

import math

import numpy as np

from smearsight.anchors import BBOX_LOG_CLAMP

EMPTY_ROW = np.array([0, 0, 0, 0, 0, -1], dtype=np.float32)
MIN_BOX_SIDE = 1.0  # frame pixels: a box thinner than this after clipping lay on the padding, not on a cell
_ANCHOR_BITS = 24  # up to 16.7M anchors
_MAX_CLASSES = 128
_SCORE_MASK = np.int64(0x7FFFFFFF)
_ANCHOR_MASK = np.int64((1 << _ANCHOR_BITS) - 1)
_POSITION_MASK = np.int64(0xFFFFFFFF)


def sigmoid32(x: np.ndarray) -> np.ndarray:
    """The float32 score every stage uses: ``1 / (1 + exp(-x))`` in float64, rounded once to float32."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def empty_detections(max_detections: int) -> np.ndarray:
    """A fixed ``[max_detections, 6]`` array filled with empty rows."""
    out = np.empty((max_detections, 6), dtype=np.float32)
    out[:] = EMPTY_ROW
    return out


def to_frame_pixels(dets: np.ndarray, n: int, *, scale: tuple[float, float], offset: tuple[float, float],
                    frame_size: tuple[int, int], out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Map the first ``n`` detections from model-input to frame pixels (``frame = (model - offset) / scale``),
    clip them to the frame and drop those left thinner than a pixel: boxes found on the letterbox padding.

    ``scale``/``offset``: (x, y). Returns ``(out, kept)``; ``out`` (default a new ``dets``-shaped array) holds
    the kept rows first, in their order, then empty rows.
    """
    if out is None:
        out = np.empty_like(dets)
    out[:] = EMPTY_ROW
    if n == 0:
        return out, 0
    h, w = frame_size
    rows = out[:n]
    rows[:, 4:6] = dets[:n, 4:6]
    np.subtract(dets[:n, 0:4:2], np.float32(offset[0]), out=rows[:, 0:4:2])
    rows[:, 0:4:2] /= np.float32(scale[0])
    np.subtract(dets[:n, 1:4:2], np.float32(offset[1]), out=rows[:, 1:4:2])
    rows[:, 1:4:2] /= np.float32(scale[1])
    np.clip(rows[:, 0:4:2], 0, w, out=rows[:, 0:4:2])
    np.clip(rows[:, 1:4:2], 0, h, out=rows[:, 1:4:2])
    solid = (rows[:, 2] - rows[:, 0] >= MIN_BOX_SIDE) & (rows[:, 3] - rows[:, 1] >= MIN_BOX_SIDE)
    if solid.all():
        return out, n
    kept = int(solid.sum())
    out[:kept] = rows[solid]
    out[kept:n] = EMPTY_ROW
    return out, kept


def _logit_floor(score_threshold: float) -> float:
    """A logit below which no score can pass the threshold (conservative by a margin)."""
    t = float(np.float32(score_threshold))
    if t <= 0.0:
        return -math.inf
    if t >= 1.0:
        return math.inf
    return math.log(t / (1.0 - t)) - 1e-3 - 1e-3 * abs(math.log(t / (1.0 - t)))


def _score_bits(scores: np.ndarray) -> np.ndarray:
    """Bit patterns of positive float32 scores as int64 (monotone in the score)."""
    return np.ascontiguousarray(scores, dtype=np.float32).view(np.int32).astype(np.int64)


def decode_nms(
    class_logits: np.ndarray,
    box_regression: np.ndarray,
    anchors: np.ndarray,
    *,
    score_threshold: float,
    iou_threshold: float,
    pre_nms_topk: int,
    max_detections: int,
    image_size: tuple[int, int] | None = None,
    out: np.ndarray | None = None,
    class_candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Decode + class-aware NMS of one image's raw detector outputs.

    Args:
        class_logits: ``[A, C]`` (or ``[1, A, C]``) raw class logits.
        box_regression: ``[A, 4]`` (or ``[1, A, 4]``) (dx, dy, dw, dh).
        anchors: ``[A, 4]`` float32 xyxy anchors in the same order.
        image_size: (H, W) to clip boxes to, or None for no clipping.
        out: optional preallocated ``[max_detections, 6]`` float32 array to fill (hot path).
        class_candidates: optional int64 ``[C]`` array, filled with each class's candidates above the score
            threshold before the ``pre_nms_topk`` cap (a count above the cap means cells may be dropped).

    Returns:
        ``(detections [max_detections, 6] float32, count)``: rows ``(x1, y1, x2, y2, score, class)``
        sorted by score, unused rows ``(0, 0, 0, 0, 0, -1)``.
    """
    logits = np.asarray(class_logits)
    deltas = np.asarray(box_regression)
    if logits.ndim == 3:
        logits = logits[0]
    if deltas.ndim == 3:
        deltas = deltas[0]
    num_anchors, num_classes = logits.shape
    if deltas.shape != (num_anchors, 4) or anchors.shape != (num_anchors, 4):
        raise ValueError(
            f"decode_nms: shapes disagree: class_logits {logits.shape}, box_regression {deltas.shape}, "
            f"anchors {anchors.shape}"
        )
    if num_classes > _MAX_CLASSES or num_anchors >= 1 << _ANCHOR_BITS:
        raise ValueError(f"decode_nms: at most {_MAX_CLASSES} classes and 2^24 anchors are supported")
    if out is None:
        out = np.empty((max_detections, 6), dtype=np.float32)
    elif out.shape != (max_detections, 6) or out.dtype != np.float32:
        raise ValueError(f"decode_nms: out must be float32 [{max_detections}, 6]")
    out[:] = EMPTY_ROW
    if class_candidates is not None:
        class_candidates[:] = 0

    # 1. threshold: a cheap logit-space pre-filter, then the exact float32 score test.
    flat = logits.reshape(-1)
    floor = _logit_floor(score_threshold)
    if floor == math.inf:
        return out, 0
    cand = np.flatnonzero(flat > floor) if floor > -math.inf else np.arange(flat.size)
    if cand.size == 0:
        return out, 0
    scores = sigmoid32(np.take(flat, cand))
    passed = scores > np.float32(score_threshold)
    if not passed.all():
        cand = np.compress(passed, cand)
        scores = np.compress(passed, scores)
    if cand.size == 0:
        return out, 0
    anchor_idx = cand // num_classes
    cls = cand - anchor_idx * num_classes

    # 2. per-class top-k: one value sort of packed keys (class, -score, anchor), all unique; every
    # field is unpacked from the sorted keys, so no argsort (4x slower than a sort of int64) is needed.
    inv_bits = _SCORE_MASK - _score_bits(scores)
    key = np.sort((cls << 55) | (inv_bits << _ANCHOR_BITS) | anchor_idx)
    cls = key >> 55
    if class_candidates is not None:
        class_candidates[:] = np.bincount(cls, minlength=num_classes)
    if key.size > pre_nms_topk:
        key, cls = _class_topk(key, cls, num_classes, pre_nms_topk)
    inv_bits = (key >> _ANCHOR_BITS) & _SCORE_MASK
    anchor_idx = key & _ANCHOR_MASK
    scores = (_SCORE_MASK - inv_bits).astype(np.int32).view(np.float32)

    # 3. decode in float32 (same operations as smearsight.anchors.decode_boxes), optional clip.
    boxes = _decode(np.take(deltas, anchor_idx, axis=0), np.take(anchors, anchor_idx, axis=0))
    if image_size is not None:
        h, w = image_size
        np.clip(boxes[:, 0::2], np.float32(0), np.float32(w), out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], np.float32(0), np.float32(h), out=boxes[:, 1::2])

    # 4. class-aware greedy NMS (boxes are grouped by class, score-ordered within each class).
    keep = _nms_sorted(boxes, cls, np.float32(iou_threshold))

    # 5. global order: score desc, class asc, anchor asc; truncate to max_detections. Candidates are in
    # (class, score desc, anchor) order, so for equal scores their position orders (class, anchor).
    final = (np.sort((np.take(inv_bits, keep) << 32) | keep) & _POSITION_MASK)[:max_detections]
    n = int(final.size)
    out[:n, 0:4] = np.take(boxes, final, axis=0)
    out[:n, 4] = np.take(scores, final)
    out[:n, 5] = np.take(cls, final)
    return out, n


def _class_topk(key: np.ndarray, cls: np.ndarray, num_classes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of each class from sorted class-major ``key`` (and its ``cls``)."""
    counts = np.bincount(cls, minlength=num_classes)
    if counts.max() <= k:
        return key, cls
    starts = np.cumsum(counts) - counts
    sel = (np.arange(key.size) - np.take(starts, cls)) < k
    return np.compress(sel, key), np.compress(sel, cls)


def _decode(deltas: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Float32 decode with the operation order of :func:`smearsight.anchors.decode_boxes`.

    Computed on contiguous coordinate rows (``[4, N]``; strided ``[:, 0:2]`` columns are several times
    slower) and returned as the ``[N, 4]`` transposed view of them."""
    d = np.ascontiguousarray(deltas.T, dtype=np.float32)
    a = np.ascontiguousarray(anchors.T, dtype=np.float32)
    half = np.float32(0.5)
    awh = a[2:4] - a[0:2]
    actr = a[0:2] + half * awh
    centre = actr + d[0:2] * awh
    size = awh * np.exp(np.minimum(d[2:4], np.float32(BBOX_LOG_CLAMP)))
    hs = half * size
    out = np.empty((4, d.shape[1]), dtype=np.float32)
    np.subtract(centre, hs, out=out[0:2])
    np.add(centre, hs, out=out[2:4])
    return out.T


class _BoxColumns:
    """Contiguous float32 columns and areas of ``[N, 4]`` xyxy boxes, for IoU of many index pairs."""

    def __init__(self, boxes: np.ndarray) -> None:
        self.x1, self.y1, self.x2, self.y2 = (np.ascontiguousarray(boxes[:, k], dtype=np.float32) for k in range(4))
        self.areas = (self.x2 - self.x1) * (self.y2 - self.y1)

    def iou(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Float32 IoU of the box pairs ``(i[k], j[k])`` in torchvision's operation order."""
        x1, y1, x2, y2, areas = self.x1, self.y1, self.x2, self.y2, self.areas
        take = np.take
        zero = np.float32(0)
        iw = np.minimum(take(x2, i), take(x2, j))
        iw -= np.maximum(take(x1, i), take(x1, j))
        np.maximum(iw, zero, out=iw)
        ih = np.minimum(take(y2, i), take(y2, j))
        ih -= np.maximum(take(y1, i), take(y1, j))
        np.maximum(ih, zero, out=ih)
        inter = iw * ih
        union = take(areas, i) + take(areas, j)
        union -= inter
        with np.errstate(divide="ignore", invalid="ignore"):
            return inter / union


def _overlap_pairs(
    boxes: np.ndarray, cls: np.ndarray, iou_threshold: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Same-class pairs (a < b) that may have IoU > ``iou_threshold`` (a superset of them; none with a box that
    has a non-finite coordinate, whose IoU is NaN or 0).

    IoU > t needs the intersection to be longer than t times each box's width and height, so boxes
    shrunk by t/2 of their size on every side (with a safety margin) still overlap: only those pairs
    are generated. Boxes are copied into every horizontal band their y-range touches; within each
    (class, band) an x-sweep finds boxes whose x-ranges overlap; a pair is reported only in the band
    holding the top of its y-intersection, so each pair appears once.

    The sweep sorts integer keys ``(class, band, floor(x1 * q), copy)`` by value (no argsort) and looks up
    ``(class, band, ceil(x2 * q))``: rounding x1 down and x2 up keeps every overlapping pair.
    """
    finite = np.isfinite(boxes).all(axis=1)
    if not finite.all():  # a NaN box (a broken engine's output) has IoU NaN or 0 with every box: it has no pair
        idx = np.flatnonzero(finite)  # and left in, it made the bands and the x-sweep one group: all n^2 pairs
        if idx.size < 2:
            empty = np.zeros(0, dtype=np.int32)
            return empty, empty
        a, b = _overlap_pairs(boxes[idx], cls[idx], iou_threshold)
        return idx[a], idx[b]
    n = boxes.shape[0]
    take, compress = np.take, np.compress  # several times faster than fancy and boolean indexing here
    b64 = boxes.T.astype(np.float64)  # coordinate rows x1, y1, x2, y2
    shrink = 0.5 * min(max(float(iou_threshold), 0.0), 1.0) * 0.999
    if shrink > 0:
        wh = np.maximum(b64[2:4] - b64[0:2], 0.0) * shrink
        b64[0:2] += wh
        b64[2:4] -= wh
    x1, y1, x2, y2 = b64
    ylo = float(min(y1.min(), y2.min()))
    heights = np.abs(y2 - y1)
    band_h = max(2.0 * float(np.partition(heights, n // 2)[n // 2]), 1.0)  # about the median: speed only
    while True:
        b1 = np.floor((y1 - ylo) / band_h).astype(np.int64)
        b2 = np.floor((np.maximum(y1, y2) - ylo) / band_h).astype(np.int64)
        nrep = b2 - b1 + 1
        if nrep.sum() <= 6 * n and b2.max() < 1 << 16:
            break
        band_h *= 2.0
    nbands = int(b2.max()) + 1
    total = int(nrep.sum())
    box = np.repeat(np.arange(n, dtype=np.int32), nrep)
    starts = np.cumsum(nrep) - nrep
    copy_no = np.arange(total, dtype=np.int64) - take(starts, box)
    first = copy_no == 0
    group = take(cls, box) * nbands + (take(b1, box) + copy_no)
    idx_bits = max(total.bit_length(), 1)
    x_bits = min(max(62 - idx_bits - max(int(group.max()).bit_length(), 1), 0), 32)  # exact in float64
    x_max = (1 << x_bits) - 1
    lo = float(min(x1.min(), x2.min()))
    span = float(max(x1.max(), x2.max())) - lo
    q = x_max / span if span > 0 else 0.0
    qx1 = np.clip(np.floor((x1 - lo) * q), 0, x_max).astype(np.int64)
    qx2 = np.clip(np.ceil((x2 - lo) * q), 0, x_max).astype(np.int64)
    gx = group << x_bits
    keys = np.sort(((gx | take(qx1, box)) << idx_bits) | np.arange(total, dtype=np.int64))
    by_x = (keys & ((1 << idx_bits) - 1)).astype(np.int32)
    first_s = take(first, by_x)
    box_s = take(box, by_x)
    reach = ((take(gx, by_x) | take(qx2, box_s)) << idx_bits) | ((1 << idx_bits) - 1)
    hi = np.searchsorted(keys, reach, side="right").astype(np.int32)
    pos = np.arange(total, dtype=np.int32)
    counts = hi - pos - 1
    np.maximum(counts, 0, out=counts)
    npairs = int(counts.sum())
    if npairs == 0:
        empty = np.zeros(0, dtype=np.int32)
        return empty, empty
    # pair k of sorted copy p: (p, p + 1 + k - start_p)
    src = np.repeat(pos, counts)
    dst = np.arange(npairs, dtype=np.int32)
    dst += np.repeat(pos + 1 - (np.cumsum(counts, dtype=np.int32) - counts), counts)
    # both copies share a band; report the pair only in the band of the lower box's top edge,
    # i.e. where one of the two copies is its box's first copy
    once = take(first_s, src)
    once |= take(first_s, dst)
    a = take(box_s, compress(once, src))
    b = take(box_s, compress(once, dst))
    return np.minimum(a, b), np.maximum(a, b)


def _nms_sorted(boxes: np.ndarray, cls: np.ndarray, iou_threshold: np.float32) -> np.ndarray:
    """Greedy NMS over boxes already in (class, score desc, anchor asc) order; kept indices ascending."""
    n = boxes.shape[0]
    if n <= 1:
        return np.arange(n)
    sup, vic = _overlap_pairs(boxes, cls, float(iou_threshold))
    if sup.size == 0:
        return np.arange(n)
    take, compress = np.take, np.compress
    cols = _BoxColumns(boxes)
    # state: 0 undecided, 1 kept, -1 suppressed. A box is kept iff none of its suppressors is kept.
    # A box that no candidate pair can suppress is kept: IoU is first computed for its pairs only (in a
    # cluster the best box usually suppresses the rest, whose pairs among themselves then never matter).
    may_lose = np.zeros(n, dtype=bool)
    may_lose[vic] = True
    state = np.where(may_lose, 0, 1).astype(np.int8)
    from_root = ~take(may_lose, sup)
    if from_root.any():
        s1, v1 = compress(from_root, sup), compress(from_root, vic)
        state[compress(cols.iou(s1, v1) > iou_threshold, v1)] = -1
    rest = ~from_root
    rest &= take(state, vic) == 0
    rest &= take(state, sup) == 0
    sup = compress(rest, sup)
    vic = compress(rest, vic)
    if sup.size:
        hit = cols.iou(sup, vic) > iou_threshold
        sup = compress(hit, sup)
        vic = compress(hit, vic)
    blocked = np.zeros(n, dtype=bool)
    blocked[vic] = True
    state[(state == 0) & ~blocked] = 1
    for _ in range(64):
        live = take(state, vic) == 0
        if not live.any():
            return np.flatnonzero(state == 1)
        sup = compress(live, sup)
        vic = compress(live, vic)
        st = take(state, sup)
        state[compress(st == 1, vic)] = -1
        pending = compress(take(state, sup) != -1, vic)
        blocked = np.zeros(n, dtype=bool)
        blocked[pending] = True
        state[(state == 0) & ~blocked] = 1
    # Long suppression chains (adversarial input): finish sequentially, in order.
    live = take(state, vic) == 0
    order = np.argsort(compress(live, vic), kind="stable")
    vic_s = compress(live, vic)[order]
    sup_s = compress(live, sup)[order]
    for i in np.flatnonzero(state == 0):
        lo, hi = np.searchsorted(vic_s, [i, i + 1])
        state[i] = -1 if (state[sup_s[lo:hi]] == 1).any() else 1
    return np.flatnonzero(state == 1)


def synthetic_raw_outputs(
    anchors: np.ndarray,
    num_classes: int,
    num_objects: int,
    image_size: tuple[int, int],
    seed: int = 0,
    background_logit: float = -6.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Detector-like raw outputs for tests and benchmarks (no model needed).

    Background logits ~ N(background_logit, 1.5); for each of ``num_objects`` random boxes (8-60 px)
    the anchors overlapping it (IoU > 0.25) get a high logit for its class and regressions pointing
    at it (plus noise), so NMS has realistic clusters to resolve.

    Returns ``(class_logits [A, C], box_regression [A, 4], gt_boxes, gt_labels)``.
    """
    from smearsight.anchors import box_iou, encode_boxes

    rng = np.random.default_rng(seed)
    a = anchors.shape[0]
    h, w = image_size
    logits = rng.normal(background_logit, 1.5, size=(a, num_classes)).astype(np.float32)
    deltas = rng.normal(0.0, 0.3, size=(a, 4)).astype(np.float32)
    sizes = rng.uniform(8, 60, size=(num_objects, 2))
    ctr = rng.uniform([0, 0], [w, h], size=(num_objects, 2))
    gt = np.concatenate([ctr - sizes / 2, ctr + sizes / 2], axis=1).astype(np.float32)
    labels = rng.integers(0, num_classes, size=num_objects)
    if num_objects:
        small = np.flatnonzero((anchors[:, 2] - anchors[:, 0]) <= 160)
        for start in range(0, num_objects, 64):
            g = gt[start : start + 64]
            iou = box_iou(g, anchors[small])
            gi, ai = np.nonzero(iou > 0.25)
            idx = small[ai]
            q = iou[gi, ai]
            logits[idx, labels[start + gi]] = (8.0 * q - 2.0 + rng.normal(0, 0.5, size=q.size)).astype(np.float32)
            deltas[idx] = encode_boxes(g[gi], anchors[idx]) + rng.normal(0, 0.05, size=(q.size, 4)).astype(
                np.float32
            )
    return logits, deltas, gt, labels
