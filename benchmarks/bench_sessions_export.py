"""Time and peak memory of ``smearsight sessions export`` on a long recorded session.

    python benchmarks/bench_sessions_export.py [--frames 1930] [--boxes 300] [--runs 3]

Records one session of ``--frames`` frames with ``--boxes`` detections each (a sperm-rich field on the
device) into a temporary SQLite record, then runs the real CLI in a subprocess for each format, writing to
a file. Prints one table: median wall seconds and the median of the child process's peak resident memory
(``ru_maxrss``) over ``--runs`` runs, and the size of the export.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from smearsight.catalog import TPS_CLASS_NAMES
from smearsight.device.record import SessionRecorder


def _record(path: Path, frames: int, boxes: int) -> None:
    rng = np.random.default_rng(0)
    rec = SessionRecorder(path, batch_frames=100)
    rec.start_session({"source": "synth://", "class_names": list(TPS_CLASS_NAMES)})
    for i in range(frames):
        dets = np.zeros((boxes, 6), np.float32)
        dets[:, :2] = rng.uniform(0, 980, (boxes, 2))
        dets[:, 2:4] = dets[:, :2] + rng.uniform(8, 40, (boxes, 2))
        dets[:, 4] = rng.uniform(0.3, 1.0, boxes)
        dets[:, 5] = rng.integers(0, len(TPS_CLASS_NAMES), boxes)
        rec.record_frame(i, i / 10, dets, TPS_CLASS_NAMES)
    rec.end_session({})
    rec.close()


def _peak_rss_mb_of(command: list[str]) -> tuple[float, float]:
    """Wall seconds and the peak RSS (MB) of one child run (measured in a fresh helper process)."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True)
    wall, rss = out.stdout.split()
    return float(wall), float(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1930)
    ap.add_argument("--boxes", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "long.db"
        start = time.perf_counter()
        _record(db, args.frames, args.boxes)
        print(f"recorded {args.frames} frames x {args.boxes} detections in {time.perf_counter() - start:.1f} s "
              f"({db.stat().st_size / 1e6:.0f} MB record)")
        print("| format | wall s (median) | peak RSS MB (median) | export MB |")
        print("| --- | --- | --- | --- |")
        for fmt in ("csv", "json"):
            out = Path(tmp) / f"export.{fmt}"
            command = [sys.executable, "-m", "smearsight.cli", "sessions", "export", "1", "--db", str(db),
                       "--format", fmt, "--out", str(out)]
            runs = [_peak_rss_mb_of(command) for _ in range(args.runs)]
            wall = statistics.median(r[0] for r in runs)
            rss = statistics.median(r[1] for r in runs)
            print(f"| {fmt} | {wall:.1f} | {rss:.0f} | {out.stat().st_size / 1e6:.0f} |")


if __name__ == "__main__":
    main()
