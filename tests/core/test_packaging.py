"""The built wheel must contain every sub-package of the re-mapped folders and the kernel sources."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy: setuptools leaves build/ in the source tree, whose stale files would
    # otherwise end up in later wheels.
    src = tmp_path_factory.mktemp("src") / "smearsight"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".ci-venv", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    wheels = list(out.glob("smearsight-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def expected_packages():
    folders = {"smearsight": "smearsight", "train": "smearsight/train", "export": "smearsight/export",
               "runtime": "smearsight/runtime", "device": "smearsight/device", "deploy": "smearsight/deploy"}
    for folder, target in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            yield (Path(target) / rel / "__init__.py").as_posix()


def test_wheel_contains_every_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in expected_packages() if p not in names]
    assert not missing, missing
    for cu in (ROOT / "runtime").rglob("*.cu"):
        assert "smearsight/runtime/" + cu.relative_to(ROOT / "runtime").as_posix() in names
    # the demo models that `smearsight run` uses by default, and the systemd units
    models = sorted((ROOT / "smearsight" / "models").glob("*/manifest.json"))
    assert [m.parent.name for m in models] == ["detector", "detector_int8", "morphology_head"]
    for model in models:
        for name in ("manifest.json", "model.onnx"):
            assert (model.parent / name).relative_to(ROOT).as_posix() in names
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        assert "smearsight/deploy/systemd/" + unit.name in names


def test_wheel_has_console_script(wheel):
    zf = zipfile.ZipFile(wheel)
    entry = [n for n in zf.namelist() if n.endswith("entry_points.txt")]
    assert entry and "smearsight = smearsight.cli:entry" in zf.read(entry[0]).decode()
