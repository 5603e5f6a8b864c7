"""A TUF update repository on disk: init, publish bundles, refresh, serve over HTTP.

Layout of a repository directory::

    metadata/   1.root.json root.json  N.targets.json targets.json  N.snapshot.json snapshot.json  timestamp.json
    targets/    bundles/<sha256>.<key>.tar.gz      (consistent snapshots: content-addressed names)
    keys/       <role>.pem (0600) + <role>.pub.json  -- never served; keep root.pem offline
    repository.json                                  -- expiry settings

Bundles are published as targets ``bundles/<key>.tar.gz`` where ``key`` is a GPU key
``sm_<compute capability>-trt<TensorRT major.minor>`` (engines only run where they were built) or
``onnx`` (the fallback every device can run). Each target carries ``custom.smearsight.version``.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import math
import os
import posixpath
import re
import shutil
import socket
import sys
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.repository import Repository

from smearsight.deploy.bundle import read_index, version_key
from smearsight.deploy.keys import ROLES, generate_key, load_signer
from smearsight.errors import InputError
from smearsight.fileio import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    fsync_dir,
    sha256_file,
    staging_dir,
)

CONFIG_NAME = "repository.json"
ONNX_KEY = "onnx"
GPU_KEY_RE = re.compile(r"^sm_[0-9]{2,3}-trt[0-9]+\.[0-9]+$")
MAX_EXPIRY_DAYS = 36500.0  # a hundred years: beyond it dates overflow, and no key should live that long
DEFAULT_EXPIRY_DAYS: dict[str, float] = {"root": 365.0, "targets": 90.0, "snapshot": 30.0, "timestamp": 7.0}


def gpu_key(compute_capability: str, tensorrt_version: str) -> str:
    """``sm_87-trt10.3`` for compute capability ``8.7`` and TensorRT ``10.3.x``."""
    major_minor = ".".join(tensorrt_version.split(".")[:2])
    return f"sm_{compute_capability.replace('.', '')}-trt{major_minor}"


def target_path(key: str) -> str:
    """The TUF target path under which a bundle for ``key`` is published."""
    if key != ONNX_KEY and not GPU_KEY_RE.match(key):
        raise InputError(f"--gpu: '{key}' is not a GPU key like 'sm_87-trt10.3' (compute capability + TensorRT)")
    return f"bundles/{key}.tar.gz"


def check_expiry_days(expiry_days: dict[str, Any], where: str) -> None:
    """Refuse an unknown role or a number of days outside (0, MAX_EXPIRY_DAYS]; ``where`` starts the message."""
    for role, days in expiry_days.items():
        if role not in ROLES:
            raise InputError(f"{where}: unknown role '{role}' (expected one of {', '.join(ROLES)})")
        if isinstance(days, bool) or not isinstance(days, (int, float)):
            raise InputError(f"{where}: {role} must be a number of days, got {json.dumps(days)}")
        if not (math.isfinite(days) and 0 < days <= MAX_EXPIRY_DAYS):
            raise InputError(f"{where}: {role} must expire in more than 0 and at most {MAX_EXPIRY_DAYS:g}"
                             f" days, got {days}")


def _expires(days: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=days)


def _check_engines_for(bundle: Path, index: dict[str, Any], key: str) -> None:
    """A bundle published for the GPU key ``key`` must hold, for every model, an engine built for that key: a device
    of that key refuses the whole bundle otherwise (and downloads it again at every update check)."""
    models = index.get("models", [])
    if not any(m.get("engine") for m in models):
        raise InputError(f"{bundle}: has no TensorRT engines; publish it with --onnx-fallback instead of --gpu")
    for model in models:
        engine = model.get("engine")
        if not engine:
            raise InputError(f"{bundle}: model '{model.get('name')}' has no TensorRT engine; a --gpu bundle needs one "
                             "for every model (or publish it with --onnx-fallback)")
        capability, version = str(engine.get("compute_capability")), str(engine.get("tensorrt_version"))
        built_for = gpu_key(capability, version)
        if built_for != key:
            raise InputError(f"{bundle}: the engine of model '{model.get('name')}' was built for {built_for} (compute "
                             f"capability {capability}, TensorRT {version}), not for --gpu {key}")


class FileRepository(Repository):
    """python-tuf's repository workflow (edit, snapshot, timestamp) over files in one directory."""

    def __init__(self, repo_dir: str | Path, expiry_days: dict[str, float] | None = None):
        self.dir = Path(repo_dir)
        self.meta_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        self.keys_dir = self.dir / "keys"
        config = self._read_config()
        self.expiry_days = {**DEFAULT_EXPIRY_DAYS, **config.get("expiry_days", {}), **(expiry_days or {})}
        self._signers: dict[str, Signer] = {}

    def _read_config(self) -> dict[str, Any]:
        path = self.dir / CONFIG_NAME
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: cannot read the repository settings ({exc})") from None
        if not isinstance(config, dict):
            raise InputError(f"{path}: expected a JSON object with 'expiry_days', got {type(config).__name__}")
        expiry = config.get("expiry_days", {})
        if not isinstance(expiry, dict):
            raise InputError(f"{path}: 'expiry_days' must be an object like {{\"timestamp\": 7}}, "
                             f"got {type(expiry).__name__}")
        check_expiry_days(expiry, f"{path}: expiry_days")
        return config

    # -- storage -------------------------------------------------------------------------------
    def _root_version(self) -> int:
        versions = [int(p.name.split(".")[0]) for p in self.meta_dir.glob("*.root.json") if p.name[0].isdigit()]
        if not versions:
            raise InputError(f"{self.dir}: not an update repository (no metadata/1.root.json); run 'deploy repo init'")
        return max(versions)

    def open(self, role: str) -> Metadata:
        """Load the newest metadata of ``role``."""
        name = f"{self._root_version()}.root.json" if role == Root.type else f"{role}.json"
        path = self.meta_dir / name
        try:
            return Metadata.from_bytes(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - deserialisation raises several types
            raise InputError(f"{path}: cannot read {role} metadata ({exc})") from None

    def close(self, role: str, md: Metadata) -> None:
        """Bump the version, renew the expiry, sign with the role's key and write atomically."""
        md.signed.version += 1
        self._sign_and_write(role, md)

    def signer(self, role: str) -> Signer:
        """The key of ``role`` from ``keys/``, checked to be one that root trusts for ``role``.

        Kept for the operation under way (publish and refresh start afresh): an operation loads every key it
        needs before it writes anything.
        """
        if role not in self._signers:
            signer = load_signer(self.keys_dir, role)
            root = self.root()
            probe = self.open(role)
            probe.sign(signer)
            try:
                root.verify_delegate(role, probe.signed_bytes, probe.signatures)
            except UnsignedMetadataError:
                raise InputError(
                    f"{self.keys_dir / f'{role}.pem'}: not a {role} key that root v{root.version} trusts "
                    f"(it lists key id {', '.join(k[:16] for k in root.roles[role].keyids)}); "
                    f"put back the {role} key that root trusts"
                ) from None
            self._signers[role] = signer
        return self._signers[role]

    def _sign_and_write(self, role: str, md: Metadata) -> None:
        md.signed.expires = _expires(self.expiry_days[role])
        md.sign(self.signer(role))
        data = md.to_bytes()
        version = md.signed.version
        if role == Root.type:
            atomic_write_bytes(self.meta_dir / f"{version}.root.json", data)
            atomic_write_bytes(self.meta_dir / "root.json", data)
        elif role == Timestamp.type:
            atomic_write_bytes(self.meta_dir / "timestamp.json", data)
        else:
            atomic_write_bytes(self.meta_dir / f"{version}.{role}.json", data)
            atomic_write_bytes(self.meta_dir / f"{role}.json", data)

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {"targets.json": MetaFile(self.targets().version)}

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(self.snapshot().version)

    # -- operations ----------------------------------------------------------------------------
    @classmethod
    def init(cls, repo_dir: str | Path, expiry_days: dict[str, float] | None = None) -> FileRepository:
        """Create keys and version-1 metadata for all four top-level roles.

        Built in a staging folder beside ``repo_dir`` and moved into place at the end: a failure part-way
        leaves no half-made repository behind (nor one that ``init`` would refuse as existing).
        """
        repo_dir = Path(repo_dir)
        check_expiry_days(expiry_days or {}, "--expiry-days")
        if (repo_dir / "metadata").exists() or (repo_dir / "keys").exists():
            raise InputError(f"{repo_dir}: already holds a repository (metadata/ or keys/ exists)")
        check_output_dir(repo_dir, "deploy repo init")
        # staging_dir: locked while in use, and the folders of inits killed part-way (holding private keys) are
        # removed by the next init. An existing folder (one an administrator made for this user, often in a
        # folder the user may not write) is built in; a new one beside it.
        existing = repo_dir.is_dir()
        with staging_dir(repo_dir / "init" if existing else repo_dir) as work:  # .init.XXXXXXXX.staging inside
            stage = work / "repo"
            stage.mkdir()
            atomic_write_json(stage / CONFIG_NAME, {"expiry_days": {**DEFAULT_EXPIRY_DAYS, **(expiry_days or {})}})
            staged = cls(stage)
            staged.targets_dir.mkdir()
            signers = {role: generate_key(staged.keys_dir, role) for role in ROLES}
            staged._signers.update(signers)
            root = Root(consistent_snapshot=True)
            for role, signer in signers.items():
                root.add_key(signer.public_key, role)
            staged._sign_and_write(Root.type, Metadata(root))
            staged._sign_and_write(Targets.type, Metadata(Targets()))
            staged._sign_and_write(Snapshot.type, Metadata(Snapshot()))
            staged._sign_and_write(Timestamp.type, Metadata(Timestamp()))
            if not existing:
                os.replace(stage, repo_dir)
            else:  # move the pieces in, metadata/ (what marks a repository) last
                for name in (CONFIG_NAME, "targets", "keys", "metadata"):
                    os.replace(stage / name, repo_dir / name)
            fsync_dir(repo_dir if existing else repo_dir.parent)
        return cls(repo_dir)

    def published(self) -> dict[str, dict[str, Any]]:
        """``{target path: {"version", "length", "sha256", ...}}`` of every published bundle."""
        out = {}
        for path, info in self.targets().targets.items():
            out[path] = {**(info.custom or {}).get("smearsight", {}), "length": info.length, **info.hashes}
        return out

    def publish(self, bundle: str | Path, key: str = ONNX_KEY, allow_downgrade: bool = False) -> dict[str, Any]:
        """Add ``bundle`` as the target for ``key``; re-sign targets, snapshot and timestamp."""
        self._signers.clear()
        bundle = Path(bundle)
        path = target_path(key)
        index = read_index(bundle)
        version = str(index["version"])
        if key != ONNX_KEY:
            _check_engines_for(bundle, index, key)
        sha = sha256_file(bundle)
        existing = self.targets().targets.get(path)
        if existing is not None:
            old = str((existing.custom or {}).get("smearsight", {}).get("version", ""))
            if old == version:
                if existing.hashes.get("sha256") == sha:  # a publish that stopped part-way is finished now
                    return {"target": path, "version": version, "changed": False, "resigned": self._catch_up()}
                raise InputError(f"{bundle}: version {version} is already published for '{key}' with other content;"
                                 " bump --version")
            if version_key(version) < version_key(old) and not allow_downgrade:
                raise InputError(f"{bundle}: version {version} is older than the published {old} for '{key}'"
                                 " (use --allow-downgrade to publish it anyway)")
            earlier = self._earlier_sha(path, version)
            if earlier is not None and earlier != sha:
                raise InputError(f"{bundle}: version {version} was published for '{key}' before with other content"
                                 " (devices that installed it would keep the old one); bump --version")
        for role in (Targets.type, Snapshot.type, Timestamp.type):
            self.signer(role)
        info = TargetFile.from_file(path, str(bundle), ["sha256"])
        info.unrecognized_fields["custom"] = {
            "smearsight": {"version": version, "key": key, "models": [m["name"] for m in index.get("models", [])]}
        }
        stored = self.targets_dir / "bundles" / f"{sha}.{key}.tar.gz"
        stored.parent.mkdir(parents=True, exist_ok=True)
        if not stored.exists():
            with open(bundle, "rb") as src, atomic_open(stored) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        with self.edit_targets() as targets:
            targets.targets[path] = info
        self.do_snapshot()
        self.do_timestamp()
        return {"target": path, "version": version, "changed": True, "targets_version": self.targets().version}

    def _earlier_sha(self, path: str, version: str) -> str | None:
        """The sha256 that earlier targets metadata (``N.targets.json``) gave ``path`` at ``version``, if any."""
        for file in sorted(self.meta_dir.glob("*.targets.json")):
            try:
                info = Metadata.from_bytes(file.read_bytes()).signed.targets.get(path)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - deserialisation raises several types
                raise InputError(f"{file}: cannot read targets metadata ({exc})") from None
            if info is not None and str((info.custom or {}).get("smearsight", {}).get("version", "")) == version:
                return info.hashes.get("sha256")
        return None

    def _catch_up(self) -> bool:
        """Re-sign snapshot and timestamp when they do not yet cover the newest targets (or their signatures
        do not verify); True when something was signed."""
        root = self.root()
        stale = False
        for role in (Snapshot.type, Timestamp.type):
            md = self.open(role)
            try:
                root.verify_delegate(role, md.signed_bytes, md.signatures)
            except UnsignedMetadataError:
                stale = True
        snapshot = self.snapshot()
        listed = snapshot.meta.get("targets.json")
        stale = (stale or listed is None or listed.version != self.targets().version
                 or self.timestamp().snapshot_meta.version != snapshot.version)
        if not stale:
            return False
        for role in (Snapshot.type, Timestamp.type):
            self.signer(role)
        self.do_snapshot()
        self.do_timestamp()
        return True

    def refresh(self, targets: bool = False, root: bool = False) -> dict[str, Any]:
        """Re-sign snapshot and timestamp (and optionally targets, root) with fresh expiries.

        Run it regularly (see docs/deploy.md). Re-signing root needs the offline root key and publishes
        ``N.root.json``, which devices pick up on their next update. ``warnings`` in the result: one line per
        role left as it was whose metadata has expired, or expires before the new timestamp does (devices
        refuse the whole repository from then on).
        """
        self._signers.clear()
        roles = [Root.type] * root + [Targets.type] * targets + [Snapshot.type, Timestamp.type]
        for role in roles:
            self.signer(role)
        if root:
            with self.edit_root():
                pass
        if targets:
            with self.edit_targets():
                pass
        self.do_snapshot(force=True)
        self.do_timestamp(force=True)
        warnings = []
        horizon = self.timestamp().expires
        for role, signed, option in ((Root.type, root, "--root"), (Targets.type, targets, "--targets")):
            expires = self.root().expires if role == Root.type else self.targets().expires
            if not signed and expires <= horizon:
                expired = expires <= datetime.now(timezone.utc)
                what = "expired" if expired else "expires"
                effect = "devices refuse the repository until" if expired else "devices will refuse it unless"
                extra = " with root.pem brought back from offline" if role == Root.type else ""
                warnings.append(f"{role} metadata {what} on {expires.isoformat()}: {effect} it is re-signed; run "
                                f"'smearsight deploy repo refresh {option}'{extra}")
        return {"root": self.root().version, "targets": self.targets().version,
                "snapshot": self.snapshot().version, "timestamp": self.timestamp().version, "warnings": warnings}


# -------------------------------------------------------------------------------------------- serve


class _RepoHandler(http.server.SimpleHTTPRequestHandler):
    """Static files from ``metadata/`` and ``targets/`` only: keys and settings are never served."""

    quiet = True

    def send_head(self):  # type: ignore[no-untyped-def]
        raw = self.path.split("?", 1)[0].split("#", 1)[0]
        # Judge the path the way translate_path will resolve it (percent-decoded, '..' folded), or
        # /metadata/../keys/root.pem would hand out the signing keys.
        path = posixpath.normpath(unquote(raw))
        if (
            raw.endswith("/")
            or "\\" in path
            or "\x00" in path
            or not (path.startswith("/metadata/") or path.startswith("/targets/"))
        ):
            self.send_error(404, "not found")
            return None
        return super().send_head()

    def list_directory(self, path):  # type: ignore[no-untyped-def]
        self.send_error(404, "not found")
        return None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if not self.quiet:
            super().log_message(format, *args)


class _RepoServer(http.server.ThreadingHTTPServer):
    """A device that goes away mid-download (unplugged, rebooted, timed out) is one log line, not a traceback."""

    quiet = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            super().handle_error(request, client_address)
        elif not self.quiet:
            when = time.strftime("%d/%b/%Y %H:%M:%S")  # as the request log lines give it
            sys.stderr.write(f"{client_address[0]} - - [{when}] the client closed the connection before the response "
                             f"was sent ({exc.strerror or type(exc).__name__})\n")


class _RepoServer6(_RepoServer):
    """IPv6; '::' also takes IPv4 connections (as ``python -m http.server --bind ::`` does)."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def make_server(
    repo_dir: str | Path, host: str = "127.0.0.1", port: int = 0, quiet: bool = True
) -> http.server.ThreadingHTTPServer:
    """A threading HTTP server for ``repo_dir`` (call ``serve_forever``; ``server_address`` has the port)."""
    repo_dir = Path(repo_dir)
    if not (repo_dir / "metadata" / "1.root.json").is_file():
        raise InputError(f"{repo_dir}: not an update repository (no metadata/1.root.json)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"--port: {port} is not a TCP port (0 to 65535; 0 picks a free one)")
    handler = type("RepoHandler", (_RepoHandler,), {"quiet": quiet})
    server_class = _RepoServer6 if ":" in host else _RepoServer  # an IPv6 address such as '::' or '::1'
    try:
        server = server_class((host, port), partial(handler, directory=str(repo_dir)))
    except socket.gaierror as exc:
        raise InputError(f"--host: '{host}' is not a known host name or address ({exc.strerror or exc})") from None
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            raise InputError(f"--port: {port} is already in use on {host} ({reason})") from None
        if isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
            raise InputError(f"--host: {host} is not an address of this machine ({reason})") from None
        raise InputError(f"--host {host} --port {port}: cannot listen there ({reason})") from None
    server.daemon_threads = True
    server.quiet = quiet
    return server
