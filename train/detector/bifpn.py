"""BiFPN with fast normalised fusion (EfficientDet), for any contiguous list of pyramid levels (P2 allowed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_act(name: str) -> nn.Module:
    return {"silu": nn.SiLU, "relu6": nn.ReLU6, "relu": nn.ReLU}[name](inplace=False)


def make_bn(channels: int) -> nn.BatchNorm2d:
    # PyTorch's default momentum (0.1): TF-style 0.01 leaves the running statistics far from the batch
    # statistics after the few hundred steps of a short CPU run, and eval-mode outputs collapse.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.1)


class SeparableConv(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 (or a plain 3x3 when ``separable`` is False)."""

    def __init__(self, cin: int, cout: int, separable: bool = True, bias: bool = True) -> None:
        super().__init__()
        if separable:
            self.dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
            self.pw = nn.Conv2d(cin, cout, 1, bias=bias)
        else:
            self.dw = nn.Identity()
            self.pw = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


def downsample(x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    out = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    if size is not None and tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out, size=size, mode="nearest")
    return out


class FastFusion(nn.Module):
    """out = conv(act(sum_i relu(w_i) x_i / (sum_i relu(w_i) + eps)))."""

    def __init__(self, n_inputs: int, channels: int, act: str, separable: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_inputs))
        self.act = make_act(act)
        self.conv = SeparableConv(channels, channels, separable, bias=False)
        self.bn = make_bn(channels)
        self.eps = 1e-4

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + self.eps)
        fused = inputs[0] * w[0]
        for i in range(1, len(inputs)):
            fused = fused + inputs[i] * w[i]
        return self.bn(self.conv(self.act(fused)))


class BiFPNLayer(nn.Module):
    """One top-down + bottom-up pass over ``n_levels`` same-width feature maps (finest first)."""

    def __init__(self, n_levels: int, channels: int, act: str, separable: bool) -> None:
        super().__init__()
        self.n = n_levels
        self.top_down = nn.ModuleList(FastFusion(2, channels, act, separable) for _ in range(n_levels - 1))
        self.bottom_up = nn.ModuleList(
            FastFusion(3 if i < n_levels - 1 else 2, channels, act, separable) for i in range(1, n_levels)
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        td: list[torch.Tensor] = [feats[-1]]
        for i in range(self.n - 2, -1, -1):
            up = F.interpolate(td[0], size=feats[i].shape[-2:], mode="nearest")
            td.insert(0, self.top_down[i]([feats[i], up]))
        outs = [td[0]]
        for i in range(1, self.n):
            down = downsample(outs[-1], tuple(feats[i].shape[-2:]))
            inputs = [feats[i], td[i], down] if i < self.n - 1 else [feats[i], down]
            outs.append(self.bottom_up[i - 1](inputs))
        return outs


class BiFPN(nn.Module):
    """Resample backbone features to ``channels``, add coarser levels by pooling, then ``repeats`` layers.

    ``in_channels`` lists the backbone feature widths for the levels it provides (finest first);
    ``n_levels`` >= len(in_channels) — extra levels come from the coarsest backbone map.
    """

    def __init__(
        self, in_channels: list[int], n_levels: int, channels: int, repeats: int, act: str, separable: bool
    ) -> None:
        super().__init__()
        self.n_backbone = len(in_channels)
        self.n_levels = n_levels
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), make_bn(channels)) for c in in_channels
        )
        self.layers = nn.Sequential(*[BiFPNLayer(n_levels, channels, act, separable) for _ in range(repeats)])

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = [lat(f) for lat, f in zip(self.lateral, feats, strict=True)]
        while len(outs) < self.n_levels:
            outs.append(downsample(outs[-1]))
        return self.layers(outs)
