"""How far the frozen teacher's features go with labels: a linear probe per MHSMA part.

    python benchmarks/bench_morphology_probe.py --data ../shared/data/mhsma [--input-sizes 64 128]
        [--teachers tf_efficientnet_lite0 tf_efficientnet_lite2] [--layers 2,3,4] [--views 1 8]
        [--parts head acrosome vacuole]

The ``--supervised`` morphology mode fits a small classifier over features of the frozen ImageNet teacher
(and the student's discrepancy from it). This script measures the ceiling of the teacher's own features:
mean- and max-pooled activations of the critical layers, standardised on train, then scikit-learn's
logistic regression (balanced classes, the regularisation C picked on valid from a short grid). It prints
valid ROC AUC and the best accuracy over all thresholds (both chosen on valid, so optimistic) beside the
best published supervised results. Needs the ``train`` and ``dev`` extras (torch, timm, scikit-learn).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

PUBLISHED_SUPERVISED = {"head": (84.00, 81.56), "acrosome": (80.66, 83.89), "vacuole": (94.00, 94.73)}  # acc, AUC
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)


def pooled_features(teacher, images: np.ndarray, views: int, batch: int = 100) -> np.ndarray:
    """Mean and max of every critical layer's activations, per view and crop: [views, N, F]."""
    import torch

    from smearsight.train.morphology.data import to_tensor_input
    from smearsight.train.morphology.torch_model import dihedral_views

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(to_tensor_input(images[start : start + batch]))
            per_view = []
            for view in dihedral_views(x)[:views]:
                feats = teacher(view)
                per_view.append(torch.cat([torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1) for f in feats], 1))
            out.append(torch.stack(per_view).numpy())
    return np.concatenate(out, axis=1)


def probe(train_x: np.ndarray, train_y: np.ndarray, valid_x: np.ndarray, valid_y: np.ndarray) -> tuple:
    """(AUC, best accuracy over thresholds, C) of the best logistic regression on valid.

    ``train_x`` [V, N, F]: every view is a training row; ``valid_x`` [V, M, F]: probabilities are averaged
    over the views.
    """
    from sklearn.linear_model import LogisticRegression

    from smearsight.train.morphology.metrics import roc_auc

    rows = train_x.reshape(-1, train_x.shape[-1])
    labels = np.tile(train_y, len(train_x))
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(rows, labels)
        scores = np.mean([model.predict_proba(view)[:, 1] for view in valid_x], axis=0)
        auc = roc_auc(valid_y, scores)
        if best is None or auc > best[0]:
            accuracy = max(float(np.mean((scores >= t) == valid_y.astype(bool))) for t in np.unique(scores))
            best = (auc, accuracy, c)
    return best


def main() -> None:
    import torch

    from smearsight.train.morphology.config import TeacherConfig
    from smearsight.train.morphology.data import load_crops
    from smearsight.train.morphology.teacher import build_teacher

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="MHSMA folder (x_64_<split>.npy, y_<part>_...)")
    parser.add_argument("--parts", nargs="+", default=["head", "acrosome", "vacuole"])
    parser.add_argument("--input-sizes", type=int, nargs="+", default=[64, 128], help="teacher input sizes")
    parser.add_argument("--teachers", nargs="+", default=["tf_efficientnet_lite0"], help="timm teacher names")
    parser.add_argument("--layers", default="2,3,4", help="critical layers (timm feature indices)")
    parser.add_argument("--views", type=int, nargs="+", default=[1], choices=[1, 8], help="dihedral views")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = [int(v) for v in args.layers.split(",")]

    print("| teacher | input | views | part | valid AUC % | best accuracy % | C | published supervised acc / AUC % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    labels = {part: {split: load_crops(args.data, part, split).labels for split in ("train", "valid")}
              for part in args.parts}
    images = {split: load_crops(args.data, args.parts[0], split).images for split in ("train", "valid")}
    for name in args.teachers:
        for size in args.input_sizes:
            teacher = build_teacher(TeacherConfig(name=name, layers=layers, input_size=size))
            t0 = time.perf_counter()
            feats = {split: pooled_features(teacher, crops, max(args.views)) for split, crops in images.items()}
            mean, std = feats["train"].mean((0, 1)), feats["train"].std((0, 1)) + 1e-6
            feats = {split: (f - mean) / std for split, f in feats.items()}
            seconds = time.perf_counter() - t0
            for views in args.views:
                for part in args.parts:
                    auc, accuracy, c = probe(feats["train"][:views], labels[part]["train"], feats["valid"][:views],
                                             labels[part]["valid"])
                    acc_pub, auc_pub = PUBLISHED_SUPERVISED.get(part, (float("nan"), float("nan")))
                    print(f"| {name} | {size}x{size} | {views} | {part} | {auc * 100:.1f} | {accuracy * 100:.1f} | "
                          f"{c} | {acc_pub:.1f} / {auc_pub:.1f} |")
            print(f"(features of {sum(len(v) for v in images.values())} crops x {max(args.views)} views, {name} at "
                  f"{size}x{size}: {seconds:.0f} s)")


if __name__ == "__main__":
    main()
