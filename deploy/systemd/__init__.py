"""systemd units and udev rules shipped with the package (``smearsight deploy units --out DIR``).

- ``smearsight-runtime.service``: the runtime (``Type=notify``, ``WatchdogSec=``, ``Restart=on-failure``);
  checks the current release before starting and ends its trial once it is up.
- ``smearsight-rollback.service``: started by the runtime's ``OnFailure=``; rolls back a release on trial.
- ``smearsight-update.service`` + ``smearsight-update.timer``: periodic signed updates; the runtime is
  restarted when an update switched ``current``.
- ``99-smearsight.rules``: stable names for the microscope camera and the panel's serial port.
"""

from __future__ import annotations

from importlib import resources

UNIT_FILES: tuple[str, ...] = (
    "smearsight-runtime.service",
    "smearsight-rollback.service",
    "smearsight-update.service",
    "smearsight-update.timer",
    "99-smearsight.rules",
)


def read_unit(name: str) -> str:
    """Text of one shipped unit or rules file."""
    if name not in UNIT_FILES:
        raise KeyError(name)
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
