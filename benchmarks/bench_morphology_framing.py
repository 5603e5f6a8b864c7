"""How large a sperm head is in an MHSMA crop: the framing the runtime's morphology crops should copy.

    python benchmarks/bench_morphology_framing.py --data ../shared/data/mhsma [--split train] [--count 1000]

For each 64x64 crop the object near the centre is segmented (Gaussian blur, pixels more than 2.5 standard
deviations from the median, the connected component that is large and central) and its longer side is
measured. Prints percentiles of that side in pixels, its fraction of the crop, and the crop scale the
runtime needs (crop side / head box side) for its crops to frame a head as MHSMA does. A rough measure:
the segmented blob is the head plus whatever of the midpiece passes the threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from smearsight.train.morphology.data import load_npy_images


def head_side(crop: np.ndarray) -> int | None:
    """Longer side (px) of the central object of one gray crop, or None when nothing stands out."""
    blurred = cv2.GaussianBlur(crop.astype(np.float32), (5, 5), 1.5)
    deviation = np.abs(blurred - np.median(blurred))
    mask = (deviation > 2.5 * deviation.std()).astype(np.uint8)
    n, _, stats, centres = cv2.connectedComponentsWithStats(mask)
    if n < 2:
        return None
    h, w = crop.shape
    best = max(range(1, n), key=lambda k: stats[k, 4] - 0.05 * float(np.hypot(centres[k, 0] - w / 2,
                                                                              centres[k, 1] - h / 2)) ** 2)
    return int(max(stats[best, 2], stats[best, 3]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--count", type=int, default=1000)
    args = ap.parse_args()
    crops = load_npy_images(args.data / f"x_64_{args.split}.npy")[: args.count]
    sides = np.array([s for s in map(head_side, crops) if s is not None], dtype=np.float64)
    size = crops.shape[1]
    print(f"{len(sides)} of {len(crops)} crops measured ({args.data.name} {args.split}, {size}x{size})")
    print("| percentile | head side px | fraction of the crop | crop scale |")
    print("| --- | --- | --- | --- |")
    for q in (10, 25, 50, 75, 90):
        side = float(np.percentile(sides, q))
        print(f"| {q} | {side:.0f} | {side / size:.2f} | {size / side:.2f} |")


if __name__ == "__main__":
    main()
