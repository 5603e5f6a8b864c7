"""Anchor matching on dense fields: the chunked IoU of the matcher against one full [A, G] matrix.

    python benchmarks/bench_matcher.py [--sizes 384x512,768x1024] [--cells 50,350] [--runs 5] [--threads 1]

For each frame size and number of cells (random boxes of 6-40 px over the frame), times
``match_anchors`` (IoU in chunks of anchors against the boxes that reach them) and the same matching done
with torchvision's full ``box_iou`` matrix, on the P2-P4 anchors the training recipe picks for small cells
(3 scales x 3 ratios, anchor scale 2), alternating the two; prints medians in ms per image.
"""

from __future__ import annotations

import argparse
import statistics
import time


def full_matrix_match(anchors, gt):
    """The matcher's first two steps (best box per anchor, best anchor per box) from the full matrix."""
    from torchvision.ops import box_iou

    iou = box_iou(anchors, gt)
    return iou.max(dim=1), iou.argmax(dim=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="384x512,768x1024")
    parser.add_argument("--cells", default="50,350")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from smearsight.anchors import AnchorConfig, generate_anchors
    from smearsight.train.detector.config import MatcherConfig
    from smearsight.train.detector.matcher import best_overlaps, match_anchors

    torch.set_num_threads(args.threads)
    cfg = MatcherConfig()
    layout = AnchorConfig(levels=[2, 3, 4], anchor_scale=2.0)
    print("| frame | anchors | cells | match_anchors ms | best_overlaps ms | full [A, G] matrix ms | full / chunked |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        anchors = torch.from_numpy(generate_anchors((h, w), layout))
        for cells in (int(v) for v in args.cells.split(",")):
            rng = np.random.default_rng(0)
            xy = rng.uniform(0, [w - 40, h - 40], (cells, 2))
            gt = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(6, 40, (cells, 2))], 1).astype(np.float32))
            times: dict[str, list[float]] = {"match": [], "chunked": [], "full": []}
            for _ in range(args.runs):
                for name, fn, fn_args in (("match", match_anchors, (anchors, gt, cfg)),
                                          ("chunked", best_overlaps, (anchors, gt)),
                                          ("full", full_matrix_match, (anchors, gt))):
                    t0 = time.perf_counter()
                    fn(*fn_args)
                    times[name].append(time.perf_counter() - t0)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            print(f"| {h}x{w} | {len(anchors):,} | {cells} | {med['match']:.1f} | {med['chunked']:.1f} | "
                  f"{med['full']:.1f} | {med['full'] / med['chunked']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
