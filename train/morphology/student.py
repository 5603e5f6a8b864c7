"""Compact VGG-like student (conv-BN-ReLU stages, max-pool between stages) with one head per critical layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from smearsight.errors import InputError
from smearsight.train.morphology.config import StudentConfig


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Student(nn.Module):
    """Maps a gray 64x64 crop to tensors shaped like the teacher's critical-layer features.

    Stage k (k >= 1) halves the resolution; a critical layer of spatial size S is read from the stage
    at resolution S and projected to the teacher's channel count by a small conv head.
    """

    def __init__(self, cfg: StudentConfig, targets: list[tuple[int, int, int]], crop_size: int = 64) -> None:
        super().__init__()
        self.taps: list[int] = []
        for _channels, height, width in targets:
            if height != width or crop_size % height or not math.log2(crop_size // height).is_integer():
                raise InputError(
                    f"student: teacher feature size {height}x{width} is not 64/2^k; change teacher.input_size"
                )
            stage = int(math.log2(crop_size // height))
            if stage >= len(cfg.widths):
                raise InputError(f"student.widths: needs {stage + 1} stages to reach {height}x{width} features")
            self.taps.append(stage)
        self.last_stage = max(self.taps)
        self.stages = nn.ModuleList()
        cin = 1
        for k, width in enumerate(cfg.widths[: self.last_stage + 1]):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if k > 0 else []
            for _ in range(cfg.convs_per_stage):
                layers += _conv_bn_relu(cin, width)
                cin = width
            self.stages.append(nn.Sequential(*layers))
        pad = cfg.head_kernel // 2
        self.heads = nn.ModuleList(
            nn.Conv2d(cfg.widths[tap], channels, cfg.head_kernel, padding=pad)
            for tap, (channels, _h, _w) in zip(self.taps, targets, strict=True)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        per_stage = []
        for stage in self.stages:
            x = stage(x)
            per_stage.append(x)
        return [head(per_stage[tap]) for head, tap in zip(self.heads, self.taps, strict=True)]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs (multiply-adds counted as 2) with PyTorch's own FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()  # a train-mode pass would update BatchNorm running statistics
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            module(example)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())
