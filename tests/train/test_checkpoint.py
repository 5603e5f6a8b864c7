"""Checkpoint loading refuses files that would run code, with one line naming the file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from smearsight.errors import InputError  # noqa: E402
from smearsight.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


class _CreatesAFile:
    """Unpickling this calls ``Path.touch`` on the marker: what a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _payload(**extra) -> dict:
    return {"kind": "morphology", "model_config": {}, "state_dict": {"w": torch.zeros(2)},
            "normalization": {"color": "gray", "mean": [0.5], "std": [0.5]}, "image_size": [64, 64],
            "morphology": {"part": "head", "threshold": 0.25, "mode": "kd"}, **extra}


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "crafted.pt"
    buffer = io.BytesIO()
    torch.save({**_payload(), "extra": _CreatesAFile(marker)}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(InputError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert not marker.exists()
    assert message.startswith(f"{path}: not a SmearSight checkpoint") and "\n" not in message
    assert "getattr" in message or "touch" in message  # names the object it refused


def test_a_saved_checkpoint_loads_back(tmp_path) -> None:
    generator = torch.Generator().manual_seed(1)
    path = save_checkpoint(tmp_path / "ok.pt", _payload(rng=generator.get_state(), history=[{"auc": 0.5}]))
    loaded = load_checkpoint(path, kind="morphology")
    assert torch.equal(loaded["rng"], generator.get_state()) and loaded["history"] == [{"auc": 0.5}]


def test_a_corrupt_checkpoint_gets_one_line(tmp_path) -> None:
    path = tmp_path / "cut.pt"
    buffer = io.BytesIO()
    torch.save(_payload(), buffer)
    path.write_bytes(buffer.getvalue()[:100])
    with pytest.raises(InputError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: not a readable checkpoint") and "\n" not in str(err.value)
