"""Anchor assignment for small cells (the original work's recipe).

1. IoU of every anchor with every ground-truth box; an anchor whose best IoU >= ``positive_iou`` is positive
   for that box, < ``negative_iou`` negative, in between ignored. Both thresholds are lowered (0.4 / 0.3 by
   default instead of 0.5 / 0.4) because a small box overlaps its neighbouring anchors weakly.
2. Each ground truth is force-matched to its best anchor, whatever the IoU (an 8 px cell is never lost).
3. At most K (default 20) positive anchors per ground truth enter the loss: the K with the highest IoU
   (``sampling="topk"``) or the forced one plus K-1 drawn at random (``"random"``); the others are ignored,
   so big boxes do not dominate the loss with hundreds of positives.
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
    from torchvision.ops import box_iou

    num_anchors = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((num_anchors,), NEGATIVE, dtype=torch.long, device=anchors.device)
    iou = box_iou(anchors.float(), gt_boxes.float())  # [A, G]
    best_iou, best_gt = iou.max(dim=1)
    assigned = torch.full((num_anchors,), IGNORE, dtype=torch.long, device=anchors.device)
    assigned[best_iou < cfg.negative_iou] = NEGATIVE
    positive = best_iou >= cfg.positive_iou
    assigned[positive] = best_gt[positive]
    forced = torch.zeros(num_anchors, dtype=torch.bool, device=anchors.device)
    if cfg.force_match:
        gt_best_anchor = iou.argmax(dim=0)  # [G]
        assigned[gt_best_anchor] = torch.arange(gt_boxes.shape[0], device=anchors.device)
        forced[gt_best_anchor] = True
    if cfg.topk is not None:
        pos_idx = torch.nonzero(assigned >= 0).flatten()
        gt_of = assigned[pos_idx]
        if cfg.sampling == "topk":
            value = iou[pos_idx, gt_of]
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
