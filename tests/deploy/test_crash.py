"""Crash safety: a real install process is SIGKILLed at every step; full disks; read-only targets.

After every interruption the device must still have a complete, verified ``current`` release, and the
next update must finish cleanly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from smearsight.deploy import faults
from smearsight.deploy.bundle import verify_release
from smearsight.deploy.health import health_check
from smearsight.deploy.install import Device, UpdateError
from smearsight.deploy.updater import update


@pytest.fixture
def on_1_0_with_1_1_published(repo, bundles, device_root):
    repo.publish(bundles["1.0"])
    update(device_root, str(repo.dir))
    repo.publish(bundles["1.1"])
    return device_root


def _assert_intact(root, allowed=("1.0", "1.1")):
    device = Device(root)
    version = device.current()
    assert version in allowed
    assert verify_release(device.current_dir(), version) == []
    return version


def test_kill_9_at_every_install_step(repo, on_1_0_with_1_1_published, tmp_path):
    pristine = on_1_0_with_1_1_published
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for step in faults.INSTALL_STEPS:
        root = tmp_path / f"device-{step}"
        shutil.copytree(pristine, root, symlinks=True)
        proc = subprocess.run(
            [sys.executable, "-m", "smearsight.cli", "deploy", "update", "--repo", str(repo.dir),
             "--root-dir", str(root)],
            env={**env, faults.CRASH_ENV: step}, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == -9, f"step {step} was not reached: {proc.stdout}{proc.stderr}"
        before = _assert_intact(root)
        expected = "1.1" if faults.INSTALL_STEPS.index(step) >= faults.INSTALL_STEPS.index("switched") else "1.0"
        assert before == expected, step
        Device(root).recover()  # what every command does first: reconcile state with the link
        status = Device(root).status()
        assert status["current"] == before and status["history"][-1] == before
        # the next (uninterrupted) update completes and leaves nothing behind
        result = update(root, str(repo.dir))
        assert result["version"] == "1.1" and _assert_intact(root) == "1.1"
        device = Device(root)
        leftovers = [p.name for p in device.releases.iterdir() if p.name.startswith(".")]
        leftovers += [p.name for p in root.glob(".current.*")]
        assert not leftovers, (step, leftovers)
        state = device.load_state()
        assert state["pending"] is None and state["current"] == "1.1" and state["history"][-2:] == ["1.0", "1.1"]
        assert health_check(root, quick=True).ok


def test_injected_write_failure_full_disk(repo, on_1_0_with_1_1_published, monkeypatch):
    """ENOSPC injected at the release writer (the OS-call edge), for hosts where no small disk can be mounted."""
    monkeypatch.setenv(faults.FAIL_WRITE_ENV, "2000")
    monkeypatch.setattr(faults, "_written", 0)
    with pytest.raises(UpdateError, match="is full.*current release 1.0 untouched"):
        update(on_1_0_with_1_1_published, str(repo.dir))
    assert _assert_intact(on_1_0_with_1_1_published) == "1.0"
    device = Device(on_1_0_with_1_1_published)
    assert not [p for p in device.releases.iterdir() if p.name.startswith(".")]
    assert device.events()[-1]["event"] == "failed"
    monkeypatch.delenv(faults.FAIL_WRITE_ENV)
    assert update(on_1_0_with_1_1_published, str(repo.dir))["version"] == "1.1"


def _namespace_prefix():
    """Run as root of a private mount namespace (mounts vanish with the process), or None."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                                "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


NAMESPACE = _namespace_prefix()
needs_namespace = pytest.mark.skipif(NAMESPACE is None, reason="cannot mount in a private mount namespace here")


def _run_in_namespace(shell: str, python: str) -> subprocess.CompletedProcess:
    script = f"{shell}\nexec {sys.executable} -c {_quote(python)}\n"
    return subprocess.run([*NAMESPACE, "sh", "-c", script], capture_output=True, text=True, timeout=120)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(textwrap.dedent(text))


def _device_on_a_full_disk(mount, device, leave_bytes: int = 0) -> str:
    """Python lines that copy the ``device`` folder onto the tmpfs at ``mount`` and fill that disk completely,
    then give back ``leave_bytes``; they import what the scripts use (Device, UpdateError, update)."""
    free = f"os.ftruncate(fd, os.fstat(fd).st_size - {leave_bytes})\n" if leave_bytes else ""
    return textwrap.dedent(f"""\
        import os, shutil, sys
        from smearsight.deploy.install import Device, UpdateError
        from smearsight.deploy.updater import update
        root = {str(mount / 'device')!r}
        shutil.copytree({str(device)!r}, root, symlinks=True)
        filler = {str(mount / 'filler')!r}
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk completely
            while True:
                os.write(fd, b'x' * 4096)
        except OSError as exc:
            assert exc.errno == 28, exc
        """) + free + "os.close(fd)\n"


@needs_namespace
def test_real_full_disk_on_a_small_tmpfs(repo, on_1_0_with_1_1_published, tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    python = _device_on_a_full_disk(mount, on_1_0_with_1_1_published) + textwrap.dedent(f"""
        from smearsight.deploy.bundle import verify_release
        try:
            update(root, {str(repo.dir)!r})
            sys.exit('update succeeded on a full disk')
        except UpdateError as exc:
            print('MESSAGE', exc)
        device = Device(root)
        assert device.current() == '1.0', device.current()
        assert verify_release(device.current_dir(), '1.0') == []
        os.unlink(filler)
        assert update(root, {str(repo.dir)!r})['version'] == '1.1'
        assert not [p for p in os.listdir(root + '/releases') if p.startswith('.')]
        print('OK')
    """)
    proc = _run_in_namespace(f"mount -t tmpfs -o size=600k tmpfs {mount}", python)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    message = [line for line in proc.stdout.splitlines() if line.startswith("MESSAGE")][0]
    assert "is full" in message and "current release 1.0 untouched" in message


@needs_namespace
@pytest.mark.parametrize("read_only", ["root", "releases"])
def test_read_only_target(repo, on_1_0_with_1_1_published, read_only):
    root = on_1_0_with_1_1_published
    target = root if read_only == "root" else root / "releases"
    python = f"""
        import sys
        from smearsight.deploy.install import Device, UpdateError
        from smearsight.deploy.health import health_check
        from smearsight.deploy.updater import update
        try:
            update({str(root)!r}, {str(repo.dir)!r})
            sys.exit('update succeeded on a read-only target')
        except UpdateError as exc:
            print('MESSAGE', exc)
        assert Device({str(root)!r}).current() == '1.0'
        report = health_check({str(root)!r})
        assert report.ok, report
        print('OK')
    """
    proc = _run_in_namespace(f"mount --bind {target} {target} && mount -o remount,ro,bind {target}", python)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    message = [line for line in proc.stdout.splitlines() if line.startswith("MESSAGE")][0]
    assert "read-only file system" in message and "current release 1.0 untouched" in message
    assert _assert_intact(root) == "1.0"
    assert update(root, str(repo.dir))["version"] == "1.1"  # the mount is gone with the namespace


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions (the namespace tests cover root)")
def test_unwritable_releases_directory_without_privileges(repo, on_1_0_with_1_1_published):
    releases = on_1_0_with_1_1_published / "releases"
    os.chmod(releases, 0o555)
    try:
        with pytest.raises(UpdateError, match="no permission to write.*current release 1.0 untouched"):
            update(on_1_0_with_1_1_published, str(repo.dir))
    finally:
        os.chmod(releases, 0o755)
    assert _assert_intact(on_1_0_with_1_1_published) == "1.0"


@needs_namespace
def test_a_download_that_fills_the_disk_leaves_no_partial_bundle(repo, on_1_0_with_1_1_published, bundles,
                                                                   tmp_path):
    """Room for ngclient's download buffer but not for the copy it then writes into downloads/: the partial bundle
    must not stay behind, filling the disk that the runtime's session record and event log need."""
    from smearsight.deploy.bundle import build_bundle

    models = bundles["1.0"].parent / "models"
    notes = tmp_path / "notes.md"
    notes.write_bytes(os.urandom(400_000))  # incompressible: a bundle of ~100 pages
    big = tmp_path / "big.tar.gz"
    build_bundle([models / "det1", models / "head"], "1.5", big, notes)
    repo.publish(big)
    pages = -(-big.stat().st_size // 4096)
    mount = tmp_path / "small-disk"
    mount.mkdir()
    room = (pages + pages // 2) * 4096  # the download buffer fits, its copy does not
    python = _device_on_a_full_disk(mount, on_1_0_with_1_1_published, room) + textwrap.dedent(f"""
        try:
            update(root, {str(repo.dir)!r})
            sys.exit('update succeeded on a nearly full disk')
        except UpdateError as exc:
            print('MESSAGE', exc)
        assert Device(root).current() == '1.0'
        print('DOWNLOADS', sorted(os.listdir(root + '/downloads')))
        os.unlink(filler)
        assert update(root, {str(repo.dir)!r})['version'] == '1.5'
        print('OK')
    """)
    proc = _run_in_namespace(f"mount -t tmpfs -o size=2m tmpfs {mount}", python)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "is full" in next(line for line in lines if line.startswith("MESSAGE"))
    assert next(line for line in lines if line.startswith("DOWNLOADS")) == "DOWNLOADS []"
