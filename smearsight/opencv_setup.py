"""Which OpenCV is installed, and whether the arrangement is sane.

pip's ``opencv-python`` (GUI) and ``opencv-python-headless`` both install the same ``cv2`` package, so
having both leaves whichever was unpacked last, half-overwritten. SmearSight therefore never depends on
OpenCV in its base install: the ``headless`` extra (servers, CI) or the ``gui`` extra (a device with a
screen) picks one, and a Jetson uses the system OpenCV (built with GStreamer for CSI cameras) through a
virtualenv made with ``--system-site-packages`` and neither extra. See docs/install.md.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
from dataclasses import dataclass, field

PIP_OPENCV_DISTS = (
    "opencv-python",
    "opencv-python-headless",
    "opencv-contrib-python",
    "opencv-contrib-python-headless",
)


@dataclass
class OpenCVInstall:
    """What ``import cv2`` gives on this machine."""

    importable: bool
    version: str = ""
    location: str = ""
    pip_distributions: list[str] = field(default_factory=list)
    gstreamer: bool = False
    gui: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        if not self.importable:
            return "not installed"
        if self.pip_distributions:
            return "pip wheel (" + ", ".join(self.pip_distributions) + ")"
        return "system build"


def installed_pip_opencv() -> list[str]:
    """Names of the pip OpenCV distributions present in this environment."""
    found = []
    for name in PIP_OPENCV_DISTS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def inspect_opencv() -> OpenCVInstall:
    """Describe the OpenCV in use: version, origin, GStreamer and GUI support, and any conflict."""
    dists = installed_pip_opencv()
    problems = []
    if len(dists) > 1:
        problems.append(
            "more than one pip OpenCV package is installed (" + ", ".join(dists) + "): they overwrite each "
            "other's cv2; uninstall all of them and install exactly one extra ('headless' or 'gui')"
        )
    if importlib.util.find_spec("cv2") is None:
        problems.append("OpenCV (cv2) is not installed: pip install 'smearsight[headless]' or '[gui]'")
        return OpenCVInstall(False, pip_distributions=dists, problems=problems)
    import cv2

    info = cv2.getBuildInformation()
    gstreamer = _build_flag(info, "GStreamer")
    gui_line = _build_value(info, "GUI")
    gui = bool(gui_line) and gui_line.strip().upper() not in ("NONE", "NO")
    return OpenCVInstall(
        True,
        version=cv2.__version__,
        location=str(getattr(cv2, "__file__", "")),
        pip_distributions=dists,
        gstreamer=gstreamer,
        gui=gui,
        problems=problems,
    )


def _build_value(info: str, key: str) -> str:
    for line in info.splitlines():
        stripped = line.strip()
        if stripped.startswith(key + ":"):
            return stripped.split(":", 1)[1].strip()
    return ""


def _build_flag(info: str, key: str) -> bool:
    return _build_value(info, key).upper().startswith("YES")
