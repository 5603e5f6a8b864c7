"""Rich progress bars with ETA for detector training/evaluation (see smearsight.train.progress)."""

from __future__ import annotations

from smearsight.train.progress import make_progress

__all__ = ["make_progress"]
