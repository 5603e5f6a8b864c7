"""Tiny, untrained checkpoints of both models, made through the same factories as the real ones."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def tiny_detector_checkpoint(tmp_path_factory):
    from smearsight.anchors import AnchorConfig
    from smearsight.catalog import TPS_CLASS_NAMES
    from smearsight.train.checkpoint import save_checkpoint
    from smearsight.train.detector.torch_model import build_from_config, model_config_for

    torch.manual_seed(0)
    anchors = AnchorConfig(levels=[3, 4, 5], base_sizes=[12.0, 24.0, 48.0], scales=[1.0], aspect_ratios=[1.0, 2.0])
    cfg = model_config_for("test_efficientdet", len(TPS_CLASS_NAMES), anchors.levels, anchors.anchors_per_location)
    model = build_from_config(cfg).eval()
    # Spread the untrained head's outputs so that scores and boxes differ clearly between anchors
    # (an untrained head gives every anchor the prior score, and then NMS order is a coin toss).
    with torch.no_grad():
        for head, std in ((model.class_net, 2.0), (model.box_net, 0.3)):
            for param in head.predict.parameters():
                param.normal_(0.0, std)
    path = tmp_path_factory.mktemp("det") / "tiny_detector.pt"
    save_checkpoint(
        path,
        {
            "kind": "detector",
            "model_config": cfg.to_dict(),
            "state_dict": model.state_dict(),
            "normalization": {"color": "rgb", "mean": [0.5] * 3, "std": [0.5] * 3},
            "image_size": [64, 96],
            "class_names": list(TPS_CLASS_NAMES),
            "anchors": anchors.to_dict(),
            "thresholds": {"score": 0.5, "iou": 0.5, "pre_nms_topk": 1000, "max_detections": 1000},
        },
    )
    return path


@pytest.fixture(scope="session")
def tiny_morphology_checkpoint(tmp_path_factory):
    """An untrained tiny KD model (Lite0 teacher truncated after layer 2, random weights) with a threshold
    at the median score of some crops, so that decisions go both ways."""
    import numpy as np

    from smearsight.train.checkpoint import save_checkpoint
    from smearsight.train.morphology.config import MorphologyModelConfig
    from smearsight.train.morphology.torch_model import build_model

    torch.manual_seed(0)
    cfg = MorphologyModelConfig.from_dict({
        "teacher": {"name": "tf_efficientnet_lite0", "layers": [1, 2], "weights": "none", "input_size": 64},
        "student": {"widths": [4, 8, 16, 16], "convs_per_stage": 1},
    })
    model = build_model(cfg, load_teacher_weights=False).eval()
    crops = torch.from_numpy(np.random.default_rng(1).normal(size=(16, 1, 64, 64)).astype(np.float32))
    with torch.no_grad():
        threshold = float(model(crops).median())
    path = tmp_path_factory.mktemp("morph") / "tiny_morphology.pt"
    save_checkpoint(path, {
        "kind": "morphology",
        "model_config": cfg.to_dict(),
        "state_dict": model.state_dict(),
        "normalization": {"color": "gray", "mean": [0.5], "std": [0.5]},
        "image_size": [64, 64],
        "morphology": {"part": "head", "threshold": threshold, "mode": "unsupervised"},
    })
    return path
