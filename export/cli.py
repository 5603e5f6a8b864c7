"""``smearsight export``: onnx, check, int8, engine, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from smearsight.cli_app import export_app
from smearsight.errors import InputError
from smearsight.fileio import check_output_file


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"768x1024"`` -> ``(768, 1024)`` (height x width)."""
    if text is None:
        return None
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--image-size: expected HEIGHTxWIDTH such as 768x1024, got {text!r}") from None
    if height <= 0 or width <= 0:
        raise InputError(f"--image-size: sides must be positive, got {text!r}")
    return height, width


@export_app.command("onnx")
def export_onnx(
    weights: Path = typer.Option(..., "--weights", help="Detector or morphology checkpoint (.pt)."),
    out: Path = typer.Option(..., "--out", help="Output directory for model.onnx and manifest.json."),
    image_size: str | None = typer.Option(
        None, "--image-size",
        help="Detector input HxW (default: the training size, frames letterboxed as in training). Another size "
             "keeps cells at their trained pixel size: frames are padded, not rescaled (larger ones shrunk).",
    ),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    dynamic_batch: bool | None = typer.Option(
        None, "--dynamic-batch/--static-batch", help="Dynamic batch (default: static detector, dynamic morphology)."
    ),
    simplify: bool = typer.Option(True, "--simplify/--no-simplify", help="Simplify the graph with onnxslim."),
    score_threshold: float | None = typer.Option(
        None, "--score-threshold", help="Detector: the score above which the device shows and counts a cell "
        "(default: the checkpoint's; choose it on validation data)."),
    pre_nms_topk: int | None = typer.Option(
        None, "--pre-nms-topk", help="Detector: candidates kept per class before NMS (default: the checkpoint's). "
        "Raise it when exporting for larger frames than the training size or for crowded fields: more anchors "
        "or cells, more candidates (the runtime says when it binds; the GPU decoder takes at most 4096)."),
    max_detections: int | None = typer.Option(
        None, "--max-detections", help="Detector: detections kept per frame (default: the checkpoint's)."),
) -> None:
    """Export a checkpoint to ONNX with its manifest (detector: raw per-anchor outputs, no NMS)."""
    from rich.console import Console

    from smearsight.export.onnx_export import export_checkpoint

    result = export_checkpoint(weights, out, parse_size(image_size), opset, dynamic_batch, simplify,
                               pre_nms_topk=pre_nms_topk, max_detections=max_detections,
                               score_threshold=score_threshold)
    m = result.manifest
    Console().print(
        f"wrote {out / m.onnx_file} ({m.kind}, input {m.input.name}{m.input.shape}, outputs "
        + ", ".join(f"{o.name}{o.shape}" for o in m.outputs)
        + f", simplified={result.simplified}) and {out / 'manifest.json'}"
    )


@export_app.command("check")
def export_check(
    model_dir: Path = typer.Argument(..., help="Directory with model.onnx and manifest.json."),
    weights: Path = typer.Option(..., "--weights", help="The checkpoint it was exported from."),
    count: int = typer.Option(4, "--count", min=1, help="Number of real inputs to compare on."),
    data: Path | None = typer.Option(None, "--data", help="MHSMA folder for morphology crops (else synthetic)."),
    fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Also check FP16 numerical safety."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON."),
) -> None:
    """Compare onnxruntime with PyTorch (errors, detections/decisions) and check FP16 safety. Exit 1 on failure."""
    from rich.console import Console
    from rich.table import Table

    from smearsight.export.parity import check_export
    from smearsight.fileio import atomic_write_json

    if json_out is not None:
        check_output_file(json_out, "--json")
    report = check_export(model_dir, weights, count=count, data=data, fp16=fp16)
    table = Table(title=f"{report.kind} export parity on {report.inputs} inputs")
    for column in ("run", "output", "max abs err", "max rel err", "agreement"):
        table.add_column(column)
    what = "detections" if report.kind == "detector" else "decisions"
    for comparison in (report.fp32, report.fp16):
        if comparison is None:
            continue
        a = comparison.agreement
        agreement = f"{a.matched}/{max(a.reference, a.candidate)} {what} matched" + (
            f" (+{a.borderline} at threshold)" if a.borderline else ""
        )
        for i, err in enumerate(comparison.errors):
            table.add_row(comparison.label if i == 0 else "", err.name, f"{err.max_abs:.3g}", f"{err.max_rel:.3g}",
                          agreement if i == 0 else "")
    console = Console()
    console.print(table)
    if report.fp16 is not None:
        if report.overflow_layers:
            console.print("[red]layers whose activations exceed the float16 range (65504):[/]")
            for name, peak in report.overflow_layers[:20]:
                console.print(f"  {name}: max |x| = {peak:.4g}")
        else:
            console.print("FP16 safety: no activation exceeds the float16 range on these inputs")
    if json_out is not None:
        atomic_write_json(json_out, report.to_dict())
    ok = report.fp32_ok and (report.fp16 is None or report.fp16_ok)
    console.print(f"parity {'[green]PASSED' if ok else '[red]FAILED'}[/] (fp32 tolerance {report.tolerance:.3g})")
    if not ok:
        raise typer.Exit(1)


@export_app.command("engine")
def export_engine_cmd(
    onnx: Path = typer.Option(..., "--onnx", help="model.onnx (its manifest.json must sit beside it)."),
    out: Path = typer.Option(..., "--out", help="Output directory for model.engine and the updated manifest."),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="Allow FP16 kernels."),
    strongly_typed: bool = typer.Option(False, "--strongly-typed", help="Strongly-typed network (types from ONNX)."),
    workspace: int = typer.Option(1024, "--workspace", min=16, help="Builder workspace in MB."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="Timing cache file (loaded and saved)."),
    min_batch: int = typer.Option(1, "--min-batch", min=1),
    opt_batch: int = typer.Option(8, "--opt-batch", min=1),
    max_batch: int = typer.Option(32, "--max-batch", min=1),
) -> None:
    """Build an FP16 TensorRT engine (TensorRT 10) and record the build environment in the manifest."""
    from smearsight.export.engine import EngineOptions, export_engine

    if not min_batch <= opt_batch <= max_batch:
        raise InputError(f"--min-batch {min_batch} <= --opt-batch {opt_batch} <= --max-batch {max_batch} must hold")
    options = EngineOptions(fp16, strongly_typed, workspace, timing_cache, min_batch, opt_batch, max_batch)
    spec = export_engine(onnx, out, options)
    typer.echo(
        f"wrote {out / spec.file}: TensorRT {spec.tensorrt_version}, {spec.gpu_name} (sm {spec.compute_capability}), "
        f"CUDA {spec.cuda_version}"
    )


@export_app.command("int8")
def export_int8_cmd(
    model_dir: Path = typer.Argument(..., help="Float32 detector folder (model.onnx + manifest.json)."),
    out: Path = typer.Option(..., "--out", help="New folder for the int8 model.onnx and its manifest."),
    calibration: str | None = typer.Option(
        None, "--calibration", help="Frame source for calibration (synth://, file://folder/, video); "
        "default: independent synthetic smears."),
    count: int = typer.Option(16, "--count", min=1, help="Calibration frames."),
    check_count: int = typer.Option(8, "--check-count", min=1, help="Synthetic frames to compare float vs int8."),
    min_agreement: float = typer.Option(0.9, "--min-agreement", help="Refuse below this detection agreement."),
    keep_stem_float: bool = typer.Option(True, "--keep-stem-float/--quantize-stem",
                                         help="Leave the first convolution in float."),
    reduce_range: bool = typer.Option(
        True, "--reduce-range/--full-range", help="7-bit weights, exact on every x86 CPU (default); --full-range: "
        "8-bit, only for CPUs with VNNI (on AVX2 alone the integer kernels saturate and detections change)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON."),
) -> None:
    """Quantize a detector to int8 for CPU devices (ONNX Runtime static QDQ) and check it against the float model."""
    from rich.progress import Progress

    from smearsight.export.quantize import quantize_detector
    from smearsight.fileio import atomic_write_json

    if json_out is not None:
        check_output_file(json_out, "--json")
    with Progress(transient=True) as progress:
        task = progress.add_task("quantizing", total=count + check_count)
        report = quantize_detector(
            model_dir, out, calibration=calibration, count=count, check_count=check_count,
            keep_stem_float=keep_stem_float, reduce_range=reduce_range, min_agreement=min_agreement,
            on_frame=lambda label: progress.update(task, advance=1, description=label),
        )
    if json_out is not None:
        atomic_write_json(json_out, report.to_dict())
    typer.echo(
        f"wrote {out / 'model.onnx'} ({report.int8_mb:.1f} MB, float {report.float_mb:.1f} MB): on "
        f"{report.check_frames} check frames the int8 model finds {report.matched}/{report.float_detections} "
        f"float detections (recall {report.recall:.3f}, precision {report.precision:.3f})"
    )


@export_app.command("inspect")
def export_inspect(model_dir: Path = typer.Argument(..., help="Directory with manifest.json.")) -> None:
    """Print the manifest and check the hashes of the files it names (exit 1 on a mismatch)."""
    from rich.console import Console

    from smearsight.manifest import load_manifest, verify_files

    manifest = load_manifest(model_dir)
    console = Console()
    console.print_json(json.dumps(manifest.to_dict()))
    problems = verify_files(model_dir, manifest)
    for problem in problems:
        console.print(f"[red]{problem}[/]")
    if problems:
        raise typer.Exit(1)
    console.print("[green]all files match their sha256 in the manifest[/]")
