"""Durable file writes (temp file, fsync, rename) and hashing."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; atomically written files get the permissions a plain open() would give.
_FILE_MODE = 0o666 & ~_current_umask()
DIR_MODE = 0o777 & ~_current_umask()
"""What ``mkdir`` would give a folder; for folders made by ``tempfile.mkdtemp`` (0700) that are kept."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: int | None = None, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file that appears as ``path`` only when the block ends without error.

    Written under a temporary name in the same folder (see :func:`remove_stale_temp_files`), fsynced,
    renamed over ``path`` and the folder fsynced; on error nothing is left behind. ``mode`` defaults to
    what ``open()`` would create. An OSError of the write (a full disk) names ``path``. ``durable=False`` skips
    the fsyncs (many files whose index, written last, is durable: a crash leaves whole old or new files, or
    none, but possibly not the newest).
    """
    with atomic_files([path], mode, durable=durable) as (handle,):
        yield handle


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike[str]], mode: int | None = None, *,
                 durable: bool = True) -> Iterator[list[BinaryIO]]:
    """Binary files, one per path, that replace theirs together when the block ends without error.

    Each is written under a temporary name beside its path (as :func:`atomic_open` does) and fsynced; only
    when all are complete are they renamed over their paths, back to back, and their folders fsynced. A
    reader (or a kill) can then find an old set or a new set, or, between two renames, a mix for a few
    microseconds, never a half-written file. A file that belongs with another (a model and the manifest
    that names its sha256) goes through here. An OSError names the path it concerns (never a temporary name),
    or, for a write that names no file, the path (one path) or the folder (several).
    """
    targets = [Path(p) for p in paths]
    temps: list[str] = []
    handles: list[BinaryIO] = []
    try:
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as exc:  # it names its random temporary name: name the file being written
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            temps.append(tmp)
            handles.append(os.fdopen(fd, "wb"))
        yield handles
        for handle in handles:
            os.fchmod(handle.fileno(), _FILE_MODE if mode is None else mode)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
            handle.close()
        for tmp, path in zip(temps, targets, strict=True):
            os.replace(tmp, path)
    except BaseException as exc:
        for handle in handles:
            with contextlib.suppress(OSError):
                handle.close()
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and str(exc.filename) in temps:
            # the rename over the path failed (a file another user owns in a sticky folder, a folder in its
            # place): the temporary file it names is gone, the path is what the user knows
            raise OSError(exc.errno, exc.strerror, str(targets[temps.index(str(exc.filename))])) from exc
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            named = targets[0] if len(targets) == 1 else targets[0].parent
            raise OSError(exc.errno, exc.strerror, str(named)) from exc
        raise
    if durable:
        for folder in dict.fromkeys(path.parent for path in targets):
            fsync_dir(folder)


def remove_stale_temp_files(folder: str | os.PathLike[str], names: Iterable[str]) -> int:
    """Delete the temporary files :func:`atomic_open` left in ``folder`` for ``names`` (file names or glob
    patterns such as ``example_*.jpg``) when its process was killed mid-write (``.NAME.XXXXXXXX.tmp``);
    returns how many. Call it before writing those files again."""
    removed = 0
    for name in names:
        for stale in Path(folder).glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A new hidden folder beside ``target`` in which to build it, removed when the block ends (rename what
    is kept out of it first).

    Named ``.NAME.XXXXXXXX.staging`` and locked while in use; those that runs killed mid-build left (kill -9
    runs no clean-up) are removed first, never one that another run is building in.
    """
    import fcntl
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.staging"):
        if not stale.is_dir() or stale.is_symlink():
            continue
        try:
            fd = os.open(stale / _STAGING_LOCK, os.O_RDWR)
        except FileNotFoundError:  # killed before it was locked
            fd = None
        except OSError:
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(stale, ignore_errors=True)
        except BlockingIOError:
            pass  # another run is building in it
        finally:
            if fd is not None:
                os.close(fd)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    fd = os.open(staging / _STAGING_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)


_STAGING_LOCK = ".lock"


def check_output_dir(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Fail early, before long work, when the output folder ``path`` could not be created or written in.

    Creates nothing (the command does, once its inputs are known good). Raises InputError naming ``what``.
    """
    from smearsight.errors import InputError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{what} {out}: is a file; expected a folder (new or existing)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} {out}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {out}: {existing} is not writable")
    return out


def check_output_file(path: str | os.PathLike[str], what: str) -> Path:
    """Fail early when the output file ``path`` could not be written (it is a folder, or its folder could not be
    created or written in); creates nothing. Raises InputError naming ``what``."""
    from smearsight.errors import InputError

    out = Path(path)
    if out.is_dir():
        raise InputError(f"{what} {out}: is a folder; expected a file name")
    if out.parent.exists() and not out.parent.is_dir():
        raise InputError(f"{what} {out}: {out.parent} is not a folder")
    check_output_dir(out.parent, f"{what} {out}: its folder")
    return out


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None, *,
                       durable: bool = True) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    with atomic_open(path, mode, durable=durable) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def finite_json(value: Any) -> Any:
    """``value`` (dicts, lists and tuples, nested) with every NaN and infinity as None: JSON has no such
    numbers, and jq, browsers and spreadsheet imports refuse a document holding Python's ``NaN``/``Infinity``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps_finite(obj: Any, **kwargs: Any) -> str:
    """``json.dumps(obj, **kwargs)`` with NaN and infinities as null (:func:`finite_json`); the copy is made only
    when ``obj`` holds such a number (rare: an overflowed score, a NaN metric)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(finite_json(obj), **kwargs)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically, NaN and infinities as null (:func:`dumps_finite`)."""
    return atomic_write_text(path, dumps_finite(obj, indent=indent, sort_keys=False) + "\n")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file written by someone else (e.g. a video encoder) before renaming it into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_stdout(text: str) -> None:
    """Write ``text`` to stdout. A failure (a full disk behind ``> file``) becomes
    :class:`~smearsight.errors.StdoutError`; a reader that went away (``| head``) stays a
    :class:`BrokenPipeError`, which the CLI ends quietly."""
    from smearsight.errors import StdoutError

    try:
        sys.stdout.write(text)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise StdoutError(exc) from None
