"""Shared test set-up: skip hardware-marked tests where the hardware is absent; keep torch lean."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

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


@contextlib.contextmanager
def _mounted_tmpfs(target: Path, options: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount to create a tmpfs")
    target.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Callable[[str, str], contextlib.AbstractContextManager[Path]]:
    """``with tmpfs("small", "size=96k") as d:`` a real tmpfs under tmp_path (a full or read-only disk);
    skips the test where it cannot be mounted (not root, no mount)."""
    return lambda name, options: _mounted_tmpfs(tmp_path / name, options)
