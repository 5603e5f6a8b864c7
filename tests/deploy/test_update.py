"""Device updates end to end: provisioning, online and offline (USB directory) updates, status, keeping
N releases, rollback, GPU/ONNX target choice, health checks that roll back by themselves, sd_notify."""

from __future__ import annotations

import json
import os
import socket

import pytest

from smearsight.cli import main
from smearsight.deploy.bundle import build_bundle
from smearsight.deploy.health import health_check, report_runtime_failure
from smearsight.deploy.install import Device, UpdateError, compatibility
from smearsight.deploy.updater import DeviceProfile, detect_device, update


def _status(root, capsys):
    capsys.readouterr()
    assert main(["deploy", "status", "--root-dir", str(root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_offline_usb_update_status_and_rollback_cli(repo, bundles, tmp_path, capsys):
    root = tmp_path / "dev"
    # not provisioned yet: a clear one-line refusal
    assert main(["deploy", "update", "--repo", str(repo.dir), "--root-dir", str(root)]) == 1
    assert "not provisioned" in capsys.readouterr().err
    assert main(["deploy", "provision", "--trusted-root", str(repo.meta_dir / "1.root.json"),
                 "--root-dir", str(root)]) == 0
    usb = tmp_path / "usb-stick"
    repo.publish(bundles["1.0"])
    import shutil

    shutil.copytree(repo.dir, usb, ignore=shutil.ignore_patterns("keys"))  # what an operator copies
    assert main(["deploy", "update", "--repo", str(usb), "--root-dir", str(root)]) == 0
    assert "installed 1.0" in capsys.readouterr().out
    repo.publish(bundles["1.1"])
    shutil.rmtree(usb)
    shutil.copytree(repo.dir, usb, ignore=shutil.ignore_patterns("keys"))
    assert main(["deploy", "update", "--repo", usb.as_uri(), "--root-dir", str(root)]) == 0
    status = _status(root, capsys)
    assert status["current"] == "1.1" and status["releases"] == ["1.0", "1.1"]
    assert status["trial"]["previous"] == "1.0"
    assert status["backends"] == {"detector": "onnx", "morphology_head": "onnx"}
    assert main(["deploy", "update", "--repo", str(usb), "--root-dir", str(root)]) == 0
    assert "up to date: 1.1" in capsys.readouterr().out
    # rollback: back to 1.0, 1.1 remembered as rejected and not re-installed by the timer
    assert main(["deploy", "rollback", "--root-dir", str(root), "--reason", "counts look wrong"]) == 0
    status = _status(root, capsys)
    assert status["current"] == "1.0" and status["rejected"] == {"1.1": "counts look wrong"}
    assert os.readlink(root / "current") == "releases/1.0"
    assert main(["deploy", "update", "--repo", str(usb), "--root-dir", str(root)]) == 0
    assert "skipped: version 1.1 was rolled back here" in capsys.readouterr().out
    assert main(["deploy", "update", "--repo", str(usb), "--root-dir", str(root), "--force"]) == 0
    assert _status(root, capsys)["current"] == "1.1"
    assert main(["deploy", "status", "--root-dir", str(root)]) == 0
    assert "current:   1.1" in capsys.readouterr().out
    # a wrong --repo is one line, exit 1
    assert main(["deploy", "update", "--repo", str(tmp_path), "--root-dir", str(root)]) == 1
    assert "has no metadata/ directory" in capsys.readouterr().err


def test_online_update_over_http_cli(repo, bundles, device_root, serve, capsys):
    repo.publish(bundles["1.0"])
    url = serve(repo.dir)
    assert main(["deploy", "update", "--repo", url, "--root-dir", str(device_root)]) == 0
    assert Device(device_root).current() == "1.0"
    # a tampered target over HTTP: exit 3 and one line on stderr
    repo.publish(bundles["1.1"])
    for stored in (repo.targets_dir / "bundles").iterdir():
        stored.write_bytes(stored.read_bytes()[::-1])
    capsys.readouterr()
    assert main(["deploy", "update", "--repo", url, "--root-dir", str(device_root)]) == 3
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "tampered target" in err[0] and "current release 1.0 untouched" in err[0]


def test_keep_n_previous_releases(repo, bundles, device_root):
    for version in ("1.0", "1.1", "1.2"):
        repo.publish(bundles[version])
        update(device_root, str(repo.dir), keep=1)
    device = Device(device_root)
    assert device.installed() == ["1.1", "1.2"]
    assert device.load_state()["history"] == ["1.1", "1.2"]
    assert device.events()[-1]["pruned"] == ["1.0"]


def _publish_unchecked(repo, bundle, key):
    """Publish as a tool that does not check the engines against the key would (``publish`` refuses this)."""
    import shutil

    from tuf.api.metadata import TargetFile

    from smearsight.deploy.bundle import read_index
    from smearsight.deploy.repository import target_path

    info = TargetFile.from_file(target_path(key), str(bundle), ["sha256"])
    info.unrecognized_fields["custom"] = {"smearsight": {"version": read_index(bundle)["version"], "key": key}}
    stored = repo.targets_dir / "bundles" / f"{info.hashes['sha256']}.{key}.tar.gz"
    stored.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle, stored)
    with repo.edit_targets() as targets:
        targets.targets[info.path] = info
    repo.do_snapshot()
    repo.do_timestamp()


def test_incompatible_gpu_bundle_falls_back_to_onnx(repo, bundles, device_root, tmp_path, factory):
    engine = dict(tensorrt_version="10.3.0", cuda_version="12.6", gpu_name="RTX A2000",
                  compute_capability="8.6")  # built on the wrong GPU, published under the Orin key
    det = factory.detector(tmp_path / "det-gpu", seed=5, engine=engine)
    gpu_bundle = tmp_path / "gpu.tar.gz"
    build_bundle([det], "2.0", gpu_bundle)
    _publish_unchecked(repo, gpu_bundle, "sm_87-trt10.3")
    orin = DeviceProfile(compute_capability="8.7", tensorrt_version="10.3.0")
    assert orin.gpu_key == "sm_87-trt10.3"
    with pytest.raises(UpdateError, match="compute capability 8.6 .* this device's GPU is 8.7"):
        update(device_root, str(repo.dir), profile=orin)
    assert Device(device_root).current() is None
    repo.publish(bundles["1.0"])  # the ONNX fallback
    result = update(device_root, str(repo.dir), profile=orin)
    assert result["key"] == "onnx" and result["version"] == "1.0"
    assert any(e["event"] == "incompatible" for e in Device(device_root).events())


def test_backend_choice_for_a_matching_engine(tmp_path, factory):
    from smearsight.deploy.bundle import safe_extract

    engine = dict(tensorrt_version="10.3.0", cuda_version="12.6", gpu_name="Orin", compute_capability="8.7")
    det = factory.detector(tmp_path / "det", seed=1, engine=engine)
    build_bundle([det], "2.0", tmp_path / "b.tar.gz")
    release = tmp_path / "r"
    release.mkdir()
    safe_extract(tmp_path / "b.tar.gz", release)
    assert compatibility(release, "sm_87-trt10.3", DeviceProfile("8.7", "10.3.0")) == {"detector": "trt"}
    assert compatibility(release, "onnx", DeviceProfile("8.7", "10.3.0")) == {"detector": "onnx"}
    with pytest.raises(UpdateError, match="TensorRT 10.3.0 but this device has TensorRT 10.3.1"):
        compatibility(release, "sm_87-trt10.3", DeviceProfile("8.7", "10.3.1"))
    with pytest.raises(UpdateError, match="no TensorRT"):
        compatibility(release, "sm_87-trt10.3", DeviceProfile(None, None))


def test_detect_device_overrides(monkeypatch):
    monkeypatch.setenv("SMEARSIGHT_COMPUTE_CAPABILITY", "8.7")
    monkeypatch.setenv("SMEARSIGHT_TENSORRT_VERSION", "10.3.0")
    assert detect_device().gpu_key == "sm_87-trt10.3"
    assert detect_device(tensorrt_version="none").gpu_key is None


def _two_releases(repo, bundles, root):
    repo.publish(bundles["1.0"])
    update(root, str(repo.dir))
    repo.publish(bundles["1.1"])
    update(root, str(repo.dir))
    return Device(root)


def test_health_check_rolls_back_a_broken_new_release(repo, bundles, device_root, capsys):
    device = _two_releases(repo, bundles, device_root)
    assert health_check(device_root).ok
    model = device.releases / "1.1" / "models" / "detector" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")  # bit rot on the device
    capsys.readouterr()
    assert main(["deploy", "health-check", "--root-dir", str(device_root)]) == 4
    err = capsys.readouterr().err
    assert "sha256 does not match" in err and "rolled back to 1.0" in err
    assert device.current() == "1.0"
    rollback = [e for e in device.events() if e["event"] == "rollback"][-1]
    assert rollback["auto"] is True and "health check failed after the switch to 1.1" in rollback["reason"]
    assert "1.1" in device.load_state()["rejected"]
    assert update(device_root, str(repo.dir))["status"] == "skipped"


def test_health_check_smoke_test_failure_rolls_back(repo, bundles, device_root):
    device = _two_releases(repo, bundles, device_root)
    # a model that loads but computes something else, with the index rewritten to match: smoke test catches it
    import hashlib

    import numpy as np

    release = device.releases / "1.1"
    expected = release / "reference" / "morphology_head" / "scores.npy"
    np.save(expected, np.load(expected) * 3 + 1)
    index = json.loads((release / "bundle.json").read_text())
    index["files"]["reference/morphology_head/scores.npy"]["sha256"] = hashlib.sha256(expected.read_bytes()).hexdigest()
    (release / "bundle.json").write_text(json.dumps(index))
    report = health_check(device_root)
    assert not report.ok and report.rolled_back_to == "1.0"
    assert "differs from the expected outputs" in report.problems[0]


def test_runtime_failure_rolls_back_only_while_on_trial(repo, bundles, device_root, capsys):
    device = _two_releases(repo, bundles, device_root)
    report = report_runtime_failure(device_root, "engine deserialisation failed")
    assert report.rolled_back_to == "1.0" and device.current() == "1.0"
    # 1.0 is not on trial (it was rolled back to): a later runtime failure is recorded, nothing switched
    report = report_runtime_failure(device_root, "camera lost")
    assert report.rolled_back_to is None and device.current() == "1.0"
    assert device.events()[-1]["event"] == "runtime-failed"


def test_confirm_ends_the_trial(repo, bundles, device_root, capsys):
    device = _two_releases(repo, bundles, device_root)
    assert main(["deploy", "health-check", "--root-dir", str(device_root), "--confirm", "--quick"]) == 0
    assert "(confirmed)" in capsys.readouterr().out
    assert device.load_state()["trial"] is None
    assert report_runtime_failure(device_root, "crash").rolled_back_to is None


def test_rollback_without_previous_release(repo, bundles, device_root, capsys):
    repo.publish(bundles["1.0"])
    update(device_root, str(repo.dir))
    assert main(["deploy", "rollback", "--root-dir", str(device_root)]) == 3
    assert "no previous release is installed" in capsys.readouterr().err
    assert Device(device_root).current() == "1.0"


def test_sd_notify_datagrams(tmp_path, monkeypatch):
    from smearsight.deploy.sdnotify import Watchdog, notify, watchdog_interval

    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(2)
    try:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        assert notify("READY=1") is False  # not under systemd
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert watchdog_interval() == 4.0
        dog = Watchdog()
        assert dog.ready("models loaded")
        assert receiver.recv(256) == b"READY=1\nSTATUS=models loaded"
        assert dog.ping(now=100.0) and not dog.ping(now=101.0) and dog.ping(now=102.5)
        assert receiver.recv(256) == b"WATCHDOG=1" and receiver.recv(256) == b"WATCHDOG=1"
        monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
        assert watchdog_interval() is None
    finally:
        receiver.close()


def test_sd_notify_abstract_socket():
    from smearsight.deploy.sdnotify import notify

    name = f"smearsight-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(2)
    try:
        assert notify("STATUS=hello", socket_path="@" + name)
        assert receiver.recv(64) == b"STATUS=hello"
    finally:
        receiver.close()


def test_concurrent_update_is_refused(repo, bundles, device_root):
    repo.publish(bundles["1.0"])
    with Device(device_root).lock():
        with pytest.raises(UpdateError, match="another update or health check is running"):
            update(device_root, str(repo.dir))
    assert update(device_root, str(repo.dir))["version"] == "1.0"


def test_status_does_not_clean_up_under_a_running_install(repo, bundles, device_root, capsys):
    repo.publish(bundles["1.0"])
    assert update(device_root, str(repo.dir))["version"] == "1.0"
    device = Device(device_root)
    staging = device.releases / ".staging-1.1-abcd"  # what an install in progress is writing
    staging.mkdir()
    with device.lock():
        assert _status(device_root, capsys)["current"] == "1.0"
        assert staging.is_dir(), "deploy status deleted the staging directory of a running install"
    _status(device_root, capsys)  # no install running: a left-over staging directory is cleaned up
    assert not staging.exists()


def _doc_commands():
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if "smearsight deploy" not in line:
                continue
            args = shlex.split(line[line.index("smearsight deploy"):].split("&&")[0])
            yield args[1:]


@pytest.mark.parametrize("args", list(_doc_commands()), ids=lambda a: " ".join(a[:3]))
def test_documented_commands_parse(args, capsys):
    assert main([*args, "--help"]) == 0, capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.trt
def test_gpu_bundle_with_a_real_engine_is_chosen_and_smoke_tested(repo, device_root, tmp_path, factory,
                                                                  monkeypatch):
    """On a TensorRT device: a real FP16 engine, published under this GPU's key, runs the smoke test."""
    from smearsight.deploy.repository import gpu_key
    from smearsight.export.engine import EngineOptions, export_engine

    monkeypatch.delenv("SMEARSIGHT_COMPUTE_CAPABILITY")
    monkeypatch.delenv("SMEARSIGHT_TENSORRT_VERSION")
    det = factory.detector(tmp_path / "det", seed=2)
    spec = export_engine(det / "model.onnx", det, EngineOptions(fp16=True, workspace_mb=256))
    build_bundle([det], "3.0", tmp_path / "gpu.tar.gz")
    key = gpu_key(spec.compute_capability, spec.tensorrt_version)
    repo.publish(tmp_path / "gpu.tar.gz", key)
    profile = detect_device()
    assert profile.gpu_key == key
    result = update(device_root, str(repo.dir), profile=profile)
    assert result["key"] == key and result["backends"] == {"detector": "trt"}
    assert health_check(device_root).ok


def test_rollback_skips_a_release_rolled_back_from_before(repo, bundles, device_root, capsys):
    for version in ("1.0", "1.1"):
        repo.publish(bundles[version])
        update(device_root, str(repo.dir))
    device = Device(device_root)
    assert device.rollback(reason="1.1 crashed")["version"] == "1.0"
    repo.publish(bundles["1.2"])
    update(device_root, str(repo.dir))
    assert device.current() == "1.2" and "1.1" in device.installed()
    # the newest previous release is 1.1, but it was rejected: the way back is 1.0
    assert device.rollback(reason="1.2 crashed")["version"] == "1.0"
    assert set(device.load_state()["rejected"]) == {"1.1", "1.2"}
    # only rejected releases left: refused in plain words, and --to still forces one
    assert main(["deploy", "rollback", "--root-dir", str(device_root)]) == 3
    assert "rolled back from before" in capsys.readouterr().err
    assert device.rollback(to="1.1")["version"] == "1.1"


def _rewrite_bundle(src, dst, name, change):
    """A copy of bundle ``src`` with member ``name`` (JSON) changed and the index updated to match: what a
    release tool with a bug could produce and sign."""
    import hashlib
    import io
    import tarfile

    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    data = {m.name: d for m, d in members}
    doc = json.loads(data[name])
    change(doc)
    data[name] = json.dumps(doc).encode()
    index = json.loads(data["bundle.json"])
    index["files"][name] = {"sha256": hashlib.sha256(data[name]).hexdigest(), "size": len(data[name])}
    data["bundle.json"] = json.dumps(index).encode()
    with tarfile.open(dst, "w:gz") as tar:
        for member, _ in members:
            if member.isfile():
                member.size = len(data[member.name])
                tar.addfile(member, io.BytesIO(data[member.name]))
            else:
                tar.addfile(member)
    return dst


def test_signed_bundle_with_an_unusable_manifest_is_refused_as_an_update(repo, bundles, device_root, tmp_path,
                                                                         capsys):
    bad = _rewrite_bundle(bundles["1.0"], tmp_path / "smearsight-1.0.tar.gz", "models/detector/manifest.json",
                          lambda m: m.update(onnx_file="../model.onnx"))
    repo.publish(bad)
    rc = main(["deploy", "update", "--root-dir", str(device_root), "--repo", str(repo.dir)])
    err = capsys.readouterr().err
    assert rc == 3, err  # an update problem, not bad command-line input
    assert "failed verification" in err and "plain file name" in err and "nothing was installed" in err
    assert Device(device_root).current() is None


@pytest.mark.parametrize("cut", ["targets/", "timestamp.json"])
def test_connection_dropped_mid_download_is_one_line_and_refused(repo, bundles, device_root, capsys, cut):
    """A server that announces the full Content-Length and then closes (a flaky link): exit 3, one line."""
    import http.server
    import threading
    from functools import partial
    from pathlib import Path

    repo.publish(bundles["1.0"])

    class Truncating(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server's naming
            path = Path(self.directory) / self.path.lstrip("/")
            if cut not in self.path or not path.is_file():
                return super().do_GET()
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Truncating, directory=str(repo.dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        capsys.readouterr()
        rc = main(["deploy", "update", "--repo", f"http://127.0.0.1:{server.server_address[1]}",
                   "--root-dir", str(device_root)])
    finally:
        server.shutdown()
        server.server_close()
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert rc == 3 and len(err) == 1, err
    assert "update refused: cannot download from the repository (connection broken" in err[0]
    assert Device(device_root).current() is None
    assert Device(device_root).events()[-1]["event"] == "refused"


def test_a_version_chosen_again_on_purpose_is_no_longer_rejected(repo, bundles, device_root, capsys):
    device = _two_releases(repo, bundles, device_root)
    root = str(device_root)
    assert main(["deploy", "rollback", "--root-dir", root, "--reason", "counts look wrong"]) == 0
    assert "1.1" in device.load_state()["rejected"]
    assert main(["deploy", "rollback", "--root-dir", root, "--to", "1.1", "--reason", "false alarm"]) == 0
    assert "1.1" not in device.load_state()["rejected"]
    assert main(["deploy", "health-check", "--root-dir", root, "--confirm"]) == 0
    repo.publish(bundles["1.2"])
    assert update(device_root, str(repo.dir), keep=3)["version"] == "1.2"
    with open(device.releases / "1.2" / "models" / "detector" / "model.onnx", "ab") as handle:
        handle.write(b"corrupt")
    capsys.readouterr()
    assert main(["deploy", "health-check", "--root-dir", root]) == 4
    assert "rolled back to 1.1" in capsys.readouterr().err
    assert device.current() == "1.1"
    # update --force of a rejected version clears it as well
    assert update(device_root, str(repo.dir), force=True, keep=3)["status"] == "installed"
    assert "1.2" not in device.load_state()["rejected"]


def test_health_check_says_why_it_cannot_roll_back(repo, bundles, device_root, capsys):
    repo.publish(bundles["1.0"])
    update(device_root, str(repo.dir))
    device = Device(device_root)
    with open(device.releases / "1.0" / "models" / "detector" / "model.onnx", "ab") as handle:
        handle.write(b"corrupt")
    capsys.readouterr()
    assert main(["deploy", "health-check", "--root-dir", str(device_root)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "size" in err[0] and "cannot roll back from 1.0: no previous release" in err[0]
    assert device.events()[-1]["event"] == "rollback-failed"
    assert "cannot roll back from 1.0" in device.events()[-1]["reason"]


def test_provision_into_a_file_is_one_line(repo, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert main(["deploy", "provision", "--trusted-root", str(repo.meta_dir / "1.root.json"),
                 "--root-dir", str(tmp_path / "afile")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--root-dir" in err[0] and "is a file; expected a folder" in err[0]


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["rollback"], ["health-check", "--quick"],
                                  ["update", "--repo", "{repo}"]])
def test_a_mistyped_root_is_refused_not_created(repo, tmp_path, capsys, args):
    mistyped = tmp_path / "var" / "lib" / "smearsigth"
    capsys.readouterr()
    assert main(["deploy", *[a.format(repo=repo.dir) for a in args], "--root-dir", str(mistyped)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--root-dir {mistyped}: no such folder (device not provisioned" in err[0]
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("state, events", [
    ("null", None), ("[]", None), ('{"history": null}', None), ('{"rejected": []}', None),
    ('{"trial": "x"}', None), ('{"pending": 3, "history": [1]}', None),
    (None, "null"), (None, '{"x": 1}'), (None, '[{"event": "installed"}, 3, null]'),
])
def test_state_or_events_of_the_wrong_shape_fall_back_to_empty(repo, bundles, device_root, capsys, state, events):
    repo.publish(bundles["1.0"])
    update(device_root, str(repo.dir))
    device = Device(device_root)
    if state is not None:
        device.state_path.write_text(state)
    if events is not None:
        device.events_path.write_text(events)
    root = str(device_root)
    for args, rc in ((["status"], 0), (["status", "--json"], 0), (["health-check"], 0), (["rollback"], 3),
                     (["update", "--repo", str(repo.dir)], 0)):
        capsys.readouterr()
        assert main(["deploy", *args, "--root-dir", root]) == rc, args
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if args == ["rollback"]:
            assert "cannot roll back from 1.0" in err
        if args == ["status"] and state == "null":
            assert "warning:" in err and "state.json: expected a JSON object, got null" in err
    assert device.current() == "1.0"
    assert isinstance(device.load_state()["history"], list) and isinstance(device.events(), list)
    assert all("time" in e for e in device.events())


@pytest.mark.parametrize("name", ["metadata/timestamp.json", "bundle"])
def test_usb_stick_with_a_fifo_is_refused_not_hanging(repo, bundles, device_root, tmp_path, name):
    import shutil
    import subprocess
    import sys

    repo.publish(bundles["1.0"])
    usb = tmp_path / "usb"
    shutil.copytree(repo.dir, usb, ignore=shutil.ignore_patterns("keys"))
    fifo = next((usb / "targets" / "bundles").iterdir()) if name == "bundle" else usb / name
    fifo.unlink()
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "smearsight.cli", "deploy", "update", "--repo", str(usb),
                           "--root-dir", str(device_root)], capture_output=True, text=True, timeout=60)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 3 and len(err) == 1, proc.stderr
    assert f"{fifo}: not a regular file" in err[0] and "nothing was installed" in err[0]
    assert Device(device_root).events()[-1]["event"] == "refused"


def test_a_full_temporary_folder_does_not_stop_an_update(repo, bundles, device_root, serve, tmpfs, monkeypatch):
    import tempfile

    repo.publish(bundles["1.0"])
    url = serve(repo.dir)
    with tmpfs("tmp", "size=8k") as full:
        with open(full / "filler", "wb", buffering=0) as handle:
            with pytest.raises(OSError):
                while True:
                    handle.write(b"x" * 4096)
        monkeypatch.setattr(tempfile, "tempdir", str(full))  # what TMPDIR=<full tmpfs> gives
        for where in (url, str(repo.dir)):  # downloads are buffered under the device root, not in $TMPDIR
            result = update(device_root, where)
            assert result["status"] in {"installed", "up-to-date"} and Device(device_root).current() == "1.0"
            if where == url:
                (device_root / "current").unlink()


def test_a_device_provisioned_from_an_expired_first_root_updates_through_a_newer_one(repo, bundles, tmp_path, capsys):
    """The docs provision from metadata/1.root.json, which expires after a year; TUF needs only the newest root
    to be fresh, so such a device must be provisioned (with a note) and update once the repository has a newer
    root (before: provisioning was refused)."""
    from datetime import datetime, timezone

    from tuf.api.metadata import Metadata

    from smearsight.deploy.keys import load_signer

    old = Metadata.from_file(str(repo.meta_dir / "1.root.json"))
    old.signed.expires = datetime(2020, 1, 1, tzinfo=timezone.utc)
    old.signatures.clear()
    old.sign(load_signer(repo.keys_dir, "root"))
    expired = tmp_path / "1.root.json"
    expired.write_bytes(old.to_bytes())
    root = tmp_path / "device"
    assert main(["deploy", "provision", "--trusted-root", str(expired), "--root-dir", str(root)]) == 0
    assert "expired on 2020-01-01" in capsys.readouterr().err
    repo.refresh(root=True)  # root v2, fresh
    repo.publish(bundles["1.0"])
    assert update(root, str(repo.dir))["version"] == "1.0"
    assert Device(root).current() == "1.0"


def test_an_older_bundle_for_this_gpu_does_not_hide_a_newer_onnx_one(repo, bundles, device_root, tmp_path, factory):
    """The GPU key is tried first; its bundle being older than the installed release (engines built for an earlier
    release) must not stop the update: the ONNX fallback's newer release is installed, as when the GPU bundle
    cannot run here."""
    orin = DeviceProfile(compute_capability="8.7", tensorrt_version="10.3.0")
    repo.publish(bundles["1.1"])
    assert update(device_root, str(repo.dir), profile=orin)["version"] == "1.1"
    engine = dict(tensorrt_version="10.3.0", cuda_version="12.6", gpu_name="Orin", compute_capability="8.7")
    build_bundle([factory.detector(tmp_path / "det-orin", seed=7, engine=engine)], "1.0", tmp_path / "orin.tar.gz")
    repo.publish(tmp_path / "orin.tar.gz", orin.gpu_key)
    repo.publish(bundles["1.2"])
    result = update(device_root, str(repo.dir), profile=orin)
    assert result["status"] == "installed" and result["version"] == "1.2" and result["key"] == "onnx"
    # with nothing newer anywhere, the downgrade is still refused and says so
    repo.publish(bundles["1.0"], allow_downgrade=True)
    with pytest.raises(UpdateError, match="offers 1.0, older than the installed 1.2"):
        update(device_root, str(repo.dir), profile=orin)
    assert Device(device_root).current() == "1.2"


@pytest.mark.parametrize("anchor", ["garbage", '{"signed": {"_type": "root"}, "signatures": []}', "unsigned"])
def test_a_damaged_trusted_root_on_the_device_is_named(repo, bundles, device_root, capsys, anchor):
    """The device's own trust anchor was blamed on the repository ('the repository metadata is invalid')."""
    repo.publish(bundles["1.0"])
    path = device_root / "trusted-root.json"
    if anchor == "unsigned":
        data = json.loads(path.read_text())
        data["signatures"] = []
        anchor = json.dumps(data)
    path.write_text(anchor)
    capsys.readouterr()
    assert main(["deploy", "update", "--repo", str(repo.dir), "--root-dir", str(device_root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: not valid, self-signed TUF root metadata" in err[0]
    assert "repository metadata" not in err[0] and "deploy provision" in err[0]
    assert Device(device_root).current() is None
