"""Ed25519 signing keys for the update repository, stored with owner-only permissions.

``<dir>/<role>.pem`` holds the PKCS#8 private key (mode 0600, directory 0700), ``<dir>/<role>.pub.json``
the public key in TUF's key format. Real deployments keep the root key offline (see docs/deploy.md):
only the timestamp (and usually snapshot/targets) keys need to be on the publishing host.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from securesystemslib.signer import CryptoSigner, SSlibKey

from smearsight.errors import InputError
from smearsight.fileio import atomic_write_text, fsync_dir

ROLES: tuple[str, ...] = ("root", "targets", "snapshot", "timestamp")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, 0o600)  # whatever the umask was


def generate_key(keys_dir: str | Path, role: str) -> CryptoSigner:
    """Create a new Ed25519 key pair for ``role`` in ``keys_dir``; refuse to overwrite one."""
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys_dir, 0o700)
    private = keys_dir / f"{role}.pem"
    if private.exists():
        raise InputError(f"{private}: a key already exists; refusing to overwrite it")
    signer = CryptoSigner.generate_ed25519()
    _write_private(private, signer.private_bytes)
    public = signer.public_key
    atomic_write_text(keys_dir / f"{role}.pub.json", json.dumps({"keyid": public.keyid, **public.to_dict()}, indent=2))
    fsync_dir(keys_dir)
    return signer


def load_public_key(keys_dir: str | Path, role: str) -> SSlibKey:
    """The public key of ``role``."""
    path = Path(keys_dir) / f"{role}.pub.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        keyid = data.pop("keyid")
        return SSlibKey.from_dict(keyid, data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: cannot read the public key ({exc})") from None


def load_signer(keys_dir: str | Path, role: str) -> CryptoSigner:
    """Load the private key of ``role``; refuse a key file that group or others can read."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    private = Path(keys_dir) / f"{role}.pem"
    if not private.is_file():
        hint = ("keep root offline; bring it only to sign root" if role == "root"
                else f"it must be here to sign {role} metadata")
        raise InputError(f"{private}: the {role} key is not on this host ({hint})")
    mode = stat.S_IMODE(private.stat().st_mode)
    if mode & 0o077:
        raise InputError(f"{private}: permissions {mode:04o} are too open; run: chmod 600 {private}")
    try:
        key = load_pem_private_key(private.read_bytes(), None)
        return CryptoSigner(key, load_public_key(keys_dir, role))
    except InputError:
        raise
    except Exception as exc:  # cryptography raises several types for a bad key file
        raise InputError(f"{private}: not a usable private key ({exc})") from None
