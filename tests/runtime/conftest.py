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
