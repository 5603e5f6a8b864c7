"""Torch twins of the NumPy box coding (smearsight.anchors) and of the runtime's decode_nms reference.

Tests check both against the NumPy originals. Decoding always runs in float32.
"""

from __future__ import annotations

import torch

from smearsight.anchors import BBOX_LOG_CLAMP


def to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    wh = b[..., 2:4] - b[..., 0:2]
    return torch.cat([b[..., 0:2] + 0.5 * wh, wh], dim=-1)


def to_xyxy(b: torch.Tensor) -> torch.Tensor:
    half = 0.5 * b[..., 2:4]
    return torch.cat([b[..., 0:2] - half, b[..., 0:2] + half], dim=-1)


def encode(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(dx, dy, dw, dh) of ``boxes`` relative to paired ``anchors`` (same as anchors.encode_boxes)."""
    b = to_cxcywh(boxes.float())
    a = to_cxcywh(anchors.float())
    return torch.cat([(b[..., :2] - a[..., :2]) / a[..., 2:], torch.log(b[..., 2:].clamp(min=1e-6) / a[..., 2:])], -1)


def decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode` in float32 with the shared BBOX_LOG_CLAMP (as anchors.decode_boxes)."""
    d = deltas.float()
    a = to_cxcywh(anchors.float())
    centre = a[..., :2] + d[..., :2] * a[..., 2:]
    size = a[..., 2:] * torch.exp(d[..., 2:].clamp(max=BBOX_LOG_CLAMP))
    return to_xyxy(torch.cat([centre, size], dim=-1))


def decode_nms(
    class_logits: torch.Tensor,
    box_regression: torch.Tensor,
    anchors: torch.Tensor,
    *,
    score_threshold: float,
    iou_threshold: float,
    pre_nms_topk: int,
    max_detections: int,
    image_size: tuple[int, int] | None = None,
    max_per_class: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Torch twin of ``smearsight.runtime.postprocess.decode_nms`` for one image.

    ``class_logits [A, C]``, ``box_regression [A, 4]``, ``anchors [A, 4]``. Returns a float32
    ``[max_detections, 6]`` tensor (x1, y1, x2, y2, score, class), unused rows (0, 0, 0, 0, 0, -1), and the count.
    ``max_per_class`` (evaluation only; the runtime has no such cap) keeps each class's best that many after
    NMS, as COCO's ``maxDets`` counts them, so that a crowded class cannot push a rarer one out of the list.
    """
    from torchvision.ops import batched_nms

    scores = torch.sigmoid(class_logits.float())
    num_anchors, num_classes = scores.shape
    cand_scores, cand_cls, cand_idx = [], [], []
    for c in range(num_classes):
        col = scores[:, c]
        idx = torch.nonzero(col > score_threshold).flatten()
        if idx.numel() == 0:
            continue
        # Highest score first; ties broken by lower anchor index (idx ascending + stable sort).
        order = torch.sort(-col[idx], stable=True).indices[:pre_nms_topk]
        idx = idx[order]
        cand_idx.append(idx)
        cand_scores.append(col[idx])
        cand_cls.append(torch.full_like(idx, c))
    out = torch.zeros((max_detections, 6), dtype=torch.float32, device=class_logits.device)
    out[:, 5] = -1
    if not cand_idx:
        return out, 0
    idx = torch.cat(cand_idx)
    sc = torch.cat(cand_scores)
    cl = torch.cat(cand_cls)
    boxes = decode(box_regression[idx], anchors[idx])
    if image_size is not None:
        h, w = image_size
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    keep = batched_nms(boxes, sc, cl, iou_threshold)
    boxes, sc, cl, idx = boxes[keep], sc[keep], cl[keep], idx[keep]
    # Final order: score desc, then class asc, then anchor index asc.
    key = cl * (num_anchors + 1) + idx
    order = torch.sort(key, stable=True).indices
    order = order[torch.sort(-sc[order], stable=True).indices]
    if max_per_class is not None:
        ordered_cls = cl[order]
        grouped = torch.sort(ordered_cls, stable=True).indices  # by class, best first within each
        counts = torch.bincount(ordered_cls, minlength=num_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(ordered_cls)
        rank[grouped] = torch.arange(grouped.numel(), device=rank.device) - starts[ordered_cls[grouped]]
        order = order[rank < max_per_class]
    order = order[:max_detections]
    n = int(order.numel())
    out[:n, :4] = boxes[order]
    out[:n, 4] = sc[order]
    out[:n, 5] = cl[order].float()
    return out, n
