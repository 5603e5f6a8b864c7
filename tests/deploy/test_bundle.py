"""Bundles: reproducible archives, a complete index, reference outputs from ONNX Runtime, safe unpacking."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from smearsight.deploy.bundle import (
    FIXED_MTIME,
    build_bundle,
    read_index,
    safe_extract,
    smoke_test,
    verify_release,
    version_key,
)
from smearsight.deploy.inference import frame_to_input, reference_frame
from smearsight.errors import InputError
from smearsight.fileio import sha256_file
from smearsight.manifest import load_manifest


@pytest.fixture(scope="module")
def models(tmp_path_factory, factory):
    base = tmp_path_factory.mktemp("models")
    return factory.detector(base / "det", seed=3), factory.morphology(base / "head")


def test_same_inputs_give_identical_bytes(models, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# 2.0\n- smaller anchors\n")
    a = tmp_path / "a" / "b.tar.gz"
    b = tmp_path / "other-dir" / "different-name.tar.gz"
    build_bundle(models, "2.0", a, notes)
    build_bundle(list(reversed(models)), "2.0", b, notes)  # argument order does not matter either
    assert a.read_bytes() == b.read_bytes()
    assert sha256_file(a) == sha256_file(b)
    # ...and the content really depends on the inputs
    c = tmp_path / "c.tar.gz"
    build_bundle(models, "2.1", c, notes)
    assert c.read_bytes() != a.read_bytes()


def test_archive_entries_are_normalised(models, tmp_path):
    out = tmp_path / "b.tar.gz"
    build_bundle(models, "2.0", out)
    raw = out.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip mtime 0
    with tarfile.open(out, "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert all(m.isreg() and m.mtime == FIXED_MTIME and m.uid == 0 and m.gid == 0 and m.mode == 0o644
               for m in members)
    assert {"bundle.json", "RELEASE_NOTES.md", "models/detector/model.onnx", "models/morphology_head/manifest.json",
            "reference/detector/frame.npy", "reference/detector/class_logits.npy",
            "reference/morphology_head/scores.npy"} <= set(names)


def test_index_hashes_every_file_and_outputs_match_onnxruntime(models, tmp_path):
    out = tmp_path / "b.tar.gz"
    index = build_bundle(models, "2.0", out)
    assert read_index(out) == index
    release = tmp_path / "release"
    release.mkdir()
    names = safe_extract(out, release)
    assert set(index["files"]) == set(names) - {"bundle.json"}
    for name, info in index["files"].items():
        assert sha256_file(release / name) == info["sha256"]
        assert (release / name).stat().st_size == info["size"]
    # independent reference: a fresh ONNX Runtime session on the source model
    det_dir = models[0]
    manifest = load_manifest(det_dir)
    frame = np.load(release / "reference/detector/frame.npy")
    assert frame.dtype == np.uint8 and frame.shape == (3, 16, 16)
    np.testing.assert_array_equal(frame, reference_frame(manifest.input))
    x = ((frame.astype(np.float32) / 255 - 0.5) / 0.5)[None]
    np.testing.assert_allclose(frame_to_input(frame, manifest.input), x, rtol=0, atol=1e-7)
    session = ort.InferenceSession(str(det_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(["class_logits", "box_regression"], {"images": x})
    np.testing.assert_allclose(np.load(release / "reference/detector/class_logits.npy"), logits, atol=1e-6)
    np.testing.assert_allclose(np.load(release / "reference/detector/box_regression.npy"), boxes, atol=1e-6)
    assert verify_release(release, "2.0") == []
    assert all(r.ok for r in smoke_test(release))


def test_verify_and_smoke_test_catch_damage(models, tmp_path):
    out = tmp_path / "b.tar.gz"
    build_bundle(models, "2.0", out)
    release = tmp_path / "release"
    release.mkdir()
    safe_extract(out, release)
    assert verify_release(release, "9.9")[0].endswith("'9.9' was expected")
    (release / "stray.txt").write_text("x")
    assert "not part of the release" in verify_release(release)[0]
    (release / "stray.txt").unlink()
    # wrong expected outputs (index rewritten to match) -> the smoke test fails with the reason
    expected = release / "reference/morphology_head/scores.npy"
    np.save(expected, np.load(expected) + 1.0)
    results = {r.model: r for r in smoke_test(release)}
    assert results["detector"].ok and not results["morphology_head"].ok
    assert "differs from the expected outputs" in results["morphology_head"].detail
    assert "sha256 does not match" in verify_release(release)[0]


def test_bad_inputs_are_one_line_errors(models, tmp_path, factory):
    det, head = models
    with pytest.raises(InputError, match="not a valid version"):
        build_bundle(models, "../1", tmp_path / "x.tar.gz")
    with pytest.raises(InputError, match="a second 'morphology_head' model"):
        build_bundle([head, head], "1", tmp_path / "x.tar.gz")
    broken = factory.detector(tmp_path / "broken", seed=1)
    (broken / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(InputError, match="does not match manifest field 'onnx_sha256'") as info:
        build_bundle([broken], "1", tmp_path / "x.tar.gz")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="not a directory"):
        build_bundle([tmp_path / "nope"], "1", tmp_path / "x.tar.gz")

    assert not (tmp_path / "x.tar.gz").exists()
    assert not list(tmp_path.glob(".x.tar.gz*"))  # nothing half-written


def _evil_tar(path: Path, build) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        build(tar)
    path.write_bytes(gzip.compress(buffer.getvalue()))
    return path


def _add(tar, name, data=b"x", **fields):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda t: _add(t, "../outside.txt"), "unsafe path"),
        (lambda t: _add(t, "/etc/evil"), "unsafe path"),
        (lambda t: _add(t, "models/../../x"), "unsafe path"),
        (lambda t: _add(t, "link", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "only plain files"),
        (lambda t: (_add(t, "a"), _add(t, "b", b"", type=tarfile.LNKTYPE, linkname="a")), "only plain files"),
        (lambda t: _add(t, "dev", b"", type=tarfile.CHRTYPE), "only plain files"),
        (lambda t: (_add(t, "models/a", b"good"), _add(t, "models/a", b"evil")), "appears twice"),
    ],
)
def test_safe_extract_refuses_escapes_and_links(tmp_path, build, message):
    archive = _evil_tar(tmp_path / "evil.tar.gz", build)
    dest = tmp_path / "dest" / "release"
    dest.mkdir(parents=True)
    with pytest.raises(InputError, match=message):
        safe_extract(archive, dest)
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "dest" / "x").exists()
    assert not (dest / "link").is_symlink()


def test_damaged_archive_and_not_a_bundle(tmp_path, models):
    out = tmp_path / "b.tar.gz"
    build_bundle(models, "2.0", out)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(out.read_bytes()[: len(out.read_bytes()) // 2])
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(InputError, match="damaged"):
        safe_extract(cut, dest)
    plain = _evil_tar(tmp_path / "plain.tar.gz", lambda t: _add(t, "hello.txt"))
    with pytest.raises(InputError, match="not a SmearSight bundle"):
        read_index(plain)


def test_version_order():
    assert version_key("1.10") > version_key("1.9") > version_key("1.2.3") > version_key("1.2")
    # semver: a pre-release sorts below its release, and its identifiers compare naturally
    order = ["1.3.9", "1.4.0-alpha", "1.4.0-rc1", "1.4.0-rc2", "1.4.0-rc10", "1.4.0", "1.4.0+build2", "1.4.1-rc1"]
    assert sorted(order, key=version_key) == order
    assert sorted(reversed(order), key=version_key) == order


def test_final_release_after_its_release_candidate(factory, tmp_path):
    from smearsight.deploy.install import Device, provision
    from smearsight.deploy.repository import FileRepository
    from smearsight.deploy.updater import update

    morph = factory.morphology(tmp_path / "head")
    for seed, version in enumerate(["1.4.0-rc1", "1.4.0"]):
        build_bundle([factory.detector(tmp_path / f"det{seed}", seed=seed), morph], version,
                     tmp_path / f"{version}.tar.gz")
    repo = FileRepository.init(tmp_path / "repo")
    provision(tmp_path / "dev", repo.meta_dir / "1.root.json")
    repo.publish(tmp_path / "1.4.0-rc1.tar.gz")
    assert update(tmp_path / "dev", str(repo.dir))["version"] == "1.4.0-rc1"
    assert repo.publish(tmp_path / "1.4.0.tar.gz")["changed"]  # not a downgrade
    assert update(tmp_path / "dev", str(repo.dir))["version"] == "1.4.0"
    assert Device(tmp_path / "dev").current() == "1.4.0"


def test_cli_bundle(models, tmp_path, capsys):
    from smearsight.cli import main

    out = tmp_path / "cli.tar.gz"
    assert main(["deploy", "bundle", str(models[0]), str(models[1]), "--version", "3.0", "--out", str(out)]) == 0
    assert read_index(out)["version"] == "3.0"
    assert "version 3.0" in capsys.readouterr().out
    assert main(["deploy", "bundle", str(tmp_path / "missing"), "--version", "3.0", "--out", str(out)]) == 1


def test_runtime_backend_and_plain_onnxruntime_agree(models):
    """run_model goes through the runtime's open_backend when present; the direct session is the fallback."""
    from smearsight.deploy.inference import _run_onnxruntime, run_model

    det = models[0]
    manifest = load_manifest(det)
    x = frame_to_input(reference_frame(manifest.input), manifest.input)
    direct = _run_onnxruntime(det, manifest, x)
    via = run_model(det, x, "onnx")
    assert set(direct) == set(via) == {"class_logits", "box_regression"}
    for name in direct:
        np.testing.assert_allclose(via[name], direct[name], atol=1e-6)


def test_release_layout_is_what_the_runtime_loads(models, tmp_path):
    pipeline = pytest.importorskip("smearsight.runtime.pipeline")
    build_bundle(models, "2.0", tmp_path / "b.tar.gz")
    release = tmp_path / "release"
    release.mkdir()
    safe_extract(tmp_path / "b.tar.gz", release)
    found = pipeline.find_models(release / "models")
    assert found.detector == release / "models" / "detector"
    assert list(found.morphology) == [release / "models" / "morphology_head"]


def test_int8_detector_travels_beside_the_float_one(models, tmp_path, factory, monkeypatch):
    """A real int8 quantization of the float detector goes into models/detector_int8, passes the smoke
    test with its own tolerance, and is what the runtime picks on a CPU-only device; an int8 model made
    from another float detector is refused."""
    pipeline = pytest.importorskip("smearsight.runtime.pipeline")
    quantize = pytest.importorskip("smearsight.export.quantize")
    det, head = models
    int8 = tmp_path / "det_int8"
    quantize.quantize_detector(det, int8, count=2, check_count=1, min_agreement=0.0)
    index = build_bundle([det, int8, head], "3.0", tmp_path / "b.tar.gz")
    assert {m["name"]: m["precision"] for m in index["models"]} == {
        "detector": "fp32", "detector_int8": "int8", "morphology_head": "fp32"}
    release = tmp_path / "release"
    release.mkdir()
    safe_extract(tmp_path / "b.tar.gz", release)
    assert verify_release(release, "3.0") == []
    results = {r.model: r for r in smoke_test(release)}
    assert all(r.ok for r in results.values()), results
    monkeypatch.setattr(pipeline, "cpu_only", lambda backend="auto": True)
    assert pipeline.find_models(release / "models").detector == release / "models" / "detector_int8"

    other = factory.detector(tmp_path / "other", seed=9)
    with pytest.raises(InputError, match="does not name the bundle's float detector"):
        build_bundle([other, int8], "3.1", tmp_path / "c.tar.gz")
    assert not (tmp_path / "c.tar.gz").exists()


def test_cli_bundle_out_is_an_existing_folder(models, tmp_path, capsys):
    from smearsight.cli import main

    (tmp_path / "adir").mkdir()
    capsys.readouterr()
    assert main(["deploy", "bundle", str(models[0]), "--version", "3.0", "--out", str(tmp_path / "adir")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "is a folder; expected a file name" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["adir"] and not any((tmp_path / "adir").iterdir())
