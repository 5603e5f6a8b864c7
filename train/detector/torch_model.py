"""The exportable EfficientDet network: backbone + BiFPN + class/box heads shared across levels.

The network never knows whether it is training or predicting (effdet style): ``forward`` returns raw
per-anchor ``class_logits [B, A, C]`` and ``box_regression [B, A, 4]`` in the anchor order of
:func:`smearsight.anchors.generate_anchors` (level, y, x, shape). Training adds anchor labelling + loss
(:mod:`.train_model`); prediction adds padding, decode and NMS (:mod:`.predictor`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from smearsight.anchors import AnchorConfig
from smearsight.errors import InputError
from smearsight.train.detector.bifpn import BiFPN, SeparableConv, make_act, make_bn
from smearsight.train.detector.config import DetectorModelConfig, levels_problem


class HeadNet(nn.Module):
    """Conv tower whose convolutions are shared by every level; BatchNorm is kept per level."""

    def __init__(self, cfg: DetectorModelConfig, n_levels: int, outputs_per_anchor: int, bias_init: float) -> None:
        super().__init__()
        ch = cfg.fpn_channels
        self.outputs_per_anchor = outputs_per_anchor
        self.convs = nn.ModuleList(SeparableConv(ch, ch, cfg.separable, bias=False) for _ in range(cfg.head_repeats))
        self.bns = nn.ModuleList(
            nn.ModuleList(make_bn(ch) for _ in range(cfg.head_repeats)) for _ in range(n_levels)
        )
        self.act = make_act(cfg.act)
        self.predict = SeparableConv(ch, cfg.anchors_per_location * outputs_per_anchor, cfg.separable, bias=True)
        nn.init.constant_(self.predict.pw.bias, bias_init)
        nn.init.normal_(self.predict.pw.weight, std=0.01)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        outs = []
        for level, x in enumerate(feats):
            for conv, bn in zip(self.convs, self.bns[level], strict=True):
                x = self.act(bn(conv(x)))
            x = self.predict(x)  # [B, A_loc*K, H, W]
            b = x.shape[0]
            outs.append(x.permute(0, 2, 3, 1).reshape(b, -1, self.outputs_per_anchor))
        return torch.cat(outs, dim=1)


class EfficientDet(nn.Module):
    """EfficientNet backbone (timm features) + BiFPN + shared heads; ``forward`` -> (class_logits, box_regression)."""

    def __init__(self, cfg: DetectorModelConfig, pretrained: bool | str = False) -> None:
        super().__init__()
        from smearsight.train.backbones import create_backbone

        levels = list(cfg.levels)
        problem = levels_problem(levels)
        if problem:
            raise InputError(f"model_config: {problem}")
        backbone_levels = [lvl for lvl in levels if lvl <= 5]
        self.config = cfg
        self.backbone = create_backbone(
            cfg.backbone, pretrained=pretrained, out_indices=tuple(lvl - 1 for lvl in backbone_levels)
        )
        reductions = list(self.backbone.feature_info.reduction())
        if reductions != [2**lvl for lvl in backbone_levels]:
            raise InputError(f"backbone {cfg.backbone!r}: feature strides {reductions} do not match levels {levels}")
        self.fpn = BiFPN(
            list(self.backbone.feature_info.channels()),
            len(levels),
            cfg.fpn_channels,
            cfg.fpn_repeats,
            cfg.act,
            cfg.separable,
        )
        prior = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        self.class_net = HeadNet(cfg, len(levels), cfg.num_classes, prior)
        self.box_net = HeadNet(cfg, len(levels), 4, 0.0)

    @property
    def max_stride(self) -> int:
        return 2 ** self.config.levels[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.fpn(self.backbone(x))
        return self.class_net(feats), self.box_net(feats)


def model_config_for(
    variant: str,
    num_classes: int,
    levels: list[int],
    anchors_per_location: int,
    backbone: str | None = None,
) -> DetectorModelConfig:
    """The model config of a registered ``variant`` for a class count and anchor layout."""
    from smearsight.train.detector.registry import variant_settings

    s = variant_settings(variant)
    return DetectorModelConfig(
        variant=variant,
        backbone=backbone or s["backbone"],
        num_classes=num_classes,
        levels=list(levels),
        anchors_per_location=anchors_per_location,
        fpn_channels=s["fpn_channels"],
        fpn_repeats=s["fpn_repeats"],
        head_repeats=s["head_repeats"],
        act=s["act"],
    )


def build_from_config(cfg: DetectorModelConfig | dict[str, Any], pretrained: bool | str = False) -> EfficientDet:
    """Build the network from its config (``pretrained`` is passed to ``create_backbone``)."""
    if isinstance(cfg, dict):
        cfg = DetectorModelConfig.from_dict(cfg, source="model_config")
    return EfficientDet(cfg, pretrained=pretrained)


def build_from_checkpoint(ckpt: dict[str, Any]) -> EfficientDet:
    """Rebuild the exportable network from a detector checkpoint dict, weights loaded, in eval mode.

    ``forward(x [B,3,H,W] normalised)`` returns ``(class_logits [B,A,C], box_regression [B,A,4])`` in the
    anchor order of ``generate_anchors((H, W), AnchorConfig(**ckpt["anchors"]))``.
    """
    if ckpt.get("kind") != "detector":
        raise InputError(f"checkpoint: is a {ckpt.get('kind')!r} checkpoint, expected a detector checkpoint")
    cfg = DetectorModelConfig.from_dict(ckpt["model_config"], source="checkpoint model_config")
    anchors = ckpt["anchors"]
    if list(anchors["levels"]) != list(cfg.levels):
        raise InputError(f"checkpoint: anchor levels {anchors['levels']} differ from model levels {cfg.levels}")
    shapes = AnchorConfig.from_dict(anchors, source="checkpoint anchors").anchors_per_location
    if shapes != cfg.anchors_per_location:
        raise InputError(f"checkpoint: anchors have {shapes} shapes a location but the model's heads "
                         f"{cfg.anchors_per_location}")
    model = EfficientDet(cfg, pretrained=False)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise InputError(f"checkpoint: weights do not fit the model config ({str(exc).splitlines()[0]})") from None
    return model.eval()
