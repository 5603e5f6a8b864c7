"""Health of the installed release, and self-rollback when a freshly switched release is bad.

``smearsight deploy health-check`` (run by the runtime unit before it starts) verifies the current
release's files and runs its smoke test; a failure rolls back to the previous release by itself and
records why in ``events.json``. The runtime reports its own failures with :func:`report_runtime_failure`
(or ``health-check --runtime-failed REASON``): while the release is on trial (switched, not yet
confirmed) that also rolls back. ``--confirm`` ends the trial once the runtime has run the release.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smearsight.deploy.bundle import smoke_test, verify_release
from smearsight.deploy.install import DEFAULT_ROOT, Device, UpdateError, describe_os_error


@dataclass
class HealthReport:
    """Outcome of a health check."""

    ok: bool
    version: str | None
    problems: list[str] = field(default_factory=list)
    rolled_back_to: str | None = None
    rollback_failed: str | None = None
    confirmed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _backends(device: Device, version: str) -> dict[str, str]:
    import json

    from smearsight.deploy.bundle import INSTALL_MARKER

    try:
        return json.loads((device.releases / version / INSTALL_MARKER).read_text(encoding="utf-8"))["backends"]
    except (OSError, ValueError, KeyError):
        return {}


def check_release(device: Device, version: str, quick: bool = False) -> list[str]:
    """Problems with an installed release: files against the index, then (unless quick) the smoke test."""
    release = device.releases / version
    problems = verify_release(release, expected_version=version)
    if problems or quick:
        return problems
    backends = _backends(device, version)
    results = smoke_test(release, lambda m: backends.get(m["name"], "onnx"))  # type: ignore[arg-type,return-value]
    return [f"model '{r.model}' ({r.backend}): {r.detail}" for r in results if not r.ok]


def health_check(
    root: str | Path = DEFAULT_ROOT,
    runtime_failure: str | None = None,
    confirm: bool = False,
    quick: bool = False,
) -> HealthReport:
    """Check the current release; roll back by itself when it is bad (see the module docstring)."""
    device = Device(root)
    root = device.root
    with device.lock(wait=300.0):  # an update in progress finishes first
        device.recover()
        version = device.current()
        if version is None:
            return HealthReport(False, None, ["no release is installed"])
        state = device.load_state()
        on_trial = bool(state.get("trial") and state["trial"].get("version") == version)
        if runtime_failure is not None:
            problems = [f"the runtime reported: {runtime_failure}"]
            if not on_trial:
                device.log_event("runtime-failed", version=version, reason=runtime_failure, rolled_back=False)
                return HealthReport(False, version, problems)
        else:
            problems = check_release(device, version, quick=quick)
        if not problems:
            confirmed = device.confirm() if confirm else False
            device.log_event("health-ok", version=version, confirmed=confirmed)
            return HealthReport(True, version, confirmed=confirmed)
        reason = f"health check failed after the switch to {version}: {problems[0]}"
        device.log_event("health-failed", version=version, reason=problems[0])
        try:
            result = device.rollback(reason=reason, auto=True)
        except (UpdateError, OSError) as exc:
            why = str(exc) if isinstance(exc, UpdateError) else f"cannot roll back: {describe_os_error(exc, root)}"
            device.log_event("rollback-failed", version=version, reason=why)
            return HealthReport(False, version, problems, rollback_failed=why)
        return HealthReport(False, version, problems, rolled_back_to=result["version"])


def report_runtime_failure(root: str | Path, reason: str) -> HealthReport:
    """For the runtime: it could not run the current release (rolls back while the release is on trial)."""
    return health_check(root, runtime_failure=reason)
