"""Detector configuration: the model (what gets exported) apart from the training recipe (how it is trained)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from smearsight.anchors import AnchorConfig
from smearsight.config import StrictConfig
from smearsight.manifest import DEFAULT_PRE_NMS_TOPK


def default_detector_anchors() -> AnchorConfig:
    """Default anchors for TPS cells of 8-64 px in a 768x1024 frame.

    P2-P6 with base sizes 8/16/32/64/128 px (two octave scales, three ratios): an 8 px cell meets an 8 px
    anchor on the stride-4 grid at IoU >= 0.5, unlike the usual P3-P7 layout whose smallest anchor is 32 px
    (IoU 0.06 for an 8 px box). ``smearsight data anchors`` reports the coverage per size bucket.
    """
    return AnchorConfig(
        levels=[2, 3, 4, 5, 6],
        base_sizes=[8.0, 16.0, 32.0, 64.0, 128.0],
        scales=[1.0, 2**0.5],
        aspect_ratios=[0.5, 1.0, 2.0],
    )


def levels_problem(levels: list[int]) -> str | None:
    """Why the EfficientDet network cannot have these pyramid levels (None when it can): they must be
    contiguous, the finest one a backbone stage (P1..P5); coarser ones come from pooling."""
    if list(levels) != list(range(levels[0], levels[-1] + 1)):
        return f"levels must be contiguous, got {list(levels)}"
    if not 1 <= levels[0] <= 5:
        return f"the finest level must be 1..5, got P{levels[0]}"
    return None


class DetectorModelConfig(StrictConfig):
    """The network: rebuilt from a checkpoint's ``model_config`` by :func:`torch_model.build_from_config`."""

    variant: str = "efficientdet_lite0"
    backbone: str = "tf_efficientnet_lite0"
    num_classes: int = Field(6, ge=1)
    levels: list[int] = Field(default_factory=lambda: [3, 4, 5, 6, 7])
    anchors_per_location: int = Field(9, ge=1)
    fpn_channels: int = Field(64, ge=4)
    fpn_repeats: int = Field(3, ge=1)
    head_repeats: int = Field(3, ge=1)
    act: Literal["silu", "relu6", "relu"] = "silu"
    separable: bool = True
    prior_prob: float = Field(0.01, gt=0, lt=1)


DEFAULT_MATCHER_TOPK = 20
MIN_IMAGE_SIDE = 32  # px: the model input's smallest height or width


class MatcherConfig(StrictConfig):
    """Anchor assignment as in the original work: lowered IoU thresholds, forced best anchor, K per GT."""

    positive_iou: float = Field(0.4, gt=0, le=1)
    negative_iou: float = Field(0.3, ge=0, le=1)
    force_match: bool = True
    topk: int | None = Field(DEFAULT_MATCHER_TOPK, ge=1)
    sampling: Literal["topk", "random"] = "topk"

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> MatcherConfig:
        if self.negative_iou > self.positive_iou:
            raise ValueError(
                f"negative_iou {self.negative_iou} must not exceed positive_iou {self.positive_iou}"
            )
        return self


class LossConfig(StrictConfig):
    """Sigmoid focal loss + Huber on encoded deltas + GIoU on decoded boxes (see loss.py)."""

    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(1.5, ge=0)
    huber_delta: float = Field(0.1, gt=0)
    box_weight: float = Field(50.0, ge=0)
    giou_weight: float = Field(1.0, ge=0)


class AugmentConfig(StrictConfig):
    """Microscopy augmentation: probabilities (``hflip`` ... ``rot90``, ``color``, ``blur``, ``noise``, ``mosaic``)
    and ranges (a scale in ``[scale_min, scale_max]``; ``hue`` a fraction of the hue circle either way; the
    others a relative change either way)."""

    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rot90: float = Field(0.25, ge=0, le=1)
    scale_min: float = Field(0.75, gt=0)
    scale_max: float = Field(1.25, gt=0)
    color: float = Field(0.8, ge=0, le=1)
    hue: float = Field(0.04, ge=0, le=0.5)
    saturation: float = Field(0.3, ge=0, le=1)
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    stain: float = Field(0.08, ge=0, le=1)
    blur: float = Field(0.2, ge=0, le=1)
    noise: float = Field(0.1, ge=0, le=1)
    mosaic: float = Field(0.0, ge=0, le=1)  # probability of a four-image mosaic (augment.mosaic_transform)
    min_visible: float = Field(0.4, gt=0, le=1)  # a box cut by the canvas stays a box with this share visible

    @model_validator(mode="after")
    def _scale_range(self) -> AugmentConfig:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min {self.scale_min} must not exceed scale_max {self.scale_max}")
        return self


class TrainConfig(StrictConfig):
    """The training recipe. ``anchors: auto`` picks the anchor layout from the training boxes."""

    variant: str = "efficientdet_lite0"
    backbone: str | None = None
    pretrained: bool = True
    backbone_weights: str | None = None
    # [H, W]; None = the variant's default (rounded to max stride)
    image_size: list[Annotated[int, Field(ge=MIN_IMAGE_SIDE)]] | None = Field(None, min_length=2, max_length=2)
    anchors: AnchorConfig | Literal["auto", "default"] = "auto"
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    backbone_lr_mult: float = Field(0.5, gt=0)
    freeze_stages: int = Field(3, ge=0)  # pretrained backbones only: stem + first N stages stay frozen (BN too)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.02, ge=0, le=1)
    time_budget_min: float | None = Field(40.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(10.0, gt=0)
    amp: bool = True
    eval_every: int = Field(2, ge=1)
    workers: int = Field(0, ge=0)
    seed: int = Field(0, ge=0, lt=2**32)  # NumPy's seeding takes 0..2**32-1
    threads: int | None = Field(None, ge=0)  # None or 0: torch's default
    matcher: MatcherConfig = Field(default_factory=MatcherConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    score_threshold: float = Field(0.3, ge=0, lt=1)
    eval_score_threshold: float = Field(0.01, ge=0, lt=1)
    iou_threshold: float = Field(0.5, gt=0, le=1)
    pre_nms_topk: int = Field(DEFAULT_PRE_NMS_TOPK, ge=1)
    eval_pre_nms_topk: int | None = Field(None, ge=1)
    max_detections: int = Field(1000, ge=1)

    @field_validator("anchors")
    @classmethod
    def _levels_fit_the_network(cls, value: AnchorConfig | str) -> AnchorConfig | str:
        problem = levels_problem(value.levels) if isinstance(value, AnchorConfig) else None
        if problem:
            raise ValueError(problem)
        return value

    def evaluation_caps(self, num_classes: int) -> dict[str, int]:
        """Predictor caps for the validation passes (see :func:`evaluation_caps`)."""
        return evaluation_caps(self.pre_nms_topk, self.matcher.topk, self.max_detections, num_classes,
                               self.eval_pre_nms_topk)


def evaluation_caps(
    pre_nms_topk: int, matcher_topk: int | None, max_dets: int, num_classes: int, override: int | None = None
) -> dict[str, int]:
    """The predictor's caps when scoring AP down to a low score: ``{"pre_nms_topk", "max_detections",
    "max_per_class"}``.

    Candidates per class before NMS: ``override`` if given, else room for ``max_dets`` cells with the
    ``matcher_topk`` anchors each that training made positive (at least ``pre_nms_topk``, the device's cap,
    which suits its operating threshold: at a score of 0.01 a trained model puts dozens of anchors on every
    cell, and on a dense field the device's cap drops whole cells before NMS; docs/benchmarks.md).
    Detections kept: ``max_dets`` per class, as COCO's ``maxDets`` counts them, so that one crowded class
    cannot push a rarer one out of a frame's list.
    """
    if override is None:
        override = max(int(pre_nms_topk), int(matcher_topk or DEFAULT_MATCHER_TOPK) * int(max_dets))
    return {"pre_nms_topk": int(override), "max_detections": int(max_dets) * int(num_classes),
            "max_per_class": int(max_dets)}
