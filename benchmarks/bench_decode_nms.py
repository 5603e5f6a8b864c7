"""Decode + NMS on CPU: the NumPy reference vs a torch/torchvision implementation of the same steps.

Inputs: 768x1024 frame, P3-P7 x 9 anchors (147,312) x 6 classes, detector-like raw outputs from
``synthetic_raw_outputs`` at a sparse (30 objects) and a dense (350 objects) density. Prints the
median and best of several runs; torch is used with one thread (the device has 2 cores).

    python benchmarks/bench_decode_nms.py [--runs 30] [--objects 30 350]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from smearsight.anchors import AnchorConfig, generate_anchors
from smearsight.runtime.postprocess import decode_nms, synthetic_raw_outputs

PARAMS = dict(score_threshold=0.3, iou_threshold=0.5, pre_nms_topk=1000, max_detections=1000)


def torch_decode_nms(logits, deltas, anchors, image_size):
    """The same contract with torch ops + torchvision.ops.batched_nms (the usual PyTorch way)."""
    import torch
    import torchvision

    scores = torch.sigmoid(logits)
    mask = scores > PARAMS["score_threshold"]
    anc, cls = torch.nonzero(mask, as_tuple=True)
    sc = scores[anc, cls]
    keep_idx = []
    for k in range(scores.shape[1]):
        idx = torch.nonzero(cls == k).flatten()
        if idx.numel() > PARAMS["pre_nms_topk"]:
            idx = idx[torch.topk(sc[idx], PARAMS["pre_nms_topk"]).indices]
        keep_idx.append(idx)
    sel = torch.cat(keep_idx)
    anc, cls, sc = anc[sel], cls[sel], sc[sel]
    a = anchors[anc]
    d = deltas[anc]
    wh = a[:, 2:] - a[:, :2]
    ctr = a[:, :2] + 0.5 * wh + d[:, :2] * wh
    size = wh * torch.exp(d[:, 2:].clamp(max=float(np.log(1000 / 16))))
    boxes = torch.cat([ctr - 0.5 * size, ctr + 0.5 * size], dim=1)
    h, w = image_size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    keep = torchvision.ops.batched_nms(boxes, sc, cls, PARAMS["iou_threshold"])[: PARAMS["max_detections"]]
    return boxes[keep], sc[keep], cls[keep]


def cuda_decoder(anchors):
    """The pycuda decoder when pycuda and a GPU are present, else None."""
    try:
        from smearsight.runtime.cuda_postprocess import CudaDecodeNMS

        return CudaDecodeNMS(anchors, 6, image_size=(768, 1024), **PARAMS)
    except Exception as exc:  # no pycuda or no GPU here
        print(f"(CUDA kernels not timed: {exc})")
        return None


def timeit(fn, runs: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--objects", type=int, nargs="+", default=[30, 350])
    args = parser.parse_args()
    size = (768, 1024)
    anchors = generate_anchors(size, AnchorConfig(base_sizes=[8, 16, 32, 64, 128]))
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        torch = None
    rows = []
    for n_obj in args.objects:
        logits, deltas, _, _ = synthetic_raw_outputs(anchors, 6, n_obj, size, seed=n_obj)
        _, kept = decode_nms(logits, deltas, anchors, image_size=size, **PARAMS)
        n_cand = int((logits > np.log(0.3 / 0.7)).sum())
        med, best = timeit(
            lambda lg=logits, dl=deltas: decode_nms(lg, dl, anchors, image_size=size, **PARAMS), args.runs
        )
        rows.append((n_obj, n_cand, kept, "numpy", med, best))
        if torch is not None:
            tl, td, ta = torch.from_numpy(logits), torch.from_numpy(deltas), torch.from_numpy(anchors)
            med, best = timeit(lambda a=tl, b=td, c=ta: torch_decode_nms(a, b, c, size), args.runs)
            rows.append((n_obj, n_cand, kept, "torchvision-cpu", med, best))
            if torch.cuda.is_available():
                gl, gd, ga = tl.cuda(), td.cuda(), ta.cuda()

                def tv_cuda(a=gl, b=gd, c=ga):
                    torch_decode_nms(a, b, c, size)
                    torch.cuda.synchronize()

                med, best = timeit(tv_cuda, args.runs)
                rows.append((n_obj, n_cand, kept, "torchvision-cuda", med, best))
        gpu = cuda_decoder(anchors)
        if gpu is not None:
            med, best = timeit(lambda g=gpu, lg=logits, dl=deltas: g(lg, dl), args.runs)
            rows.append((n_obj, n_cand, kept, "cuda kernels (+copies)", med, best))
            gpu.close()
    print(f"anchors {anchors.shape[0]:,} x 6 classes, input {size[0]}x{size[1]}, runs {args.runs}")
    print(f"{'objects':>8} {'candidates':>10} {'kept':>6} {'impl':>24} {'median ms':>10} {'best ms':>8}")
    for n_obj, n_cand, kept, impl, med, best in rows:
        print(f"{n_obj:>8} {n_cand:>10} {kept:>6} {impl:>24} {med:>10.2f} {best:>8.2f}")


if __name__ == "__main__":
    main()
