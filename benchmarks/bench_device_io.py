"""Device I/O timings at 768x1024: annotation, MJPEG encode, session record, sources and file sinks.

    python benchmarks/bench_device_io.py [--boxes 300] [--frames 60]

Prints one table: median and best (min) milliseconds per frame. On a shared, loaded machine the
median swings with the load; the min is the uncontended cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from smearsight.catalog import TPS_CLASS_NAMES
from smearsight.device.record import SessionRecorder
from smearsight.device.sinks import open_sink
from smearsight.device.sources import open_source
from smearsight.runtime.annotate import annotate

H, W = 768, 1024


def _detections(rng: np.random.Generator, k: int) -> np.ndarray:
    xy = rng.uniform(0, [W - 40, H - 40], (k, 2))
    wh = rng.uniform(8, 40, (k, 2))
    out = np.zeros((k, 6), np.float32)
    out[:, :2], out[:, 2:4] = xy, xy + wh
    out[:, 4] = rng.uniform(0.3, 1.0, k)
    out[:, 5] = rng.integers(0, len(TPS_CLASS_NAMES), k)
    return out


class Ms(float):
    """A median in ms that also carries the min (formatted as "median (min)")."""

    best: float

    def __format__(self, spec: str) -> str:
        return f"{float(self):{spec}} ({self.best:{spec}})"

    def __sub__(self, other: object) -> Ms:
        out = Ms(float(self) - float(other))  # type: ignore[arg-type]
        out.best = self.best - float(getattr(other, "best", other))  # type: ignore[arg-type]
        return out


def _median_ms(fn: Callable[[int], object], n: int, warmup: int = 3) -> Ms:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    out = Ms(statistics.median(times) * 1e3)
    out.best = min(times) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--boxes", type=int, default=300)
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (H, W, 3), np.uint8)
    dets = _detections(rng, args.boxes)
    sperm = np.flatnonzero(dets[:, 5] >= 4)
    morph = [{"det": int(i), "part": "head", "score": 0.5, "abnormal": bool(i % 3 == 0)} for i in sperm]
    overlay = {"fps": 12.0, "latency_ms": {"pre": 3.0, "det": 60.0, "nms": 1.0}, "status": "camera lost — retrying"}
    rows: list[tuple[str, str]] = []
    n = args.frames

    frame = base.copy()

    def ann(_: int) -> None:
        np.copyto(frame, base)
        annotate(frame, dets, TPS_CLASS_NAMES, morph, overlay)

    copy_ms = _median_ms(lambda _: np.copyto(frame, base), n)
    rows.append((f"annotate {args.boxes} boxes + morphology + panel + banner", f"{_median_ms(ann, n) - copy_ms:.2f}"))
    empty_ms = _median_ms(lambda _: annotate(frame, dets[:0], TPS_CLASS_NAMES, None, {"fps": 1.0}), n)
    rows.append(("annotate 0 boxes (panel only)", f"{empty_ms:.2f}"))

    sink = open_sink("http://127.0.0.1:0")
    rows.append(("http sink write, no client (copy only)", f"{_median_ms(lambda _: sink.write(base, {}), n):.2f}"))
    sink._latest.clients = 1  # as if one viewer were connected: the write now encodes the JPEG
    enc_ms = _median_ms(lambda _: sink.write(base, {}), n)
    rows.append(("http sink write with a viewer (JPEG q80 once)", f"{enc_ms:.2f}"))
    sink._latest.clients = 0
    sink.close()

    with tempfile.TemporaryDirectory() as tmp:
        for background in (False, True):
            rec = SessionRecorder(Path(tmp) / f"s{background}.db", batch_frames=30, background=background)
            rec.start_session({"source": "bench"})
            times = []
            for i in range(3 * 30):
                t = time.perf_counter()
                rec.record_frame(i, time.time(), dets, TPS_CLASS_NAMES, morph)
                times.append(time.perf_counter() - t)
                if background:
                    time.sleep(0.02)  # a frame loop at a realistic pace leaves the writer time to commit
            rec.end_session()
            rec.close()
            per_frame = [t for i, t in enumerate(times) if (i + 1) % 30]
            commits = [t for i, t in enumerate(times) if (i + 1) % 30 == 0]
            mode = "background writer" if background else "in the frame loop"
            if not background:
                buffered = f"{statistics.median(per_frame) * 1e3:.2f} ({min(per_frame) * 1e3:.2f})"
                rows.append((f"record_frame ({args.boxes} dets), buffered", buffered))
            commit_ms = f"{statistics.median(commits) * 1e3:.2f} ({min(commits) * 1e3:.2f})"
            rows.append((f"record_frame at a 30-frame commit (FULL), {mode}", commit_ms))
            rows.append((f"record, amortised per frame, {mode}", f"{sum(times) / len(times) * 1e3:.2f}"))

        video = Path(tmp) / "v.mp4"
        vs = open_sink(f"file://{video}", fps=15)
        rows.append(("file://out.mp4 sink write (mp4v)", f"{_median_ms(lambda _: vs.write(base, {}), n):.2f}"))
        vs.close()
        ds = open_sink(f"file://{tmp}/frames/")
        rows.append(("file://dir/ sink write (JPEG q90, atomic)", f"{_median_ms(lambda _: ds.write(base, {}), n):.2f}"))
        ds.close()
        t = time.perf_counter()
        count = sum(1 for _ in open_source(f"file://{video}"))
        rows.append((f"file://video.mp4 source, {count} frames", f"{(time.perf_counter() - t) / count * 1e3:.2f}"))
        src = open_source("synth://?seed=0&speed=4")
        next(src)
        t = time.perf_counter()
        for _ in range(20):
            next(src)
        rows.append(("synth:// source (768x1024, tiles cached)", f"{(time.perf_counter() - t) / 20 * 1e3:.2f}"))
        src.close()

    width = max(len(r[0]) for r in rows)
    print(f"{'device I/O at 768x1024':<{width}}  ms/frame: median (min)")
    print("-" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>18}")
    print(f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} threads")


if __name__ == "__main__":
    main()
