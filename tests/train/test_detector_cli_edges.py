"""Edge cases of ``smearsight train detector`` / ``eval detector``: one-line errors, exit 1 (2 for usage errors),
no traceback, and no output folder left mixing one run's files with another's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("pycocotools")

from smearsight.cli import main  # noqa: E402

SIZE = (96, 128)  # synthetic frames


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    from smearsight.train.datasets.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, 10, seed=3, size=SIZE, progress=False)
    return root


def _train_args(data: Path, out: Path, *extra: str, val: str = "none") -> list[str]:
    return ["train", "detector", "--data", str(data), "--format", "coco", "--val-split", val, "--out", str(out),
            "--variant", "test_efficientdet", "--random-init", "--batch-size", "4", "--image-size", "128x128",
            "--epochs", "1", "--threads", "1", "--no-progress", *extra]


def _eval_args(weights: Path, data: Path, out: Path, *extra: str, split: str = "val") -> list[str]:
    return ["eval", "detector", "--weights", str(weights), "--data", str(data), "--format", "coco", "--split", split,
            "--out", str(out), "--threads", "1", *extra]


@pytest.fixture(scope="module")
def weights(synth_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edge_run") / "run"
    torch.set_num_threads(1)
    assert main(_train_args(synth_data, out)) == 0
    return out / "best.pt"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def no_boxes_in_val(synth_data, tmp_path) -> Path:
    root = tmp_path / "negatives"
    shutil.copytree(synth_data, root)
    val = json.loads((root / "annotations" / "val.json").read_text())
    val["annotations"] = []
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    return root


def test_train_refuses_an_out_that_holds_another_run(synth_data, tmp_path, capsys) -> None:
    """A morphology run folder (best.pt, metrics.json, no last.pt) must not be overwritten by a detector run."""
    run = tmp_path / "morph_run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"a morphology checkpoint")
    (run / "metrics.json").write_text('{"auc": 0.9}')
    assert main(_train_args(synth_data, run)) == 1
    err = _one_line_error(capsys)
    assert "best.pt" in err and "--out" in err
    assert (run / "best.pt").read_bytes() == b"a morphology checkpoint"
    assert (run / "metrics.json").read_text() == '{"auc": 0.9}'
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "metrics.json"]


def test_train_refuses_a_validation_split_without_boxes(no_boxes_in_val, tmp_path, capsys) -> None:
    """mAP on a split with no ground truth is always 0: best.pt would be chosen on nothing."""
    out = tmp_path / "run"
    assert main(_train_args(no_boxes_in_val, out, val="val")) == 1
    err = _one_line_error(capsys)
    assert "validation split 'val' holds no boxes" in err and "--val-split none" in err
    assert not out.exists()


def test_eval_refuses_a_split_without_boxes(weights, no_boxes_in_val, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    assert main(_eval_args(weights, no_boxes_in_val, out)) == 1
    err = _one_line_error(capsys)
    assert "split 'val' holds no boxes" in err
    assert not out.exists()


@pytest.mark.parametrize(("option", "value"), [("--max-dets", "-5"), ("--max-dets", "0"), ("--examples", "-1"),
                                               ("--score-threshold", "2"), ("--score-threshold", "-0.5"),
                                               ("--threads", "-1")])
def test_eval_refuses_out_of_range_options(weights, synth_data, tmp_path, option, value, capsys) -> None:
    out = tmp_path / "eval"
    assert main(_eval_args(weights, synth_data, out, option, value)) == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err
    assert not out.exists()


def test_train_refuses_negative_threads(synth_data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = _train_args(synth_data, out)
    args[args.index("--threads") + 1] = "-1"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "Traceback" not in err
    assert not out.exists()


def test_eval_into_an_older_report_leaves_no_stale_example(weights, synth_data, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    assert main(_eval_args(weights, synth_data, out, "--examples", "2")) == 0, capsys.readouterr()
    assert len(list(out.glob("example_*.jpg"))) == 2
    for stale in (".metrics.json.k1ll3d00.tmp", ".example_07_x.jpg.k1ll3d00.tmp"):  # left by a kill -9
        (out / stale).write_bytes(b"\0" * 100)
    assert main(_eval_args(weights, synth_data, out, "--examples", "1", split="train")) == 0, capsys.readouterr()
    from smearsight.train.datasets.formats import read_dataset

    first_train = Path(read_dataset(synth_data, "coco", "train")[0].images[0].file_name).stem
    assert [p.name for p in out.glob("example_*.jpg")] == [f"example_00_{first_train}.jpg"]
    assert json.loads((out / "metrics.json").read_text())["images"] == 8
    assert not list(out.glob(".*.tmp"))


def test_eval_that_fails_mid_report_leaves_no_metrics_json(weights, synth_data, tmp_path, monkeypatch, capsys) -> None:
    """metrics.json is written last: a folder that holds it holds the whole report of one evaluation."""
    import errno

    from smearsight.train.detector import plots

    out = tmp_path / "eval"
    assert main(_eval_args(weights, synth_data, out, "--examples", "1")) == 0, capsys.readouterr()
    capsys.readouterr()

    def full_disk(matrix, names, path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(plots, "confusion", full_disk)
    assert main(_eval_args(weights, synth_data, out, "--examples", "1", split="train")) == 1
    err = _one_line_error(capsys)
    assert "confusion_matrix.png: cannot write (No space left on device)" in err
    assert not (out / "metrics.json").exists()


def test_eval_refuses_an_out_that_is_a_training_run(weights, synth_data, capsys) -> None:
    """The run folder's metrics.json holds the training history; the report must not replace it."""
    run = weights.parent
    before = (run / "metrics.json").read_bytes()
    assert main(_eval_args(weights, synth_data, run)) == 1
    err = _one_line_error(capsys)
    assert "--out" in err and "holds a training run (last.pt)" in err
    assert (run / "metrics.json").read_bytes() == before
    assert not (run / "pr_curve.png").exists()


def test_predict_refuses_an_out_that_is_a_training_run(weights, synth_data, tmp_path, capsys) -> None:
    """An image named metrics.jpg would write metrics.json over the run's training history."""
    run = weights.parent
    image = tmp_path / "metrics.jpg"
    shutil.copy(next((synth_data / "images").glob("*.jpg")), image)
    before = (run / "metrics.json").read_bytes()
    assert main(["predict", "detector", str(image), "--weights", str(weights), "--out", str(run)]) == 1
    err = _one_line_error(capsys)
    assert f"--out {run}: holds a training run (last.pt)" in err
    assert (run / "metrics.json").read_bytes() == before and not (run / "metrics_pred.jpg").exists()


def test_train_names_both_splits_when_their_class_names_differ(synth_data, tmp_path, capsys) -> None:
    root = tmp_path / "renamed_val"
    shutil.copytree(synth_data, root)
    val = json.loads((root / "annotations" / "val.json").read_text())
    val["categories"][0]["name"] = "zzz"
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    assert main(_train_args(root, tmp_path / "run", val="val")) == 1
    err = _one_line_error(capsys)
    assert "[val]: class names ['zzz'," in err and "the training split's ['sertoli'," in err
    assert "checkpoint" not in err  # there is none yet


@pytest.mark.parametrize(("option", "value", "said"), [("--val-split", "none", "--val-split none (saved 'val')"),
                                                       ("--train-split", "val", "--train-split 'val' (saved 'train')")])
def test_resume_refuses_other_splits(synth_data, tmp_path, option, value, said, capsys) -> None:
    """Resuming a validated run with --val-split none replaced its best-mAP best.pt by the latest weights."""
    from smearsight.train.checkpoint import load_checkpoint
    from smearsight.train.detector.config import TrainConfig
    from smearsight.train.detector.train_loop import train_detector

    out = tmp_path / "run"
    cfg = TrainConfig(variant="test_efficientdet", pretrained=False, batch_size=4, image_size=[128, 128], epochs=2,
                      eval_every=1, threads=1)
    train_detector(synth_data, "coco", "train", "val", out, cfg, progress=False, stop_after_epochs=1)
    best = (out / "best.pt").read_bytes()
    args = _train_args(synth_data, out, "--resume", val="val")
    args[args.index("--epochs") + 1] = "2"
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    assert main(args) == 1
    err = _one_line_error(capsys)
    assert said in err and str(out / "last.pt") in err
    assert (out / "best.pt").read_bytes() == best and load_checkpoint(out / "last.pt")["epoch"] == 1


def test_resume_takes_the_same_data_moved_and_refuses_changed_data(synth_data, tmp_path, capsys) -> None:
    """A moved --data folder with the same images resumes; one box changed in the training split is refused."""
    from smearsight.train.checkpoint import load_checkpoint
    from smearsight.train.detector.config import TrainConfig
    from smearsight.train.detector.train_loop import train_detector

    out = tmp_path / "run"
    cfg = TrainConfig(variant="test_efficientdet", pretrained=False, batch_size=4, image_size=[128, 128], epochs=3,
                      eval_every=1, threads=1)
    train_detector(synth_data, "coco", "train", "val", out, cfg, progress=False, stop_after_epochs=1)
    changed = tmp_path / "changed"
    shutil.copytree(synth_data, changed)
    train_json = changed / "annotations" / "train.json"
    coco = json.loads(train_json.read_text())
    coco["annotations"][0]["bbox"][0] += 1.0
    train_json.write_text(json.dumps(coco))

    def resume(data: Path) -> list[str]:
        args = _train_args(data, out, "--resume", val="val")
        args[args.index("--epochs") + 1] = "3"
        return args

    assert main(resume(changed)) == 1
    err = _one_line_error(capsys)
    assert str(out / "last.pt") in err and f"{changed} [train] (train split)" in err
    assert "not the same ones" in err and load_checkpoint(out / "last.pt")["epoch"] == 1

    moved = tmp_path / "moved"
    shutil.copytree(synth_data, moved)
    assert main(resume(moved)) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 3


def test_eval_without_any_detection_still_draws_its_plots_quietly(weights, synth_data, tmp_path, capsys) -> None:
    """No detection at all (or no class with ground truth and detections): empty PR and confusion plots, no
    matplotlib warning on stderr about an empty legend, finite metrics."""
    import warnings

    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(_eval_args(weights, synth_data, out, "--score-threshold", "1", "--examples", "0")) == 0, \
            capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["map50"] == 0.0 and metrics["detections"] == 0
    assert all(v["ap50"] == 0.0 and v["recall"] == 0.0 for v in metrics["per_class"].values())
    assert (out / "pr_curve.png").stat().st_size > 0 and (out / "confusion_matrix.png").stat().st_size > 0


def test_train_refuses_a_negative_time_budget(synth_data, tmp_path, capsys) -> None:
    """Only 0 means no budget; -1 was taken as none too."""
    out = tmp_path / "run"
    assert main(_train_args(synth_data, out, "--time-budget", "-1")) == 2
    err = capsys.readouterr().err
    assert "--time-budget" in err and "Traceback" not in err
    assert not out.exists()


def test_train_names_the_option_for_a_too_small_image_size(synth_data, tmp_path, capsys) -> None:
    args = _train_args(synth_data, tmp_path / "run")
    args[args.index("--image-size") + 1] = "16x640"
    assert main(args) == 1
    err = _one_line_error(capsys)
    assert "--image-size" in err and "'16x640'" in err and "32" in err


def test_train_refuses_random_init_with_backbone_weights(synth_data, tmp_path, capsys) -> None:
    """Both asked for: the weights were loaded (and stages frozen) while the recipe said pretrained: false."""
    weights_file = tmp_path / "backbone.pt"
    weights_file.write_bytes(b"unused")
    out = tmp_path / "run"
    assert main(_train_args(synth_data, out, "--backbone-weights", str(weights_file))) == 1
    err = _one_line_error(capsys)
    assert "--random-init" in err and "--backbone-weights" in err
    assert not out.exists()


def test_resume_on_data_with_other_class_names_names_last_pt(weights, synth_data, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(weights.parent, run)
    renamed = tmp_path / "renamed"
    shutil.copytree(synth_data, renamed)
    train = json.loads((renamed / "annotations" / "train.json").read_text())
    train["categories"][0]["name"] = "zzz"
    (renamed / "annotations" / "train.json").write_text(json.dumps(train))
    assert main(_train_args(renamed, run, "--resume")) == 1
    err = _one_line_error(capsys)
    assert "[train]: class names ['zzz'," in err and f"{run / 'last.pt'}'s ['sertoli'," in err


def test_eval_with_other_class_names_names_both_lists_and_the_weights(weights, synth_data, tmp_path, capsys) -> None:
    renamed = tmp_path / "renamed"
    shutil.copytree(synth_data, renamed)
    val = json.loads((renamed / "annotations" / "val.json").read_text())
    val["categories"][0]["name"] = "zzz"
    (renamed / "annotations" / "val.json").write_text(json.dumps(val))
    out = tmp_path / "eval"
    assert main(_eval_args(weights, renamed, out)) == 1
    err = _one_line_error(capsys)
    assert "[val]: class names ['zzz'," in err and f"{weights}'s ['sertoli'," in err
    assert not out.exists()


@pytest.mark.parametrize("left", ["no best.pt", "an epoch-old best.pt"])
def test_resume_of_a_finished_run_killed_before_best_pt_writes_it(weights, synth_data, tmp_path, capsys,
                                                                  left) -> None:
    """Without validation best.pt follows last.pt; a kill between the two left a finished run without best.pt
    (or with the previous epoch's), and --resume, with nothing left to train, kept it."""
    from smearsight.train.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(weights.parent, run)
    if left == "no best.pt":
        (run / "best.pt").unlink()
    else:
        older = load_checkpoint(run / "best.pt")
        older["state_dict"] = {k: torch.zeros_like(v) for k, v in older["state_dict"].items()}
        save_checkpoint(run / "best.pt", {**older, "epoch": 0})
    assert main(_train_args(synth_data, run, "--resume")) == 0, capsys.readouterr()
    best, last = load_checkpoint(run / "best.pt", kind="detector"), load_checkpoint(run / "last.pt")
    assert best["epoch"] == last["epoch"] == 1 and "optimizer" not in best
    for key, value in last["state_dict"].items():
        assert torch.equal(best["state_dict"][key], value), key


def test_train_refuses_pretrained_false_from_config_with_backbone_weights(synth_data, tmp_path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("pretrained: false\n")
    weights_file = tmp_path / "backbone.pt"
    weights_file.write_bytes(b"unused")
    args = [a for a in _train_args(synth_data, tmp_path / "run") if a != "--random-init"]
    assert main([*args, "--config", str(recipe), "--backbone-weights", str(weights_file)]) == 1
    err = _one_line_error(capsys)
    assert "pretrained: false" in err and "--backbone-weights" in err
    assert not (tmp_path / "run").exists()
