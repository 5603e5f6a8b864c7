"""The TUF repository on disk: keys with tight permissions, signed metadata, publishing, serving."""

from __future__ import annotations

import http.client
import os
import stat
import threading
import urllib.error
import urllib.request

import pytest
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from smearsight.deploy.keys import load_signer
from smearsight.deploy.repository import FileRepository, gpu_key, make_server, target_path
from smearsight.errors import InputError


def test_init_writes_private_keys_and_signed_metadata(repo):
    keys = repo.keys_dir
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert stat.S_IMODE((keys / f"{role}.pem").stat().st_mode) == 0o600
    root = Metadata[Root].from_file(str(repo.meta_dir / "1.root.json"))
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
    for role, cls in (("targets", Targets), ("snapshot", Snapshot), ("timestamp", Timestamp)):
        name = "timestamp.json" if role == "timestamp" else f"1.{role}.json"
        md = Metadata.from_file(str(repo.meta_dir / name))
        assert isinstance(md.signed, cls) and md.signed.version == 1
        root.signed.verify_delegate(role, md.signed_bytes, md.signatures)  # raises when unsigned
        assert not md.signed.is_expired()
    assert root.signed.consistent_snapshot
    # each role has its own key
    assert len({root.signed.roles[r].keyids[0] for r in ("root", "targets", "snapshot", "timestamp")}) == 4


def test_init_refuses_existing_repo_and_bad_expiry(repo, tmp_path):
    with pytest.raises(InputError, match="already holds a repository"):
        FileRepository.init(repo.dir)
    with pytest.raises(InputError, match="unknown role 'bogus'"):
        FileRepository.init(tmp_path / "r2", {"bogus": 3})
    for days in (0, -1, float("nan"), float("inf"), 1e9):
        with pytest.raises(InputError, match="more than 0 and at most 36500 days"):
            FileRepository.init(tmp_path / "r3", {"timestamp": days})
    assert not (tmp_path / "r3").exists()


def test_init_that_fails_part_way_leaves_nothing_behind(tmp_path, monkeypatch):
    """A crash while signing (here: the snapshot key cannot be made) must not leave a half-made repository
    that init would then refuse as existing."""
    from smearsight.deploy import repository as repository_module

    real = repository_module.generate_key

    def failing(keys_dir, role):
        if role == "snapshot":
            raise OSError(28, "No space left on device")
        return real(keys_dir, role)

    monkeypatch.setattr(repository_module, "generate_key", failing)
    target = tmp_path / "repo"
    with pytest.raises(OSError):
        FileRepository.init(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(repository_module, "generate_key", real)
    repo = FileRepository.init(target)  # and a second attempt works
    assert (repo.meta_dir / "root.json").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700


def test_init_into_an_existing_folder_keeps_its_files(tmp_path):
    target = tmp_path / "srv"
    target.mkdir()
    (target / "README").write_text("ours")
    repo = FileRepository.init(target)
    assert (target / "README").read_text() == "ours" and (repo.meta_dir / "timestamp.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["srv"]  # no staging folder left


def test_init_clears_the_staging_folder_of_an_init_that_was_killed(tmp_path):
    """kill -9 runs no clean-up: the half-made repository it leaves (private keys included) is removed by the
    next init, and only the new repository remains."""
    killed = tmp_path / ".repo.k1ll3d00.staging"
    (killed / "repo" / "keys").mkdir(parents=True)
    (killed / "repo" / "keys" / "root.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    (killed / ".lock").write_bytes(b"")  # locked by no one: its process is gone
    repo = FileRepository.init(tmp_path / "repo")
    assert (repo.meta_dir / "1.root.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert not (repo.dir / ".lock").exists() and not (repo.dir / "repo").exists()


def test_expiry_settings_are_used(tmp_path):
    repo = FileRepository.init(tmp_path / "r", {"timestamp": 2, "root": 30})
    ts = repo.timestamp()
    root = repo.root()
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    assert timedelta(days=1.9) < ts.expires - now <= timedelta(days=2)
    assert timedelta(days=29.9) < root.expires - now <= timedelta(days=30)


def test_key_with_open_permissions_is_refused(repo):
    os.chmod(repo.keys_dir / "timestamp.pem", 0o644)
    with pytest.raises(InputError, match="too open; run: chmod 600"):
        load_signer(repo.keys_dir, "timestamp")


def test_publish_bumps_and_resigns(repo, bundles):
    result = repo.publish(bundles["1.0"])
    assert result["changed"] and result["target"] == "bundles/onnx.tar.gz"
    assert repo.targets().version == 2 and repo.snapshot().version == 2 and repo.timestamp().version == 2
    assert repo.snapshot().meta["targets.json"].version == 2
    assert repo.timestamp().snapshot_meta.version == 2
    info = repo.targets().targets["bundles/onnx.tar.gz"]
    assert info.custom["smearsight"]["version"] == "1.0"
    stored = repo.targets_dir / "bundles" / f"{info.hashes['sha256']}.onnx.tar.gz"
    assert stored.read_bytes() == bundles["1.0"].read_bytes()
    assert (repo.meta_dir / "2.targets.json").is_file() and (repo.meta_dir / "2.snapshot.json").is_file()
    # same bundle again: nothing to do; older version: refused; newer: accepted
    assert repo.publish(bundles["1.0"])["changed"] is False
    repo.publish(bundles["1.2"])
    with pytest.raises(InputError, match="older than the published 1.2"):
        repo.publish(bundles["1.1"])
    assert repo.publish(bundles["1.1"], allow_downgrade=True)["changed"]
    assert repo.published()["bundles/onnx.tar.gz"]["version"] == "1.1"


def test_gpu_keys(repo, bundles):
    assert gpu_key("8.7", "10.3.0") == "sm_87-trt10.3"
    assert target_path("sm_87-trt10.3") == "bundles/sm_87-trt10.3.tar.gz"
    with pytest.raises(InputError, match="not a GPU key"):
        target_path("orin")
    with pytest.raises(InputError, match="has no TensorRT engines"):
        repo.publish(bundles["1.0"], "sm_87-trt10.3")


def test_a_gpu_bundle_is_published_only_under_the_key_its_engines_were_built_for(repo, tmp_path, factory):
    """Devices of the key would refuse the whole bundle, and download it again at every update check."""
    from smearsight.deploy.bundle import build_bundle

    orin = dict(tensorrt_version="10.3.0", cuda_version="12.6", gpu_name="Orin", compute_capability="8.7")
    a2000 = {**orin, "gpu_name": "RTX A2000", "compute_capability": "8.6"}
    det = factory.detector(tmp_path / "det", seed=5, engine=a2000)
    build_bundle([det], "2.0", tmp_path / "wrong-gpu.tar.gz")
    with pytest.raises(InputError, match="model 'detector' was built for sm_86-trt10.3 .*not for --gpu sm_87-trt10.3"):
        repo.publish(tmp_path / "wrong-gpu.tar.gz", "sm_87-trt10.3")
    morph = factory.morphology(tmp_path / "head")
    det = factory.detector(tmp_path / "det-orin", seed=6, engine=orin)
    build_bundle([det, morph], "2.0", tmp_path / "half.tar.gz")
    with pytest.raises(InputError, match="model 'morphology_head' has no TensorRT engine"):
        repo.publish(tmp_path / "half.tar.gz", "sm_87-trt10.3")
    assert repo.targets().targets == {} and repo.targets().version == 1  # nothing was signed
    build_bundle([det], "2.0", tmp_path / "orin.tar.gz")
    assert repo.publish(tmp_path / "orin.tar.gz", "sm_87-trt10.3")["changed"]


def test_serve_only_metadata_and_targets(repo, bundles):
    repo.publish(bundles["1.0"])
    server = make_server(repo.dir)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(f"{base}/metadata/timestamp.json") as response:
            assert response.read() == (repo.meta_dir / "timestamp.json").read_bytes()
        for secret in ("/keys/root.pem", "/repository.json", "/metadata/", "/targets/bundles/"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(base + secret)
            assert info.value.code == 404
        # '..' and its percent-encoded forms must not climb out of metadata/ or targets/ (sent raw:
        # a client is free not to fold them)
        for sneaky in ("/metadata/../keys/root.pem", "/targets/%2e%2e/keys/timestamp.pem",
                       "/metadata/%2E%2E/repository.json", "/metadata/..%2fkeys/root.pem"):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
            try:
                conn.request("GET", sneaky)
                response = conn.getresponse()
                body = response.read()
            finally:
                conn.close()
            assert response.status == 404, sneaky
            assert b"PRIVATE KEY" not in body
    finally:
        server.shutdown()
        server.server_close()


def test_cli_repo_commands(tmp_path, bundles, capsys):
    from smearsight.cli import main

    repo_dir = tmp_path / "r"
    assert main(["deploy", "repo", "init", str(repo_dir), "--expiry-days", "timestamp=3"]) == 0
    assert "offline" in capsys.readouterr().out
    assert main(["deploy", "repo", "publish", str(repo_dir), str(bundles["1.0"]), "--onnx-fallback"]) == 0
    assert main(["deploy", "repo", "publish", str(repo_dir), str(bundles["1.0"])]) == 1
    assert "exactly one of --gpu" in capsys.readouterr().err
    assert main(["deploy", "repo", "refresh", str(repo_dir)]) == 0
    assert FileRepository(repo_dir).timestamp().version == 3
    assert main(["deploy", "repo", "refresh", str(repo_dir), "--targets"]) == 0
    assert FileRepository(repo_dir).targets().version == 3
    assert main(["deploy", "repo", "init", str(repo_dir), "--expiry-days", "timestamp"]) == 1


def test_refresh_root_and_targets_reaches_devices(repo, bundles, device_root):
    from smearsight.deploy.updater import update

    repo.publish(bundles["1.0"])
    assert update(device_root, str(repo.dir))["version"] == "1.0"
    versions = repo.refresh(targets=True, root=True)
    assert versions["root"] == 2 and versions["targets"] == 3 and (repo.meta_dir / "2.root.json").is_file()
    repo.publish(bundles["1.1"])
    assert update(device_root, str(repo.dir))["version"] == "1.1"
    assert (device_root / "tuf" / "root_history" / "2.root.json").is_file()  # the device now trusts root v2
    os.unlink(repo.keys_dir / "root.pem")  # kept offline
    with pytest.raises(InputError, match="keep root offline"):
        repo.refresh(root=True)
    assert repo.refresh()["timestamp"] == 5  # the online keys are enough for freshness


def test_cli_serve_subprocess(repo, bundles):
    import re
    import subprocess
    import sys

    repo.publish(bundles["1.0"])
    proc = subprocess.Popen([sys.executable, "-m", "smearsight.cli", "deploy", "repo", "serve", str(repo.dir),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata/2.targets.json", timeout=10) as response:
            assert response.read() == (repo.meta_dir / "2.targets.json").read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def _metadata_bytes(repo):
    return {p.name: p.read_bytes() for p in repo.meta_dir.iterdir()}


@pytest.mark.parametrize("problem", ["open-permissions", "missing"])
def test_publish_with_an_unusable_online_key_writes_nothing(repo, bundles, problem):
    repo.publish(bundles["1.0"])
    before = _metadata_bytes(repo)
    key = repo.keys_dir / ("snapshot.pem" if problem == "open-permissions" else "timestamp.pem")
    aside = key.with_name("aside.pem")
    if problem == "open-permissions":
        os.chmod(key, 0o644)
        match = "too open"
    else:
        key.rename(aside)
        match = "timestamp key is not on this host"
    with pytest.raises(InputError, match=match) as info:
        FileRepository(repo.dir).publish(bundles["1.1"])
    assert "keep root offline" not in str(info.value)
    assert _metadata_bytes(repo) == before  # targets.json was not signed ahead of the others
    if problem == "open-permissions":
        os.chmod(key, 0o600)
    else:
        aside.rename(key)
    result = FileRepository(repo.dir).publish(bundles["1.1"])
    assert result["changed"] and repo.timestamp().snapshot_meta.version == repo.snapshot().version == 3


def test_publish_again_finishes_a_publish_that_stopped_after_targets(repo, bundles, device_root):
    import shutil

    from tuf.api.metadata import TargetFile

    from smearsight.deploy.updater import update
    from smearsight.fileio import sha256_file

    repo.publish(bundles["1.0"])
    assert update(device_root, str(repo.dir))["version"] == "1.0"
    # what an interrupted publish of 1.1 leaves (killed, or a key failing after targets was signed): the
    # bundle stored and targets v3 signed, but snapshot and timestamp still at v2
    published = repo.targets().targets["bundles/onnx.tar.gz"]
    info = TargetFile.from_file("bundles/onnx.tar.gz", str(bundles["1.1"]), ["sha256"])
    info.unrecognized_fields["custom"] = {"smearsight": {**published.custom["smearsight"], "version": "1.1"}}
    shutil.copy(bundles["1.1"], repo.targets_dir / "bundles" / f"{sha256_file(bundles['1.1'])}.onnx.tar.gz")
    with repo.edit_targets() as targets:
        targets.targets["bundles/onnx.tar.gz"] = info
    assert repo.targets().version == 3 and repo.snapshot().meta["targets.json"].version == 2
    assert update(device_root, str(repo.dir))["status"] == "up-to-date"  # devices cannot see 1.1 yet
    result = FileRepository(repo.dir).publish(bundles["1.1"])
    assert result == {"target": "bundles/onnx.tar.gz", "version": "1.1", "changed": False, "resigned": True}
    assert repo.snapshot().meta["targets.json"].version == 3
    assert repo.timestamp().snapshot_meta.version == repo.snapshot().version == 3
    assert update(device_root, str(repo.dir))["version"] == "1.1"
    assert FileRepository(repo.dir).publish(bundles["1.1"])["resigned"] is False  # now nothing to do


@pytest.mark.parametrize("role", ["timestamp", "targets", "root"])
def test_a_key_that_root_does_not_trust_is_refused_before_signing(repo, bundles, tmp_path, role, capsys):
    import shutil

    from smearsight.cli import main

    repo.publish(bundles["1.0"])
    other = FileRepository.init(tmp_path / "other")
    for name in (f"{role}.pem", f"{role}.pub.json"):  # keys/ restored from another repository's backup
        shutil.copy2(other.keys_dir / name, repo.keys_dir / name)
    before = _metadata_bytes(repo)
    args = ["--root"] if role == "root" else ["--targets"]
    capsys.readouterr()
    if role != "root":
        assert main(["deploy", "repo", "publish", str(repo.dir), str(bundles["1.1"]), "--onnx-fallback"]) == 1
    assert main(["deploy", "repo", "refresh", str(repo.dir), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == (1 if role == "root" else 2)
    assert all(f"keys/{role}.pem: not a {role} key that root v1 trusts" in line for line in err)
    assert _metadata_bytes(repo) == before


@pytest.mark.parametrize("config, expected", [
    ({"expiry_days": {"timestamp": -1}}, "timestamp must expire in more than 0"),
    ({"expiry_days": {"timestamp": "30"}}, 'timestamp must be a number of days, got "30"'),
    ({"expiry_days": {"snapshot": 1e9}}, "snapshot must expire in more than 0 and at most 36500"),
    ({"expiry_days": {"timestamp": [7]}}, "timestamp must be a number of days, got [7]"),
    ({"expiry_days": {"timestmap": 7}}, "unknown role 'timestmap'"),
    ({"expiry_days": [7]}, "'expiry_days' must be an object"),
    ([], "expected a JSON object"),
])
def test_bad_expiry_settings_are_refused_when_read(repo, bundles, capsys, config, expected):
    import json

    from smearsight.cli import main

    (repo.dir / "repository.json").write_text(json.dumps(config))
    before = _metadata_bytes(repo)
    capsys.readouterr()
    assert main(["deploy", "repo", "refresh", str(repo.dir)]) == 1
    assert main(["deploy", "repo", "publish", str(repo.dir), str(bundles["1.0"]), "--onnx-fallback"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("repository.json" in line and expected in line for line in err), err
    assert _metadata_bytes(repo) == before


def test_serve_refuses_bad_host_and_port_in_one_line(repo, capsys):
    import socket

    from smearsight.cli import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cases = [
            (["--port", str(busy.getsockname()[1])], f"--port: {busy.getsockname()[1]} is already in use"),
            (["--port", "99999"], "--port: 99999 is not a TCP port (0 to 65535"),
            (["--port", "-1"], "--port: -1 is not a TCP port"),
            (["--host", "no-such-host.invalid"], "--host: 'no-such-host.invalid' is not a known host"),
            (["--host", "192.0.2.1"], "--host: 192.0.2.1 is not an address of this machine"),
        ]
        for args, expected in cases:
            capsys.readouterr()
            assert main(["deploy", "repo", "serve", str(repo.dir), *args]) == 1, args
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and expected in err[0], (args, err)
    finally:
        busy.close()


def test_a_version_published_before_cannot_come_back_with_other_content(repo, bundles, factory, tmp_path):
    from smearsight.deploy.bundle import build_bundle

    other = build_bundle([factory.detector(tmp_path / "det", seed=7), factory.morphology(tmp_path / "head")],
                         "1.0", tmp_path / "other-1.0.tar.gz")
    assert other["version"] == "1.0"
    repo.publish(bundles["1.0"])
    with pytest.raises(InputError, match="already published"):
        repo.publish(tmp_path / "other-1.0.tar.gz")
    repo.publish(bundles["1.1"])
    with pytest.raises(InputError, match="version 1.0 was published for 'onnx' before with other content"):
        repo.publish(tmp_path / "other-1.0.tar.gz", allow_downgrade=True)
    assert repo.published()["bundles/onnx.tar.gz"]["version"] == "1.1"
    assert repo.publish(bundles["1.0"], allow_downgrade=True)["changed"]  # the same content may come back


def test_serve_a_client_that_goes_away_mid_download_is_one_line(repo, capfd):
    """A device unplugged while downloading a bundle: the server logs one line and keeps serving, rather than
    printing socketserver's traceback for every dropped download."""
    import socket
    import struct
    import time

    with open(repo.targets_dir / "big.tar.gz", "wb") as handle:
        handle.truncate(64 << 20)  # more than the socket buffers hold
    server = make_server(repo.dir, quiet=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"GET /targets/big.tar.gz HTTP/1.1\r\nHost: device\r\n\r\n")
        assert client.recv(1024).startswith(b"HTTP/1.0 200")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, as a cut cable
        client.close()
        err, deadline = "", time.monotonic() + 10
        while "closed the connection" not in err and "-----\n" not in err and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capfd.readouterr().err
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata/timestamp.json", timeout=10) as response:
            assert response.status == 200  # still serving
    finally:
        server.shutdown()
        server.server_close()
    err += capfd.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "closed the connection" in line]
    assert len(lines) == 1 and lines[0].startswith("127.0.0.1 - - [")


@pytest.mark.parametrize("text", ["[]", "null",
                                  '{"keyid": "ab", "keytype": "ed25519", "scheme": "ed25519", "keyval": 3}'])
def test_a_damaged_public_key_file_is_named_not_the_private_key(repo, capsys, text):
    from smearsight.cli import main

    (repo.keys_dir / "timestamp.pub.json").write_text(text)
    assert main(["deploy", "repo", "refresh", str(repo.dir)]) == 1
    err = capsys.readouterr().err
    assert "timestamp.pub.json: cannot read the public key" in err and "timestamp.pem" not in err
    assert len(err.strip().splitlines()) == 1


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_serve_on_an_ipv6_address(repo):
    """--host :: (every interface, IPv6 and IPv4) and --host ::1 were refused as unknown host names."""
    for host, url_host in (("::1", "[::1]"), ("::", "127.0.0.1")):
        server = make_server(repo.dir, host=host)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://{url_host}:{server.server_address[1]}/metadata/timestamp.json"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.read() == (repo.meta_dir / "timestamp.json").read_bytes()
        finally:
            server.shutdown()
            server.server_close()
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "smearsight.cli", "deploy", "repo", "serve", str(repo.dir),
                             "--host", "::1", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://\[::1\]:(\d+)/", line).group(1))  # a URL a browser or device can use
        with urllib.request.urlopen(f"http://[::1]:{port}/metadata/1.root.json", timeout=10) as response:
            assert response.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_refresh_warns_when_metadata_it_does_not_sign_has_expired(tmp_path, bundles, capsys):
    """A daily 'refresh' cron re-signs snapshot and timestamp only; once targets expired it still said 'signed'
    and exited 0 while every device refused the repository ('metadata has expired')."""
    import time

    from smearsight.cli import main

    repo = FileRepository.init(tmp_path / "r", {"targets": 1 / 86400})  # targets valid for one second
    repo.publish(bundles["1.0"])
    time.sleep(1.2)
    capsys.readouterr()
    assert main(["deploy", "repo", "refresh", str(repo.dir)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: targets metadata expired on ")
    assert "refresh --targets" in err[0]
    assert main(["deploy", "repo", "refresh", str(repo.dir), "--targets"]) == 0
    assert capsys.readouterr().err == ""  # targets fresh again; root (a year) is far from expiring


def test_init_into_an_existing_folder_needs_no_write_access_beside_it(tmp_path, tmpfs):
    """/srv/smearsight-repo made by an administrator for the publishing user, /srv not writable by that user: init
    staged beside the folder, in /srv, and failed. The parent is made read-only here (permissions do not stop
    root), the folder itself a writable mount."""
    import subprocess

    with tmpfs("srv", "size=4m") as srv:
        target = srv / "smearsight-repo"
        target.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(target)], check=True)
        try:
            (target / "README").write_text("ours")
            killed = target / ".init.k1ll3d00.staging"  # what an init killed in this folder leaves
            (killed / "repo" / "keys").mkdir(parents=True)
            subprocess.run(["mount", "-o", "remount,ro", str(srv)], check=True)
            repo = FileRepository.init(target)
            assert (repo.meta_dir / "1.root.json").is_file() and (target / "README").read_text() == "ours"
            assert sorted(p.name for p in target.iterdir()) == ["README", "keys", "metadata", "repository.json",
                                                                "targets"]
            assert stat.S_IMODE((repo.keys_dir / "root.pem").stat().st_mode) == 0o600
        finally:
            subprocess.run(["umount", "-l", str(target)], check=False)
