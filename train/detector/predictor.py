"""Prediction wrapper (effdet style): letterbox/padding, the network, decode + NMS, boxes mapped back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from smearsight.anchors import AnchorConfig
from smearsight.manifest import DEFAULT_PRE_NMS_TOPK
from smearsight.runtime.postprocess import to_frame_pixels
from smearsight.train.detector.augment import letterbox
from smearsight.train.detector.boxes import decode_nms
from smearsight.train.detector.data import fit_scale, round_up
from smearsight.train.detector.train_model import AnchorCache


class Predictor:
    """Runs a detector network on RGB frames of any size.

    ``resize="letterbox"`` (default) scales each frame to fit the checkpoint's input size, as in training;
    ``resize="pad"`` keeps native resolution and pads bottom/right up to a multiple of the largest stride
    (640x480 -> 640x512 for P7). Either way boxes come back in the original frame's pixels.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        anchors: AnchorConfig,
        image_size: tuple[int, int],
        mean: list[float],
        std: list[float],
        *,
        score_threshold: float = 0.3,
        iou_threshold: float = 0.5,
        pre_nms_topk: int = DEFAULT_PRE_NMS_TOPK,
        max_detections: int = 1000,
        max_per_class: int | None = None,
        resize: str = "letterbox",
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.anchor_cfg = anchors
        self.anchors = AnchorCache(anchors)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.mean = np.asarray(mean, np.float32) * 255.0
        self.std = np.asarray(std, np.float32) * 255.0
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.pre_nms_topk = pre_nms_topk
        self.max_detections = max_detections
        self.max_per_class = max_per_class
        if resize not in ("letterbox", "pad"):
            raise ValueError(f"resize must be 'letterbox' or 'pad', got {resize!r}")
        self.resize = resize
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], **overrides: Any) -> Predictor:
        from smearsight.train.detector.torch_model import build_from_checkpoint

        th = ckpt["thresholds"]
        kwargs: dict[str, Any] = {
            "score_threshold": th["score"],
            "iou_threshold": th["iou"],
            "pre_nms_topk": th["pre_nms_topk"],
            "max_detections": th["max_detections"],
        }
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        norm = ckpt["normalization"]
        return cls(
            build_from_checkpoint(ckpt),
            AnchorConfig(**ckpt["anchors"]),
            tuple(ckpt["image_size"]),
            norm["mean"],
            norm["std"],
            **kwargs,
        )

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        """Canvas (uint8) and the (x, y) scales from frame pixels to canvas pixels (the resized size's)."""
        h, w = image.shape[:2]
        empty = np.zeros((0, 4), np.float32)
        if self.resize == "letterbox":
            scale = fit_scale(h, w, self.image_size)
            canvas, _ = letterbox(image, empty, self.image_size, scale)
            return canvas, (max(1, round(w * scale)) / w, max(1, round(h * scale)) / h)
        stride = self.anchor_cfg.max_stride
        canvas, _ = letterbox(image, empty, (round_up(h, stride), round_up(w, stride)), 1.0)
        return canvas, (1.0, 1.0)

    @torch.no_grad()
    def predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Detections ``[K, 6]`` (x1, y1, x2, y2, score, class) per RGB frame, in frame pixels."""
        prepared = [self.prepare(img) for img in images]
        shapes = {c.shape for c, _ in prepared}
        results: list[np.ndarray] = []
        groups = [prepared] if len(shapes) == 1 else [[p] for p in prepared]
        for group in groups:
            x = np.stack([(c.astype(np.float32) - self.mean) / self.std for c, _ in group]).transpose(0, 3, 1, 2)
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device).contiguous(memory_format=torch.channels_last)
            logits, deltas = self.model(xt)
            anchors = self.anchors.get(tuple(xt.shape[-2:]), self.device)
            for i in range(len(group)):
                dets, n = decode_nms(
                    logits[i], deltas[i], anchors,
                    score_threshold=self.score_threshold, iou_threshold=self.iou_threshold,
                    pre_nms_topk=self.pre_nms_topk, max_detections=self.max_detections,
                    image_size=tuple(xt.shape[-2:]), max_per_class=self.max_per_class,
                )
                results.append(dets[:n].cpu().numpy())
        out = []
        for (_, scale), img, det in zip(prepared, images, results, strict=True):  # the frame sits top-left
            frame, kept = to_frame_pixels(det, len(det), scale=scale, offset=(0.0, 0.0), frame_size=img.shape[:2])
            out.append(frame[:kept])
        return out

    def predict_files(self, paths: list[Path], batch_size: int = 4) -> list[np.ndarray]:
        from smearsight.train.datasets.images import read_image_rgb

        out: list[np.ndarray] = []
        for i in range(0, len(paths), batch_size):
            out.extend(self.predict_batch([read_image_rgb(p) for p in paths[i : i + batch_size]]))
        return out
