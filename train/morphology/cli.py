"""CLI: ``smearsight train morphology`` and ``smearsight eval morphology``.

Import-light: torch and timm are imported inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from smearsight.cli_app import eval_app, train_app
from smearsight.fileio import check_output_dir


@train_app.command("morphology")
def train_morphology_cmd(
    data: Path = typer.Option(
        ..., "--data", help="MHSMA folder (x_64_<split>.npy, y_<part>_<split>.npy) or PNGs + labels.csv."
    ),
    part: str = typer.Option(..., "--part", help="head | acrosome | vacuole | tail"),
    out: Path = typer.Option(
        ..., "--out", help="Run folder: best.pt, last.pt, metrics.json, history.json, curves.png."
    ),
    supervised: bool = typer.Option(
        False, "--supervised",
        help="Add a classifier trained with the labels (configs/morphology_supervised.yaml: the stronger setup).",
    ),
    teacher: str | None = typer.Option(None, "--teacher", help="Teacher: timm name or vgg16 (default Lite0)."),
    teacher_weights: str | None = typer.Option(None, "--teacher-weights", help="Teacher weights file path."),
    epochs: int | None = typer.Option(None, "--epochs"),
    config: Path | None = typer.Option(None, "--config", help="YAML MorphologyTrainConfig."),
    train_split: str = typer.Option("train", "--train-split"),
    valid_split: str = typer.Option("valid", "--valid-split", help="Model selection and threshold split."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
    seed: int | None = typer.Option(None, "--seed"),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Start from this checkpoint's student (with --epochs 0: only fit the classifier)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from last.pt with its saved settings (--threads may change)."
    ),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Train a knowledge-distillation morphology model for one part on normal crops only.

    The student is selected and the threshold chosen on the validation split (F0.5, normal positive).
    RUN/last.pt is written after every epoch: --resume continues a killed run.
    """
    from smearsight.config import read_yaml
    from smearsight.train.morphology.config import MorphologyTrainConfig
    from smearsight.train.morphology.data import check_part
    from smearsight.train.morphology.train_loop import train_morphology

    check_part(part)
    check_output_dir(out)
    raw = read_yaml(config) if config else {}  # the file read once: the settings and which ones it sets
    cfg = MorphologyTrainConfig.from_dict(raw, source=str(config)) if config else MorphologyTrainConfig()
    data_cfg = cfg.to_dict()
    explicit = _leaf_fields(raw)  # what --resume checks against the saved run
    options = {"epochs": epochs, "threads": threads, "seed": seed, "model.supervised": True if supervised else None,
               "model.teacher.name": teacher, "model.teacher.weights": teacher_weights}
    if teacher in ("vgg16", "vgg16_bn") and "model.teacher.layers" not in explicit:
        options["model.teacher.layers"] = [2, 3, 4, 5]  # pool2..pool5, the published choice
    for field, value in options.items():
        if value is not None:
            *parents, name = field.split(".")
            node = data_cfg
            for parent in parents:
                node = node[parent]
            node[name] = value
            explicit.add(field)
    # the file alone passed above: what fails now comes from the options
    cfg = MorphologyTrainConfig.from_dict(data_cfg, source=f"options (over {config})" if config else "options")
    metrics = train_morphology(data, part, out, cfg, train_split, valid_split, log=typer.echo,
                               progress=not no_progress, init_from=init_from, resume=resume, explicit_fields=explicit)
    valid = metrics["valid"]
    typer.echo(
        f"{part} ({metrics['mode']}): valid AUC {valid['auc']:.4f} accuracy {valid['accuracy']:.4f} "
        f"F0.5 {valid['f05']:.4f} at threshold {metrics['threshold']:.4g}; wrote {out / 'best.pt'}"
    )


def _leaf_fields(tree: dict, prefix: str = "") -> set[str]:
    """The dotted names of the settings a (validated) config mapping sets: ``{"model.teacher.name", "epochs"}``."""
    fields: set[str] = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            fields |= _leaf_fields(value, f"{prefix}{key}.")
        else:
            fields.add(f"{prefix}{key}")
    return fields


@eval_app.command("morphology")
def eval_morphology_cmd(
    weights: Path = typer.Option(..., "--weights", help="Morphology checkpoint (best.pt)."),
    data: Path = typer.Option(..., "--data", help="MHSMA folder or PNGs+labels.csv."),
    part: str = typer.Option(..., "--part"),
    split: str = typer.Option(..., "--split"),
    out: Path = typer.Option(..., "--out", help="Report folder: metrics.json, roc.png, score_hist.png, localisation/."),
    localise: int = typer.Option(8, "--localise", min=0, max=200,
                                 help="Number of localisation examples (0 to 200)."),
    threads: int | None = typer.Option(None, "--threads", min=0, max=2**31 - 1,
                                       help="torch CPU threads (0: torch's default)."),
) -> None:
    """Evaluate a morphology checkpoint on a split (normal = positive class for precision/recall/F0.5)."""
    from smearsight.train.morphology.data import check_part
    from smearsight.train.morphology.evaluate import evaluate_morphology

    check_part(part)
    check_output_dir(out)
    if threads:
        import torch

        torch.set_num_threads(threads)
    report = evaluate_morphology(weights, data, part, split, out, n_localise=localise)
    keys = ("accuracy", "precision", "recall", "f05", "gmean", "auc", "mcc")
    typer.echo(json.dumps({k: round(report[k], 4) for k in keys}))
