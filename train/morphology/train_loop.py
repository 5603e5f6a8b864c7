"""Training one part's KD model: normal train crops only, flips/rotations, FGSM, selection on valid.

``RUN/last.pt`` is written after every KD epoch (student, optimiser, schedule, RNG state, the best epoch so far and
the history: ``--resume`` continues after a kill); ``RUN/best.pt`` (written last) holds the finished model with its
threshold, beside ``metrics.json``, ``history.json`` and ``curves.png``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from smearsight.errors import InputError
from smearsight.fileio import atomic_write_bytes, atomic_write_json, remove_stale_temp_files
from smearsight.interrupts import raise_if_interrupted
from smearsight.train.morphology.config import MorphologyTrainConfig
from smearsight.train.morphology.data import CropSet, check_part, load_crops, to_tensor_input
from smearsight.train.morphology.metrics import binary_metrics, roc_auc
from smearsight.train.morphology.threshold import choose_threshold
from smearsight.train.resume import check_resumed_inputs, setting_differences

RUN_FILES = ("best.pt", "metrics.json", "history.json", "curves.png")  # what a finished run adds to last.pt
LAST = "last.pt"  # the training state after the latest KD epoch (--resume)
RESUME_STATE = ("student", "optimizer", "scheduler", "rng", "epoch", "best", "history", "elapsed_s", "train_config",
                "data")

NORMALIZATION = {"color": "gray", "mean": [0.5], "std": [0.5]}


def _progress() -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False,
    )


def augment(x: Any, generator: Any, degrees: float, flips: bool) -> Any:
    """Random flips + transposes (the dihedral group) and rotations by up to ``degrees`` (reflection padding)."""
    import torch
    import torch.nn.functional as F

    batch = x.shape[0]
    if flips:
        hflip = torch.rand(batch, generator=generator) < 0.5
        vflip = torch.rand(batch, generator=generator) < 0.5
        x = torch.where(hflip[:, None, None, None], x.flip(-1), x)
        x = torch.where(vflip[:, None, None, None], x.flip(-2), x)
        if x.shape[-1] == x.shape[-2]:  # with both flips: the whole dihedral group (rot90 multiples)
            swap = torch.rand(batch, generator=generator) < 0.5
            x = torch.where(swap[:, None, None, None], x.transpose(-1, -2), x)
    if degrees > 0:
        angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zeros = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return x


def fgsm(model: Any, x: Any, epsilon: float) -> Any:
    """One FGSM step that increases the teacher-student discrepancy; epsilon in [0,1] pixel units."""
    import torch

    from smearsight.train.morphology.teacher import INPUT_STD

    x_att = x.detach().clone().requires_grad_(True)
    loss = model.kd_score(x_att).mean()
    (grad,) = torch.autograd.grad(loss, x_att)
    return (x_att + (epsilon / INPUT_STD) * grad.sign()).clamp(-1.0, 1.0).detach()


def score_crops(model: Any, images: np.ndarray, batch_size: int = 128, kd_only: bool = False) -> np.ndarray:
    """Scores [N] for uint8 crops [N,64,64] (model in eval mode, no gradients)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            raise_if_interrupted()  # scoring a large split (8 views with tta) takes minutes on a CPU
            x = torch.from_numpy(to_tensor_input(images[start : start + batch_size]))
            out.append((model.kd_score(x) if kd_only else model(x)).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def layer_scores(model: Any, images: np.ndarray, reduce: str = "mean", batch_size: int = 128) -> np.ndarray:
    """Per image and critical layer: the discrepancy with ``reduce`` over positions, as [N, L] (averaged over
    the 8 dihedral views when the model's ``tta`` is on, as its score is)."""
    import torch

    from smearsight.train.morphology.losses import discrepancy
    from smearsight.train.morphology.torch_model import dihedral_views

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            raise_if_interrupted()
            x = torch.from_numpy(to_tensor_input(images[start : start + batch_size]))
            per_view = []
            for view in dihedral_views(x) if model.cfg.tta else [x]:
                t, s = model.pair(view)
                per_view.append(np.stack([discrepancy(t, s, model.lambda_mse, [i], reduce).numpy()
                                          for i in range(len(t))], axis=1))
            out.append(np.mean(per_view, axis=0))
    return np.concatenate(out)


def best_subset(per_layer: np.ndarray, labels: np.ndarray, search: bool, default: list[int]) -> tuple[list[int], float]:
    """The non-empty subset of critical layers whose summed score has the best valid AUC (or ``default``)."""
    import itertools

    two_classes = len(set(labels.tolist())) == 2
    if not search or not two_classes:
        subset = list(default) or list(range(per_layer.shape[1]))
        return subset, roc_auc(labels, per_layer[:, subset].sum(1)) if two_classes else float("nan")
    best: tuple[list[int], float] = ([], -1.0)
    for size in range(1, per_layer.shape[1] + 1):
        for combo in itertools.combinations(range(per_layer.shape[1]), size):
            auc = roc_auc(labels, per_layer[:, list(combo)].sum(1))
            if auc > best[1] + 1e-9:
                best = (list(combo), auc)
    return best


def _features(model: Any, images: np.ndarray, views: bool, batch_size: int = 128) -> np.ndarray:
    """Classifier features [V, N, F] of every crop: V = 8 dihedral views if ``views``, else 1."""
    import torch

    from smearsight.train.morphology.torch_model import dihedral_views

    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            raise_if_interrupted()
            x = torch.from_numpy(to_tensor_input(images[start : start + batch_size]))
            chunks.append(np.stack([model.features(v).numpy() for v in (dihedral_views(x) if views else [x])]))
    return np.concatenate(chunks, axis=1)


def train_classifier(model: Any, train: CropSet, valid: CropSet, cfg: MorphologyTrainConfig, log: Any) -> dict:
    """Fit the supervised head on discrepancy features of all train crops; keep the best valid-AUC state."""
    import torch
    import torch.nn.functional as F

    assert model.classifier is not None
    views = _features(model, train.images, cfg.flips or cfg.model.tta)
    feats = views.reshape(-1, views.shape[-1])
    labels = np.tile(train.labels, len(views)).astype(np.float32)
    valid_views = torch.from_numpy(_features(model, valid.images, cfg.model.tta))
    head = model.classifier
    head.feat_mean.copy_(torch.from_numpy(feats.mean(0)))
    head.feat_std.copy_(torch.from_numpy(feats.std(0) + 1e-6))
    x, y = torch.from_numpy(feats), torch.from_numpy(labels)
    pos_weight = torch.tensor((y == 0).sum().item() / max(1.0, (y == 1).sum().item()))
    opt = torch.optim.AdamW(head.net.parameters(), lr=cfg.classifier_lr, weight_decay=cfg.classifier_weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    best = {"auc": -math.inf, "epoch": 0, "state": copy.deepcopy(head.state_dict())}
    history = []
    two_classes = len(set(valid.labels.tolist())) == 2
    for epoch in range(1, cfg.classifier_epochs + 1):
        head.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 256):
            raise_if_interrupted()
            idx = order[start : start + 256]
            loss = F.binary_cross_entropy_with_logits(head(x[idx]), y[idx], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % cfg.classifier_eval_every == 0 or epoch == cfg.classifier_epochs:
            head.eval()
            with torch.no_grad():
                valid_scores = torch.stack([torch.sigmoid(head(view)) for view in valid_views]).mean(0).numpy()
            if not (math.isfinite(loss.item()) and np.isfinite(valid_scores).all()):  # else the untrained head stays
                raise InputError(f"classifier_lr: the supervised classifier diverged by epoch {epoch} (NaN or infinite "
                                 f"loss or scores); lower classifier_lr (now {cfg.classifier_lr:g})")
            auc = roc_auc(valid.labels, valid_scores) if two_classes else -float(valid_scores.mean())
            history.append({"epoch": epoch, "loss": loss.item(), "valid_auc": auc})
            if auc > best["auc"]:
                best = {"auc": auc, "epoch": epoch, "state": copy.deepcopy(head.state_dict())}
    head.load_state_dict(best["state"])
    head.eval()
    log(f"classifier: best valid AUC {best['auc']:.4f} at epoch {best['epoch']}")
    return {"history": history, "best_epoch": best["epoch"], "best_valid_auc": best["auc"]}


_OPTION_OF = {"epochs": "--epochs", "seed": "--seed", "model.supervised": "--supervised",
              "model.teacher.name": "--teacher", "model.teacher.weights": "--teacher-weights"}


def _at(tree: Any, path: str) -> Any:
    for key in path.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _load_resumable(last_path: Path) -> dict[str, Any]:
    from smearsight.train.checkpoint import load_checkpoint

    if not last_path.is_file():
        raise InputError(f"{last_path}: nothing to resume (no {LAST} in the run folder)")
    resumed = load_checkpoint(last_path, kind="morphology")
    missing = [key for key in RESUME_STATE if key not in resumed]
    if missing:
        raise InputError(f"{last_path}: not a resumable {LAST} (no training state: {', '.join(missing)}); "
                         "is it a copy of best.pt?")
    return resumed


def _resumed_config(resumed: dict[str, Any], requested: MorphologyTrainConfig, explicit_fields: Collection[str],
                    last_path: Path) -> MorphologyTrainConfig:
    """The saved settings of the run in ``last_path``; InputError when an explicit request (dotted field names:
    options, keys of a --config file) contradicts them. ``threads`` applies to this call only."""
    saved = MorphologyTrainConfig.from_dict(resumed["train_config"], source=f"{last_path} train_config")
    asked_dict, saved_dict = requested.to_dict(), saved.to_dict()
    conflicts = [text for path in sorted(set(explicit_fields) - {"threads"})
                 for text in setting_differences(path, _at(asked_dict, path), _at(saved_dict, path), _OPTION_OF)]
    if conflicts:
        raise InputError(f"{last_path}: --resume continues the run with its saved settings, but this call asks for "
                         f"{'; '.join(conflicts)}: drop those options to resume, or train into a new --out")
    if "threads" in explicit_fields:
        saved.threads = requested.threads
    return saved


def _check_same_teacher(model: Any, resumed: dict[str, Any], cfg: MorphologyTrainConfig, last_path: Path) -> None:
    """InputError when the teacher built now (its weights file or package) is not the one the run distilled from."""
    import torch

    saved = {key[len("teacher."):]: value for key, value in resumed["state_dict"].items() if key.startswith("teacher.")}
    own = model.teacher.state_dict()
    if saved.keys() != own.keys() or any(not torch.equal(own[key], saved[key]) for key in own):
        raise InputError(f"model.teacher.weights (--teacher-weights): the {cfg.model.teacher.name} teacher from "
                         f"{cfg.model.teacher.weights!r} now has other weights than the one the run in {last_path} "
                         "distilled from; restore them to resume, or train into a new --out")


def _data_digest(train: CropSet, valid: CropSet) -> str:
    """sha256 of the crops and labels a run trains and selects on (a resumed run must see the same)."""
    digest = hashlib.sha256()
    for array in (train.images, train.labels, valid.images, valid.labels):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def train_morphology(
    data_dir: str | Path,
    part: str,
    out_dir: str | Path,
    cfg: MorphologyTrainConfig,
    train_split: str = "train",
    valid_split: str = "valid",
    log: Any = print,
    progress: bool = True,
    init_from: str | Path | None = None,
    *,
    resume: bool = False,
    explicit_fields: Collection[str] = (),
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Train, select on valid, choose the threshold and write ``out_dir/best.pt`` + metrics + curves.

    ``init_from``: a morphology checkpoint whose student weights start the training (with ``epochs=0`` the
    KD stage is skipped, e.g. to fit only the ``--supervised`` classifier on an existing KD model).

    ``out_dir/last.pt`` is written after every KD epoch. With ``resume`` the run continues from it with its saved
    settings on the same part, splits and crops (else InputError); ``explicit_fields`` names the ``cfg`` fields
    (dotted: ``model.teacher.name``) the caller set on purpose, each of which must equal the saved one, except
    ``threads``. A finished run resumed returns its metrics and writes nothing. ``stop_after_epochs`` ends this
    call after that many epochs as if it had been killed right after writing last.pt (tests check ``resume``).
    """
    import torch

    from smearsight.train.checkpoint import load_checkpoint, save_checkpoint
    from smearsight.train.morphology.losses import discrepancy
    from smearsight.train.morphology.student import count_flops
    from smearsight.train.morphology.torch_model import build_model

    check_part(part)
    out = Path(out_dir)
    last_path = out / LAST
    resumed: dict[str, Any] | None = None
    if resume:
        resumed = _load_resumable(last_path)
        cfg = _resumed_config(resumed, cfg, explicit_fields, last_path)
        asked = {"part": part, "train_split": train_split, "valid_split": valid_split}
        if init_from is not None:
            asked["init_from"] = str(init_from)
        check_resumed_inputs(resumed["data"], asked, last_path, "its own part and data")
        init_from = resumed["data"].get("init_from")
    elif (out / "best.pt").exists():  # its metrics, history and curves would be mixed with this run's
        raise InputError(f"{out}: run folder already holds best.pt; pick a new --out (or delete the old run)")
    elif last_path.exists():
        raise InputError(f"{out}: run folder already holds {LAST} of an unfinished run; pass --resume to continue "
                         "it, or pick a new --out")
    if (out / "roc.png").exists() or (out / "score_hist.png").exists():  # eval morphology's report files
        raise InputError(f"{out}: holds an evaluation report (its metrics.json would be replaced); pick a new --out")
    if init_from is None and cfg.epochs == 0:
        raise InputError("epochs: 0 epochs is only allowed when starting from a checkpoint (--init-from)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train = load_crops(data_dir, part, train_split)
    valid = load_crops(data_dir, part, valid_split)
    normal = train.images[train.labels == 0]
    if len(normal) == 0:
        raise InputError(f"{train.labels_source}: the train split holds no normal sample for part '{part}'")
    if cfg.model.supervised and len(set(train.labels.tolist())) < 2:
        raise InputError(f"{train.labels_source}: --supervised needs both classes in the train split for part '{part}'")
    if not (valid.labels == 0).any():  # checked before training: the threshold needs normal validation scores
        raise InputError(f"{valid.labels_source}: the validation split holds no normal sample for part '{part}' "
                         "(the threshold is chosen on it)")
    valid_two_classes = len(set(valid.labels.tolist())) == 2
    digest = _data_digest(train, valid)
    if resumed is not None:
        if resumed["data"]["sha256"] != digest:
            raise InputError(f"--data {data_dir}: its '{train_split}'/'{valid_split}' crops or labels for part "
                             f"'{part}' are not those the run in {last_path} was trained on: pass the run's data to "
                             "resume, or train into a new --out")
        if resumed["epoch"] >= cfg.epochs and (out / "best.pt").is_file():
            log(f"{out}: the run finished ({resumed['epoch']} epochs); nothing to resume")
            return load_checkpoint(out / "best.pt", kind="morphology")["metrics"]

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if init_from is not None and resumed is None:
        _load_student(model, init_from, part if cfg.epochs == 0 else None)
    if resumed is not None:
        _check_same_teacher(model, resumed, cfg, last_path)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known good
    remove_stale_temp_files(out, (*RUN_FILES, LAST))  # left by a kill -9 of an earlier try
    sizes = model.sizes()
    example = torch.zeros(1, 1, 64, 64)
    sizes.update(teacher_flops=count_flops(model.teacher, example), student_flops=count_flops(model.student, example))
    log(
        f"teacher {cfg.model.teacher.name} layers {cfg.model.teacher.layers}: {sizes['teacher_params']:,} params, "
        f"{sizes['teacher_flops'] / 1e6:.1f} MFLOPs; student {sizes['student_params']:,} params, "
        f"{sizes['student_flops'] / 1e6:.1f} MFLOPs; {len(normal)} normal train crops"
    )
    opt = torch.optim.AdamW(model.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(normal) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch), pct_start=0.1
    )
    data = torch.from_numpy(to_tensor_input(normal))
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"key": -math.inf, "epoch": 0, "state": copy.deepcopy(model.student.state_dict()),
                            "subset": list(model.score_positions), "threshold": None}
    recipe = cfg.to_dict()  # as asked: the choices made after the KD epochs change cfg
    run_data = {"part": part, "train_split": train_split, "valid_split": valid_split,
                "init_from": None if init_from is None else str(init_from), "sha256": digest}
    start_epoch, elapsed = 0, 0.0
    if resumed is not None:
        model.student.load_state_dict(resumed["student"])
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
        generator.set_state(resumed["rng"]["generator"])
        torch.set_rng_state(resumed["rng"]["torch"])
        history, best, start_epoch = resumed["history"], resumed["best"], resumed["epoch"]
        elapsed = resumed["elapsed_s"]
        log(f"resumed {last_path} after epoch {start_epoch} of {cfg.epochs}")
    started = time.perf_counter() - elapsed
    bar = _progress() if progress else None
    task = (bar.add_task(f"train {part}", total=cfg.epochs * steps_per_epoch, completed=start_epoch * steps_per_epoch,
                         info="") if bar else None)
    if bar:
        bar.start()
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            model.student.train()
            order = torch.randperm(len(data), generator=generator)
            losses = []
            for start in range(0, len(data), cfg.batch_size):
                raise_if_interrupted()
                x = augment(data[order[start : start + cfg.batch_size]], generator, cfg.rotate_degrees, cfg.flips)
                n_att = int(round(cfg.fgsm_fraction * len(x))) if cfg.fgsm_epsilon > 0 else 0
                if n_att:
                    x = torch.cat([x[n_att:], fgsm(model, x[:n_att], cfg.fgsm_epsilon)])
                with torch.no_grad():
                    t_feats = model.teacher(x)
                s_feats = model.student(x)
                loss = discrepancy(t_feats, s_feats, model.lambda_mse).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                if bar:
                    bar.update(task, advance=1, info=f"loss {loss.item():.4f}")
            per_layer = layer_scores(model, valid.images, cfg.model.score_reduce)
            if not (np.isfinite(losses).all() and np.isfinite(per_layer).all()):  # NaN weights: no epoch after helps
                raise InputError(f"lr: training diverged at epoch {epoch} (NaN or infinite loss or scores); "
                                 f"lower lr (now {cfg.lr:g})")
            subset, auc = best_subset(per_layer, valid.labels, cfg.select_scoring_layers, model.score_positions)
            scores = per_layer[:, subset].sum(axis=1)
            normal_mean = float(scores[valid.labels == 0].mean()) if np.any(valid.labels == 0) else float("nan")
            key = auc if valid_two_classes else -normal_mean
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "valid_auc": auc,
                            "scoring_layers": [cfg.model.teacher.layers[i] for i in subset],
                            "valid_normal_score": normal_mean, "seconds": time.perf_counter() - started})
            if bar:
                bar.update(task, info=f"loss {np.mean(losses):.4f} valid AUC {auc:.4f}")
            else:
                log(f"epoch {epoch}/{cfg.epochs}: loss {np.mean(losses):.4f} valid AUC {auc:.4f} "
                    f"normal score {normal_mean:.4f} ({time.perf_counter() - started:.0f} s)")
            if key > best["key"]:
                best = {"key": key, "epoch": epoch, "state": copy.deepcopy(model.student.state_dict()),
                        "subset": subset,
                        "threshold": choose_threshold(scores, valid.labels, cfg.fallback_quantile).threshold}
            save_checkpoint(last_path, {
                **_best_so_far(model, recipe, part, best),
                "student": model.student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()}, "epoch": epoch,
                "best": best, "history": history, "elapsed_s": time.perf_counter() - started,
                "train_config": recipe, "data": run_data,
            })
            if stop_after_epochs is not None and epoch - start_epoch >= stop_after_epochs and epoch < cfg.epochs:
                return {"interrupted": True, "epochs_done": epoch, "history": history}
    finally:
        if bar:
            bar.stop()
    train_seconds = time.perf_counter() - started
    model.student.load_state_dict(best["state"])
    model.eval()
    if cfg.epochs == 0 and cfg.select_scoring_layers and valid_two_classes:
        per_layer = layer_scores(model, valid.images, cfg.model.score_reduce)
        best["subset"], best["key"] = best_subset(per_layer, valid.labels, True, [])
    if cfg.select_score_reduce and valid_two_classes and cfg.select_scoring_layers:
        other = "max" if cfg.model.score_reduce == "mean" else "mean"
        subset, auc = best_subset(layer_scores(model, valid.images, other), valid.labels, True, [])
        named = [cfg.model.teacher.layers[i] for i in subset]
        log(f"valid AUC with {other} over positions: {auc:.4f} (layers {named}) vs {best['key']:.4f}")
        if auc > best["key"] + 1e-9:
            cfg.model.score_reduce = other
            best["subset"], best["key"] = subset, auc
    if best["subset"] != model.score_positions:
        cfg.model.scoring_layers = [cfg.model.teacher.layers[i] for i in best["subset"]]
        model.score_positions = list(best["subset"])
        model.cfg = cfg.model
        log(f"scoring layers chosen on valid: {cfg.model.scoring_layers}")
    log(f"student: best epoch {best['epoch']} (valid {'AUC' if valid_two_classes else '-normal score'} "
        f"{best['key']:.4f}), {train_seconds:.0f} s")
    classifier_info = None
    if cfg.model.supervised:
        t0 = time.perf_counter()
        classifier_info = train_classifier(model, train, valid, cfg, log)
        classifier_info["seconds"] = time.perf_counter() - t0
        train_seconds += classifier_info["seconds"]

    valid_scores = score_crops(model, valid.images)
    choice = choose_threshold(valid_scores, valid.labels, cfg.fallback_quantile)
    log(choice.note)
    valid_metrics = binary_metrics(valid.labels, valid_scores, choice.threshold)
    mode = "supervised" if cfg.model.supervised else "unsupervised"
    metrics = {
        "part": part, "mode": mode, "valid": valid_metrics, "threshold": choice.threshold,
        "threshold_method": choice.method, "threshold_note": choice.note, "best_epoch": best["epoch"],
        "train_seconds": train_seconds, "sizes": sizes, "size_ratio": sizes["teacher_params"] / sizes["student_params"],
        "n_train_normal": int(len(normal)), "n_valid": int(len(valid)), "classifier": classifier_info,
    }
    payload = {
        "kind": "morphology",
        "model_config": cfg.model.to_dict(),
        "state_dict": model.state_dict(),
        "normalization": NORMALIZATION,
        "image_size": [64, 64],
        "morphology": {"part": part, "threshold": float(choice.threshold), "mode": mode},
        "threshold_info": {"method": choice.method, "note": choice.note, "f05": choice.f05},
        "train_config": cfg.to_dict(),
        "metrics": metrics,
    }
    # best.pt last: a folder that holds it holds the whole run (a kill before leaves no best.pt to reuse); a
    # failure on the way (a full disk) takes back what this run wrote, so no files of an unfinished run stay
    try:
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(out / "history.json", {"student": history, "classifier": classifier_info})
        _plot_curves(out / "curves.png", history)
        save_checkpoint(out / "best.pt", payload)
    except BaseException:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        raise
    return metrics


def _best_so_far(model: Any, recipe: dict[str, Any], part: str, best: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint fields for the best KD student so far: an unsupervised model scored by the layers chosen for it,
    with the valid threshold for those scores (a supervised run fits its classifier after the KD epochs)."""
    model_config = copy.deepcopy(recipe["model"])
    model_config.update(supervised=False, scoring_layers=[model_config["teacher"]["layers"][i] for i in best["subset"]])
    state = {key: value for key, value in model.state_dict().items() if key.startswith("teacher.")}
    state.update({f"student.{key}": value for key, value in best["state"].items()})
    return {"kind": "morphology", "model_config": model_config, "state_dict": state, "normalization": NORMALIZATION,
            "image_size": [64, 64], "morphology": {"part": part, "threshold": float(best["threshold"]),
                                                   "mode": "unsupervised"}}


def _plot_curves(path: Path, history: list[dict[str, Any]]) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history])
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train KD loss")
    ax2.plot(epochs, [h["valid_auc"] for h in history], label="valid AUC")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("valid ROC AUC")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _load_student(model: Any, path: str | Path, as_is_for: str | None = None) -> None:
    """Start from ``path``'s student; ``as_is_for``: the part it is kept for without KD training (epochs 0), which
    must be the part it was trained for, with the same teacher."""
    from smearsight.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, kind="morphology")
    if as_is_for is not None:
        trained_part = ckpt["morphology"]["part"]
        if trained_part != as_is_for:
            raise InputError(f"{path}: with 0 epochs its student is kept as is, but it was trained for part "
                             f"'{trained_part}', not '{as_is_for}'")
        theirs = (ckpt["model_config"].get("teacher") or {}) if isinstance(ckpt["model_config"], dict) else {}
        ours = model.cfg.teacher.to_dict()
        differ = [key for key in ("name", "layers", "input_size") if theirs.get(key) != ours[key]]
        if differ:
            raise InputError(f"{path}: with 0 epochs its student is kept as is, but it was distilled from another "
                             f"teacher (teacher {', '.join(differ)} differ)")
    state = {k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    own = model.student.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise InputError(f"{path}: its student does not fit this model config (teacher layers/student widths differ)")
    model.student.load_state_dict(state)
