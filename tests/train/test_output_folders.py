"""Every training/evaluation command refuses an unusable --out before any long work (one-line error, exit 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smearsight.cli import main

pytest.importorskip("torch")

COMMANDS = {
    "train detector": ["train", "detector", "--data", "nowhere", "--format", "coco"],
    "eval detector": ["eval", "detector", "--weights", "none.pt", "--data", "nowhere", "--format", "coco"],
    "predict detector": ["predict", "detector", "--weights", "none.pt", "img.png"],
    "train morphology": ["train", "morphology", "--data", "nowhere", "--part", "head"],
    "eval morphology": ["eval", "morphology", "--weights", "none.pt", "--data", "nowhere", "--part", "head",
                        "--split", "valid"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_that_is_a_file_is_refused_first(command, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    rc = main([*COMMANDS[command], "--out", str(existing)])
    err = capfd.readouterr().err
    assert rc == 1, err
    assert "--out" in err and "is a file" in err and "Traceback" not in err
    assert existing.read_text() == "keep me"


def test_check_output_dir_creates_nothing(tmp_path: Path):
    from smearsight.errors import InputError
    from smearsight.fileio import check_output_dir

    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="is a file, so the folder cannot be created"):
        check_output_dir(tmp_path / "f" / "run")


def test_localise_count_is_range_checked(tmp_path, capfd):
    rc = main([*COMMANDS["eval morphology"], "--out", str(tmp_path / "e"), "--localise", "-3"])
    assert rc == 2 and "--localise" in capfd.readouterr().err
