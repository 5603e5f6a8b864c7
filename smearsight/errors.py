"""Errors every stage raises, and the lazy-import helper for optional dependencies.

The CLI turns :class:`InputError` into one line and exit code 1, and :class:`MissingDependencyError`
into one line and exit code 2 (see ``smearsight.cli.main``).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class SmearSightError(Exception):
    """Base class: an error with a one-line, user-facing message."""

    exit_code = 1


class InputError(SmearSightError):
    """Bad input: a file, field or argument is not what was expected. Exit code 1."""

    exit_code = 1


class StdoutError(SmearSightError):
    """Standard output cannot take the command's output (a full disk behind ``> file``). Exit code 1."""

    exit_code = 1

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"standard output: cannot write ({exc.strerror or exc})")


class MissingDependencyError(SmearSightError):
    """An optional dependency is not installed. Exit code 2."""

    exit_code = 2


_HINTS = {
    "torch": "pip install 'smearsight[train]'",
    "torchvision": "pip install 'smearsight[train]'",
    "timm": "pip install 'smearsight[train]'",
    "onnx": "pip install 'smearsight[train]'",
    "pycocotools": "pip install 'smearsight[train]'",
    "matplotlib": "pip install 'smearsight[train]'",
    "pycuda": "pip install 'smearsight[gpu]' (needs the CUDA toolkit headers)",
    "tensorrt": "TensorRT comes with the device's CUDA stack (JetPack on Jetson; NVIDIA's TensorRT packages on x86)",
    "cv2": "pip install 'smearsight[headless]' (or '[gui]' for a window); on Jetson use the system OpenCV",
}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run over several), or its type's name
    when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require(module: str, purpose: str = "") -> ModuleType:
    """Import an optional module or raise :class:`MissingDependencyError` with an install hint."""
    top = module.split(".")[0]
    what = f" (needed for {purpose})" if purpose else ""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing != top and _installed(top):
            # the package is there but one of its own imports is not (a CUDA library, a half-removed wheel)
            needed = _HINTS.get((missing or "").split(".")[0])
            raise MissingDependencyError(f"{top} is installed but cannot be imported{what}: {first_line(exc)}"
                                         + (f" ({needed})" if needed else "")) from exc
        hint = _HINTS.get(top, f"pip install {top}")
        raise MissingDependencyError(f"{top} is not installed{what}: {hint}") from exc
    except Exception as exc:  # a broken install failing as it initialises (a library of the wrong version)
        raise MissingDependencyError(f"{top} is installed but cannot be imported{what}: "
                                     f"{type(exc).__name__}: {first_line(exc)}") from exc


def _installed(top: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False
