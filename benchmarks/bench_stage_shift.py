"""Telling a stage step from a jump on real micrographs: the phase-correlation peak of StageShift.

    python benchmarks/bench_stage_shift.py [--images ../shared/data/bccd/JPEGImages] [--pairs 200]
        [--max-step 24] [--seed 0] [--threshold 0.45]

The runtime trusts the stage's shift between two frames (to move boxes and morphology results) only when
:class:`~smearsight.runtime.stage_motion.StageShift`'s correlation peak reaches its ``min_response``. This
measures that peak on real blood-smear photographs (BCCD, 480x640) instead of ``synth://``:

* a *step*: two 384x512 windows of the same photograph, the second moved by a random (dx, dy) of up to
  ``--max-step`` px, as the stage moves between two frames; the second window may also be degraded the way
  a real camera degrades a frame (defocus blur, motion blur, sensor noise, an exposure change);
* a *jump*: windows of two different photographs (another field of another slide), at the same place;
* ``768x1024``: the same pairs upscaled 2x (a camera of the runtime's frame size over the same field).

For each case it prints the peak's spread, the share of pairs the threshold accepts and, for accepted
steps, how far the measured shift is from the true one. A step refused costs one detector run (the frame
is detected instead of carried); a jump accepted carries boxes onto the wrong cells.
"""

from __future__ import annotations

import argparse
from pathlib import Path

WINDOW_HW = (384, 512)


def degrade(image, kind: str, rng):
    """The second frame as a camera might give it."""
    import cv2
    import numpy as np

    if kind == "blur 1.5":
        return cv2.GaussianBlur(image, (0, 0), 1.5)
    if kind == "blur 3":
        return cv2.GaussianBlur(image, (0, 0), 3.0)
    if kind == "motion 9":  # the stage moving during the exposure: a 9 px horizontal smear
        return cv2.blur(image, (9, 1))
    if kind == "noise 8":
        return np.clip(image + rng.normal(0.0, 8.0, image.shape), 0, 255).astype(np.uint8)
    if kind == "exposure 0.8":
        return np.clip(image.astype(np.float32) * 0.8, 0, 255).astype(np.uint8)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("../shared/data/bccd/JPEGImages"))
    parser.add_argument("--pairs", type=int, default=200, help="pairs per case")
    parser.add_argument("--max-step", type=int, default=24, help="largest stage step, px per axis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=None, help="default: StageShift's min_response")
    args = parser.parse_args(argv)

    import cv2
    import numpy as np

    from smearsight.runtime.stage_motion import StageShift

    paths = sorted(args.images.glob("*.jpg"))
    if len(paths) < 2:
        raise SystemExit(f"{args.images}: expected at least two .jpg photographs")
    grays = [g for g in (cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths)
             if g is not None and g.shape[0] >= WINDOW_HW[0] + args.max_step
             and g.shape[1] >= WINDOW_HW[1] + args.max_step]
    threshold = StageShift().min_response if args.threshold is None else args.threshold
    h, w = WINDOW_HW
    rows = []
    for scale in (1, 2):
        for kind in ("step", "step, blur 1.5", "step, blur 3", "step, motion 9", "step, noise 8",
                     "step, exposure 0.8", "jump"):
            rng = np.random.default_rng(args.seed)  # the same pairs for every case
            peaks, errors, accepted = [], [], 0
            for _ in range(args.pairs):
                i = int(rng.integers(len(grays)))
                g = grays[i]
                dx, dy = (int(v) for v in rng.integers(-args.max_step, args.max_step + 1, size=2))
                y0 = int(rng.integers(max(0, -dy), g.shape[0] - h - max(0, dy) + 1))  # both windows inside
                x0 = int(rng.integers(max(0, -dx), g.shape[1] - w - max(0, dx) + 1))
                first = g[y0:y0 + h, x0:x0 + w]
                if kind == "jump":
                    other = grays[(i + 1 + int(rng.integers(len(grays) - 1))) % len(grays)]
                    second = other[y0:y0 + h, x0:x0 + w]
                else:  # the stage moved by (dx, dy): the content moves by (-dx, -dy) in the frame
                    second = degrade(g[y0 + dy:y0 + dy + h, x0 + dx:x0 + dx + w], kind.partition(", ")[2], rng)
                if scale != 1:
                    first, second = (cv2.resize(a, (w * scale, h * scale), interpolation=cv2.INTER_LINEAR)
                                     for a in (first, second))
                shift = StageShift()
                shift.measure(first)
                mx, my, peak = shift.measure(second)
                peaks.append(peak)
                if peak >= threshold:
                    accepted += 1
                    if kind != "jump":
                        errors.append(float(np.hypot(mx + dx * scale, my + dy * scale)))
            p = np.asarray(peaks)
            rows.append((f"{h * scale}x{w * scale}", kind, len(peaks), p.min(), np.percentile(p, 5),
                         np.median(p), p.max(), accepted / len(peaks),
                         np.percentile(errors, 95) if errors else float("nan"),
                         max(errors) if errors else float("nan")))

    print(f"{len(grays)} photographs from {args.images}; threshold {threshold}; steps up to "
          f"{args.max_step} px per axis (x2 at 768x1024)\n")
    print("| frame | case | pairs | peak min | peak p5 | peak median | peak max | accepted | "
          "shift error p95 px | max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, kind, n, pmin, p5, med, pmax, acc, e95, emax in rows:
        print(f"| {size} | {kind} | {n} | {pmin:.3f} | {p5:.3f} | {med:.3f} | {pmax:.3f} | {acc:.3f} | "
              f"{e95:.2f} | {emax:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
