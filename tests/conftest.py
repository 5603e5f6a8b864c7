"""Shared test set-up: skip hardware-marked tests where the hardware is absent; keep torch lean."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

# Two-core CI machines: one intra-op thread per test process keeps torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return importlib.util.find_spec("pycuda") is not None


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checks = {
        "gpu": (_has_cuda, "needs a CUDA GPU"),
        "trt": (_has_tensorrt, "needs TensorRT"),
        "hw": (lambda: os.environ.get("SMEARSIGHT_HW_TESTS") == "1", "needs hardware (set SMEARSIGHT_HW_TESTS=1)"),
    }
    cache: dict[str, bool] = {}
    for item in items:
        for marker, (probe, reason) in checks.items():
            if marker in item.keywords:
                if marker not in cache:
                    cache[marker] = probe()
                if not cache[marker]:
                    item.add_marker(pytest.mark.skip(reason=reason))
