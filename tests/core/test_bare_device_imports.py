"""A bare device install has no torch, TensorRT or pycuda: every device-side module must still import."""

import subprocess
import sys
import textwrap

import pytest

BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = {"torch", "torchvision", "timm", "tensorrt", "pycuda", "onnx", "onnxconverter_common",
               "pycocotools", "matplotlib"}

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
            return None

    sys.meta_path.insert(0, _Blocker())
    """
)

SCRIPT = BLOCKER + textwrap.dedent(
    """
    import importlib, pkgutil
    import smearsight, smearsight.runtime, smearsight.device, smearsight.deploy
    failures = []
    for package in (smearsight, smearsight.runtime, smearsight.device, smearsight.deploy):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                importlib.import_module(info.name)
            except Exception as exc:
                failures.append(f"{info.name}: {type(exc).__name__}: {exc}")
    from smearsight.cli import COMMAND_MODULES, main
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            failures.append(f"{name}: {exc}")
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    for group in ("data", "train", "eval", "predict", "export", "device", "sessions", "deploy"):
        if main([group, "--help"]) != 0:
            failures.append(f"smearsight {group} --help failed")
    for heavy in ("torch", "tensorrt", "pycuda"):
        if heavy in sys.modules:
            failures.append(f"{heavy} got imported")
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
    """
)


def test_device_modules_import_without_torch_tensorrt_pycuda():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_blocker_really_blocks():
    result = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert result.returncode != 0 and "blocked for this test" in result.stderr


def test_missing_dependency_exit_code_2():
    script = BLOCKER + textwrap.dedent(
        """
        from smearsight.cli_app import data_app
        from smearsight.cli import main
        from smearsight.errors import require

        @data_app.command("needs-torch")
        def needs_torch():
            require("torch", "this test")

        sys.exit(main(["data", "needs-torch"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2
    assert "torch is not installed" in result.stderr and "smearsight[train]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_broken_install_is_not_called_missing(tmp_path, monkeypatch):
    """A package that is there but fails to import (a CUDA library missing under it, a wrong version) says so."""
    from smearsight.errors import MissingDependencyError, require

    (tmp_path / "needs_native").mkdir()
    (tmp_path / "needs_native" / "__init__.py").write_text("import _smearsight_absent_native_lib\n")
    (tmp_path / "fails_init").mkdir()
    (tmp_path / "fails_init" / "__init__.py").write_text("raise RuntimeError('built for CUDA 12, found 11')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError, match=r"^needs_native is installed but cannot be imported \(needed "
                       r"for engines\): No module named '_smearsight_absent_native_lib'$"):
        require("needs_native", "engines")
    with pytest.raises(MissingDependencyError,
                       match=r"^fails_init is installed but cannot be imported: RuntimeError: built for CUDA 12"):
        require("fails_init")
    with pytest.raises(MissingDependencyError, match=r"^smearsight_absent_pkg is not installed: pip install"):
        require("smearsight_absent_pkg")
    (tmp_path / "needs_torch").mkdir()  # installed, but what it needs is one of ours, with its own hint
    (tmp_path / "needs_torch" / "__init__.py").write_text("raise ModuleNotFoundError(name='torch')\n")
    with pytest.raises(MissingDependencyError, match=r"^needs_torch is installed but cannot be imported: .*"
                       r"\(pip install 'smearsight\[train\]'\)$"):
        require("needs_torch")
