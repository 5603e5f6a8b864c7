"""Frozen ImageNet teacher with selectable critical layers.

Gray input handling: for teachers whose normalisation is the same on every channel (EfficientNet-Lite,
mean = std = 0.5) the first conv is built with ``in_chans=1`` and its RGB weights summed (timm's convention).
That is exactly equivalent to replicating the gray crop into three channels (tested), at a third of the
first conv's cost, and keeps the graph single-channel. Teachers with per-channel ImageNet statistics (VGG16)
get the gray crop replicated to RGB and normalised per channel inside the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smearsight.errors import InputError
from smearsight.train.backbones import (
    backbone_normalization,
    create_backbone,
    load_weights_into,
    read_weights_file,
)
from smearsight.train.morphology.config import VGG_TEACHERS, TeacherConfig

CROP_SIZE = 64
INPUT_MEAN = 0.5  # the morphology graph's input normalisation: x = (pixel/255 - 0.5) / 0.5
INPUT_STD = 0.5
VGG_POOL_INDEX = {"vgg16": [4, 9, 16, 23, 30], "vgg16_bn": [6, 13, 23, 33, 43]}


class VGGFeatures(nn.Module):
    """torchvision VGG16 ``features`` truncated after the last requested pool; returns pool outputs."""

    def __init__(self, name: str, layers: list[int]) -> None:
        super().__init__()
        import torchvision

        build = torchvision.models.vgg16_bn if name == "vgg16_bn" else torchvision.models.vgg16
        pools = VGG_POOL_INDEX[name]
        self.out_positions = [pools[layer - 1] for layer in layers]
        self.features = build(weights=None).features[: self.out_positions[-1] + 1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for position, module in enumerate(self.features):
            x = module(x)
            if position in self.out_positions:
                outputs.append(x)
        return outputs


def _truncate_efficientnet(body: nn.Module) -> None:
    """Drop EfficientNet blocks after the deepest requested feature (timm builds them all)."""
    stages = getattr(body, "_stage_out_idx", None)
    if stages and getattr(body, "feature_hooks", "x") is None and hasattr(body, "blocks"):
        body.blocks = body.blocks[: max(stages)]
        for name in ("conv_head", "bn2"):
            if hasattr(body, name):
                setattr(body, name, nn.Identity())


class Teacher(nn.Module):
    """Frozen feature extractor: gray [B,1,64,64] (graph normalisation) -> critical-layer features."""

    def __init__(self, cfg: TeacherConfig, body: nn.Module, in_chans: int, mean: list[float], std: list[float]):
        super().__init__()
        self.cfg = cfg
        self.body = body
        self.in_chans = in_chans
        # pixel = x * INPUT_STD + INPUT_MEAN; teacher input = (pixel - mean) / std, folded into one affine.
        mean_t = torch.tensor(mean[:in_chans], dtype=torch.float32).view(1, in_chans, 1, 1)
        std_t = torch.tensor(std[:in_chans], dtype=torch.float32).view(1, in_chans, 1, 1)
        self.register_buffer("in_scale", INPUT_STD / std_t, persistent=False)
        self.register_buffer("in_shift", (INPUT_MEAN - mean_t) / std_t, persistent=False)
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:  # always frozen (BN statistics stay ImageNet's)
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        x = x * self.in_scale + self.in_shift
        size = self.cfg.input_size
        if size != CROP_SIZE:  # static: the graph input is always 64x64
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return list(self.body(x))


def build_teacher(cfg: TeacherConfig, load_weights: bool = True) -> Teacher:
    """Build the teacher; ``load_weights=False`` skips weights (a checkpoint's state dict will fill them)."""
    weights: bool | str | Path
    if not load_weights or cfg.weights == "none":
        weights = False
    elif cfg.weights == "bundled":
        if cfg.name in VGG_TEACHERS:
            raise InputError(f"teacher.weights: {cfg.name} has no bundled weights; give a weights file path")
        weights = True
    else:
        weights = Path(cfg.weights)
    mean, std = backbone_normalization(cfg.name)
    uniform = len(set(mean)) == 1 and len(set(std)) == 1
    if cfg.name in VGG_TEACHERS:
        body: Any = VGGFeatures(cfg.name, cfg.layers)
        if weights:
            state = read_weights_file(weights)
            state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()}
            load_weights_into(body.features, state, str(weights))
        in_chans = 3
    else:
        in_chans = 1 if uniform else 3
        body = create_backbone(cfg.name, pretrained=weights, out_indices=tuple(cfg.layers), in_chans=in_chans)
        _truncate_efficientnet(body)
    return Teacher(cfg, body, in_chans, mean, std)


def feature_shapes(teacher: nn.Module, crop_size: int = 64) -> list[tuple[int, int, int]]:
    """(C, H, W) of each critical layer for a crop_size x crop_size gray input."""
    with torch.no_grad():
        feats = teacher(torch.zeros(1, 1, crop_size, crop_size))
    return [tuple(f.shape[1:]) for f in feats]  # type: ignore[misc]
