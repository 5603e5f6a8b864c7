"""What ``--resume`` compares, shared by the detector and morphology trainers: a run continues with the settings
and inputs it started with, and a call that asks for others is refused in one line naming each difference."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smearsight.errors import InputError


def setting_differences(name: str, asked: Any, saved: Any, option_of: Mapping[str, str]) -> list[str]:
    """``["epochs 3 (saved 1)"]``; for a nested section only the keys that differ (``"augment.hflip 0.1 (saved
    0.5)"``); a field that a CLI option sets is named with that option (``option_of``: field -> option)."""
    if isinstance(asked, dict) and isinstance(saved, dict):
        return [text for key in sorted(set(asked) | set(saved))
                for text in setting_differences(f"{name}.{key}", asked.get(key), saved.get(key), option_of)]
    if asked == saved:
        return []
    label = f"{name} ({option_of[name]})" if name in option_of else name
    return [f"{label} {asked!r} (saved {saved!r})"]


def check_resumed_inputs(saved: Mapping[str, Any], asked: Mapping[str, Any], last_path: Path, what: str) -> None:
    """InputError when an input option of this call (``asked``: ``{"train_split": "train", ...}``, None for an
    option given as ``none``) differs from the one the run in ``last_path`` started with (``saved``); inputs an
    older checkpoint did not save are not checked. ``what`` says what the run continues on ("its own splits")."""
    def said(value: Any) -> str:  # as typed: --val-split none means no validation split
        return "none" if value is None else repr(value)

    conflicts = [f"--{key.replace('_', '-')} {said(value)} (saved {said(saved[key])})"
                 for key, value in asked.items() if key in saved and saved[key] != value]
    if conflicts:
        raise InputError(f"{last_path}: --resume continues the run on {what}, but this call asks for "
                         f"{'; '.join(conflicts)}: pass the run's to resume, or train into a new --out")
