"""Start-up environment for the PyTorch benchmarks (imported before torch).

glibc's allocator and libgomp read their settings only at process start, so a benchmark re-executes
itself once with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised (PyTorch is 2-2.5x slower
on these VMs otherwise) and, unless ``--spin`` is given, ``OMP_WAIT_POLICY=PASSIVE`` (spinning OpenMP
threads wait for descheduled peers at every op on a shared machine).
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}
START_KEYS = (*MALLOC_ENV, "OMP_WAIT_POLICY")


def reexec_with_torch_env(script: str) -> None:
    """Re-execute ``script`` with the start-up environment unless it is already in place."""
    wanted = MALLOC_ENV if "--spin" in sys.argv[1:] else {**MALLOC_ENV, "OMP_WAIT_POLICY": "PASSIVE"}
    if all(key in os.environ for key in wanted):
        return
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in wanted.items()}}
    os.execve(sys.executable, [sys.executable, os.path.abspath(script), *sys.argv[1:]], env)
