"""Device updates through TUF: pick this device's target, verify it, hand it to the installer.

The repository may be an ``http(s)://`` URL or a local directory / ``file://`` URL (a USB stick for
offline labs); both go through the same ngclient verification.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlparse
from urllib.request import url2pathname

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface, Updater, Urllib3Fetcher

from smearsight.deploy.bundle import check_version, version_key
from smearsight.deploy.install import (
    DEFAULT_KEEP,
    Device,
    IncompatibleError,
    UpdateError,
    describe_os_error,
)
from smearsight.deploy.repository import ONNX_KEY, gpu_key, target_path
from smearsight.errors import InputError, first_line

_JETSON_CC = {"tegra234": "8.7", "tegra194": "7.2", "tegra186": "6.2", "tegra210": "5.3"}


@dataclass(frozen=True)
class DeviceProfile:
    """What decides which bundle a device can run: GPU compute capability and TensorRT version."""

    compute_capability: str | None = None
    tensorrt_version: str | None = None

    @property
    def gpu_key(self) -> str | None:
        if self.compute_capability and self.tensorrt_version:
            return gpu_key(self.compute_capability, self.tensorrt_version)
        return None


def _probe_compute_capability() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()
        if out:
            return out[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # Jetson: no nvidia-smi; the SoC names the GPU
        compatible = Path("/proc/device-tree/compatible").read_bytes().decode(errors="ignore")
        for soc, cc in _JETSON_CC.items():
            if soc in compatible:
                return cc
    except OSError:
        pass
    return None


def _probe_tensorrt() -> str | None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # a broken TensorRT install means no TensorRT
        return None


def detect_device(compute_capability: str | None = None, tensorrt_version: str | None = None) -> DeviceProfile:
    """This device's profile: arguments, else ``SMEARSIGHT_COMPUTE_CAPABILITY`` /
    ``SMEARSIGHT_TENSORRT_VERSION`` (``none`` = absent), else probing nvidia-smi / Jetson / tensorrt."""

    def pick(value: str | None, env: str, probe: Callable[[], str | None]) -> str | None:
        value = value if value is not None else os.environ.get(env)
        if value is None:
            return probe()
        return None if value.lower() in {"", "none"} else value

    return DeviceProfile(
        pick(compute_capability, "SMEARSIGHT_COMPUTE_CAPABILITY", _probe_compute_capability),
        pick(tensorrt_version, "SMEARSIGHT_TENSORRT_VERSION", _probe_tensorrt),
    )


class _RootBufferedFetcher(FetcherInterface):
    """Buffers each download in ``buffer_dir`` (the device's ``downloads/``) rather than ``$TMPDIR``: a full disk
    is then the one the error names, and the size of the temporary folder does not limit bundles."""

    buffer_dir: Path | None = None

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        received = 0
        with tempfile.TemporaryFile(dir=self.buffer_dir) as buffer:
            for chunk in self.fetch(url):
                received += len(chunk)
                if received > max_length:
                    raise tuf_errors.DownloadLengthMismatchError(
                        f"Downloaded {received} bytes exceeding the maximum allowed length of {max_length}")
                buffer.write(chunk)
            buffer.seek(0)
            yield buffer


class LocalFetcher(_RootBufferedFetcher):
    """ngclient fetcher for ``file://`` URLs: a repository copied to a USB stick or a local disk."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise tuf_errors.DownloadError(f"{url}: only file:// URLs are served by the local fetcher")
        path = Path(url2pathname(parsed.path))
        try:
            # O_NONBLOCK: a FIFO (or a device) on the stick must not block the update, which holds the lock
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise tuf_errors.DownloadHTTPError(f"{path}: not found", 404) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise tuf_errors.DownloadError(f"{path}: not a regular file")
        handle = os.fdopen(fd, "rb")

        def chunks() -> Iterator[bytes]:
            with handle:
                while block := handle.read(1 << 20):
                    yield block

        return chunks()


class HttpFetcher(_RootBufferedFetcher, Urllib3Fetcher):
    """ngclient's urllib3 fetcher, with a connection that breaks mid-download reported as a DownloadError.

    Urllib3Fetcher only converts timeouts; a server that announces a length and then closes raises
    urllib3's ProtocolError from the middle of the stream, which ngclient passes on as it is."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        chunks = super()._fetch(url)

        def guarded() -> Iterator[bytes]:
            try:
                yield from chunks
            except urllib3.exceptions.HTTPError as exc:
                detail = str(exc.args[0]) if exc.args else type(exc).__name__
                detail = detail.removeprefix("Connection broken: ")
                raise tuf_errors.DownloadError(f"connection broken while downloading {url}: {detail}") from None

        return guarded()


def repo_location(repo: str) -> tuple[str, FetcherInterface | None]:
    """Base URL and fetcher for an ``http(s)://`` URL, a ``file://`` URL or a directory path."""
    parsed = urlparse(repo)
    if parsed.scheme in {"http", "https"}:
        return repo.rstrip("/"), HttpFetcher()
    path = Path(url2pathname(parsed.path)) if parsed.scheme == "file" else Path(repo)
    if parsed.scheme not in {"", "file"}:
        raise InputError(f"--repo: '{repo}' is neither an http(s):// URL nor a directory")
    if not (path / "metadata").is_dir():
        raise InputError(f"--repo: {path} has no metadata/ directory (expected an update repository or USB copy)")
    return path.resolve().as_uri(), LocalFetcher()


def explain(exc: BaseException) -> str:
    """One line saying why TUF refused, in words an operator can act on."""
    text = first_line(exc)
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return f"metadata has expired ({text}): a stale or frozen repository; the publisher must re-sign it"
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return f"metadata is not signed by the trusted keys ({text}): bad signature or wrong key"
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return f"metadata version check failed ({text}): rollback or mix-and-match of metadata"
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return f"the download does not match its signed length/hash ({text}): tampered target"
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return f"the download is longer than its signed length ({text}): tampered target"
    if isinstance(exc, tuf_errors.DownloadError):
        cause = exc.__cause__
        detail = f"{text}: {str(cause).splitlines()[0]}" if cause else text
        return f"cannot download from the repository ({detail})"
    if isinstance(exc, tuf_errors.RepositoryError):
        return f"the repository metadata is invalid ({type(exc).__name__}: {text})"
    return text


def open_updater(device: Device, repo: str) -> Updater:
    """An ngclient Updater for ``repo`` anchored at the root installed by provisioning."""
    anchor = device.root / "trusted-root.json"
    if not anchor.is_file():
        raise InputError(f"{anchor}: device not provisioned; run 'smearsight deploy provision --trusted-root FILE'")
    base, fetcher = repo_location(repo)
    (device.root / "tuf").mkdir(parents=True, exist_ok=True)
    (device.root / "downloads").mkdir(parents=True, exist_ok=True)
    if isinstance(fetcher, _RootBufferedFetcher):
        fetcher.buffer_dir = device.root / "downloads"
    try:
        return Updater(
            metadata_dir=str(device.root / "tuf"),
            metadata_base_url=f"{base}/metadata/",
            target_dir=str(device.root / "downloads"),
            target_base_url=f"{base}/targets/",
            fetcher=fetcher,
            bootstrap=anchor.read_bytes(),
        )
    except tuf_errors.RepositoryError as exc:  # the device's own anchor, not the repository's metadata
        raise InputError(f"{anchor}: not valid, self-signed TUF root metadata ({type(exc).__name__}: "
                         f"{first_line(exc)}); provision the device again: smearsight deploy provision "
                         "--trusted-root FILE --force") from None


def update(
    root: str | Path,
    repo: str,
    *,
    keep: int = DEFAULT_KEEP,
    allow_downgrade: bool = False,
    force: bool = False,
    profile: DeviceProfile | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Check ``repo`` for this device's bundle and install it (verify, unpack, check, smoke test, switch)."""
    device = Device(root)
    say = progress or (lambda _msg: None)
    profile = profile or detect_device()
    with device.lock():
        device.recover()
        current = device.current()
        untouched = f"current release {current} untouched" if current else "nothing was installed"
        try:
            return _update_locked(device, repo, keep, allow_downgrade, force, profile, say)
        except IncompatibleError as exc:
            device.log_event("refused", reason=str(exc))
            raise UpdateError(f"update refused: {exc}; {untouched}") from None
        except UpdateError as exc:
            device.log_event("refused", reason=str(exc))
            raise UpdateError(f"{exc}; {untouched}") from None
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            reason = explain(exc)
            device.log_event("refused", reason=reason)
            raise UpdateError(f"update refused: {reason}; {untouched}") from None
        except OSError as exc:
            reason = describe_os_error(exc, device.root)
            device.log_event("failed", reason=reason)
            raise UpdateError(f"update failed: {reason}; {untouched}") from None


def _update_locked(
    device: Device,
    repo: str,
    keep: int,
    allow_downgrade: bool,
    force: bool,
    profile: DeviceProfile,
    say: Callable[[str], None],
) -> dict[str, Any]:
    updater = open_updater(device, repo)
    say("checking signed metadata")
    updater.refresh()
    current = device.current()
    state = device.load_state()
    keys = ([profile.gpu_key] if profile.gpu_key else []) + [ONNX_KEY]
    incompatible: list[str] = []
    downgrades: list[str] = []
    for key in keys:
        info = updater.get_targetinfo(target_path(key))
        if info is None:
            continue
        custom = (info.custom or {}).get("smearsight", {})
        version = check_version(str(custom.get("version", "")), f"target {info.path}: custom 'version'")
        if version == current:
            return {"status": "up-to-date", "version": version, "key": key}
        if version in state["rejected"] and not force:
            return {"status": "skipped", "version": version, "key": key,
                    "reason": f"version {version} was rolled back here ({state['rejected'][version]}); "
                              "use --force to install it again"}
        if current and version_key(version) < version_key(current) and not allow_downgrade:
            # an older bundle for this GPU (its engines not yet rebuilt) must not hide a newer fallback
            downgrades.append(f"update refused: the repository offers {version}, older than the installed "
                              f"{current} (downgrade; use --allow-downgrade to install it)")
            continue
        say(f"downloading {info.path} ({info.length} bytes)")
        # named as ngclient names it; removed however this ends (a download cut short by a full disk included)
        path = device.root / "downloads" / quote(info.path, safe="")
        try:
            if updater.find_cached_target(info, str(path)) is None:
                updater.download_target(info, str(path))
            say(f"installing {version}")
            return device.install_bundle(path, version, key, profile, keep)
        except IncompatibleError as exc:
            incompatible.append(f"{key}: {exc}")
            device.log_event("incompatible", version=version, key=key, reason=str(exc))
            continue
        finally:
            path.unlink(missing_ok=True)
    if downgrades:
        raise UpdateError(downgrades[0])
    if incompatible:
        raise IncompatibleError("; ".join(incompatible))
    raise UpdateError(f"update refused: the repository has no bundle for this device (looked for {', '.join(keys)})")
