"""The exportable morphology network: teacher + student + discrepancy score in one module.

``forward(x [B,1,64,64] float32, x = (pixel/255 - 0.5)/0.5) -> scores [B]``; a crop is abnormal when its
score >= the checkpoint's threshold. Unsupervised: the score is the discrepancy over the scoring layers.
Supervised: a small classifier over the discrepancy features of every critical layer gives P(abnormal).
With ``tta`` the score is the mean over the crop's 8 dihedral variants.
No training machinery here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from smearsight.errors import InputError
from smearsight.train.morphology.config import MorphologyModelConfig
from smearsight.train.morphology.losses import discrepancy, discrepancy_features
from smearsight.train.morphology.student import Student, count_parameters
from smearsight.train.morphology.teacher import Teacher, build_teacher, feature_shapes

CROP_SIZE = 64


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/transposes of square crops [B,C,H,W] (the first is ``x`` itself)."""
    flips = [x, x.flip(-1), x.flip(-2), x.flip(-2).flip(-1)]
    return flips + [view.transpose(-1, -2) for view in flips]


class FeatureClassifier(nn.Module):
    """Standardise features (stored statistics) then a 1-hidden-layer MLP (or logistic regression)."""

    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(n_features))
        self.register_buffer("feat_std", torch.ones(n_features))
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1)
            )
        else:
            self.net = nn.Linear(n_features, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net((feats - self.feat_mean) / self.feat_std)[:, 0]


class MorphologyModel(nn.Module):
    """Teacher, student and the score; ``forward`` returns per-crop scores [B]."""

    def __init__(self, cfg: MorphologyModelConfig, teacher: Teacher) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher = teacher
        shapes = feature_shapes(teacher, CROP_SIZE)
        self.student = Student(cfg.student, shapes, CROP_SIZE)
        self.score_positions = [cfg.teacher.layers.index(layer) for layer in cfg.score_layers()]
        self.lambda_mse = float(cfg.lambda_mse)
        self.classifier: FeatureClassifier | None = None
        if cfg.supervised:
            self.classifier = FeatureClassifier(self.n_features(shapes), cfg.classifier_hidden)

    @property
    def _feature_kinds(self) -> tuple[bool, bool]:
        """(teacher pooled over the whole map, teacher pooled over its centre) in the classifier's input."""
        inputs = self.cfg.classifier_inputs
        return inputs != "discrepancy", inputs == "discrepancy+teacher+centre"

    def n_features(self, shapes: list[tuple[int, int, int]]) -> int:
        with_teacher, with_centre = self._feature_kinds
        per_channel = 1 + 2 * with_teacher + 2 * with_centre
        return sum(3 + per_channel * shape[0] for shape in shapes)

    def pair(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.teacher(x), self.student(x)

    def kd_score(self, x: torch.Tensor) -> torch.Tensor:
        t, s = self.pair(x)
        return discrepancy(t, s, self.lambda_mse, self.score_positions, self.cfg.score_reduce)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        t, s = self.pair(x)
        return discrepancy_features(t, s, list(range(len(t))), *self._feature_kinds)

    def single_view_score(self, x: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            return self.kd_score(x)
        return torch.sigmoid(self.classifier(self.features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.tta:
            return self.single_view_score(x)
        views = dihedral_views(x)
        return self.single_view_score(torch.cat(views, dim=0)).reshape(len(views), -1).mean(dim=0)

    def sizes(self) -> dict[str, int]:
        return {"teacher_params": count_parameters(self.teacher), "student_params": count_parameters(self.student)}


def build_model(cfg: MorphologyModelConfig, load_teacher_weights: bool = True) -> MorphologyModel:
    """Build the network from its config (teacher weights from the config's source unless told not to)."""
    model = MorphologyModel(cfg, build_teacher(cfg.teacher, load_weights=load_teacher_weights))
    sizes = model.sizes()
    if cfg.min_size_ratio and sizes["student_params"] * cfg.min_size_ratio > sizes["teacher_params"]:
        raise InputError(
            f"student.widths: student has {sizes['student_params']:,} parameters, teacher "
            f"{sizes['teacher_params']:,}; the student must be at least {cfg.min_size_ratio:g}x smaller"
        )
    return model


def build_from_checkpoint(ckpt: dict[str, Any]) -> MorphologyModel:
    """Rebuild the exportable module from a morphology checkpoint dict, in eval mode."""
    if ckpt.get("kind") != "morphology":
        raise InputError(f"checkpoint: kind {ckpt.get('kind')!r} is not a morphology checkpoint")
    cfg = MorphologyModelConfig.from_dict(ckpt["model_config"], source="checkpoint model_config")
    model = build_model(cfg, load_teacher_weights=False)
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:  # a tensor of another shape (e.g. made with another feature layout)
        first = str(exc).strip().splitlines()[-1].strip()
        raise InputError(f"checkpoint: state_dict does not fit the model ({first}); retrain it") from None
    if missing or unexpected:
        raise InputError(
            f"checkpoint: state_dict does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval()
