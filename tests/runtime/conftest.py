"""Shared fixtures of the runtime tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="session")
def tiny() -> ModuleType:
    """``tests/runtime/tiny_models.py``: tiny real ONNX detector and morphology models (needs onnx)."""
    pytest.importorskip("onnx")
    spec = importlib.util.spec_from_file_location("ss_tiny_models", Path(__file__).with_name("tiny_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def head_models(tiny, tmp_path_factory) -> Path:
    """A tiny detector (64x96 input, low score threshold) and a head morphology model, as a model folder."""
    return tiny.build_model_set(tmp_path_factory.mktemp("head_models"), image_size=(64, 96), seed=3,
                                score_threshold=0.05, parts=("head",))


@pytest.fixture(scope="session")
def stage_slide():
    """A synthetic slide whose 384x512 frames a test can take anywhere (``frame_at``)."""
    synth = pytest.importorskip("smearsight.train.datasets.synth")
    return synth.SyntheticSlide(seed=5, slide_size=(1024, 2048), frame_size=(384, 512))


class _MissingCamera:
    """What ``cv2.VideoCapture`` gives for a V4L2 node that is not there (the camera is unplugged)."""

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return False

    def set(self, prop: int, value: float) -> bool:
        return False

    def release(self) -> None:
        pass


@pytest.fixture
def unplugged_camera(monkeypatch):
    """``unplug(stall_s)``: from then on every source opened by ``smearsight run`` captures from an unplugged
    camera (stand-in capture: there is no camera here), giving up on a frame after ``stall_s``."""
    from smearsight.device import sources

    real_open_source = sources.open_source

    def unplug(stall_s: float = 0.02) -> None:
        monkeypatch.setattr(sources, "open_source", lambda uri, loop=False: real_open_source(
            uri, loop=loop, capture_factory=lambda target, api: _MissingCamera(), stall_s=stall_s))

    return unplug


@pytest.fixture
def models_failing_every_frame(tiny, tmp_path) -> Path:
    """Tiny models whose manifest's anchors disagree with the graph (twice the anchors; the outputs' anchor
    dimension left free, so nothing catches it when the models open): every frame fails in decode."""
    import json

    models = tiny.build_model_set(tmp_path / "failing_models", image_size=(64, 96), parts=())
    manifest = json.loads((models / "detector" / "manifest.json").read_text())
    for out in manifest["outputs"]:
        out["shape"][1] = -1
    manifest["detector"]["anchors"]["scales"] = [1.0, 2.0]
    (models / "detector" / "manifest.json").write_text(json.dumps(manifest))
    return models
