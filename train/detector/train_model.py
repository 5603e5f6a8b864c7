"""Training wrapper (effdet style): the network plus anchor labelling and the loss."""

from __future__ import annotations

import torch
from torch import nn

from smearsight.anchors import AnchorConfig, generate_anchors
from smearsight.train.detector.config import LossConfig, MatcherConfig
from smearsight.train.detector.loss import detection_loss
from smearsight.train.detector.matcher import match_anchors


class AnchorCache:
    """Anchors per (H, W, device), generated once by the NumPy single source of truth."""

    def __init__(self, cfg: AnchorConfig) -> None:
        self.cfg = cfg
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def get(self, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        key = (int(size[0]), int(size[1]), str(device))
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(generate_anchors((key[0], key[1]), self.cfg)).to(device)
        return self._cache[key]


class DetectorTrainWrapper(nn.Module):
    """``forward(images, boxes, labels)`` -> loss dict; boxes/labels are per-image lists in input pixels."""

    def __init__(
        self, model: nn.Module, anchors: AnchorConfig, matcher: MatcherConfig, loss: LossConfig, seed: int = 0
    ) -> None:
        super().__init__()
        self.model = model
        self.anchors = AnchorCache(anchors)
        self.matcher_cfg = matcher
        self.loss_cfg = loss
        self.generator = torch.Generator().manual_seed(seed)

    def forward(
        self, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        class_logits, box_regression = self.model(images)
        anchors = self.anchors.get(tuple(images.shape[-2:]), images.device)
        with torch.no_grad():
            assigned = torch.stack([match_anchors(anchors, b, self.matcher_cfg, self.generator) for b in boxes])
        return detection_loss(class_logits, box_regression, anchors, assigned, boxes, labels, self.loss_cfg)
