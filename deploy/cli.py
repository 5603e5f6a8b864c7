"""``smearsight deploy ...``: bundles, the signed update repository, device updates and rollback.

Exit codes: 0 done (or already up to date), 1 bad input, 3 an update/rollback refused or failed (the
current release is untouched), 4 a health check failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from smearsight.cli_app import deploy_app
from smearsight.errors import InputError

repo_app = typer.Typer(name="repo", help="The signed TUF update repository: init, publish, refresh, serve.",
                       no_args_is_help=True, pretty_exceptions_enable=False)
deploy_app.add_typer(repo_app, name="repo")

ROOT_HELP = "Device root directory (releases, current link, state). Env: SMEARSIGHT_ROOT_DIR."


_UNIT_UNSAFE = set("\"'\\$%;`")  # quoting, escapes, expansion and specifiers in unit files and sh -c


def _root_default() -> Path:
    from smearsight.deploy.install import DEFAULT_ROOT

    return DEFAULT_ROOT


def _provisioned_root(root_dir: Path | None) -> Path:
    """The device root a command other than ``provision`` works in; it must exist (a mistyped --root-dir
    is refused rather than created)."""
    root = root_dir or _root_default()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "no such folder"
        raise InputError(f"--root-dir {root}: {what} (device not provisioned; run "
                         "'smearsight deploy provision --trusted-root FILE')")
    return root


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@deploy_app.command("bundle")
def bundle_cmd(
    model_dirs: list[Path] = typer.Argument(..., help="Exported model directories (manifest.json + model files)."),
    version: str = typer.Option(..., "--version", help="Release version, e.g. 1.4.0."),
    out: Path = typer.Option(..., "--out", help="Bundle file to write (.tar.gz)."),
    notes: Path | None = typer.Option(None, "--notes", help="Release notes (Markdown)."),
) -> None:
    """Build a reproducible release bundle with reference outputs for the device's smoke test."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from smearsight.deploy.bundle import build_bundle

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("bundling", total=None)
        index = build_bundle(model_dirs, version, out, notes,
                             progress=lambda msg: bar.update(task, description=msg))
    size = out.stat().st_size
    typer.echo(f"wrote {out} ({size} bytes): version {index['version']}, "
               f"models {', '.join(m['name'] for m in index['models'])}")


@repo_app.command("init")
def repo_init(
    repo_dir: Path = typer.Argument(..., help="Directory for the new repository."),
    expiry_days: list[str] = typer.Option(
        [], "--expiry-days", help="ROLE=DAYS (root, targets, snapshot, timestamp); repeatable."
    ),
) -> None:
    """Create Ed25519 keys (0600) and signed root/targets/snapshot/timestamp metadata."""
    from smearsight.deploy.repository import FileRepository

    expiry: dict[str, float] = {}
    for item in expiry_days:
        role, sep, days = item.partition("=")
        try:
            expiry[role.strip()] = float(days)
        except ValueError:
            sep = ""
        if not sep:
            raise InputError(f"--expiry-days: '{item}' should look like timestamp=7")
    repo = FileRepository.init(repo_dir, expiry)
    typer.echo(f"initialised {repo_dir}: keys in {repo.keys_dir} (mode 0600)")
    typer.echo(f"trusted root for provisioning devices: {repo.meta_dir / '1.root.json'}")
    typer.echo(f"move {repo.keys_dir / 'root.pem'} to offline storage; it is only needed to change keys")


@repo_app.command("publish")
def repo_publish(
    repo_dir: Path = typer.Argument(..., help="Repository directory."),
    bundle: Path = typer.Argument(..., help="Bundle made by 'smearsight deploy bundle'."),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU key of the engines, e.g. sm_87-trt10.3."),
    onnx_fallback: bool = typer.Option(False, "--onnx-fallback", help="Publish as the ONNX fallback target."),
    allow_downgrade: bool = typer.Option(False, "--allow-downgrade", help="Allow an older version than published."),
) -> None:
    """Add a bundle as a target (per GPU key or ONNX fallback) and re-sign targets, snapshot, timestamp."""
    from smearsight.deploy.repository import ONNX_KEY, FileRepository

    if (gpu is None) == (not onnx_fallback):
        raise InputError("publish: give exactly one of --gpu KEY or --onnx-fallback")
    result = FileRepository(repo_dir).publish(bundle, gpu or ONNX_KEY, allow_downgrade=allow_downgrade)
    if result["changed"]:
        typer.echo(f"published {result['target']} version {result['version']} "
                   f"(targets v{result['targets_version']})")
    elif result["resigned"]:
        typer.echo(f"{result['target']} already holds version {result['version']}; re-signed snapshot and "
                   "timestamp, which an earlier publish had not finished")
    else:
        typer.echo(f"{result['target']} already holds version {result['version']}; nothing to do")


@repo_app.command("refresh")
def repo_refresh(
    repo_dir: Path = typer.Argument(..., help="Repository directory."),
    targets: bool = typer.Option(False, "--targets", help="Also re-sign targets (before it expires)."),
    root: bool = typer.Option(False, "--root", help="Also re-sign root (needs the offline root key)."),
) -> None:
    """Re-sign snapshot and timestamp with fresh expiry dates (run it regularly, e.g. daily)."""
    from smearsight.deploy.repository import FileRepository

    v = FileRepository(repo_dir).refresh(targets=targets, root=root)
    typer.echo(f"signed: root v{v['root']}, targets v{v['targets']}, snapshot v{v['snapshot']}, "
               f"timestamp v{v['timestamp']}")
    for warning in v["warnings"]:
        typer.echo(f"warning: {warning}", err=True)


@repo_app.command("serve")
def repo_serve(
    repo_dir: Path = typer.Argument(..., help="Repository directory."),
    port: int = typer.Option(8700, "--port", help="TCP port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this host only)."),
) -> None:
    """Serve metadata/ and targets/ over plain HTTP (keys are never served). Ctrl-C stops."""
    from smearsight.deploy.repository import make_server

    server = make_server(repo_dir, host, port, quiet=False)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"serving {repo_dir} at http://{shown}:{server.server_address[1]}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()


@deploy_app.command("provision")
def provision_cmd(
    trusted_root: Path = typer.Option(..., "--trusted-root", help="The repository's metadata/1.root.json."),
    root_dir: Path = typer.Option(None, "--root-dir", help=ROOT_HELP),
    force: bool = typer.Option(False, "--force", help="Replace a different trusted root."),
) -> None:
    """Install the repository's root metadata on this device (the trust anchor for every update)."""
    from smearsight.deploy.install import provision

    result = provision(root_dir or _root_default(), trusted_root, force=force)
    typer.echo(f"provisioned {result['root']}: trusted root v{result['root_version']} expires {result['expires']}")
    if result["note"]:
        typer.echo(f"note: {result['note']}", err=True)


@deploy_app.command("update")
def update_cmd(
    repo: str = typer.Option(..., "--repo", help="http(s):// URL of the repository, or its directory (USB stick)."),
    root_dir: Path = typer.Option(None, "--root-dir", help=ROOT_HELP),
    keep: int = typer.Option(2, "--keep", min=0, help="Previous releases to keep."),
    allow_downgrade: bool = typer.Option(False, "--allow-downgrade", help="Accept an older version."),
    force: bool = typer.Option(False, "--force", help="Install a version that was rolled back here before."),
    compute_capability: str | None = typer.Option(None, "--compute-capability", help="Override GPU detection."),
    tensorrt_version: str | None = typer.Option(None, "--tensorrt-version", help="Override ('none' = no TensorRT)."),
) -> None:
    """Fetch, verify (TUF), unpack, check, smoke-test and atomically switch to this device's bundle."""
    from smearsight.deploy.updater import detect_device, update

    profile = detect_device(compute_capability, tensorrt_version)
    result = update(_provisioned_root(root_dir), repo, keep=keep, allow_downgrade=allow_downgrade, force=force,
                    profile=profile, progress=lambda msg: typer.echo(msg, err=True))
    if result["status"] == "installed":
        typer.echo(f"installed {result['version']} ({result['key']}; previous: {result['previous']})")
    elif result["status"] == "up-to-date":
        typer.echo(f"up to date: {result['version']} ({result['key']})")
    else:
        typer.echo(f"skipped: {result['reason']}")


@deploy_app.command("status")
def status_cmd(
    root_dir: Path = typer.Option(None, "--root-dir", help=ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the current release, previous releases, trial state and the last update events."""
    from smearsight.deploy.install import Device, UpdateError

    device = Device(_provisioned_root(root_dir))
    try:
        with device.lock():  # never clean up under an install in progress (its staging directory)
            device.recover()
    except UpdateError:
        pass  # an update or health check holds the lock: report the state as it is
    status = device.status()
    if as_json:
        _echo_json(status)
        return
    typer.echo(f"root:      {status['root']} ({'provisioned' if status['provisioned'] else 'NOT provisioned'})")
    typer.echo(f"current:   {status['current'] or '-'} {status['backends'] or ''}")
    if status["trial"]:
        typer.echo(f"on trial:  since {status['trial']['since']} (previous {status['trial']['previous']})")
    typer.echo(f"releases:  {', '.join(status['releases']) or '-'}")
    for version, reason in status["rejected"].items():
        typer.echo(f"rejected:  {version}: {reason}")
    for event in status["last_events"]:
        detail = event.get("reason") or event.get("version") or ""
        typer.echo(f"event:     {event['time']} {event['event']} {detail}")


@deploy_app.command("rollback")
def rollback_cmd(
    root_dir: Path = typer.Option(None, "--root-dir", help=ROOT_HELP),
    to: str | None = typer.Option(None, "--to", help="Version to go back to (default: the previous one)."),
    reason: str = typer.Option("manual rollback", "--reason", help="Recorded in the event log."),
) -> None:
    """Switch back to the previous (or a given) installed release; it is not re-installed automatically."""
    from smearsight.deploy.install import Device, UpdateError, describe_os_error

    device = Device(_provisioned_root(root_dir))
    with device.lock():
        try:
            result = device.rollback(to=to, reason=reason)
        except OSError as exc:
            raise UpdateError(f"rollback failed: {describe_os_error(exc, device.root)}") from None
    typer.echo(f"rolled back from {result['previous']} to {result['version']}")


@deploy_app.command("health-check")
def health_cmd(
    root_dir: Path = typer.Option(None, "--root-dir", help=ROOT_HELP),
    runtime_failed: str | None = typer.Option(None, "--runtime-failed", help="The runtime could not run: why."),
    confirm: bool = typer.Option(False, "--confirm", help="End the trial of a new release when healthy."),
    quick: bool = typer.Option(False, "--quick", help="Check files only (no smoke test)."),
) -> None:
    """Verify the current release (files + smoke test); roll back by itself if it is bad. Exit 4 when unhealthy."""
    from smearsight.deploy.health import health_check

    report = health_check(_provisioned_root(root_dir), runtime_failure=runtime_failed, confirm=confirm, quick=quick)
    if report.ok:
        typer.echo(f"healthy: {report.version}" + (" (confirmed)" if report.confirmed else ""))
        return
    line = f"unhealthy: {report.version}: {report.problems[0]}"
    if report.rolled_back_to:
        line += f"; rolled back to {report.rolled_back_to}"
    if report.rollback_failed:
        line += f"; {report.rollback_failed}"
    typer.echo(line, err=True)
    raise typer.Exit(4)


@deploy_app.command("units")
def units_cmd(
    out: Path = typer.Option(..., "--out", help="Directory to write the units into (e.g. /etc/systemd/system)."),
    smearsight_bin: str = typer.Option("/opt/smearsight/venv/bin/smearsight", "--smearsight-bin",
                                       help="Path of the smearsight executable on the device."),
    root_dir: str = typer.Option("/var/lib/smearsight", "--root-dir", help="Device root directory."),
) -> None:
    """Write the systemd units (runtime with watchdog, update timer, rollback) and the udev rules example."""
    from smearsight.deploy.systemd import UNIT_FILES, read_unit
    from smearsight.fileio import atomic_write_text, check_output_dir

    for option, value in (("--smearsight-bin", smearsight_bin), ("--root-dir", root_dir)):
        bad = sorted({c for c in value if c.isspace() or c in _UNIT_UNSAFE})
        if bad:
            raise InputError(f"{option}: '{value}' contains {' '.join(repr(c) for c in bad)}, which systemd units and "
                             "their sh -c lines would split or expand; use a path without spaces or quotes")
        if not value.startswith("/"):
            raise InputError(f"{option}: '{value}' is not an absolute path (systemd needs one)")
    check_output_dir(out)
    for name in UNIT_FILES:
        text = read_unit(name).replace("/opt/smearsight/venv/bin/smearsight", smearsight_bin)
        text = text.replace("/var/lib/smearsight", root_dir.rstrip("/"))
        try:
            atomic_write_text(out / name, text)
        except OSError as exc:
            raise InputError(f"--out {out}: cannot write {name} ({exc.strerror or exc})") from None
        typer.echo(f"wrote {out / name}")
    typer.echo("udev rules: copy 99-smearsight.rules to /etc/udev/rules.d/ and edit the device IDs; then "
               "systemctl daemon-reload && systemctl enable --now smearsight-runtime.service smearsight-update.timer")
