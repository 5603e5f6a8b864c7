"""Dense frames of small real cells: BCCD photographs shrunk and tiled into YOLO-format frames.

    python benchmarks/make_dense_bccd.py --data ../shared/data/bccd --out /tmp/dense_bccd
        [--frame 384x512] [--grid 4x4] [--train-frames 64] [--seed 0]

Issue 3 asks the detector to stay strong on real frames holding hundreds of ~10 px objects. No such
labelled data is at hand, so this builds a stand-in from real photographs: each frame is a ``--grid`` of
BCCD photographs (480x640) shrunk to fill it (1/5 at the defaults: red cells ~17 px across, platelets
~6 px, white cells ~35 px; about 270 boxes a frame), each photograph flipped or rotated at random. Train
frames draw from BCCD ``train`` only (``--train-frames`` frames, every photograph used about equally
often); val frames use every ``val`` photograph exactly once, in order (empty tiles are left grey), so
the two never share a cell. Written as YOLO (``images/<split>/``, ``labels/``, ``train.txt``,
``val.txt``, ``classes.txt``) for ``smearsight train detector --format yolo``. Boxes shrunk below 2 px
are dropped. The label gaps of BCCD (unlabelled red cells, see docs/benchmarks.md) come along.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def parse_hw(text: str) -> tuple[int, int]:
    a, _, b = text.lower().partition("x")
    return int(a), int(b)


def dihedral(image, boxes, k: int):
    """``image`` and its boxes turned by k * 90 degrees (k 0-3), mirrored left-right first when k >= 4
    (the training augmentation's own flips and rotations)."""
    import numpy as np

    from smearsight.train.detector.augment import hflip, rot90

    if k >= 4:
        image, boxes = hflip(image, boxes)
    for _ in range(k % 4):
        image, boxes = rot90(image, boxes)
    return np.ascontiguousarray(image), boxes.astype(np.float32)


def build_frames(records, frame_hw, grid, order, rng, min_side: float = 2.0):
    """Frames (BGR image, boxes, labels) tiling the photographs of ``records`` in ``order`` (None = grey tile)."""
    import cv2
    import numpy as np

    rows, cols = grid
    th, tw = frame_hw[0] // rows, frame_hw[1] // cols
    per_frame = rows * cols
    frames = []
    for start in range(0, len(order), per_frame):
        frame = np.full((frame_hw[0], frame_hw[1], 3), 200, np.uint8)
        boxes, labels = [], []
        for slot, index in enumerate(order[start:start + per_frame]):
            if index is None:
                continue
            rec = records[index]
            image = cv2.imread(str(rec.path), cv2.IMREAD_COLOR)
            if image is None:
                raise SystemExit(f"{rec.path}: cannot read the photograph")
            image, b = dihedral(image, rec.boxes.copy(), int(rng.integers(8)))
            sy, sx = th / image.shape[0], tw / image.shape[1]
            oy, ox = (slot // cols) * th, (slot % cols) * tw
            frame[oy:oy + th, ox:ox + tw] = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
            b = b * np.array([sx, sy, sx, sy], np.float32) + np.array([ox, oy, ox, oy], np.float32)
            keep = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= min_side
            boxes.append(b[keep])
            labels.append(rec.labels[keep])
        frames.append((frame, np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
                       np.concatenate(labels) if labels else np.zeros((0,), np.int64)))
    return frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/bccd"), help="BCCD (VOC)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frame", default="384x512", help="frame HxW")
    parser.add_argument("--grid", default="4x4", help="photographs per frame, rows x columns")
    parser.add_argument("--train-frames", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import cv2
    import numpy as np

    from smearsight.fileio import atomic_write_bytes
    from smearsight.train.datasets.formats import read_dataset
    from smearsight.train.datasets.records import DetectionDataset, ImageRecord
    from smearsight.train.datasets.yolo import write_yolo

    frame_hw, grid = parse_hw(args.frame), parse_hw(args.grid)
    rng = np.random.default_rng(args.seed)
    per_frame = grid[0] * grid[1]
    for split in ("train", "val"):
        ds, problems = read_dataset(args.data, "voc", split)
        if problems:
            raise SystemExit(f"{args.data} ({split}): {problems[0]}")
        if split == "train":  # every photograph about equally often, in a new random order each pass
            need = args.train_frames * per_frame
            passes = math.ceil(need / len(ds.images))
            order = np.concatenate([rng.permutation(len(ds.images)) for _ in range(passes)])[:need].tolist()
        else:  # each once; the last frame's empty tiles stay grey
            order = list(range(len(ds.images)))
            order += [None] * (-len(order) % per_frame)
        records = []
        for i, (image, boxes, labels) in enumerate(build_frames(ds.images, frame_hw, grid, order, rng)):
            path = args.out / "images" / split / f"{split}_{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            ok, data = cv2.imencode(".png", image)
            atomic_write_bytes(path, data.tobytes())
            records.append(ImageRecord(path, frame_hw[1], frame_hw[0], boxes=boxes, labels=labels, image_id=i + 1))
        out = DetectionDataset(list(ds.class_names), records, root=args.out / "images", split=split)
        write_yolo(out, args.out, split, image_mode="none")
        sizes = np.concatenate([np.sqrt((r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1]))
                                for r in records])
        per_class = out.boxes_per_class()
        print(f"{split}: {len(records)} frames of {frame_hw[0]}x{frame_hw[1]}, {out.num_boxes} boxes "
              f"({out.num_boxes / len(records):.0f} a frame; "
              + ", ".join(f"{n} {c}" for n, c in zip(out.class_names, per_class, strict=True))
              + f"), box side median {np.median(sizes):.1f} px, 5th-95th percentile "
              f"{np.percentile(sizes, 5):.1f}-{np.percentile(sizes, 95):.1f} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
