"""The CUDA decode + NMS kernels against the NumPy reference and torchvision on the GPU (marked gpu)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from smearsight.anchors import AnchorConfig, generate_anchors
from smearsight.runtime.cuda_postprocess import kernel_source
from smearsight.runtime.postprocess import decode_nms, synthetic_raw_outputs


def test_kernel_source_ships_with_the_package():
    src = kernel_source()
    for name in ("threshold_kernel", "select_topk_kernel", "decode_kernel", "nms_mask_kernel",
                 "nms_reduce_kernel", "finalize_kernel", "merge_kernel"):
        assert f"void {name}(" in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_kernels_compile_with_nvcc(tmp_path):
    src = tmp_path / "decode_nms.cu"
    src.write_text(kernel_source())
    proc = subprocess.run(["nvcc", "--ptx", "-arch=sm_87", "--fmad=false", str(src), "-o", str(tmp_path / "k.ptx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    assert ptx.count(".entry") == 7
    from importlib import resources

    pre = resources.files("smearsight.runtime").joinpath("kernels", "preprocess.cu").read_text()
    (tmp_path / "preprocess.cu").write_text(pre)
    proc = subprocess.run(["nvcc", "--ptx", "-arch=sm_87", str(tmp_path / "preprocess.cu"), "-o",
                           str(tmp_path / "p.ptx")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def scene():
    size = (768, 1024)
    anchors = generate_anchors(size, AnchorConfig(base_sizes=[8, 16, 32, 64, 128]))
    return size, anchors


@pytest.mark.gpu
@pytest.mark.parametrize("objects,topk,max_det", [(0, 1000, 100), (30, 1000, 1000), (350, 1000, 1000),
                                                    (350, 200, 50), (350, 4096, 1000)])
def test_cuda_matches_numpy_reference(scene, objects, topk, max_det):
    from smearsight.runtime.cuda_postprocess import CudaDecodeNMS

    size, anchors = scene
    logits, deltas, _, _ = synthetic_raw_outputs(anchors, 6, objects, size, seed=objects + topk)
    params = dict(score_threshold=0.3, iou_threshold=0.5, pre_nms_topk=topk, max_detections=max_det, image_size=size)
    gpu = CudaDecodeNMS(anchors, 6, **params)
    try:
        got, n = gpu(logits, deltas)
        got = got.copy()
        again, n2 = gpu(logits, deltas)  # buffers reused: same answer
        gpu_candidates = gpu.class_candidates.astype(np.int64)
        candidates = np.zeros(6, np.int64)
        want, m = decode_nms(logits, deltas, anchors, **params, class_candidates=candidates)
    finally:
        gpu.close()
    assert n == m == n2
    np.testing.assert_array_equal(gpu_candidates, candidates)  # counted before the pre_nms_topk cap
    np.testing.assert_array_equal(got[:, 5], want[:, 5])
    np.testing.assert_array_equal(got[:, 4], want[:, 4])  # double-precision sigmoid on both sides
    np.testing.assert_allclose(got[:, :4], want[:, :4], rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(again, got)


@pytest.mark.gpu
def test_cuda_matches_torchvision_on_gpu(scene):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from smearsight.runtime.cuda_postprocess import CudaDecodeNMS

    size, anchors = scene
    logits, deltas, _, _ = synthetic_raw_outputs(anchors, 6, 200, size, seed=7)
    params = dict(score_threshold=0.3, iou_threshold=0.5, pre_nms_topk=1000, max_detections=1000, image_size=None)
    gpu = CudaDecodeNMS(anchors, 6, **params)
    try:
        got, n = gpu(logits, deltas)
        got = got[:n].copy()
    finally:
        gpu.close()
    # torchvision NMS on the GPU over the same candidate boxes (NumPy reference supplies the selection)
    no_nms = {**params, "iou_threshold": 1.0, "max_detections": 6000}  # the selection, nothing suppressed
    ref, m = decode_nms(logits, deltas, anchors, **no_nms)
    ref = ref[:m]
    boxes = torch.from_numpy(ref[:, :4]).cuda()
    keep = torchvision.ops.batched_nms(boxes, torch.from_numpy(ref[:, 4]).cuda(),
                                       torch.from_numpy(ref[:, 5]).long().cuda(), 0.5).cpu().numpy()
    assert keep.size == n
    np.testing.assert_allclose(np.sort(ref[keep, 4]), np.sort(got[:, 4]), rtol=2e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("color,resize", [("rgb", "letterbox"), ("bgr", "stretch"), ("gray", "letterbox")])
def test_gpu_preprocess_matches_cpu(color, resize):
    import pycuda.driver as cuda

    from smearsight.manifest import InputSpec
    from smearsight.runtime.cuda_postprocess import CudaPreprocessor
    from smearsight.runtime.preprocess import Preprocessor

    ch = 1 if color == "gray" else 3
    spec = InputSpec(name="images", shape=[1, ch, 96, 128], color=color, mean=[0.5] * ch, std=[0.25] * ch,
                     resize=resize, pad_value=127)
    # smooth content: bilinear (GPU) and OpenCV's resize agree to within a grey level when enlarging
    yy, xx = np.mgrid[0:60, 0:80]
    frame = np.stack([xx * 3, yy * 4, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    want, box_cpu = Preprocessor(spec)(frame)
    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        stream = cuda.Stream()
        pre = CudaPreprocessor(spec, ctx, stream)
        d_out = cuda.mem_alloc(want.nbytes)
        box = pre(frame, d_out)
        got = np.empty_like(want)
        cuda.memcpy_dtoh_async(got, d_out, stream)
        stream.synchronize()
        pre.close()
        d_out.free()
    finally:
        ctx.pop()
        ctx.detach()
    assert box == box_cpu
    np.testing.assert_allclose(got, want, atol=2.0 / 255 / 0.25 + 1e-5)
