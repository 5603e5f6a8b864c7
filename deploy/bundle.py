"""Release bundles: models, a reference frame with expected outputs, release notes, one index.

A bundle is a gzip-compressed tar archive, reproducible byte for byte (sorted entries, fixed mtime,
uid/gid 0, fixed modes, gzip mtime 0), holding::

    bundle.json                       index: version, models, tolerances, sha256 + size of every file
    RELEASE_NOTES.md
    models/<name>/manifest.json       + model.onnx (+ model.engine); <name> = detector | detector_int8 |
                                      morphology_<part>
    reference/<name>/frame.npy        uint8 [C, H, W] reference frame at the model's input size
    reference/<name>/<output>.npy     expected outputs from ONNX Runtime for that frame

``models/`` is laid out as the runtime's ``smearsight run --models DIR`` expects.

On a device a release directory is a bundle unpacked by :func:`safe_extract`, checked by
:func:`verify_release` and exercised by :func:`smoke_test`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.deploy import faults
from smearsight.deploy.inference import Backend, frame_to_input, reference_frame, run_model
from smearsight.errors import InputError, first_line
from smearsight.fileio import atomic_open, check_output_file, fsync_dir, sha256_file
from smearsight.manifest import MANIFEST_NAME, load_manifest, verify_files

INDEX_NAME = "bundle.json"
NOTES_NAME = "RELEASE_NOTES.md"
INSTALL_MARKER = ".install.json"
BUNDLE_FORMAT = 1
FIXED_MTIME = 315532800  # 1980-01-01T00:00:00Z, the same for every entry
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")

#: How close a device's outputs must be to the bundled expected outputs, per backend.
DEFAULT_TOLERANCE: dict[str, dict[str, float]] = {
    "onnx": {"atol": 1e-3, "rtol": 1e-3, "max_outlier_fraction": 0.0},
    "trt": {"atol": 0.1, "rtol": 0.05, "max_outlier_fraction": 0.001},
    # a few output quantization steps: not validated across CPU families (no second CPU type was at hand)
    "onnx-int8": {"atol": 0.3, "rtol": 0.05, "max_outlier_fraction": 0.005},
}


def check_version(version: str, what: str = "--version") -> str:
    """Validate a release version string (it becomes a directory name on the device)."""
    if not _SAFE_NAME.match(version) or version in {".", ".."} or ".." in version:
        raise InputError(f"{what}: '{version}' is not a valid version (letters, digits, '.', '_', '+', '-')")
    return version


def _version_parts(text: str) -> tuple[tuple[tuple[int, int | str], ...], ...]:
    return tuple(tuple((0, int(run)) if run.isdigit() else (1, run) for run in re.findall(r"\d+|\D+", part))
                 for part in re.split(r"[._-]", text))


def version_key(version: str) -> tuple[Any, ...]:
    """Sort key for versions, semver-like: numeric parts compare as numbers ("1.10" > "1.9"), a pre-release
    sorts below its release ("1.4.0-rc2" < "1.4.0-rc10" < "1.4.0"), "+build" only breaks ties."""
    rest, _, build = version.partition("+")
    release, dash, pre = rest.partition("-")
    pre_key = (0, _version_parts(pre)) if dash else (1,)
    return (_version_parts(release), pre_key, _version_parts(build))


# ---------------------------------------------------------------------------------------------- build


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class _Entry:
    name: str
    data: bytes | None = None
    path: Path | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size  # type: ignore[union-attr]

    def sha256(self) -> str:
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        return sha256_file(self.path)  # type: ignore[arg-type]


def build_bundle(
    model_dirs: Iterable[str | Path],
    version: str,
    out: str | Path,
    notes: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build a reproducible bundle at ``out`` from exported model directories; return its index."""
    check_version(version)
    check_output_file(out, "--out")
    entries: list[_Entry] = []
    models: list[dict[str, Any]] = []
    seen: set[str] = set()
    dirs = [Path(d) for d in model_dirs]
    if not dirs:
        raise InputError("MODEL_DIR: give at least one exported model directory")
    for model_dir in dirs:
        if not model_dir.is_dir():
            raise InputError(f"{model_dir}: not a directory (expected an exported model with {MANIFEST_NAME})")
        manifest = load_manifest(model_dir)
        problems = verify_files(model_dir, manifest)
        if problems:
            raise InputError(problems[0])
        # the runtime's --models layout: detector/, detector_int8/ and morphology_<part>/
        if manifest.kind == "detector":
            name = "detector_int8" if manifest.precision == "int8" else "detector"
        else:
            name = f"morphology_{manifest.morphology.part}"  # type: ignore[union-attr]
        if name in seen:
            raise InputError(f"{model_dir / MANIFEST_NAME}: a second '{name}' model; a bundle holds one detector "
                             "and one morphology model per part")
        seen.add(name)
        if any(d <= 0 for d in manifest.input.shape[1:]):
            raise InputError(f"{model_dir / MANIFEST_NAME}: field 'input.shape' needs fixed C, H, W")
        if progress:
            progress(f"reference outputs for {name}")
        base = f"models/{name}"
        entries.append(_Entry(f"{base}/{MANIFEST_NAME}", path=model_dir / MANIFEST_NAME))
        entries.append(_Entry(f"{base}/{manifest.onnx_file}", path=model_dir / manifest.onnx_file))
        if manifest.engine is not None:
            entries.append(_Entry(f"{base}/{manifest.engine.file}", path=model_dir / manifest.engine.file))
        frame = reference_frame(manifest.input)
        outputs = run_model(model_dir, frame_to_input(frame, manifest.input), "onnx")
        ref = f"reference/{name}"
        entries.append(_Entry(f"{ref}/frame.npy", data=_npy_bytes(frame)))
        expected = {}
        for out_name in sorted(outputs):
            if not _SAFE_NAME.match(out_name):
                raise InputError(f"{model_dir / MANIFEST_NAME}: output name '{out_name}' cannot be a file name")
            expected[out_name] = f"{ref}/{out_name}.npy"
            entries.append(_Entry(expected[out_name], data=_npy_bytes(np.asarray(outputs[out_name], np.float32))))
        models.append(
            {
                "name": name,
                "model_name": manifest.name,
                "model_version": manifest.model_version,
                "kind": manifest.kind,
                "dir": base,
                "precision": manifest.precision,
                "engine": None
                if manifest.engine is None
                else {
                    "tensorrt_version": manifest.engine.tensorrt_version,
                    "compute_capability": manifest.engine.compute_capability,
                    "gpu_name": manifest.engine.gpu_name,
                },
                "reference": {"frame": f"{ref}/frame.npy", "outputs": expected},
            }
        )
    _check_int8_source(models, dirs)
    if notes is not None:
        notes_path = Path(notes)
        if not notes_path.is_file():
            raise InputError(f"{notes_path}: release notes file not found")
        entries.append(_Entry(NOTES_NAME, path=notes_path))
    else:
        entries.append(_Entry(NOTES_NAME, data=f"# SmearSight {version}\n\nNo release notes given.\n".encode()))
    index = {
        "format": BUNDLE_FORMAT,
        "version": version,
        "models": sorted(models, key=lambda m: m["name"]),
        "notes": NOTES_NAME,
        "tolerance": DEFAULT_TOLERANCE,
        "files": {e.name: {"sha256": e.sha256(), "size": e.size} for e in sorted(entries, key=lambda e: e.name)},
    }
    entries.append(_Entry(INDEX_NAME, data=(json.dumps(index, indent=2, sort_keys=True) + "\n").encode()))
    _write_archive(Path(out), entries)
    return index


def _check_int8_source(models: list[dict[str, Any]], dirs: list[Path]) -> None:
    """An int8 detector must have been quantized from the bundle's float detector (the runtime would
    otherwise skip it as stale)."""
    by_name = {m["name"]: d for m, d in zip(models, dirs, strict=True)}
    if "detector_int8" not in by_name or "detector" not in by_name:
        return
    int8 = load_manifest(by_name["detector_int8"])
    float_sha = load_manifest(by_name["detector"]).onnx_sha256
    made_from = int8.quantization.float_onnx_sha256 if int8.quantization else ""
    if made_from != float_sha:
        raise InputError(f"{by_name['detector_int8'] / MANIFEST_NAME}: field 'quantization.float_onnx_sha256' does "
                         f"not name the bundle's float detector {by_name['detector']} (quantize that one again)")


def tolerance_key(backend: str, model: dict[str, Any]) -> str:
    """The tolerance a model's smoke test uses: int8 models get their own (integer kernels round
    differently on CPUs with and without VNNI-style instructions)."""
    return "onnx-int8" if backend == "onnx" and model.get("precision") == "int8" else backend


def _write_archive(out: Path, entries: list[_Entry]) -> None:
    with atomic_open(out) as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for entry in sorted(entries, key=lambda e: e.name):
                    info = tarfile.TarInfo(entry.name)
                    info.size = entry.size
                    info.mtime = FIXED_MTIME
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    if entry.data is not None:
                        tar.addfile(info, io.BytesIO(entry.data))
                    else:
                        with open(entry.path, "rb") as handle:  # type: ignore[arg-type]
                            tar.addfile(info, handle)


def read_index(bundle: str | Path) -> dict[str, Any]:
    """Read ``bundle.json`` from a bundle archive (no extraction)."""
    bundle = Path(bundle)
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            member = tar.getmember(INDEX_NAME)
            handle = tar.extractfile(member)
            if handle is None:
                raise KeyError(INDEX_NAME)
            index = json.loads(handle.read())
    except (OSError, tarfile.TarError, KeyError, json.JSONDecodeError) as exc:
        raise InputError(f"{bundle}: not a SmearSight bundle ({type(exc).__name__}: {exc})") from None
    if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT or "version" not in index:
        raise InputError(f"{bundle}: {INDEX_NAME} has an unsupported format (expected format {BUNDLE_FORMAT})")
    check_version(str(index["version"]), f"{bundle}: {INDEX_NAME} field 'version'")
    return index


# ------------------------------------------------------------------------------------------ extract


def _safe_member_path(dest: Path, member: tarfile.TarInfo) -> Path:
    name = member.name
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or any(p in {"", ".", ".."} for p in parts)
    ):
        raise InputError(f"bundle entry '{name}': unsafe path (absolute, '..' or empty parts are refused)")
    target = dest.joinpath(*parts)
    if os.path.commonpath([os.path.abspath(target), os.path.abspath(dest)]) != os.path.abspath(dest):
        raise InputError(f"bundle entry '{name}': would be written outside the release directory")
    return target


def safe_extract(archive: str | Path, dest: str | Path, max_total_bytes: int = 16 << 30) -> list[str]:
    """Extract a bundle into the existing empty directory ``dest``; refuse anything but plain files.

    Links, devices, absolute paths and ``..`` are refused before anything is written for that entry;
    files are created exclusively (never following a link) and fsynced.
    """
    dest = Path(dest)
    names: list[str] = []
    total = 0
    try:
        tar = tarfile.open(archive, "r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise InputError(f"{archive}: cannot open the bundle ({exc})") from None
    with tar:
        try:
            for member in tar:
                target = _safe_member_path(dest, member)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True, mode=0o755)
                    continue
                if not member.isreg():
                    raise InputError(f"bundle entry '{member.name}': only plain files are allowed (links refused)")
                total += member.size
                if total > max_total_bytes:
                    raise InputError(f"{archive}: bundle unpacks to more than {max_total_bytes} bytes")
                _mkdirs(dest, target.parent)
                source = tar.extractfile(member)
                if source is None:
                    raise InputError(f"bundle entry '{member.name}': cannot be read")
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                except FileExistsError:
                    raise InputError(f"bundle entry '{member.name}': appears twice in the archive") from None
                with os.fdopen(fd, "wb") as handle:
                    while block := source.read(1 << 20):
                        faults.count_write(len(block))
                        handle.write(block)
                    handle.flush()
                    os.fsync(handle.fileno())
                names.append(member.name)
                if len(names) == 1:
                    faults.checkpoint("extracting")
        except (tarfile.TarError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{archive}: the bundle archive is damaged ({exc})") from None
    for directory in sorted({(dest / n).parent for n in names} | {dest}, key=lambda p: -len(p.parts)):
        fsync_dir(directory)
    return names


def _mkdirs(dest: Path, directory: Path) -> None:
    """Create ``directory`` under ``dest`` refusing to pass through a symlink."""
    current = dest
    for part in directory.relative_to(dest).parts:
        current = current / part
        if current.is_symlink():
            raise InputError(f"{current}: a link inside the release directory is refused")
        if not current.exists():
            current.mkdir(mode=0o755)


# ------------------------------------------------------------------------------------------- verify


def load_release_index(release_dir: str | Path) -> dict[str, Any]:
    """Read a release directory's ``bundle.json``."""
    path = Path(release_dir) / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the release index ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT:
        raise InputError(f"{path}: unsupported release index format")
    return index


def verify_release(release_dir: str | Path, expected_version: str | None = None) -> list[str]:
    """Check a release directory against its index: every file present with its hash, nothing extra."""
    release_dir = Path(release_dir)
    try:
        index = load_release_index(release_dir)
    except InputError as exc:
        return [str(exc)]
    problems = []
    if expected_version is not None and index.get("version") != expected_version:
        problems.append(
            f"{release_dir / INDEX_NAME}: version '{index.get('version')}' but '{expected_version}' was expected"
        )
    files: dict[str, dict[str, Any]] = index.get("files", {})
    for name, info in sorted(files.items()):
        path = release_dir / name
        if path.is_symlink() or not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != info.get("size"):
            problems.append(f"{path}: size {path.stat().st_size} but the index says {info.get('size')}")
        elif sha256_file(path) != info.get("sha256"):
            problems.append(f"{path}: sha256 does not match the index")
    allowed = set(files) | {INDEX_NAME, INSTALL_MARKER}
    for path in sorted(release_dir.rglob("*")):
        rel = path.relative_to(release_dir).as_posix()
        if path.is_symlink() or (path.is_file() and rel not in allowed):
            problems.append(f"{path}: not part of the release")
    if problems:
        return problems
    for model in index.get("models", []):
        model_dir = release_dir / model["dir"]
        try:
            problems.extend(verify_files(model_dir))
        except InputError as exc:
            problems.append(str(exc))
    return problems


# --------------------------------------------------------------------------------------- smoke test


@dataclass
class SmokeResult:
    """Outcome of running one model on its reference frame."""

    model: str
    backend: str
    ok: bool
    detail: str


def smoke_test(
    release_dir: str | Path, backend_for: Callable[[dict[str, Any]], Backend] | None = None
) -> list[SmokeResult]:
    """Load every model of a release, run its reference frame and compare with the expected outputs."""
    release_dir = Path(release_dir)
    index = load_release_index(release_dir)
    tolerances = index.get("tolerance", DEFAULT_TOLERANCE)
    results = []
    for model in index.get("models", []):
        backend: Backend = backend_for(model) if backend_for else "onnx"
        key = tolerance_key(backend, model)
        tol = tolerances.get(key, DEFAULT_TOLERANCE[key])
        name = model["name"]
        try:
            model_dir = release_dir / model["dir"]
            manifest = load_manifest(model_dir)
            frame = np.load(release_dir / model["reference"]["frame"], allow_pickle=False)
            outputs = run_model(model_dir, frame_to_input(frame, manifest.input), backend)
            detail = "outputs match"
            for out_name, rel in sorted(model["reference"]["outputs"].items()):
                expected = np.load(release_dir / rel, allow_pickle=False)
                got = outputs.get(out_name)
                if got is None:
                    raise ValueError(f"output '{out_name}' missing")
                got = np.asarray(got, dtype=np.float32)
                if got.shape != expected.shape:
                    raise ValueError(
                        f"output '{out_name}' has shape {list(got.shape)}, expected {list(expected.shape)}"
                    )
                if not np.all(np.isfinite(got)):
                    raise ValueError(f"output '{out_name}' has NaN or Inf values")
                bad = np.abs(got - expected) > (tol["atol"] + tol["rtol"] * np.abs(expected))
                fraction = float(bad.mean()) if bad.size else 0.0
                if fraction > tol["max_outlier_fraction"]:
                    worst = float(np.max(np.abs(got - expected)))
                    raise ValueError(
                        f"output '{out_name}' differs from the expected outputs (max |diff| {worst:.4g}, "
                        f"{fraction:.2%} of values beyond atol {tol['atol']} rtol {tol['rtol']})"
                    )
            results.append(SmokeResult(name, backend, True, detail))
        except Exception as exc:  # any failure to load or run is a failed smoke test
            results.append(SmokeResult(name, backend, False, first_line(exc)))
    return results
