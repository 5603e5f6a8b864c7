"""Gradient localisation maps (vanilla gradient and SmoothGrad) of the anomaly score, as overlay PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smearsight.fileio import atomic_write_bytes


def gradient_map(model: Any, x: Any) -> np.ndarray:
    """|d score / d input| per pixel: [B,64,64] float32 (model in eval mode)."""
    import torch

    model.eval()
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    return grad.abs()[:, 0].numpy()


def smoothgrad_map(model: Any, x: Any, samples: int = 16, sigma: float = 0.15, seed: int = 0) -> np.ndarray:
    """SmoothGrad: |mean of the input gradients over noisy copies|, sigma relative to the input range."""
    import torch

    model.eval()
    generator = torch.Generator().manual_seed(seed)
    scale = sigma * float(x.max() - x.min()) if x.numel() else 0.0
    total = torch.zeros_like(x)
    for _ in range(samples):
        noisy = (x.detach() + scale * torch.randn(x.shape, generator=generator)).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(noisy).sum(), noisy)
        total += grad
    return (total / samples).abs()[:, 0].numpy()


def overlay(crop: np.ndarray, heat: np.ndarray, scale: int = 4, alpha: float = 0.5) -> np.ndarray:
    """Gray crop [H,W] uint8 + heat map [H,W] -> BGR uint8 image (upscaled) with a JET overlay."""
    import cv2

    heat = heat.astype(np.float32)
    span = float(heat.max() - heat.min())
    norm = ((heat - heat.min()) / span * 255.0) if span > 0 else np.zeros_like(heat)
    size = (crop.shape[1] * scale, crop.shape[0] * scale)
    base = cv2.cvtColor(cv2.resize(crop, size, interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
    colour = cv2.applyColorMap(cv2.resize(norm.astype(np.uint8), size, interpolation=cv2.INTER_LINEAR),
                               cv2.COLORMAP_JET)
    return cv2.addWeighted(base, 1.0 - alpha, colour, alpha, 0.0)


def write_localisation_panels(
    model: Any, crops: np.ndarray, names: list[str], out_dir: str | Path, captions: list[str] | None = None
) -> list[Path]:
    """For each crop write ``<name>.png``: crop | vanilla-gradient overlay | SmoothGrad overlay."""
    import cv2
    import torch

    from smearsight.train.morphology.data import to_tensor_input

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.from_numpy(to_tensor_input(crops))
    vanilla = gradient_map(model, x)
    smooth = smoothgrad_map(model, x)
    written = []
    for i, name in enumerate(names):
        plain = cv2.cvtColor(cv2.resize(crops[i], (256, 256), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
        panel = np.concatenate([plain, overlay(crops[i], vanilla[i]), overlay(crops[i], smooth[i])], axis=1)
        if captions:
            cv2.putText(panel, captions[i], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        ok, encoded = cv2.imencode(".png", panel)
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {name}")
        written.append(atomic_write_bytes(out / f"{name}.png", encoded.tobytes()))
    return written
