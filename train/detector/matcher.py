"""Anchor assignment for small cells (the original work's recipe).

1. IoU of every anchor with every ground-truth box; an anchor whose best IoU >= ``positive_iou`` is positive
   for that box, < ``negative_iou`` negative, in between ignored. Both thresholds are lowered (0.4 / 0.3 by
   default instead of 0.5 / 0.4) because a small box overlaps its neighbouring anchors weakly.
2. Each ground truth is force-matched to its best anchor, whatever the IoU (an 8 px cell is never lost). Boxes
   whose best anchor is the same one (two small cells side by side) are not left to overwrite each other: the
   one with the higher IoU keeps it (the lower index on ties), the others take their best anchor not yet
   forced. A box that overlaps no anchor at all (off the canvas) is not forced anywhere.
3. At most K (default 20) positive anchors per ground truth enter the loss: the K with the highest IoU
   (``sampling="topk"``) or the forced one plus K-1 drawn at random (``"random"``); the others are ignored,
   so big boxes do not dominate the loss with hundreds of positives.

Dense fields hold hundreds of cells against ~10^5 anchors: the IoU is computed in chunks of consecutive
anchors (which the anchor layout keeps spatially close), each against only the boxes that reach the
chunk's extent, instead of one [A, G] matrix (145k anchors x 340 boxes took ~6 s an image that way). The
result is identical to the dense computation (tests/train/test_detector_core.py compares them).
"""

from __future__ import annotations

import torch

from smearsight.train.detector.config import MatcherConfig

NEGATIVE = -1
IGNORE = -2


def match_anchors(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    cfg: MatcherConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``[A]`` int64: the matched ground-truth index (>= 0), NEGATIVE (-1) or IGNORE (-2)."""
    num_anchors = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((num_anchors,), NEGATIVE, dtype=torch.long, device=anchors.device)
    anchors, gt_boxes = anchors.float(), gt_boxes.float()
    best_iou, best_gt, gt_best_anchor, gt_best_iou = best_overlaps(anchors, gt_boxes, with_gt_iou=True)
    assigned = torch.full((num_anchors,), IGNORE, dtype=torch.long, device=anchors.device)
    assigned[best_iou < cfg.negative_iou] = NEGATIVE
    positive = best_iou >= cfg.positive_iou
    assigned[positive] = best_gt[positive]
    forced = torch.zeros(num_anchors, dtype=torch.bool, device=anchors.device)
    if cfg.force_match:
        chosen = forced_anchors(anchors, gt_boxes, gt_best_anchor, gt_best_iou)
        ok = chosen >= 0
        assigned[chosen[ok]] = torch.nonzero(ok).flatten()
        forced[chosen[ok]] = True
    if cfg.topk is not None:
        pos_idx = torch.nonzero(assigned >= 0).flatten()
        gt_of = assigned[pos_idx]
        if cfg.sampling == "topk":
            value = paired_iou(anchors[pos_idx], gt_boxes[gt_of])
        else:
            value = torch.rand(pos_idx.numel(), generator=generator, device="cpu").to(anchors.device)
        value = torch.where(forced[pos_idx], torch.full_like(value, float("inf")), value)
        order = torch.sort(-value, stable=True).indices
        order = order[torch.sort(gt_of[order], stable=True).indices]  # grouped by GT, best first
        sorted_gt = gt_of[order]
        counts = torch.bincount(sorted_gt, minlength=gt_boxes.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=anchors.device) - starts[sorted_gt]
        dropped = pos_idx[order[rank >= cfg.topk]]
        assigned[dropped] = IGNORE
    return assigned


def forced_anchors(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, best_anchor: torch.Tensor, best_iou: torch.Tensor
) -> torch.Tensor:
    """``[G]`` distinct forced anchor per box (-1: the box overlaps no anchor that is still free).

    Each box gets its best anchor; where several share one, the box with the higher IoU (lower index on
    ties) keeps it and the others, best first, take their best anchor that no box holds yet."""
    from torchvision.ops import box_iou

    chosen = torch.where(best_iou > 0, best_anchor, torch.full_like(best_anchor, -1))
    by_iou = torch.sort(-best_iou, stable=True).indices
    by_anchor = by_iou[torch.sort(chosen[by_iou], stable=True).indices]  # grouped by anchor, best box first
    shared = torch.zeros_like(chosen, dtype=torch.bool)
    grouped = chosen[by_anchor]
    shared[by_anchor[1:]] = (grouped[1:] == grouped[:-1]) & (grouped[1:] >= 0)
    if not shared.any():
        return chosen
    taken = torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    taken[chosen[~shared & (chosen >= 0)]] = True
    for g in by_iou[shared[by_iou]].tolist():  # tens of boxes in a dense field: one IoU column each
        iou = box_iou(anchors, gt_boxes[g : g + 1])[:, 0].masked_fill(taken, -1.0)
        value, anchor = iou.max(dim=0)
        if value > 0:
            chosen[g] = anchor
            taken[anchor] = True
        else:
            chosen[g] = -1
    return chosen


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of row i of ``a`` with row i of ``b`` ([N, 4] each), the same float32 operations as
    torchvision's ``box_iou`` (so the values match its matrix entries bit for bit)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area_a + area_b - inter)


def best_overlaps(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, chunk: int = 4096, with_gt_iou: bool = False
) -> tuple[torch.Tensor, ...]:
    """(best IoU per anchor [A], its box index [A], best anchor per box [G]) as ``box_iou(anchors, gt)``'s
    ``max(dim=1)`` and ``argmax(dim=0)`` would give them (first index on ties), without the [A, G] matrix;
    ``with_gt_iou`` adds the best IoU per box [G]."""
    from torchvision.ops import box_iou

    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    device = anchors.device
    best_iou = torch.zeros(num_anchors, device=device)
    best_gt = torch.zeros(num_anchors, dtype=torch.long, device=device)
    gt_best = torch.zeros(num_gt, device=device)  # an all-zero column's argmax is anchor 0, as with the matrix
    gt_best_anchor = torch.zeros(num_gt, dtype=torch.long, device=device)
    for start in range(0, num_anchors, chunk):
        block = anchors[start : start + chunk]
        lo, hi = block[:, :2].amin(dim=0), block[:, 2:].amax(dim=0)
        reach = ((gt_boxes[:, 2:] > lo) & (gt_boxes[:, :2] < hi)).all(dim=1)  # boxes touching the chunk
        near = torch.nonzero(reach).flatten()
        if near.numel() == 0:
            continue
        iou = box_iou(block, gt_boxes[near])
        value, column = iou.max(dim=1)
        best_iou[start : start + len(block)] = value
        best_gt[start : start + len(block)] = torch.where(value > 0, near[column], 0)
        top, row = iou.max(dim=0)
        better = top > gt_best[near]
        gt_best[near[better]] = top[better]
        gt_best_anchor[near[better]] = start + row[better]
    return (best_iou, best_gt, gt_best_anchor, gt_best) if with_gt_iou else (best_iou, best_gt, gt_best_anchor)
