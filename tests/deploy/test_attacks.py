"""Attacks against a real repository served over real HTTP on 127.0.0.1: every one is refused with a
one-line message, and the device keeps its current release untouched."""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timedelta, timezone

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, TargetFile

from smearsight.deploy.bundle import verify_release
from smearsight.deploy.install import Device, UpdateError
from smearsight.deploy.keys import load_signer
from smearsight.deploy.repository import FileRepository
from smearsight.deploy.updater import update


@pytest.fixture
def installed(repo, bundles, device_root, serve):
    """Device on 1.0 from the HTTP repository; the repository then publishes 1.1."""
    repo.publish(bundles["1.0"])
    url = serve(repo.dir)
    assert update(device_root, url)["version"] == "1.0"
    return url


def _refused(device_root, url, fragment, current="1.0"):
    with pytest.raises(UpdateError) as info:
        update(device_root, url)
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message and f"current release {current} untouched" in message
    device = Device(device_root)
    assert device.current() == current
    assert verify_release(device.current_dir(), current) == []
    assert device.events()[-1]["event"] == "refused"
    assert not list(device.releases.glob(".staging-*"))
    return message


def _resign(repo, role, mutate, signer=None):
    """Change a role's metadata as a publisher with ``signer`` (default: the real key) would."""
    name = "timestamp.json" if role == "timestamp" else f"{role}.json"
    md = Metadata.from_file(str(repo.meta_dir / name))
    mutate(md.signed)
    md.sign(signer or load_signer(repo.keys_dir, role))
    data = md.to_bytes()
    (repo.meta_dir / name).write_bytes(data)
    if role != "timestamp":
        (repo.meta_dir / f"{md.signed.version}.{role}.json").write_bytes(data)
    return md


def test_tampered_target(repo, bundles, device_root, installed):
    repo.publish(bundles["1.1"])
    info = repo.targets().targets["bundles/onnx.tar.gz"]
    stored = repo.targets_dir / "bundles" / f"{info.hashes['sha256']}.onnx.tar.gz"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    _refused(device_root, installed, "tampered target")
    # a longer file than signed is refused too
    stored.write_bytes(bytes(data) + b"extra")
    _refused(device_root, installed, "tampered target")


def test_bad_signature(repo, bundles, device_root, installed):
    repo.publish(bundles["1.1"])
    path = repo.meta_dir / "timestamp.json"
    doc = json.loads(path.read_text())
    doc["signed"]["version"] += 1  # content changed after signing
    path.write_text(json.dumps(doc))
    _refused(device_root, installed, "bad signature or wrong key")


def test_wrong_key_even_with_the_online_keys(repo, bundles, device_root, installed):
    """An attacker holding the snapshot and timestamp keys, but not the targets key, offers a bundle."""
    attacker = CryptoSigner.generate_ed25519()
    evil = bundles["1.1"]
    sha = __import__("hashlib").sha256(evil.read_bytes()).hexdigest()
    shutil.copy(evil, repo.targets_dir / "bundles" / f"{sha}.onnx.tar.gz")

    def add_target(targets):
        targets.version += 1
        info = TargetFile.from_file("bundles/onnx.tar.gz", str(evil), ["sha256"])
        info.unrecognized_fields["custom"] = {"smearsight": {"version": "6.6.6"}}
        targets.targets["bundles/onnx.tar.gz"] = info

    targets = _resign(repo, "targets", add_target, signer=attacker)

    def point_snapshot(snapshot):
        snapshot.version += 1
        snapshot.meta["targets.json"] = MetaFile(targets.signed.version)

    snapshot = _resign(repo, "snapshot", point_snapshot)

    def point_timestamp(timestamp):
        timestamp.version += 1
        timestamp.snapshot_meta = MetaFile(snapshot.signed.version)

    _resign(repo, "timestamp", point_timestamp)
    _refused(device_root, installed, "not signed by the trusted keys")


def test_expired_timestamp(repo, bundles, device_root, installed):
    repo.publish(bundles["1.1"])

    def expire(timestamp):
        timestamp.version += 1
        timestamp.expires = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)

    _resign(repo, "timestamp", expire)
    _refused(device_root, installed, "metadata has expired")


def test_rollback_to_older_metadata(repo, bundles, device_root, installed, tmp_path):
    old = tmp_path / "metadata-at-1.0"
    shutil.copytree(repo.meta_dir, old)
    repo.publish(bundles["1.1"])
    assert update(device_root, installed)["version"] == "1.1"
    # the attacker serves the (validly signed, unexpired) metadata from before 1.1
    shutil.rmtree(repo.meta_dir)
    shutil.copytree(old, repo.meta_dir)
    _refused(device_root, installed, "rollback or mix-and-match", current="1.1")


def test_signed_downgrade_is_refused_without_permission(repo, bundles, device_root, installed):
    repo.publish(bundles["1.1"])
    assert update(device_root, installed)["version"] == "1.1"
    repo.publish(bundles["1.0"], allow_downgrade=True)
    _refused(device_root, installed, "older than the installed 1.1", current="1.1")
    assert update(device_root, installed, allow_downgrade=True)["version"] == "1.0"


def test_freeze_stale_metadata_replayed(tmp_path, bundles, serve):
    from smearsight.deploy.install import provision

    repo = FileRepository.init(tmp_path / "repo")
    repo.expiry_days["timestamp"] = 2 / 86400  # a two-second timestamp for the test
    repo.publish(bundles["1.0"])
    frozen = tmp_path / "mirror"
    shutil.copytree(repo.dir, frozen, ignore=shutil.ignore_patterns("keys"))
    root = tmp_path / "device"
    provision(root, repo.meta_dir / "1.root.json")
    mirror_url = serve(frozen)
    assert update(root, mirror_url)["version"] == "1.0"
    repo.expiry_days["timestamp"] = 7
    repo.publish(bundles["1.1"])  # the real repository moves on; the mirror keeps replaying the old state
    time.sleep(2.5)
    _refused(root, mirror_url, "metadata has expired")
    assert update(root, serve(repo.dir))["version"] == "1.1"


def test_mix_and_match_of_metadata_versions(repo, bundles, device_root, installed):
    old_targets = (repo.meta_dir / "2.targets.json").read_bytes()
    repo.publish(bundles["1.1"])
    # new timestamp and snapshot, but the targets file of the previous version under the new name
    (repo.meta_dir / "3.targets.json").write_bytes(old_targets)
    _refused(device_root, installed, "rollback or mix-and-match")
