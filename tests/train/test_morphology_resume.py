"""``train morphology --resume``: a killed run continues from RUN/last.pt to the state of an uninterrupted run, and
refuses another part, split, data or setting, or a folder with nothing to resume."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from smearsight.cli import main  # noqa: E402
from smearsight.errors import InputError  # noqa: E402
from smearsight.train.checkpoint import load_checkpoint  # noqa: E402
from smearsight.train.morphology.train_loop import train_morphology  # noqa: E402

torch.set_num_threads(1)

# the synthetic crops and the tiny model of test_morphology_model.py (test modules cannot import each other)
_spec = importlib.util.spec_from_file_location("ss_morphology_helpers",
                                               Path(__file__).with_name("test_morphology_model.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


def quiet(*_: object) -> None:
    pass


def _tiny_yaml(path: Path, **extra: object) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"model": helpers.TINY_MODEL, "batch_size": 16, "classifier_epochs": 5, **extra}))
    return path


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("supervised", [False, True], ids=["kd", "supervised"])
def test_resume_after_stop_equals_uninterrupted_run(tmp_path: Path, supervised: bool) -> None:
    data = helpers.write_mhsma(tmp_path / "data", n_train=32, n_valid=16)
    model = {**helpers.TINY_MODEL, "supervised": supervised}
    cfg = lambda **kw: helpers.tiny_train_config(model=model, classifier_epochs=5, **kw)  # noqa: E731
    whole = train_morphology(data, "head", tmp_path / "whole", cfg(epochs=3), log=quiet, progress=False)

    run = tmp_path / "run"
    stopped = train_morphology(data, "head", run, cfg(epochs=3), log=quiet, progress=False, stop_after_epochs=1)
    assert stopped["interrupted"] and stopped["epochs_done"] == 1
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()
    last = load_checkpoint(run / "last.pt", kind="morphology")  # the best model so far, with its threshold
    assert last["epoch"] == 1 and len(last["history"]) == 1 and np.isfinite(last["morphology"]["threshold"])
    with pytest.raises(InputError, match=r"already holds last.pt of an unfinished run; pass --resume"):
        train_morphology(data, "head", run, cfg(epochs=3), log=quiet, progress=False)
    # the run's own settings win: epochs=99 was not asked for explicitly
    resumed = train_morphology(data, "head", run, cfg(epochs=99), log=quiet, progress=False, resume=True)

    history = lambda folder: load_checkpoint(folder / "last.pt")["history"]  # noqa: E731
    assert len(history(run)) == len(history(tmp_path / "whole")) == 3
    for a, b in zip(history(run), history(tmp_path / "whole"), strict=True):
        assert a["train_loss"] == b["train_loss"] and a["valid_auc"] == b["valid_auc"]
    for key in ("threshold", "best_epoch", "valid", "threshold_method"):
        assert resumed[key] == whole[key], key
    if supervised:
        assert resumed["classifier"]["history"] == whole["classifier"]["history"]
    _same_weights(load_checkpoint(run / "best.pt")["state_dict"],
                  load_checkpoint(tmp_path / "whole" / "best.pt")["state_dict"])


def test_resume_of_a_finished_run_changes_nothing_and_of_one_killed_before_best_pt_finishes_it(tmp_path: Path) -> None:
    data = helpers.write_mhsma(tmp_path / "data", n_train=32, n_valid=16)
    run = tmp_path / "run"
    whole = train_morphology(data, "head", run, helpers.tiny_train_config(epochs=2), log=quiet, progress=False)
    files = {name: (run / name).read_bytes() for name in ("best.pt", "last.pt", "metrics.json", "history.json")}
    again = train_morphology(data, "head", run, helpers.tiny_train_config(epochs=2), log=quiet, progress=False,
                             resume=True)
    assert again["threshold"] == whole["threshold"]
    assert {name: (run / name).read_bytes() for name in files} == files
    # killed after the last epoch's last.pt, before best.pt: --resume only does what came after the epochs
    for name in ("best.pt", "metrics.json", "curves.png"):
        (run / name).unlink()
    (run / ".best.pt.abcd1234.tmp").write_bytes(b"half")  # what a kill -9 mid-write leaves
    finished = train_morphology(data, "head", run, helpers.tiny_train_config(epochs=2), log=quiet, progress=False,
                                resume=True)
    assert finished["threshold"] == whole["threshold"] and finished["valid"] == whole["valid"]
    assert (run / "best.pt").is_file() and (run / "metrics.json").is_file() and (run / "curves.png").is_file()
    assert not list(run.glob(".*.tmp"))


def test_resume_refusals_are_one_line_and_write_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = helpers.write_mhsma(tmp_path / "data", n_train=32, n_valid=16)
    for split in ("train", "valid"):  # the same labels for another part
        (data / f"y_acrosome_{split}.npy").write_bytes((data / f"y_head_{split}.npy").read_bytes())
    (data / "x_64_other.npy").write_bytes((data / "x_64_valid.npy").read_bytes())
    (data / "y_head_other.npy").write_bytes((data / "y_head_valid.npy").read_bytes())
    config = _tiny_yaml(tmp_path / "tiny.yaml", epochs=3)
    run = tmp_path / "run"
    base = ["train", "morphology", "--data", str(data), "--out", str(run), "--no-progress"]

    rc = main([*base, "--part", "head", "--config", str(config), "--resume"])
    err = capfd.readouterr().err
    assert rc == 1 and f"{run / 'last.pt'}: nothing to resume" in err and not run.exists()

    train_morphology(data, "head", run, helpers.tiny_train_config(epochs=3, batch_size=16, classifier_epochs=5),
                     log=quiet, progress=False, stop_after_epochs=1)
    before = (run / "last.pt").read_bytes()
    refusals = [
        (["--part", "acrosome", "--config", str(config)], "--part 'acrosome' (saved 'head')"),
        (["--part", "head", "--config", str(config), "--valid-split", "other"],
         "--valid-split 'other' (saved 'valid')"),
        (["--part", "head", "--config", str(config), "--epochs", "5"], "epochs (--epochs) 5 (saved 3)"),
        (["--part", "head", "--config", str(_tiny_yaml(tmp_path / "lr.yaml", epochs=3, lr=0.1))],
         "lr 0.1 (saved 0.005)"),
        (["--part", "head", "--config", str(config), "--teacher", "tf_efficientnet_lite1"],
         "model.teacher.name (--teacher) 'tf_efficientnet_lite1' (saved 'tf_efficientnet_lite0')"),
    ]
    for options, expected in refusals:
        rc = main([*base, *options, "--resume"])
        err = capfd.readouterr().err
        assert rc == 1 and expected in err and "--resume continues the run" in err, (options, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    labels = np.load(data / "y_head_valid.npy")
    np.save(data / "y_head_valid.npy", 1 - labels)  # other data under the same names
    rc = main([*base, "--part", "head", "--config", str(config), "--resume"])
    err = capfd.readouterr().err
    assert rc == 1 and "are not those the run in" in err and "y_head" not in err
    np.save(data / "y_head_valid.npy", labels)
    assert (run / "last.pt").read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["last.pt"]

    rc = main([*base, "--part", "head", "--config", str(config), "--threads", "1", "--resume"])  # may change
    assert rc == 0, capfd.readouterr().err
    assert len(load_checkpoint(run / "last.pt")["history"]) == 3

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "last.pt").write_bytes((run / "best.pt").read_bytes())
    rc = main(["train", "morphology", "--data", str(data), "--out", str(copy), "--part", "head", "--resume"])
    assert rc == 1 and "not a resumable last.pt" in capfd.readouterr().err
    rc = main(["eval", "morphology", "--weights", str(copy / "last.pt"), "--data", str(data), "--part", "head",
               "--split", "valid", "--out", str(copy)])  # a killed run's folder is no report folder either
    assert rc == 1 and "holds a training run (last.pt)" in capfd.readouterr().err


def test_cli_run_killed_with_sigkill_resumes_to_the_full_history(tmp_path: Path) -> None:
    data = helpers.write_mhsma(tmp_path / "data", n_train=48, n_valid=16)
    config = _tiny_yaml(tmp_path / "tiny.yaml", epochs=8)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "smearsight.cli", "train", "morphology", "--data", str(data), "--part", "head",
            "--out", str(run), "--config", str(config), "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()
    done = load_checkpoint(run / "last.pt")["epoch"]
    assert 1 <= done < 8
    res = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resumed {run / 'last.pt'} after epoch {done} of 8" in res.stdout
    assert len(load_checkpoint(run / "last.pt")["history"]) == 8 and (run / "best.pt").is_file()



def test_resume_refuses_a_teacher_whose_weights_file_changed(tmp_path: Path) -> None:
    """The student would go on distilling from another teacher: the weights built now must be the saved ones."""
    from smearsight.train.backbones import create_backbone

    def teacher_file(seed: int) -> None:
        torch.manual_seed(seed)
        state = create_backbone("tf_efficientnet_lite0", pretrained=False, out_indices=(1, 2)).state_dict()
        torch.save(state, tmp_path / "teacher.pt")

    data = helpers.write_mhsma(tmp_path / "data", n_train=32, n_valid=16)
    teacher = {**helpers.TINY_MODEL["teacher"], "weights": str(tmp_path / "teacher.pt")}
    model = {**helpers.TINY_MODEL, "teacher": teacher}
    cfg = helpers.tiny_train_config(model=model, epochs=2)
    teacher_file(1)
    train_morphology(data, "head", tmp_path / "run", cfg, log=quiet, progress=False, stop_after_epochs=1)
    teacher_file(2)
    with pytest.raises(InputError, match=r"model.teacher.weights \(--teacher-weights\): .*now has other weights "
                                         r"than the one the run in"):
        train_morphology(data, "head", tmp_path / "run", cfg, log=quiet, progress=False, resume=True)
    assert not (tmp_path / "run" / "best.pt").exists()
    teacher_file(1)
    train_morphology(data, "head", tmp_path / "run", cfg, log=quiet, progress=False, resume=True)
    assert (tmp_path / "run" / "best.pt").is_file()
