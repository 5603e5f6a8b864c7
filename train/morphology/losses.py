"""Teacher-student discrepancy: per critical layer (1 - cosine over channels) + lambda * MSE.

The same function is the training loss (batch mean) and the anomaly score (per image). Written with
elementwise ops only, so that it exports to ONNX opset 17 unchanged.
"""

from __future__ import annotations

import torch

EPS = 1e-8
UNIT_EPS = 1e-4  # representable in float16 (1e-8 is not): a zero vector stays 0 instead of 0/0


def unit_channels(x: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its L2 norm over channels, computed without squaring large values.

    Scaling each position by its largest magnitude first keeps every intermediate within [-C, C], so an
    FP16 engine cannot overflow here (squared norms of raw activations reach 1e6 and more); the cosine
    is unchanged because it is invariant to positive scaling.
    """
    x = x / (x.abs().amax(dim=1, keepdim=True) + UNIT_EPS)
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + UNIT_EPS)


def layer_terms(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: mean (1 - cos) map [B,H,W], mean squared error [B], and (1 - cos) map itself."""
    cos_map = 1.0 - (unit_channels(teacher) * unit_channels(student)).sum(dim=1)
    mse = ((teacher - student) ** 2).mean(dim=(1, 2, 3))
    return cos_map.mean(dim=(1, 2)), mse, cos_map


def discrepancy(
    teacher_feats: list[torch.Tensor],
    student_feats: list[torch.Tensor],
    lambda_mse: float,
    layers: list[int] | None = None,
    reduce: str = "mean",
) -> torch.Tensor:
    """Per-image score [B] = sum over ``layers`` (positions in the lists) of (1 - cos) + lambda * MSE.

    ``reduce="mean"`` averages both terms over positions (the training loss); ``"max"`` takes the maximum
    over positions of the per-position (1 - cos) + lambda * squared error (for small, local defects).
    """
    chosen = range(len(teacher_feats)) if layers is None else layers
    total = None
    for index in chosen:
        t, s = teacher_feats[index], student_feats[index]
        if reduce == "max":
            cos_term, mse, cos_map = layer_terms(t, s)
            term = (cos_map + lambda_mse * ((t - s) ** 2).mean(dim=1)).flatten(1).amax(dim=1)
        else:
            cos_term, mse, _ = layer_terms(t, s)
            term = cos_term + lambda_mse * mse
        total = term if total is None else total + term
    assert total is not None
    return total


def centre_region(t: torch.Tensor) -> torch.Tensor:
    """The middle half (in height and width) of feature maps [B,C,H,W]; sides under 4 are kept whole."""
    h, w = t.shape[-2:]
    dh, dw = (h // 4 if h >= 4 else 0), (w // 4 if w >= 4 else 0)
    return t[..., dh : h - dh, dw : w - dw]


def discrepancy_features(
    teacher_feats: list[torch.Tensor], student_feats: list[torch.Tensor], layers: list[int], with_teacher: bool,
    with_centre: bool = False,
) -> torch.Tensor:
    """Feature vector per image for the supervised classifier.

    Per scoring layer: mean and max of the (1 - cos) map, the MSE, and the per-channel mean squared
    difference (C values); optionally the teacher's per-channel mean and max activation (2C values), and
    ``with_centre`` the same two over the middle of the map only (2C more: the cell sits in the middle of
    its crop, and pooling the whole map mixes in the background).
    """
    parts = []
    for index in layers:
        t, s = teacher_feats[index], student_feats[index]
        cos_mean, mse, cos_map = layer_terms(t, s)
        parts += [cos_mean[:, None], cos_map.flatten(1).amax(dim=1, keepdim=True), mse[:, None]]
        parts.append(((t - s) ** 2).mean(dim=(2, 3)))
        if with_teacher:
            parts += [t.mean(dim=(2, 3)), t.flatten(2).amax(dim=2)]
        if with_centre:
            middle = centre_region(t)
            parts += [middle.mean(dim=(2, 3)), middle.flatten(2).amax(dim=2)]
    return torch.cat(parts, dim=1)
