"""Detector speed: training step time / images per second, and PyTorch inference latency per frame.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \
    python benchmarks/bench_detector.py --variant efficientdet_lite0 --train-size 256x320 --batch-size 8 \
        --infer-size 768x1024 --anchors default

Wall times on a shared machine depend on the load; the CPU-time column is the process's own CPU seconds.

Weights are random (speed does not depend on them). On a CUDA GPU the inference is also timed in FP16.

glibc's allocator slows PyTorch down unless MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ are raised, and on
a shared, oversubscribed CPU spinning OpenMP threads wait for descheduled peers at every op (10-40x slower),
so the script re-executes itself with both thresholds and OMP_WAIT_POLICY=PASSIVE set before torch is
imported (values already in the environment win). Pass ``--spin`` on a dedicated machine to keep OpenMP's
default (spinning) waits.
"""

from __future__ import annotations

import os

from _torch_env import reexec_with_torch_env  # noqa: E402

if __name__ == "__main__":
    reexec_with_torch_env(__file__)  # before torch is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main() -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from smearsight.anchors import AnchorConfig
    from smearsight.train.detector.boxes import decode_nms
    from smearsight.train.detector.config import LossConfig, MatcherConfig, default_detector_anchors
    from smearsight.train.detector.torch_model import build_from_config, model_config_for
    from smearsight.train.detector.train_model import AnchorCache, DetectorTrainWrapper

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="efficientdet_lite0")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--anchors", choices=["default", "p3p7", "p3p5", "p2p4"], default="p3p5",
                   help="default = TPS P2-P6 8 px layout; p3p7 = effdet; p3p5 = the layout the recipe picks for "
                        "BCCD; p2p4 = the one it picked for the synthetic smears (the demo detector's)")
    p.add_argument("--train-size", type=_size, default=(256, 320))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--infer-size", type=_size, default=(768, 1024))
    p.add_argument("--infer-runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--spin", action="store_true",
                   help="keep OpenMP's spinning waits (dedicated machine); default waits passively")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    anchors = {"default": default_detector_anchors(), "p3p7": AnchorConfig(),
               "p3p5": AnchorConfig(levels=[3, 4, 5], anchor_scale=2.0),
               "p2p4": AnchorConfig(levels=[2, 3, 4], anchor_scale=2.0)}[args.anchors]
    cfg = model_config_for(args.variant, args.classes, anchors.levels, anchors.anchors_per_location)
    net = build_from_config(cfg, pretrained=False)
    rows: list[tuple[str, str, str]] = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device, memory_format=torch.channels_last)  # as the trainer and predictor do

    if not args.skip_train:
        h, w = args.train_size
        rng = np.random.default_rng(0)
        wrapper = DetectorTrainWrapper(net, anchors, MatcherConfig(), LossConfig())
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        x = torch.randn(args.batch_size, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
        boxes, labels = [], []
        wh_hi = min(110.0, min(h, w) / 2)  # boxes fit small --train-size too
        for _ in range(args.batch_size):
            xy = rng.uniform(0, min(h, w) - wh_hi - 10, (15, 2))
            wh = rng.uniform(min(20.0, wh_hi / 2), wh_hi, (15, 2))
            boxes.append(torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32, device=device))
            labels.append(torch.tensor(rng.integers(0, args.classes, 15), device=device))
        times, cpu = [], []
        net.train()
        for i in range(args.train_steps + 1):
            t = time.perf_counter()
            c = time.process_time()
            loss = wrapper(x, boxes, labels)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # first step warms up
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        step = statistics.median(times)
        rows.append((f"train step, batch {args.batch_size} @ {h}x{w}", f"{step * 1000:.0f} ms",
                     f"{statistics.median(cpu):.2f} s", f"{args.batch_size / step:.2f} img/s"))

    net.eval()
    h, w = args.infer_size
    cache = AnchorCache(anchors)
    x = torch.randn(1, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
    precisions = [("fp32", torch.float32)] + ([("fp16", torch.float16)] if device.type == "cuda" else [])
    for name, dtype in precisions:
        model = net.to(dtype)
        xi = x.to(dtype)
        anc = cache.get((h, w), device)
        fwd, total, cpu = [], [], []
        with torch.no_grad():
            for i in range(args.infer_runs + 1):
                t = time.perf_counter()
                c = time.process_time()
                logits, deltas = model(xi)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                decode_nms(logits[0].float(), deltas[0].float(), anc, score_threshold=0.3, iou_threshold=0.5,
                           pre_nms_topk=1000, max_detections=1000, image_size=(h, w))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    fwd.append(t1 - t)
                    total.append(time.perf_counter() - t)
                    cpu.append(time.process_time() - c)
        rows.append((f"inference {name} @ {h}x{w} (network)", f"{statistics.median(fwd) * 1000:.1f} ms", "",
                     f"{1 / statistics.median(fwd):.2f} frames/s"))
        rows.append((f"inference {name} @ {h}x{w} (+ decode/NMS)", f"{statistics.median(total) * 1000:.1f} ms",
                     f"{statistics.median(cpu):.2f} s", f"{1 / statistics.median(total):.2f} frames/s"))

    table = Table(title=f"{args.variant}, anchors {anchors.levels} ({anchors.num_anchors(args.infer_size)} at "
                  f"{h}x{w}), {device}, {torch.get_num_threads()} threads "
                  f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}), torch {torch.__version__}")
    for col in ("what", "wall time (median)", "CPU time", "rate"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    Console().print(table)


if __name__ == "__main__":
    main()
