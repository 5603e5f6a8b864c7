"""The detector training loop: recipe resolution, AdamW + warm-up/cosine, EMA, AMP, clipping, checkpoints.

``RUN/last.pt`` is written after every epoch (optimizer, EMA, schedule position, RNG state: ``--resume``
continues after a kill); ``RUN/best.pt`` holds the EMA weights with the best validation mAP@0.5;
``RUN/metrics.json`` the history and final validation metrics; ``RUN/curves.png`` the curves.

The cosine schedule advances with whichever is further along: steps done / total steps, or elapsed time /
``time_budget_min``; training stops when either is used up (so a CPU run keeps its time budget).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smearsight.anchors import AnchorConfig
from smearsight.errors import InputError, SmearSightError
from smearsight.interrupts import raise_if_interrupted
from smearsight.train.detector.config import TrainConfig, default_detector_anchors
from smearsight.train.resume import check_resumed_inputs, setting_differences

if TYPE_CHECKING:
    from smearsight.train.datasets.records import DetectionDataset

log = logging.getLogger(__name__)


def lr_factor(progress: float, step: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up over the first ``warmup_steps`` steps times a cosine from 1 to ``min_ratio`` over
    ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    t = min(max(progress, 0.0), 1.0)
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def resolve_recipe(cfg: TrainConfig, train_ds: Any) -> tuple[list[int], AnchorConfig, str]:
    """Input size, anchor layout and backbone for a dataset (auto choices made from the training boxes)."""
    from smearsight.train.detector.anchor_stats import choose_anchors
    from smearsight.train.detector.data import auto_image_size, round_up, scaled_boxes
    from smearsight.train.detector.registry import variant_settings

    settings = variant_settings(cfg.variant)
    backbone = cfg.backbone or settings["backbone"]
    size = list(cfg.image_size) if cfg.image_size else auto_image_size(train_ds, max(settings["image_size"]))
    if cfg.anchors == "auto":
        anchors = choose_anchors(scaled_boxes(train_ds, (size[0], size[1])), (size[0], size[1]),
                                 positive_iou=max(cfg.matcher.positive_iou, 0.5))
    elif cfg.anchors == "default":
        anchors = default_detector_anchors()
    else:
        anchors = cfg.anchors
    size = [round_up(size[0], anchors.max_stride), round_up(size[1], anchors.max_stride)]
    return size, anchors, backbone


def freeze_backbone_stages(model: Any, stages: int) -> list[Any]:
    """Freeze the backbone stem and its first ``stages`` stages (weights and BatchNorm statistics).

    Those layers run at strides 2-4 where backward passes cost most on a CPU, and their ImageNet features
    (edges, blobs) transfer as they are. Returns the frozen modules (to be kept in eval mode).
    """
    if stages <= 0:
        return []
    bb = model.backbone
    frozen = [m for m in (getattr(bb, "conv_stem", None), getattr(bb, "bn1", None)) if m is not None]
    blocks = getattr(bb, "blocks", None)
    if blocks is not None:
        frozen.extend(list(blocks)[:stages])
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen


def _param_groups(model: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith("backbone."), p.ndim <= 1)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_backbone, no_decay), params in groups.items():
        mult = cfg.backbone_lr_mult if is_backbone else 1.0
        out.append({"params": params, "lr": cfg.lr * mult, "lr_mult": mult,
                    "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    return out


def _checkpoint_payload(state: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    cfg: TrainConfig = state["cfg"]
    return {
        "kind": "detector",
        "model_config": state["model_config"].to_dict(),
        "state_dict": weights,
        "normalization": {"color": "rgb", "mean": state["mean"], "std": state["std"]},
        "image_size": list(state["image_size"]),
        "class_names": list(state["class_names"]),
        "anchors": state["anchors"].to_dict(),
        "thresholds": {"score": cfg.score_threshold, "iou": cfg.iou_threshold,
                       "pre_nms_topk": cfg.pre_nms_topk, "max_detections": cfg.max_detections},
        "train_config": cfg.to_dict(),
        "epoch": state["epoch"],
        "step": state["step"],
        "elapsed_s": state["elapsed"],
        "history": state["history"],
        "best_map50": state["best_map50"],
    }


_OPTION_OF = {"time_budget_min": "--time-budget", "batch_size": "--batch-size", "image_size": "--image-size",
              "backbone_weights": "--backbone-weights", "pretrained": "--random-init"}


def _resumed_recipe(
    resumed: dict[str, Any], requested: TrainConfig, explicit_fields: Collection[str], last_path: Path
) -> TrainConfig:
    """The saved recipe of the run in ``last_path``; InputError when an explicit request contradicts it."""
    saved = TrainConfig.from_dict(resumed["train_config"], source=f"{last_path} train_config")
    # what the recipe resolved "auto" (None) to: asking for that very value is no conflict
    resolved = {"image_size": list(resumed["image_size"]), "backbone": resumed["model_config"].get("backbone")}

    def same(name: str) -> bool:
        asked, had = getattr(requested, name), getattr(saved, name)
        return asked == had or (had is None and name in resolved and asked == resolved[name])

    asked_dict, saved_dict = requested.to_dict(), saved.to_dict()
    conflicts = [
        text
        for name in sorted(set(explicit_fields) - {"threads"})
        if not same(name)
        for text in setting_differences(name, asked_dict[name], saved_dict[name], _OPTION_OF)
    ]
    if conflicts:
        raise InputError(
            f"{last_path}: --resume continues the run with its saved recipe, but this call asks for "
            f"{'; '.join(conflicts)}: drop those options to resume, or train into a new --out"
        )
    if "threads" in explicit_fields:
        saved.threads = requested.threads
    return saved


def _check_resumed_data(resumed: dict[str, Any], datasets: dict[str, DetectionDataset | None], data: str | Path,
                        last_path: Path) -> None:
    """InputError when a split now holds other images or boxes than when the run in ``last_path`` started (the
    same data in a moved --data folder is accepted; checkpoints written before fingerprints were saved are not
    checked)."""
    saved = resumed.get("data") or {}
    for role, ds in datasets.items():
        before = saved.get(f"{role}_fingerprint")
        if ds is None or not isinstance(before, dict):
            continue
        now = ds.fingerprint()
        if now["sha256"] != before.get("sha256"):
            counts = (f"{now['images']} images and {now['boxes']} boxes, the run's {before.get('images')} and "
                      f"{before.get('boxes')}" if (now["images"], now["boxes"]) != (before.get("images"),
                                                                                   before.get("boxes"))
                      else "as many images and boxes as the run's, but not the same ones")
            raise InputError(
                f"{last_path}: --resume continues the run on the data it started with, but {data} [{ds.split}] "
                f"({role} split) now holds {counts}: resume on that data, or train into a new --out"
            )


def train_detector(
    data: str | Path,
    fmt: str,
    train_split: str | None,
    val_split: str | None,
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    explicit_fields: Collection[str] = (),
    progress: bool = True,
    device: str | None = None,
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Train a detector; returns the final metrics dict (also written to ``out/metrics.json``).

    With ``resume`` the run continues with the recipe saved in ``out/last.pt``. ``explicit_fields`` names the
    ``cfg`` fields the caller set on purpose (CLI options, keys of a --config file): on resume each must equal
    the saved recipe's, else InputError, except ``threads``, which applies to this invocation only.

    ``stop_after_epochs`` ends this invocation after that many epochs as if it had been killed right after
    writing last.pt (tests use it to check ``resume``).
    """
    import torch

    from smearsight.fileio import atomic_write_json, remove_stale_temp_files
    from smearsight.train.backbones import backbone_normalization
    from smearsight.train.checkpoint import load_checkpoint, save_checkpoint
    from smearsight.train.detector import plots
    from smearsight.train.detector.config import DetectorModelConfig
    from smearsight.train.detector.data import DetectorDataset, check_class_names, collate, load_split
    from smearsight.train.detector.ema import ModelEma
    from smearsight.train.detector.evaluate import run_evaluation
    from smearsight.train.detector.predictor import Predictor
    from smearsight.train.detector.progress import make_progress
    from smearsight.train.detector.torch_model import build_from_config, model_config_for
    from smearsight.train.detector.train_model import DetectorTrainWrapper

    out = Path(out)
    last_path = out / "last.pt"
    resumed: dict[str, Any] | None = None
    if resume:
        if not last_path.is_file():
            raise InputError(f"{last_path}: nothing to resume (no last.pt in the run folder)")
        resumed = load_checkpoint(last_path, kind="detector")
        missing = [k for k in ("model_state", "optimizer", "ema", "rng", "train_config", "epoch") if k not in resumed]
        if missing:
            raise InputError(f"{last_path}: not a resumable last.pt (no training state: {', '.join(missing)}); "
                             "is it a copy of best.pt?")
        cfg = _resumed_recipe(resumed, cfg, explicit_fields, last_path)
        check_resumed_inputs(resumed.get("data") or {}, {"format": fmt, "train_split": train_split,
                                                        "val_split": val_split}, last_path, "its own splits")
    elif last_path.exists():
        raise InputError(f"{out}: run folder already holds last.pt; pass --resume to continue it or pick a new --out")
    elif (out / "best.pt").exists():  # a finished run whose last.pt is gone: never overwrite it
        raise InputError(f"{out}: run folder already holds best.pt of another run (no last.pt to resume); "
                         "pick a new --out")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    train_ds = load_split(data, fmt, train_split, "training split", verify_images=True)
    val_ds = load_split(data, fmt, val_split, "validation split", verify_images=True) if val_split is not None else None
    if val_ds is not None:
        check_class_names(train_ds.class_names, val_ds.class_names, f"{data} [{val_split}]", "the training split's")
    if train_ds.num_boxes == 0:
        raise InputError(f"{data}: training split {train_split!r} holds no boxes (nothing to learn)")
    if val_ds is not None and val_ds.num_boxes == 0:
        raise InputError(f"{data}: validation split {val_split!r} holds no boxes (mAP cannot select best.pt); "
                         "pass --val-split none to train without validation")

    if resumed is not None:
        check_class_names(resumed["class_names"], train_ds.class_names, f"{data} [{train_split}]", f"{last_path}'s")
        _check_resumed_data(resumed, {"train": train_ds, "val": val_ds}, data, last_path)
        image_size = list(resumed["image_size"])
        anchors = AnchorConfig(**resumed["anchors"])
        model_cfg = DetectorModelConfig.from_dict(resumed["model_config"])
        mean, std = resumed["normalization"]["mean"], resumed["normalization"]["std"]
        model = build_from_config(model_cfg, pretrained=False)
    else:
        image_size, anchors, backbone = resolve_recipe(cfg, train_ds)
        model_cfg = model_config_for(cfg.variant, len(train_ds.class_names), anchors.levels,
                                     anchors.anchors_per_location, backbone)
        pretrained: bool | str = cfg.backbone_weights or cfg.pretrained
        model = build_from_config(model_cfg, pretrained=pretrained)
        mean, std = backbone_normalization(backbone)
    # channels_last: PyTorch's CPU (oneDNN) depthwise-conv backward is 3-4x faster in NHWC; fine on CUDA too.
    model.to(dev, memory_format=torch.channels_last)
    frozen = freeze_backbone_stages(model, cfg.freeze_stages) if (cfg.pretrained or cfg.backbone_weights) else []
    wrapper = DetectorTrainWrapper(model, anchors, cfg.matcher, cfg.loss, seed=cfg.seed)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = ModelEma(model, cfg.ema_decay)
    use_amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    train_set = DetectorDataset(train_ds, (image_size[0], image_size[1]), mean, std, cfg.augment, seed=cfg.seed)
    data_record = {"format": fmt, "train_split": train_split, "val_split": val_split,
                   "train_fingerprint": train_ds.fingerprint(),
                   "val_fingerprint": val_ds.fingerprint() if val_ds is not None else None}
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else math.inf

    state: dict[str, Any] = {
        "cfg": cfg, "model_config": model_cfg, "mean": list(mean), "std": list(std), "image_size": image_size,
        "class_names": list(train_ds.class_names), "anchors": anchors,
        "epoch": 0, "step": 0, "elapsed": 0.0, "history": [], "best_map50": -1.0,
    }
    if resumed is not None:
        model.load_state_dict(resumed["model_state"])
        optimizer.load_state_dict(resumed["optimizer"])
        ema.load_state_dict(resumed["ema"])
        if resumed.get("scaler"):  # AMP loss scale (CUDA); empty when AMP is off
            scaler.load_state_dict(resumed["scaler"])
        for key in ("epoch", "step", "history", "best_map50"):
            state[key] = resumed[key]
        state["elapsed"] = resumed["elapsed_s"]
        torch.set_rng_state(resumed["rng"]["torch"])
        if "matcher" in resumed["rng"]:  # checkpoints before the matcher's state was saved lack it
            wrapper.generator.set_state(resumed["rng"]["matcher"])
        log.info("resumed %s at epoch %d (step %d)", last_path, state["epoch"], state["step"])

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out, ("last.pt", "best.pt", "metrics.json", "curves.png"))  # left by a kill -9
    log.info("input %sx%s, anchors levels %s (%d anchors), %s, device %s", image_size[0], image_size[1],
             anchors.levels, anchors.num_anchors((image_size[0], image_size[1])), model_cfg.variant, dev)

    def progress_now() -> float:
        return max(state["step"] / total_steps, state["elapsed"] / budget_s)

    eval_caps = cfg.evaluation_caps(len(state["class_names"]))

    def evaluate_ema() -> dict[str, Any] | None:
        if val_ds is None:
            return None
        pred = Predictor(ema.module, anchors, image_size, mean, std, score_threshold=cfg.eval_score_threshold,
                         iou_threshold=cfg.iou_threshold, device=dev, **eval_caps)
        metrics = run_evaluation(pred, val_ds, None, max_dets=cfg.max_detections, progress=False,
                                 batch_size=cfg.batch_size)
        ema.module.train(False)
        return metrics

    run_start = time.monotonic() - state["elapsed"]
    epochs_this_call = 0
    finished = progress_now() >= 1.0 or state["epoch"] >= cfg.epochs
    with make_progress(enabled=progress) as bar:
        overall = bar.add_task("training", total=total_steps, completed=state["step"])
        while not finished:
            epoch = state["epoch"]
            train_set.epoch = epoch
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            loader = torch.utils.data.DataLoader(
                train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_set) >= cfg.batch_size,
                num_workers=cfg.workers, collate_fn=collate, generator=gen,
            )
            model.train()
            for module in frozen:
                module.eval()
            sums: dict[str, float] = {}
            n_batches = 0
            ep_task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader))
            epoch_start = last_log = time.monotonic()
            for images, boxes, labels, _ in loader:
                raise_if_interrupted()
                factor = lr_factor(progress_now(), state["step"], warmup_steps, cfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * group["lr_mult"] * factor
                images = images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                boxes = [b.to(dev) for b in boxes]
                labels = [lb.to(dev) for lb in labels]
                with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                    losses = wrapper(images, boxes, labels)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise SmearSightError(
                        f"training diverged at step {state['step']} (loss {loss.item()}): lower --lr or "
                        "check the data"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                ema.update(model)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n_batches += 1
                state["step"] += 1
                state["elapsed"] = time.monotonic() - run_start
                info = f"loss {sums['loss'] / n_batches:.3f} lr {cfg.lr * factor:.2e}"
                bar.update(ep_task, advance=1, info=info)
                bar.update(overall, completed=state["step"], info=f"{state['elapsed'] / 60:.1f} min")
                if not progress and time.monotonic() - last_log > 60:
                    last_log = time.monotonic()
                    log.info("step %d (epoch %d): %s, %.1f s/step", state["step"], epoch + 1, info,
                             (time.monotonic() - epoch_start) / n_batches)
                if progress_now() >= 1.0:
                    break
            bar.update(ep_task, visible=False)
            state["epoch"] = epoch + 1
            finished = progress_now() >= 1.0 or state["epoch"] >= cfg.epochs
            record: dict[str, Any] = {"epoch": state["epoch"], "step": state["step"],
                                      "elapsed_min": round(state["elapsed"] / 60, 2),
                                      **{k: v / max(n_batches, 1) for k, v in sums.items()},
                                      "map50": None, "map": None}
            if finished or state["epoch"] % cfg.eval_every == 0:
                metrics = evaluate_ema()
                if metrics is not None:
                    record["map50"], record["map"] = metrics["map50"], metrics["map"]
                    record["recall"] = metrics["recall"]
                    if metrics["map50"] > state["best_map50"]:
                        state["best_map50"] = metrics["map50"]
                        save_checkpoint(out / "best.pt", {**_checkpoint_payload(state, ema.module.state_dict()),
                                                          "val_metrics": metrics})
            state["history"].append(record)
            state["elapsed"] = time.monotonic() - run_start
            log.info("epoch %d: %s", state["epoch"], {k: v for k, v in record.items() if v is not None})
            if progress:
                bar.console.print(
                    f"epoch {state['epoch']}: loss {record.get('loss', float('nan')):.4f}"
                    + (f"  val mAP@0.5 {record['map50']:.4f}  mAP {record['map']:.4f}" if record["map50"] is not None
                       else "")
                    + f"  ({record['elapsed_min']} min)"
                )
            payload = _checkpoint_payload(state, ema.module.state_dict())
            payload.update({"model_state": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "ema": ema.state_dict(), "scaler": scaler.state_dict(),
                            "rng": {"torch": torch.get_rng_state(), "matcher": wrapper.generator.get_state()},
                            "data": data_record})
            save_checkpoint(last_path, payload)
            if val_ds is None:
                save_checkpoint(out / "best.pt", _checkpoint_payload(state, ema.module.state_dict()))
            plots.training_curves(state["history"], out / "curves.png")
            atomic_write_json(out / "metrics.json", {"history": state["history"], "best_map50": state["best_map50"],
                                                     "image_size": image_size, "anchors": anchors.to_dict()})
            epochs_this_call += 1
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs and not finished:
                return {"interrupted": True, "epochs_done": state["epoch"], "history": state["history"]}

    if val_ds is None and epochs_this_call == 0:  # a finished run resumed: a kill may have come between last.pt
        # and best.pt in its last epoch, leaving best.pt missing or an epoch behind
        save_checkpoint(out / "best.pt", _checkpoint_payload(state, ema.module.state_dict()))
    summary: dict[str, Any] = {"history": state["history"], "best_map50": state["best_map50"],
                               "image_size": image_size, "anchors": anchors.to_dict(),
                               "epochs_done": state["epoch"], "steps": state["step"],
                               "train_minutes": round(state["elapsed"] / 60, 2),
                               "device": str(dev), "threads": torch.get_num_threads()}
    if val_ds is not None and (out / "best.pt").is_file():
        best = load_checkpoint(out / "best.pt", kind="detector")
        pred = Predictor.from_checkpoint(best, score_threshold=cfg.eval_score_threshold, device=dev,
                                         **eval_caps)
        summary["val"] = run_evaluation(pred, val_ds, out / "val", max_dets=cfg.max_detections, progress=progress,
                                        plot_score_threshold=cfg.score_threshold, batch_size=cfg.batch_size)
    atomic_write_json(out / "metrics.json", summary)
    return summary
