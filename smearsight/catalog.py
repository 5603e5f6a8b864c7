"""The class catalog: the six touch-print-smear cell classes, their colours and typical sizes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CellClass:
    """One detector class: machine name, display name, BGR colour, typical size range in pixels."""

    name: str
    display: str
    color_bgr: tuple[int, int, int]
    size_px: tuple[int, int]
    is_sperm: bool = False


TPS_CLASSES: tuple[CellClass, ...] = (
    CellClass("sertoli", "Sertoli cell", (180, 105, 255), (30, 60)),
    CellClass("spermatocyte", "Primary spermatocyte", (0, 165, 255), (20, 30)),
    CellClass("round_spermatid", "Round spermatid", (0, 215, 255), (12, 18)),
    CellClass("elongated_spermatid", "Elongated spermatid", (50, 205, 50), (8, 14)),
    CellClass("immature_sperm", "Immature sperm", (255, 144, 30), (8, 14), is_sperm=True),
    CellClass("mature_sperm", "Mature sperm", (255, 0, 200), (8, 14), is_sperm=True),
)

TPS_CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in TPS_CLASSES)
SPERM_CLASS_NAMES: frozenset[str] = frozenset(c.name for c in TPS_CLASSES if c.is_sperm)

MORPHOLOGY_PARTS: tuple[str, ...] = ("head", "acrosome", "vacuole", "tail")

_FALLBACK_PALETTE = (
    (56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
    (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
)


def class_color(name: str, index: int) -> tuple[int, int, int]:
    """BGR colour for a class: the catalog's colour for TPS classes, a stable palette colour otherwise."""
    for cell in TPS_CLASSES:
        if cell.name == name:
            return cell.color_bgr
    return _FALLBACK_PALETTE[index % len(_FALLBACK_PALETTE)]


def is_sperm_class(name: str) -> bool:
    """True for the classes whose crops go to the morphology model."""
    return name in SPERM_CLASS_NAMES
