"""The device side of an update: releases on disk, atomic switch, rollback, state and event log.

Layout of the device root directory (``/var/lib/smearsight`` by default)::

    trusted-root.json       TUF root installed at provisioning (the trust anchor)
    tuf/                    TUF metadata cache (ngclient)
    downloads/              verified bundle downloads (removed after install)
    releases/<version>/     unpacked, verified, smoke-tested releases
    current -> releases/<version>     symlink, switched atomically (temp link + rename)
    state.json              history, trial (switched but not yet confirmed), rejected versions
    events.json             the update event log (newest last, atomic rewrites)

The ``current`` symlink is the truth; ``state.json`` is reconciled with it after any crash
(:meth:`Device.recover`). A release directory only gets its final name once it is complete and checked,
so ``current`` always points at a complete, verified release.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from smearsight.deploy import faults
from smearsight.deploy.bundle import (
    INSTALL_MARKER,
    load_release_index,
    safe_extract,
    smoke_test,
    verify_release,
)
from smearsight.errors import InputError, SmearSightError
from smearsight.fileio import atomic_write_json, fsync_dir
from smearsight.manifest import check_engine_compatibility, load_manifest

DEFAULT_ROOT = Path(os.environ.get("SMEARSIGHT_ROOT_DIR", "/var/lib/smearsight"))
DEFAULT_KEEP = 2
MAX_EVENTS = 500
ONNX_KEY = "onnx"


class UpdateError(SmearSightError):
    """An update, rollback or health check was refused or failed; the current release is untouched."""

    exit_code = 3


class IncompatibleError(UpdateError):
    """A bundle cannot run on this device (e.g. engines for another GPU or TensorRT version)."""


def _clean_state(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """``state.json``'s content with each field of its expected type, and what was not."""
    if not isinstance(raw, dict):
        got = "null" if raw is None else type(raw).__name__
        return _clean_state({})[0], [f"expected a JSON object, got {got}"]
    state = dict(raw)
    dropped = []

    def field(name: str, ok: bool, empty: Any) -> None:
        if name in raw and not ok:
            dropped.append(f"field '{name}' is not of the expected type")
        if name not in raw or not ok:
            state[name] = empty

    history = raw.get("history")
    field("history", isinstance(history, list) and all(isinstance(v, str) for v in history), [])
    rejected = raw.get("rejected")
    field("rejected", isinstance(rejected, dict) and all(isinstance(v, str) for v in rejected.values()), {})
    for name in ("trial", "pending"):
        value = raw.get(name)
        field(name, value is None or (isinstance(value, dict) and isinstance(value.get("version"), str)), None)
    field("current", raw.get("current") is None or isinstance(raw.get("current"), str), None)
    if state["trial"] is not None:
        state["trial"] = {"previous": None, "since": "?", **state["trial"]}
    return state, dropped


def now_iso() -> str:
    """UTC time, ISO 8601, seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Device:
    """A device root directory: releases, the ``current`` link, state and events."""

    def __init__(self, root: str | Path = DEFAULT_ROOT):
        self.root = Path(root)
        self.releases = self.root / "releases"
        self.link = self.root / "current"
        self.state_path = self.root / "state.json"
        self.events_path = self.root / "events.json"
        self._warned: set[tuple[Path, str]] = set()

    # -- basic state ---------------------------------------------------------------------------
    def current(self) -> str | None:
        """The version ``current`` points at, or ``None``."""
        try:
            target = os.readlink(self.link)
        except OSError:
            return None
        return Path(target).name

    def current_dir(self) -> Path | None:
        """``releases/<current version>``, or ``None`` when nothing is installed."""
        version = self.current()
        return self.releases / version if version else None

    def installed(self) -> list[str]:
        """Release directories present (complete ones only: temporary names start with a dot)."""
        if not self.releases.is_dir():
            return []
        return sorted(p.name for p in self.releases.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _warn_once(self, path: Path, problem: str) -> None:
        if (path, problem) not in self._warned:
            self._warned.add((path, problem))
            print(f"warning: {path}: {problem}", file=sys.stderr)

    def load_state(self) -> dict[str, Any]:
        """``state.json`` with every key present and of its type. An unreadable file, or one of the wrong shape,
        counts as empty (with a warning; ``recover`` rebuilds it from ``current``)."""
        try:
            raw = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            raw = {}
        except (OSError, ValueError) as exc:
            self._warn_once(self.state_path, f"unreadable ({exc}); treating it as empty")
            raw = {}
        state, dropped = _clean_state(raw)
        if dropped:
            self._warn_once(self.state_path, f"{'; '.join(dropped)}; treated as empty")
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        """Write ``state.json`` atomically."""
        atomic_write_json(self.state_path, state)

    def events(self) -> list[dict[str, Any]]:
        """The event log, oldest first (empty when missing or unreadable; entries that are not events are
        left out, with a warning)."""
        try:
            events = json.loads(self.events_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except (OSError, ValueError) as exc:
            self._warn_once(self.events_path, f"unreadable ({exc}); starting a new log")
            return []
        if not isinstance(events, list):
            got = "null" if events is None else type(events).__name__
            self._warn_once(self.events_path, f"expected a list of events, got {got}; starting a new log")
            return []
        kept = [e for e in events if isinstance(e, dict) and isinstance(e.get("time"), str)
                and isinstance(e.get("event"), str)]
        if len(kept) < len(events):
            self._warn_once(self.events_path, f"{len(events) - len(kept)} entries without 'time' and 'event' "
                                              "left out")
        return kept

    def log_event(self, event: str, **fields: Any) -> None:
        """Append an event to ``events.json`` (atomic rewrite); a read-only disk does not mask the cause."""
        record = {"time": now_iso(), "event": event, **fields}
        try:
            events = self.events()[-(MAX_EVENTS - 1) :] + [record]
            atomic_write_json(self.events_path, events)
        except OSError:
            pass

    @contextlib.contextmanager
    def lock(self, wait: float = 0.0) -> Iterator[None]:
        """Exclusive lock so that the update timer, a manual update and health checks never interleave.

        ``wait`` seconds are spent waiting for another holder before giving up."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "update.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno == errno.EROFS:  # nothing can change here: checks may still read
                yield
                return
            raise UpdateError(f"cannot take the update lock: {describe_os_error(exc, self.root)}") from None
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise UpdateError(f"{self.root}: another update or health check is running") from None
                    time.sleep(0.2)
            yield
        finally:
            os.close(fd)

    # -- crash recovery ------------------------------------------------------------------------
    def recover(self) -> None:
        """Clean up after an interrupted install and reconcile ``state.json`` with ``current``.

        Call it with :meth:`lock` held: it deletes staging directories, which an install in progress owns."""
        try:
            self._recover()
        except OSError:
            pass  # read-only or full disk: nothing we may clean up now; reading still works

    def _recover(self) -> None:
        if self.releases.is_dir():
            for path in self.releases.iterdir():
                if path.name.startswith((".staging-", ".trash-")):
                    shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".current.*"):
            path.unlink(missing_ok=True)
        state = self.load_state()
        before = json.dumps(state, sort_keys=True)
        version = self.current()
        pending = state.get("pending")
        if pending:
            if version == pending["version"] and state.get("current") != version:
                self._finish_switch(state, version, pending.get("previous"), pending.get("trial", True))
            state["pending"] = None
        if version is not None and state.get("current") != version:
            state["current"] = version
            if version not in state["history"]:
                state["history"].append(version)
        if json.dumps(state, sort_keys=True) != before:
            self.save_state(state)

    # -- install -------------------------------------------------------------------------------
    def install_bundle(
        self,
        bundle: str | Path,
        version: str,
        key: str = ONNX_KEY,
        profile: Any = None,
        keep: int = DEFAULT_KEEP,
    ) -> dict[str, Any]:
        """Unpack, verify, check and smoke-test ``bundle`` as ``releases/<version>``, then switch to it."""
        faults.checkpoint("downloaded")
        self.recover()
        previous = self.current()
        if previous == version:
            return {"status": "up-to-date", "version": version}
        self.releases.mkdir(parents=True, exist_ok=True)
        staging = self.releases / f".staging-{version}-{secrets.token_hex(4)}"
        staging.mkdir()
        faults.checkpoint("staging-created")
        try:
            safe_extract(bundle, staging)
            faults.checkpoint("extracted")
            problems = verify_release(staging, expected_version=version)
            if problems:
                raise UpdateError(f"bundle {version} failed verification: {problems[0]}")
            faults.checkpoint("verified")
            backends = compatibility(staging, key, profile)
            faults.checkpoint("compatible")
            results = smoke_test(staging, lambda m: backends[m["name"]])
            failed = [r for r in results if not r.ok]
            if failed:
                raise UpdateError(f"bundle {version} failed its smoke test: model '{failed[0].model}' "
                                  f"({failed[0].backend}): {failed[0].detail}")
            faults.checkpoint("smoke-tested")
            marker = {
                "version": version,
                "key": key,
                "backends": backends,
                "installed": now_iso(),
                "smoke_test": [r.__dict__ for r in results],
            }
            atomic_write_json(staging / INSTALL_MARKER, marker)
            final = self.releases / version
            if final.exists():  # left over from an earlier install that never became current
                trash = self.releases / f".trash-{version}-{secrets.token_hex(4)}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(staging, final)
            fsync_dir(self.releases)
            faults.checkpoint("release-renamed")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.switch(version, trial=previous is not None)
        removed = self.prune(keep)
        faults.checkpoint("pruned")
        self.log_event("installed", version=version, previous=previous, key=key, backends=backends,
                       pruned=removed)
        return {"status": "installed", "version": version, "previous": previous, "key": key, "backends": backends}

    def switch(self, version: str, trial: bool = True) -> None:
        """Point ``current`` at ``releases/<version>`` atomically (temp symlink, then rename over)."""
        if not (self.releases / version).is_dir():
            raise UpdateError(f"{self.releases / version}: release not installed")
        state = self.load_state()
        previous = self.current()
        state["pending"] = {"version": version, "previous": previous, "trial": trial}
        self.save_state(state)
        faults.checkpoint("pending-written")
        tmp = self.root / f".current.{secrets.token_hex(4)}"
        os.symlink(f"releases/{version}", tmp)
        faults.checkpoint("link-created")
        try:
            os.replace(tmp, self.link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)
        faults.checkpoint("switched")
        self._finish_switch(state, version, previous, trial)
        state["pending"] = None
        self.save_state(state)
        faults.checkpoint("state-written")

    @staticmethod
    def _finish_switch(state: dict[str, Any], version: str, previous: str | None, trial: bool) -> None:
        # a switch to a rejected version is always the operator's choice (--to, --force): no longer rejected,
        # so that a later self-rollback may return to it
        state["rejected"].pop(version, None)
        state["current"] = version
        state["history"] = [v for v in state["history"] if v != version] + [version]
        state["trial"] = (
            {"version": version, "previous": previous, "since": now_iso()} if trial and previous else None
        )

    def prune(self, keep: int = DEFAULT_KEEP) -> list[str]:
        """Delete releases beyond the current one and the ``keep`` most recent previous ones."""
        state = self.load_state()
        current = self.current()
        previous = [v for v in reversed(state["history"]) if v != current and v in self.installed()]
        protected = {current, *previous[: max(keep, 0)]}
        if state.get("trial") and state["trial"].get("previous"):
            protected.add(state["trial"]["previous"])
        removed = []
        for version in self.installed():
            if version in protected:
                continue
            trash = self.releases / f".trash-{version}-{secrets.token_hex(4)}"
            os.rename(self.releases / version, trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(version)
        if removed:
            fsync_dir(self.releases)
            state["history"] = [v for v in state["history"] if v not in removed]
            self.save_state(state)
        return removed

    # -- rollback ------------------------------------------------------------------------------
    def rollback(self, to: str | None = None, reason: str = "manual rollback", auto: bool = False) -> dict[str, Any]:
        """Switch back to ``to`` or the newest previous release that still verifies; remember why."""
        self.recover()
        current = self.current()
        state = self.load_state()
        skipped: list[str] = []
        if to is not None:
            candidates = [to]
        else:
            candidates = [v for v in reversed(state["history"]) if v != current]
            candidates += [v for v in reversed(self.installed()) if v != current and v not in candidates]
            # a release rolled back from before is not a way back (name it with --to to force it)
            skipped = [v for v in candidates if v in state["rejected"]]
            candidates = [v for v in candidates if v not in state["rejected"]]
        checked = []
        for version in candidates:
            if version == current:
                raise UpdateError(f"release {version} is already current")
            release = self.releases / version
            if not release.is_dir():
                checked.append(f"{version}: not installed")
                continue
            problems = verify_release(release, expected_version=version)
            if problems:
                checked.append(f"{version}: {problems[0]}")
                continue
            if current is not None:  # remembered first: a crash mid-rollback must not let the timer reinstall it
                state = self.load_state()
                state["rejected"][current] = reason
                self.save_state(state)
            self.switch(version, trial=False)
            self.log_event("rollback", version=version, previous=current, reason=reason, auto=auto)
            return {"status": "rolled-back", "version": version, "previous": current, "reason": reason}
        checked += [f"{v}: rolled back from before ({state['rejected'][v]}); use --to {v} to return to it anyway"
                    for v in skipped]
        detail = "; ".join(checked) if checked else "no previous release is installed"
        raise UpdateError(f"cannot roll back from {current}: {detail}")

    def confirm(self) -> bool:
        """Mark the current trial release as good (the runtime ran it); True when there was a trial."""
        state = self.load_state()
        trial = state.get("trial")
        if not trial or trial.get("version") != self.current():
            return False
        state["trial"] = None
        self.save_state(state)
        self.log_event("confirmed", version=trial["version"])
        return True

    def status(self) -> dict[str, Any]:
        """Everything an operator wants to know, JSON-ready."""
        state = self.load_state()
        current = self.current()
        marker: dict[str, Any] = {}
        if current:
            with contextlib.suppress(OSError, json.JSONDecodeError):
                marker = json.loads((self.releases / current / INSTALL_MARKER).read_text(encoding="utf-8"))
        return {
            "root": str(self.root),
            "provisioned": (self.root / "trusted-root.json").is_file(),
            "current": current,
            "key": marker.get("key"),
            "backends": marker.get("backends"),
            "installed": marker.get("installed"),
            "trial": state.get("trial"),
            "releases": self.installed(),
            "history": state.get("history", []),
            "rejected": state.get("rejected", {}),
            "last_events": self.events()[-5:],
        }


def compatibility(release_dir: Path, key: str, profile: Any) -> dict[str, str]:
    """Which backend each model of an unpacked release will use here; raise when it cannot run."""
    index = load_release_index(release_dir)
    backends = {}
    for model in index.get("models", []):
        name = model["name"]
        manifest = load_manifest(release_dir / model["dir"])
        if key == ONNX_KEY:
            backends[name] = "onnx"
            continue
        if manifest.engine is None:
            raise IncompatibleError(f"model '{name}' has no TensorRT engine in the '{key}' bundle")
        if profile is None or not getattr(profile, "tensorrt_version", None):
            raise IncompatibleError(f"this device has no TensorRT for the '{key}' bundle")
        reason = check_engine_compatibility(manifest.engine, profile.tensorrt_version, profile.compute_capability)
        if reason:
            raise IncompatibleError(f"model '{name}': {reason}")
        backends[name] = "trt"
    return backends


def describe_os_error(exc: OSError, root: Path) -> str:
    """One line for a disk problem during an update."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"the disk under {root} is full{where}"
    if exc.errno == errno.EROFS:
        return f"{root} is on a read-only file system{where}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write under {root}{where}"
    return f"{exc.strerror or exc}{where}"


def provision(root: str | Path, trusted_root: str | Path, force: bool = False) -> dict[str, Any]:
    """Install the repository's root metadata as this device's trust anchor (``note`` in the result: plain words
    when it has expired, which is allowed: updates walk from it to the repository's newest root)."""
    from tuf.api.metadata import Metadata, Root

    from smearsight.fileio import check_output_dir

    root = check_output_dir(root, "--root-dir")
    trusted_root = Path(trusted_root)
    try:
        data = trusted_root.read_bytes()
        md = Metadata[Root].from_bytes(data)
        if not isinstance(md.signed, Root):
            raise ValueError("not root metadata")
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except FileNotFoundError:
        raise InputError(f"{trusted_root}: trusted root file not found") from None
    except Exception as exc:  # noqa: BLE001 - deserialisation and verification raise several types
        raise InputError(f"{trusted_root}: not valid, self-signed TUF root metadata ({exc})") from None
    note = ""
    if md.signed.is_expired():  # TUF needs only the newest root to be fresh: the device walks there from this one
        note = (f"{trusted_root}: this root metadata expired on {md.signed.expires.isoformat()}; the device starts "
                "from it and updates once the repository serves newer root metadata (smearsight deploy repo "
                "refresh --root)")
    anchor = root / "trusted-root.json"
    if anchor.exists() and anchor.read_bytes() != data and not force:
        raise InputError(f"{anchor}: the device already trusts another root; use --force to replace it")
    for sub in ("tuf", "downloads", "releases"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if anchor.exists() and anchor.read_bytes() != data:
        shutil.rmtree(root / "tuf", ignore_errors=True)  # cached metadata belongs to the old trust
        (root / "tuf").mkdir()
    from smearsight.fileio import atomic_write_bytes

    atomic_write_bytes(anchor, data)
    Device(root).log_event("provisioned", root_version=md.signed.version,
                           keyids=sorted(md.signed.roles[Root.type].keyids))
    return {"root": str(root), "root_version": md.signed.version, "expires": md.signed.expires.isoformat(),
            "note": note}
