"""``smearsight run``: the device's main job (camera -> models -> annotated picture, recorded)."""

from __future__ import annotations

from pathlib import Path

import typer

from smearsight.cli_app import app


@app.command("run")
def run_command(
    source: str = typer.Argument(
        "synth://", help="Frame source: synth://, v4l2:///dev/video0, 0, csi://0, file://video.mp4, file://dir/, "
        "or a GStreamer pipeline."
    ),
    sink: str = typer.Argument(
        None, help="Output: display://0, http://127.0.0.1:8080 (this host) or http://:8080 (every network "
        "interface: a tablet on the lab network), file://out.mp4, file://dir/, null:// "
        "(default: a window when a display is available, else file://smearsight-out.mp4).",
        show_default=False,
    ),
    models: Path = typer.Option(None, "--models", help="Folder with detector/ and morphology_<part>/ "
                                "(default: the demo models shipped in the package)."),
    backend: str = typer.Option("auto", "--backend", help="trt | onnx | auto (TensorRT when its engine fits)."),
    headless: bool = typer.Option(False, "--headless", help="Never open a window."),
    max_frames: int = typer.Option(None, "--max-frames", min=1, help="Stop after N processed frames."),
    record: Path = typer.Option(None, "--record", help="Record the session into this SQLite file."),
    stats_json: Path = typer.Option(None, "--stats-json", help="Write frames, fps, per-stage latency medians "
                                    "and per-class counts to this JSON file."),
    loop: bool = typer.Option(False, "--loop", help="Restart a video or image folder at its end."),
    fullscreen: bool = typer.Option(False, "--fullscreen", help="Full-screen window (display://)."),
    wait_for_display: bool = typer.Option(
        False, "--wait-for-display", help="display://: when the screen is not up yet (boot), keep running and "
        "open the window once it is, instead of exiting."),
    no_morphology: bool = typer.Option(False, "--no-morphology", help="Skip the sperm morphology models."),
    morphology_every_frame: bool = typer.Option(
        False, "--morphology-every-frame", help="Judge every sperm on every frame instead of carrying each cell's "
        "result along with the stage's motion."),
    precision: str = typer.Option("auto", "--precision", help="Detector: fp32 | int8 (detector_int8/) | auto "
                                  "(int8 when present on a CPU-only device)."),
    detect_every: str = typer.Option(
        "auto", "--detect-every", help="Run the detector on every Nth frame only and move its boxes with the "
        "stage on the frames between (cells entering the field are boxed at the next detected frame; a jump, "
        "a focus change or a long stage move forces detection). auto: every frame while that keeps up with "
        "--target-fps (the camera's own pace aside), else the smallest interval that does, at most 4. "
        "1: every frame. async: the detector runs on its own thread on the latest frame, and every frame shows "
        "its newest boxes moved with the stage (frames paced at --target-fps; the boxes are one to two "
        "detector runs old)."),
    target_fps: float = typer.Option(
        10.0, "--target-fps", min=0.1, max=1000.0, help="Frame rate --detect-every auto aims for, and the rate "
        "frames are read at with --detect-every async (also the rate of a video made from a camera)."),
    morphology_budget_ms: float = typer.Option(
        100.0, "--morphology-budget-ms", min=0.0, help="About how long a frame may spend judging sperm new to "
        "the view (at least one crop); the others are judged on the next frames. 0: no limit, every new sperm "
        "at once. Not with --morphology-every-frame, which judges every sperm on every frame."),
    overlap: bool = typer.Option(
        False, "--overlap/--sequential", help="Run the models one frame ahead on their own thread while the main "
        "thread draws, shows and records (meant for a detector on a GPU; on a CPU-only device it gains nothing), "
        "or finish each frame before reading the next."),
    tile: bool = typer.Option(
        True, "--tile/--shrink", help="Frames larger than the input of a detector exported with resize 'pad' "
        "(one that learned cells at the camera's pixel size): detect them at their own scale in overlapping "
        "input-sized tiles, one detector run per tile; or shrink them to fit the input (faster, but the cells "
        "look smaller than the detector learned them and small ones are missed)."),
    panel: str = typer.Option(None, "--panel", help="Serial port of an attached panel (e.g. /dev/ttyUSB0, loop://)."),
    captures: Path = typer.Option(Path("captures"), "--captures", help="Folder for fields captured from the panel."),
) -> None:
    """Run the detector (and the morphology models) on a source and show or save the annotated frames.

    With no arguments: the synthetic smear slide through the built-in demo models.
    """
    import logging
    import math

    from rich.console import Console

    from smearsight.errors import InputError
    from smearsight.runtime.pipeline import RunConfig, run, stats_text
    from smearsight.runtime.stage_motion import parse_detect_every

    if backend not in ("auto", "onnx", "trt"):
        raise InputError(f"--backend: '{backend}' is not one of auto, onnx, trt")
    if not math.isfinite(morphology_budget_ms):  # inf passes typer's min=, then every frame failed
        raise InputError(f"--morphology-budget-ms: expected a finite number, got {morphology_budget_ms}")
    every = parse_detect_every(detect_every)
    console = Console(stderr=True, highlight=False, soft_wrap=True)  # one line each, also in the journal
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = RunConfig(source=source, sink=sink, models=models, backend=backend, headless=headless,
                    max_frames=max_frames, record=record, stats_json=stats_json, loop=loop, fullscreen=fullscreen,
                    wait_display=wait_for_display,
                    morphology=not no_morphology, morphology_reuse=not morphology_every_frame, precision=precision,
                    detect_every=every, target_fps=target_fps,
                    morphology_budget_s=morphology_budget_ms / 1000.0 if morphology_budget_ms > 0 else None,
                    overlap=overlap, tile=tile, panel=panel, captures=captures)
    stats = run(cfg, echo=lambda msg: console.print(msg, markup=False))
    console.print(stats_text(stats), markup=False)
