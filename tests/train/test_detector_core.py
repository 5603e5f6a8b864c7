"""Detector building blocks against independent references: box coding (NumPy core), decode+NMS (runtime
NumPy reference), anchor coverage (brute-force IoU), the matcher (hand-computed case), the focal loss
(torchvision), and COCO evaluation (a case with known AP)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from smearsight.anchors import AnchorConfig, box_iou, decode_boxes, encode_boxes, generate_anchors  # noqa: E402
from smearsight.train.datasets.records import DetectionDataset, ImageRecord  # noqa: E402
from smearsight.train.detector import boxes as tboxes  # noqa: E402
from smearsight.train.detector.anchor_stats import best_anchor_iou, coverage_report  # noqa: E402
from smearsight.train.detector.config import (  # noqa: E402
    MatcherConfig,
    TrainConfig,
    default_detector_anchors,
)
from smearsight.train.detector.matcher import IGNORE, NEGATIVE, match_anchors  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _random_boxes(rng: np.random.Generator, n: int, size: float = 200.0) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(4, 80, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_encode_decode_round_trip_matches_numpy_core() -> None:
    rng = np.random.default_rng(0)
    anchors = generate_anchors((128, 160), default_detector_anchors())
    idx = rng.integers(0, len(anchors), 300)
    a = anchors[idx]
    b = _random_boxes(rng, 300)
    t_np = encode_boxes(b, a)
    t_torch = tboxes.encode(torch.from_numpy(b), torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(t_torch, t_np, rtol=1e-4, atol=1e-4)
    back_np = decode_boxes(t_np, a)
    back_torch = tboxes.decode(torch.from_numpy(t_np), torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(back_np, b, atol=2e-3)
    np.testing.assert_allclose(back_torch, back_np, atol=1e-3)


def test_decode_nms_twin_equals_runtime_reference() -> None:
    postprocess = pytest.importorskip("smearsight.runtime.postprocess")
    rng = np.random.default_rng(1)
    cfg = AnchorConfig(levels=[3, 4, 5])
    anchors = generate_anchors((96, 128), cfg)
    a, c = len(anchors), 3
    logits = rng.normal(-3, 2, (a, c)).astype(np.float32)
    deltas = rng.normal(0, 0.3, (a, 4)).astype(np.float32)
    kw = dict(score_threshold=0.2, iou_threshold=0.5, pre_nms_topk=200, max_detections=150, image_size=(96, 128))
    ref, n_ref = postprocess.decode_nms(logits, deltas, anchors, **kw)
    got, n = tboxes.decode_nms(torch.from_numpy(logits), torch.from_numpy(deltas), torch.from_numpy(anchors), **kw)
    got = got.numpy()
    assert n_ref > 20 and n == n_ref
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert (got[n:, 5] == -1).all()


def _detected_cells(logits: np.ndarray, anchors: np.ndarray, cells: np.ndarray, caps: dict) -> np.ndarray:
    """Cells (rows of ``cells``) boxed at IoU >= 0.5 by decode + NMS at a score of 0.01 with ``caps``."""
    dets, n = tboxes.decode_nms(torch.from_numpy(logits), torch.from_numpy(np.zeros((len(anchors), 4), np.float32)),
                                torch.from_numpy(anchors), score_threshold=0.01, iou_threshold=0.5,
                                image_size=(640, 800), **caps)
    return (box_iou(dets[:n, :4].numpy(), cells) >= 0.5).any(axis=0)


def _cell_grid(count: int, columns: int, pitch: float = 20.0) -> np.ndarray:
    ys, xs = np.divmod(np.arange(count), columns)
    return np.stack([xs * pitch + 5, ys * pitch + 5, xs * pitch + 15, ys * pitch + 15], axis=1).astype(np.float32)


def test_evaluation_caps_keep_every_cell_of_a_dense_field() -> None:
    """300 separate cells, each with the 20 confident anchors training gives it: the device's 4,000 cap
    keeps the candidates of the best 200 cells only; the evaluation caps keep all 300."""
    per_cell = 20
    cells = _cell_grid(300, 20)
    jitter = np.tile(np.linspace(-1, 1, per_cell, dtype=np.float32)[:, None], (len(cells), 4))
    anchors = np.repeat(cells, per_cell, axis=0) + jitter
    logits = np.repeat(4.0 - 0.01 * np.arange(len(cells), dtype=np.float32), per_cell)[:, None]  # one class
    cfg = TrainConfig()
    caps = cfg.evaluation_caps(num_classes=1)
    assert caps == {"pre_nms_topk": per_cell * cfg.max_detections, "max_detections": cfg.max_detections,
                    "max_per_class": cfg.max_detections}
    device = {"pre_nms_topk": cfg.pre_nms_topk, "max_detections": cfg.max_detections}
    assert _detected_cells(logits, anchors, cells, device).sum() == 4000 // per_cell
    assert _detected_cells(logits, anchors, cells, caps).all()
    assert TrainConfig(eval_pre_nms_topk=5000).evaluation_caps(1)["pre_nms_topk"] == 5000


def test_evaluation_caps_count_detections_per_class() -> None:
    """1,000 confident cells of one class and 50 faint ones of another: with 1,000 detections per frame
    in all the faint class is left out; COCO counts maxDets per class, and so do the evaluation caps."""
    cells = _cell_grid(1050, 35, pitch=18.0)
    logits = np.full((len(cells), 2), -9.0, np.float32)
    logits[:1000, 0] = 3.0
    logits[1000:, 1] = -2.0  # score 0.12
    caps = TrainConfig().evaluation_caps(num_classes=2)
    assert caps["max_detections"] == 2000
    assert _detected_cells(logits, cells, cells, {"pre_nms_topk": 4000, "max_detections": 1000})[1000:].sum() == 0
    assert _detected_cells(logits, cells, cells, caps).all()
    # Fewer detections allowed than the crowded class holds: still each class gets its own maxDets.
    small = TrainConfig(max_detections=100).evaluation_caps(num_classes=2)
    found = _detected_cells(logits, cells, cells, small)
    assert found[:1000].sum() == 100 and found[1000:].all()  # without a per-class cap: 200 and 0


def test_coco_evaluation_scores_at_a_max_dets_below_100(tmp_path) -> None:
    """pycocotools sorts its maxDets: a cap of 5 must be scored as 5, not as its largest entry (100)."""
    pytest.importorskip("pycocotools")
    from smearsight.train.detector.evaluate import coco_evaluate

    gt = _cell_grid(20, 5)
    ds = DetectionDataset(["c"], [ImageRecord(tmp_path / "x.jpg", 200, 200, gt, np.zeros(20, np.int64))])
    det = np.concatenate([gt, np.linspace(0.9, 0.5, 20, dtype=np.float32)[:, None], np.zeros((20, 1))], 1)
    metrics, _ = coco_evaluate(ds, [det.astype(np.float32)], max_dets=5)
    assert metrics["recall"] == pytest.approx(5 / 20) and metrics["max_dets"] == 5


def test_best_anchor_iou_is_exact_against_brute_force() -> None:
    rng = np.random.default_rng(2)
    cfg = default_detector_anchors()
    b = _random_boxes(rng, 60, size=150)
    brute = box_iou(b, generate_anchors((160, 192), cfg)).max(1)
    np.testing.assert_allclose(best_anchor_iou(b, (160, 192), cfg), brute, atol=1e-5)
    rows = coverage_report(b, (160, 192), cfg, 0.5)
    assert rows[-1]["count"] == 60
    assert rows[-1]["covered"] == pytest.approx(float((brute >= 0.5).mean()))


def test_default_anchors_cover_8px_cells_but_p3_p7_do_not() -> None:
    # Worst case for an 8 px cell: centred between two stride-4 anchor centres in x and y (IoU 0.44 with the
    # 11.3 px anchor), still above the matcher's lowered positive threshold (0.4).
    boxes = np.array([[100, 100, 108, 108], [41, 63, 50, 72], [200, 10, 212, 20]], np.float32)
    assert (best_anchor_iou(boxes, (768, 1024), default_detector_anchors()) >= MatcherConfig().positive_iou).all()
    assert (best_anchor_iou(boxes, (768, 1024), AnchorConfig()) < 0.2).all()


def test_matcher_hand_computed_case_with_topk() -> None:
    # One GT box [0,0,10,10] and six 10x10 anchors shifted right by 0..5 px: IoU = (10-s)/(10+s).
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    shifts = [0, 1, 2, 3, 4, 5]
    anchors = torch.tensor([[s, 0.0, 10.0 + s, 10.0] for s in shifts])
    # IoUs: 1.0, 0.818, 0.667, 0.538, 0.429, 0.333
    cfg = MatcherConfig(positive_iou=0.5, negative_iou=0.4, topk=None)
    assert match_anchors(anchors, gt, cfg).tolist() == [0, 0, 0, 0, IGNORE, NEGATIVE]
    cfg = MatcherConfig(positive_iou=0.5, negative_iou=0.4, topk=2)
    assert match_anchors(anchors, gt, cfg).tolist() == [0, 0, IGNORE, IGNORE, IGNORE, NEGATIVE]
    # Random sampling keeps the forced best anchor plus K-1 others from the positives.
    cfg = MatcherConfig(positive_iou=0.5, negative_iou=0.4, topk=2, sampling="random")
    out = match_anchors(anchors, gt, cfg, torch.Generator().manual_seed(0)).tolist()
    assert out[0] == 0 and sum(v == 0 for v in out) == 2 and out[4:] == [IGNORE, NEGATIVE]


def test_matcher_forces_best_anchor_for_small_box() -> None:
    # A tiny GT that no anchor reaches at the positive threshold still gets its best anchor.
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [32.0, 0.0, 64.0, 32.0]])
    gt = torch.tensor([[36.0, 4.0, 44.0, 12.0], [0.0, 0.0, 31.0, 31.0]])
    out = match_anchors(anchors, gt, MatcherConfig(positive_iou=0.4, negative_iou=0.3)).tolist()
    assert out == [1, 0]
    off = match_anchors(anchors, gt, MatcherConfig(positive_iou=0.4, negative_iou=0.3, force_match=False)).tolist()
    assert off == [1, NEGATIVE]
    assert match_anchors(anchors, torch.zeros((0, 4)), MatcherConfig()).tolist() == [NEGATIVE, NEGATIVE]


def test_matcher_side_by_side_cells_keep_a_forced_anchor_each() -> None:
    """Two 5-6 px cells whose best anchor is the same 8 px one (IoU 0.39 and 0.33, below the positive
    threshold): the second box's forced match used to overwrite the first's, which then had no positive
    anchor at all; now the better-overlapping box keeps it and the other takes its next best anchor."""
    anchors = torch.from_numpy(generate_anchors((64, 64), default_detector_anchors()))
    first, second = [12.0, 12.0, 17.0, 17.0], [13.0, 13.0, 19.0, 19.0]
    for gt in (torch.tensor([first, second]), torch.tensor([second, first])):
        out = match_anchors(anchors, gt, MatcherConfig())
        best = box_iou(anchors.numpy(), gt.numpy()).argmax(axis=0)
        assert best[0] == best[1]  # the collision this test is about
        kept = [torch.nonzero(out == g).flatten().tolist() for g in range(2)]
        assert all(len(k) == 1 for k in kept), kept
        winner = 0 if gt[0].tolist() == first else 1
        assert kept[winner] == [int(best[winner])]
        loser_iou = box_iou(anchors.numpy()[kept[1 - winner]], gt.numpy()[[1 - winner]])[0, 0]
        assert loser_iou > 0.3
    # A box off the canvas overlaps no anchor: nothing is forced onto anchor 0 for it.
    out = match_anchors(anchors, torch.tensor([first, [200.0, 200.0, 210.0, 210.0]]), MatcherConfig())
    assert (out == 1).sum() == 0 and out[0] == NEGATIVE


def _dense_match(anchors, gt, cfg):
    """The matcher written with torchvision's full [A, G] IoU matrix: the reference for the chunked one."""
    from torchvision.ops import box_iou as tv_box_iou

    iou = tv_box_iou(anchors, gt)
    best_iou, best_gt = iou.max(dim=1)
    out = torch.full((len(anchors),), IGNORE, dtype=torch.long)
    out[best_iou < cfg.negative_iou] = NEGATIVE
    out[best_iou >= cfg.positive_iou] = best_gt[best_iou >= cfg.positive_iou]
    gt_iou, best_anchor = iou.max(dim=0)
    # Forced anchors: each box its best one; on a shared one the higher IoU (then lower index) keeps it and
    # the others, best first, take their best anchor still free; a box on no anchor is not forced.
    order = sorted(range(len(gt)), key=lambda g: (-float(gt_iou[g]), g))
    owner: dict[int, int] = {}
    for g in order:
        if gt_iou[g] > 0:
            owner.setdefault(int(best_anchor[g]), g)
    for g in order:
        if gt_iou[g] > 0 and owner.get(int(best_anchor[g])) != g:
            column = iou[:, g].clone()
            column[list(owner)] = -1
            if column.max() > 0:
                owner[int(column.argmax())] = g
    forced = torch.tensor(sorted(owner), dtype=torch.long)
    out[forced] = torch.tensor([owner[a] for a in sorted(owner)], dtype=torch.long)
    pos = torch.nonzero(out >= 0).flatten()
    value = torch.where(torch.isin(pos, forced), torch.tensor(float("inf")), iou[pos, out[pos]])
    for g in range(len(gt)):  # keep the K best (stable: lower anchor index first on ties) of each box
        mine = pos[out[pos] == g]
        order = torch.sort(-value[out[pos] == g], stable=True).indices
        out[mine[order[cfg.topk:]]] = IGNORE
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_matcher_equals_the_dense_iou_matrix(seed: int) -> None:
    """A dense field (300 cells of 5-40 px on the default P2-P6 anchors of a 384x512 frame, plus duplicate
    boxes, a box off the frame and one on a chunk border): the same assignment as the full matrix."""
    from smearsight.train.detector.matcher import best_overlaps

    rng = np.random.default_rng(seed)
    anchors = torch.from_numpy(generate_anchors((384, 512), default_detector_anchors()))
    xy = rng.uniform(-10, 500, (300, 2))
    gt = np.concatenate([xy, xy + rng.uniform(5, 40, (300, 2))], 1).astype(np.float32)
    gt = np.concatenate([gt, gt[:3], [[600, 600, 620, 620]], anchors[4096].numpy()[None]]).astype(np.float32)
    gt_t = torch.from_numpy(gt)
    cfg = MatcherConfig()
    np.testing.assert_array_equal(match_anchors(anchors, gt_t, cfg).numpy(), _dense_match(anchors, gt_t, cfg).numpy())
    from torchvision.ops import box_iou as tv_box_iou

    iou = tv_box_iou(anchors, gt_t)
    for chunk in (1000, 4096, len(anchors)):
        best_iou, best_gt, best_anchor = best_overlaps(anchors, gt_t, chunk=chunk)
        dense_iou, dense_gt = iou.max(dim=1)
        np.testing.assert_array_equal(best_iou.numpy(), dense_iou.numpy())
        np.testing.assert_array_equal(best_gt.numpy(), dense_gt.numpy())
        np.testing.assert_array_equal(best_anchor.numpy(), iou.argmax(dim=0).numpy())


def test_focal_loss_matches_torchvision() -> None:
    from torchvision.ops import sigmoid_focal_loss

    from smearsight.train.detector.loss import focal_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 3, generator=g) * 3
    targets = (torch.rand(50, 3, generator=g) > 0.7).float()
    ours = focal_loss(logits, targets, 0.25, 1.5)
    ref = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=1.5, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _dataset(tmp_path, records) -> DetectionDataset:
    return DetectionDataset(["a", "b"], [ImageRecord(tmp_path / f"{i}.jpg", 100, 100, b, lab, i)
                                         for i, (b, lab) in enumerate(records)])


def test_coco_evaluation_known_ap(tmp_path) -> None:
    pytest.importorskip("pycocotools")
    from smearsight.train.detector.evaluate import coco_evaluate, confusion_matrix

    gt = np.array([[10, 10, 30, 30], [50, 50, 80, 80]], np.float32)
    ds = _dataset(tmp_path, [(gt, [0, 0])])
    # TP (0.9), FP far away (0.8), TP (0.7): precision 1 up to recall 0.5, then 2/3 up to recall 1.
    det = np.array([[10, 10, 30, 30, 0.9, 0], [0, 60, 8, 70, 0.8, 0], [50, 50, 80, 80, 0.7, 0]], np.float32)
    metrics, raw = coco_evaluate(ds, [det], max_dets=1000)
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101  # COCO 101-point interpolation
    assert metrics["per_class"]["a"]["ap50"] == pytest.approx(expected, abs=1e-6)
    assert metrics["map50"] == pytest.approx(expected, abs=1e-6)  # class "b" has no GT: not averaged
    assert metrics["map"] == pytest.approx(expected, abs=1e-6)  # exact boxes: same at every IoU
    assert metrics["recall"] == pytest.approx(1.0)
    assert metrics["per_class"]["b"]["gt"] == 0
    cm = confusion_matrix(ds, [det], score_threshold=0.5)
    assert cm[0, 0] == 2 and cm[2, 0] == 1 and cm.sum() == 3


def test_coco_evaluation_respects_max_dets(tmp_path) -> None:
    pytest.importorskip("pycocotools")
    from smearsight.train.detector.evaluate import coco_evaluate

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 900, (300, 2)).astype(np.float32)
    gt = np.concatenate([xy, xy + 8], 1)
    ds = DetectionDataset(["c"], [ImageRecord(tmp_path / "x.jpg", 1000, 1000, gt, np.zeros(300, np.int64))])
    det = np.concatenate([gt, np.linspace(0.9, 0.5, 300, dtype=np.float32)[:, None], np.zeros((300, 1))], 1)
    full, _ = coco_evaluate(ds, [det.astype(np.float32)], max_dets=1000)
    capped, _ = coco_evaluate(ds, [det.astype(np.float32)], max_dets=100)
    assert full["recall"] == pytest.approx(1.0) and full["map50"] > 0.99
    assert capped["recall"] == pytest.approx(100 / 300, abs=1e-6)


def test_lr_schedule_warmup_and_cosine() -> None:
    from smearsight.train.detector.train_loop import lr_factor

    assert lr_factor(0.0, 0, 10, 0.02) == pytest.approx(0.1)
    assert lr_factor(0.0, 9, 10, 0.02) == pytest.approx(1.0)
    assert lr_factor(0.5, 50, 10, 0.02) == pytest.approx(0.02 + 0.98 * 0.5)
    assert lr_factor(1.0, 99, 10, 0.02) == pytest.approx(0.02)


def test_recipe_picks_anchors_and_size_from_the_data(tmp_path) -> None:
    from smearsight.train.detector.config import TrainConfig
    from smearsight.train.detector.train_loop import resolve_recipe

    rng = np.random.default_rng(0)
    def big_boxes() -> np.ndarray:
        xy = rng.uniform(0, 300, (10, 2))
        return np.concatenate([xy, xy + rng.uniform(40, 150, (10, 2))], 1).astype(np.float32)

    big = [ImageRecord(tmp_path / f"{i}.jpg", 640, 480, big_boxes(), np.zeros(10, np.int64)) for i in range(5)]
    size, anchors, backbone = resolve_recipe(TrainConfig(), DetectionDataset(["a"], big))
    assert backbone == "tf_efficientnet_lite0"
    assert size[0] % anchors.max_stride == 0 and size[1] % anchors.max_stride == 0
    assert max(size) <= 384  # Lite0: 320 px long side for data with large boxes
    tiny = np.array([[10, 10, 18, 18], [40, 40, 49, 50], [100, 100, 140, 130]], np.float32)
    small = [ImageRecord(tmp_path / "s.jpg", 1024, 768, tiny, np.zeros(3, np.int64))]
    size, anchors, _ = resolve_recipe(TrainConfig(), DetectionDataset(["a"], small))
    assert size == [768, 1024]  # 8 px cells keep their native resolution
    assert anchors.levels[0] == 2
    assert (best_anchor_iou(tiny, (768, 1024), anchors) >= 0.5).all()


def test_matcher_thresholds_must_be_ordered():
    from smearsight.errors import InputError
    from smearsight.train.detector.config import MatcherConfig

    with pytest.raises(InputError, match="negative_iou 0.5 must not exceed positive_iou 0.4"):
        MatcherConfig.from_dict({"positive_iou": 0.4, "negative_iou": 0.5}, source="recipe.yaml")
    assert MatcherConfig.from_dict({"positive_iou": 0.4, "negative_iou": 0.4}).negative_iou == 0.4


def test_letterbox_boxes_follow_the_resized_pixels() -> None:
    """600x1000 -> 128 wide at scale 0.128 is 76.8 rows, rounded to 77: a box on the frame's edges must
    land on the pasted image's edges (77, not 76.8), in training and in the runtime's geometry alike."""
    from smearsight.manifest import InputSpec
    from smearsight.runtime.preprocess import geometry
    from smearsight.train.detector.augment import letterbox

    image = np.full((600, 1000, 3), 200, np.uint8)
    frame_box = np.array([[0, 0, 1000, 600], [100, 300, 500, 450]], np.float32)
    canvas, boxes = letterbox(image, frame_box, (96, 128), 0.128)
    rows = np.flatnonzero((canvas != 127).any(axis=(1, 2)))
    assert rows.max() + 1 == 77
    np.testing.assert_allclose(boxes[0], [0, 0, 128, 77], atol=1e-4)
    spec = InputSpec(name="images", shape=[1, 3, 96, 128], mean=[0.5] * 3, std=[0.5] * 3, pad_value=127)
    lb, (nh, nw) = geometry((600, 1000), spec)
    assert (nh, nw) == (77, 128)
    np.testing.assert_allclose(lb.to_model(frame_box), boxes, atol=1e-4)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("augment: {hflip: 2}\n", "augment.hflip"),
        ("augment: {blur: -0.1}\n", "augment.blur"),
        ("augment: {saturation: 1.5}\n", "augment.saturation"),
        ("augment: {scale_min: 1.5, scale_max: 1.2}\n", "scale_min 1.5 must not exceed scale_max 1.2"),
        ("augment: {scale_min: 0}\n", "augment.scale_min"),
        ("score_threshold: 1.5\n", "score_threshold"),
        ("iou_threshold: 0\n", "iou_threshold"),
        ("min_lr_ratio: 2\n", "min_lr_ratio"),
        ("grad_clip: 0\n", "grad_clip"),
        ("image_size: [384]\n", "image_size"),
        ("image_size: [8, 512]\n", "image_size.0"),
        ("loss: {huber_delta: 0}\n", "loss.huber_delta"),
        ("seed: -1\n", "seed"),  # np.random.seed refuses it: a ValueError once training started
        ("seed: 4294967296\n", "seed"),
        # the network's levels: was "model_config.levels: must be contiguous", naming neither file nor field,
        # once the whole dataset had been read and checked
        ("anchors: {levels: [2, 4, 6]}\n", "field 'anchors': Value error, levels must be contiguous"),
        ("anchors: {levels: [6, 7, 8]}\n", "field 'anchors': Value error, the finest level must be 1..5"),
    ],
)
def test_a_recipe_out_of_range_is_refused_before_training(tmp_path, capsys, text, field) -> None:
    """A probability of 2 or an empty scale range would train for an hour on a meaningless recipe."""
    from smearsight.cli import main

    config = tmp_path / "recipe.yaml"
    config.write_text(text)
    data = tmp_path / "no-data-needed"  # the recipe is refused before the data is read
    rc = main(["train", "detector", "--data", str(data), "--format", "voc", "--out", str(tmp_path / "run"),
               "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert field in err and str(config) in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_whose_anchors_do_not_fit_its_heads_is_refused() -> None:
    """Heads for 6 anchors a location with a 9-shape anchor layout (or the reverse) built fine: every box
    then came from the wrong anchor, or decoding indexed past the anchors."""
    from smearsight.errors import InputError
    from smearsight.train.detector.torch_model import build_from_checkpoint, build_from_config, model_config_for

    anchors = AnchorConfig(levels=[3, 4, 5], scales=[1.0, 2.0], aspect_ratios=[0.5, 1.0, 2.0])
    model_cfg = model_config_for("test_efficientdet", 2, anchors.levels, anchors.anchors_per_location)
    ckpt = {"kind": "detector", "model_config": model_cfg.to_dict(), "anchors": anchors.to_dict(),
            "state_dict": build_from_config(model_cfg).state_dict()}
    assert build_from_checkpoint(ckpt) is not None
    ckpt["anchors"] = AnchorConfig(levels=[3, 4, 5]).to_dict()  # 3 scales x 3 ratios = 9 a location
    with pytest.raises(InputError, match="checkpoint: anchors have 9 shapes a location but the model's heads 6"):
        build_from_checkpoint(ckpt)
