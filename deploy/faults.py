"""Fault injection for the crash-safety tests (inactive unless the environment asks for it).

``SMEARSIGHT_DEPLOY_CRASH_AT=<step>`` makes the installing process SIGKILL itself when it reaches
``checkpoint(<step>)``: the tests use it to interrupt a real install at every step.
``SMEARSIGHT_DEPLOY_FAIL_WRITE_AFTER=<bytes>`` makes the release writer fail with ``ENOSPC`` once that
many bytes were written (a full disk injected at the OS-call edge, where no small file system can be
mounted).
"""

from __future__ import annotations

import errno
import os
import signal

CRASH_ENV = "SMEARSIGHT_DEPLOY_CRASH_AT"
FAIL_WRITE_ENV = "SMEARSIGHT_DEPLOY_FAIL_WRITE_AFTER"

#: Every step of an install at which a crash is simulated, in order.
INSTALL_STEPS: tuple[str, ...] = (
    "downloaded",
    "staging-created",
    "extracting",
    "extracted",
    "verified",
    "compatible",
    "smoke-tested",
    "release-renamed",
    "pending-written",
    "link-created",
    "switched",
    "state-written",
    "pruned",
)

_written = 0


def checkpoint(step: str) -> None:
    """Kill this process with SIGKILL when ``SMEARSIGHT_DEPLOY_CRASH_AT`` names ``step``."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def count_write(nbytes: int) -> None:
    """Account for ``nbytes`` written; raise ``ENOSPC`` past the injected limit."""
    global _written
    limit = os.environ.get(FAIL_WRITE_ENV)
    if limit is None:
        return
    _written += nbytes
    if _written > int(limit):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
