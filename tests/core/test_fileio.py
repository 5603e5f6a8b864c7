"""Durable writes: files that belong together replace theirs together, and leftovers of killed runs go."""

from __future__ import annotations

import errno

import pytest

from smearsight.fileio import atomic_files, staging_dir


def _old_pair(folder):
    (folder / "model.onnx").write_bytes(b"old model")
    (folder / "manifest.json").write_text("old manifest")


def test_files_written_together_all_appear_at_once(tmp_path) -> None:
    _old_pair(tmp_path)
    with atomic_files([tmp_path / "model.onnx", tmp_path / "manifest.json"]) as (model, manifest):
        model.write(b"new model")
        manifest.write(b"new manifest")
        assert (tmp_path / "model.onnx").read_bytes() == b"old model"  # nothing replaced while writing
    assert (tmp_path / "model.onnx").read_bytes() == b"new model"
    assert (tmp_path / "manifest.json").read_text() == "new manifest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.onnx"]


def test_a_failure_while_writing_the_second_file_keeps_both_old_files(tmp_path) -> None:
    _old_pair(tmp_path)
    with pytest.raises(RuntimeError), atomic_files([tmp_path / "model.onnx", tmp_path / "manifest.json"]) as (
            model, _):
        model.write(b"new model")
        raise RuntimeError("killed while writing the manifest")
    assert (tmp_path / "model.onnx").read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.onnx"]


def test_a_full_disk_keeps_the_old_pair_and_names_the_folder(tmpfs) -> None:
    with tmpfs("small", "size=64k") as disk:
        _old_pair(disk)
        with pytest.raises(OSError) as caught, atomic_files([disk / "model.onnx", disk / "manifest.json"]) as (
                model, manifest):
            model.write(b"m" * 4096)
            manifest.write(b"j" * 200_000)  # does not fit
            manifest.flush()
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(disk)
        assert (disk / "model.onnx").read_bytes() == b"old model"
        assert (disk / "manifest.json").read_text() == "old manifest"
        assert sorted(p.name for p in disk.iterdir()) == ["manifest.json", "model.onnx"]


def test_a_staging_folder_clears_what_killed_runs_left_but_not_a_running_ones(tmp_path) -> None:
    import fcntl
    import os

    target = tmp_path / "det_int8"
    killed = tmp_path / ".det_int8.k1ll3d00.staging"  # a kill -9 leaves its folder, unlocked
    (killed / "model").mkdir(parents=True)
    (killed / "model" / "model.onnx").write_bytes(b"half")
    (killed / ".lock").touch()
    running = tmp_path / ".det_int8.running0.staging"  # another export into the same --out, still at work
    running.mkdir()
    held = os.open(running / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    others = [tmp_path / ".det_int8.keep", tmp_path / ".other.k1ll3d00.staging", tmp_path / "det_int8.staging"]
    for folder in others:
        folder.mkdir()
    try:
        with staging_dir(target) as staging:
            assert staging.is_dir() and staging.parent == tmp_path and staging.name.endswith(".staging")
            assert not killed.exists() and running.is_dir()
            assert all(folder.is_dir() for folder in others)
        assert not staging.exists() and not target.exists()
    finally:
        os.close(held)


def test_json_files_hold_null_where_a_number_is_not_finite(tmp_path) -> None:
    import json

    from smearsight.fileio import atomic_write_json

    atomic_write_json(tmp_path / "metrics.json", {"auc": float("nan"), "per_part": [1.5, float("inf")], "n": 3})
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}")) == {
        "auc": None, "per_part": [1.5, None], "n": 3}


def test_a_write_that_cannot_replace_its_path_names_the_path_not_the_temporary_file(tmp_path) -> None:
    """The rename over the path fails (here: the path is a folder): the error names the path, as the CLI's one
    line shows it; before, it named the temporary file, which is gone by then."""
    from smearsight.fileio import atomic_write_bytes

    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(OSError) as err:
        atomic_write_bytes(tmp_path / "model.onnx", b"new model")
    assert err.value.filename == str(tmp_path / "model.onnx") and err.value.errno == errno.EISDIR
    (tmp_path / "manifest.json").write_text("old manifest")
    with pytest.raises(OSError) as err, atomic_files([tmp_path / "model.onnx", tmp_path / "manifest.json"]) as (
        model, manifest):
        model.write(b"new model")
        manifest.write(b"new manifest")
    assert err.value.filename == str(tmp_path / "model.onnx")  # one of several: the one that failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.onnx"]
    assert (tmp_path / "manifest.json").read_text() == "old manifest"


def test_no_room_for_the_temporary_file_names_the_path(tmpfs) -> None:
    """A disk out of inodes (or a folder this user may not write) fails as the temporary file is created: the
    error names the path being written, not the random temporary name that was never made."""
    from smearsight.fileio import atomic_write_bytes

    with tmpfs("no_inodes", "size=1m,nr_inodes=3") as disk:
        for i in range(8):  # use up the inodes the root folder left
            try:
                (disk / f"filler{i}").write_bytes(b"")
            except OSError:
                break
        with pytest.raises(OSError) as err:
            atomic_write_bytes(disk / "metrics.json", b"{}")
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(disk / "metrics.json")
        assert not (disk / "metrics.json").exists()
