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
