"""Synthetic smear rendering speed: single frames, JPEG encoding, and the virtual slide (synth:// source).

    python benchmarks/bench_synth.py [--frames 30] [--size 768x1024] [--threads 1]

Wall time and this process's CPU time are both reported: on a shared machine the wall time includes
waiting for a core, the CPU time does not.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from smearsight.train.datasets.synth import SmearSynthesizer, SyntheticSlide, _encode_jpeg, parse_size


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, 1000 * (time.perf_counter() - w0), 1000 * (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--size", default="768x1024")
    ap.add_argument("--threads", type=int, default=1, help="cv2.setNumThreads (0 = OpenCV's default)")
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)
    hw = parse_size(args.size)
    rows = []

    synth, w, c = _timed(lambda: SmearSynthesizer(0, hw))
    rows.append(("SmearSynthesizer() init", w, c, ""))
    synth.render(0)
    walls, cpus, cells = [], [], []
    for i in range(1, args.frames + 1):
        (img, boxes, _), w, c = _timed(lambda i=i: synth.render(i))
        walls.append(w)
        cpus.append(c)
        cells.append(len(boxes))
    rows.append(
        (
            f"render() {hw[0]}x{hw[1]}, median",
            float(np.median(walls)),
            float(np.median(cpus)),
            f"{int(np.median(cells))} cells (range {min(cells)}-{max(cells)})",
        )
    )
    rows.append((f"render() {hw[0]}x{hw[1]}, p90", float(np.percentile(walls, 90)), float(np.percentile(cpus, 90)), ""))
    again = [_timed(lambda: synth.render(1)) for _ in range(5)]
    rows.append(
        (
            f"render(1) {hw[0]}x{hw[1]}, best of 5",
            min(a[1] for a in again),
            min(a[2] for a in again),
            f"{len(again[0][0][1])} cells; least disturbed by other load",
        )
    )
    enc = [_timed(lambda: _encode_jpeg(img)) for _ in range(5)]
    rows.append(
        (
            "JPEG q95 4:4:4 encode",
            float(np.median([e[1] for e in enc])),
            float(np.median([e[2] for e in enc])),
            f"{len(enc[0][0]) // 1024} KB",
        )
    )

    slide, w, c = _timed(lambda: SyntheticSlide(0, frame_size=hw))
    rows.append(("SyntheticSlide() init (6144x8192)", w, c, "nothing rendered yet"))
    _, w, c = _timed(lambda: slide.frame_at(3000, 3000))
    rows.append(("frame_at, cold (renders up to 4 tiles)", w, c, ""))
    path = slide.stage_path(4.0)
    timings = [_timed(lambda: slide.frame_at(*next(path))) for _ in range(args.frames * 3)]
    rows.append(
        (
            "frame_at along stage_path(4 px/frame), median",
            float(np.median([t[1] for t in timings])),
            float(np.median([t[2] for t in timings])),
            "tiles cached",
        )
    )
    rows.append(
        (
            "frame_at along stage_path, max",
            float(np.max([t[1] for t in timings])),
            float(np.max([t[2] for t in timings])),
            "a new tile row",
        )
    )

    table = Table(title=f"synthetic smears (cv2 threads={args.threads})")
    for col in ("what", "wall ms", "CPU ms", "note"):
        table.add_column(col, justify="right" if "ms" in col else "left")
    for what, w, c, note in rows:
        table.add_row(what, f"{w:.1f}", f"{c:.1f}", note)
    Console().print(table)


if __name__ == "__main__":
    main()
