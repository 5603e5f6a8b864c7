"""``smearsight data check`` and ``smearsight data convert``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from smearsight.cli_app import data_app
from smearsight.errors import InputError

_FORMAT_HELP = "Dataset format: coco, voc or yolo."


@contextmanager
def _progress(console, description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient rich progress bar (with ETA) driven by a reader's ``progress(done, total)`` calls."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@data_app.command("check")
def check_command(
    path: Path = typer.Argument(..., help="Dataset folder (or, for COCO, an annotation JSON file)."),
    fmt: str = typer.Option(..., "--format", "-f", help=_FORMAT_HELP),
    split: str | None = typer.Option(None, "--split", "-s", help="Split name (default: the whole dataset)."),
    fast: bool = typer.Option(False, "--fast", help="Read only image headers instead of decoding every image."),
) -> None:
    """Validate a dataset: print a summary table and every bad record; exit 1 if any record is bad.

    Bad records: boxes outside the image or of zero/negative size, unknown classes, missing or
    unreadable images, malformed annotation files, and image sizes that disagree with the annotation.
    Box sizes in the table are sqrt(w*h) in pixels (p5 / p50 / p95 per class).
    """
    from rich.console import Console

    from .check import TINY_BOX_PX, render_summary, tiny_box_notes
    from .formats import read_dataset
    from .images import low_bit_depth_note

    console = Console(highlight=False, soft_wrap=True)
    with _progress(console, "checking images") as progress:
        ds, problems = read_dataset(path, fmt, split, verify_images=not fast, progress=progress)
    title = f"{path} ({fmt.lower()}{f', split {split}' if split else ''})"
    console.print(render_summary(ds, title))
    if len(ds) == 0 and not problems:
        raise InputError(f"{path}: no images found{f' in split {split!r}' if split else ''} (nothing to check)")
    notes = tiny_box_notes(ds)
    if notes:
        console.print(f"\n{len(notes)} box(es) with a side under {TINY_BOX_PX:g} px (valid, but worth a look):")
        for line in notes:
            console.print(f"  note: {line}", markup=False)
    if fmt.lower() == "voc" and split is None:
        from .voc import images_without_annotation

        lone = images_without_annotation(path, ds)
        if lone:
            console.print(f"\n{len(lone)} image(s) in JPEGImages without an annotation file, not read (a negative "
                          "needs an XML file without <object>):")
            for image in lone:
                console.print(f"  note: {image}", markup=False)
    dark = [] if fast else [n for n in map(low_bit_depth_note, (r.path for r in ds.images)) if n]
    if dark:
        console.print(f"\n{len(dark)} image(s) with 16-bit pixels that will look nearly black:")
        for line in dark:
            console.print(f"  note: {line}", markup=False)
    if problems:
        console.print(f"\n[bold red]{len(problems)} bad record(s):[/]")
        for problem in problems:
            console.print(f"  {problem}", markup=False)
        raise InputError(f"{path}: {len(problems)} bad record(s) (listed above)")
    console.print("\n[green]no bad records[/]")


@data_app.command("convert")
def convert_command(
    src: Path = typer.Argument(..., help="Source dataset folder (or, for COCO, an annotation JSON file)."),
    src_fmt: str = typer.Option(..., "--from", help="Source format: coco, voc or yolo."),
    dst_fmt: str = typer.Option(..., "--to", help="Destination format: coco, voc or yolo."),
    out: Path = typer.Option(..., "--out", "-o", help="Destination dataset folder."),
    split: str | None = typer.Option(None, "--split", "-s", help="Split to convert (default: the whole dataset)."),
    link: bool = typer.Option(False, "--link", help="Hard-link images instead of copying (copies across disks)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Drop bad records instead of refusing to convert."),
) -> None:
    """Convert a dataset between COCO, Pascal VOC and YOLO, copying (or linking) its images.

    Boxes are preserved up to the destination's precision (VOC stores 1-based pixel indices; integral
    boxes round-trip exactly). A source with bad records is refused unless --skip-bad is given.
    """
    from rich.console import Console

    from smearsight.fileio import check_output_dir

    from .formats import read_dataset, write_dataset

    check_output_dir(out)
    console = Console(highlight=False, soft_wrap=True)
    with _progress(console, "reading") as progress:
        ds, problems = read_dataset(src, src_fmt, split, progress=progress)
    if problems:
        if not skip_bad:
            for problem in problems:
                console.print(f"  {problem}", markup=False)
            raise InputError(
                f"{src}: {len(problems)} bad record(s) (listed above); fix them or pass --skip-bad to drop them"
            )
        console.print(f"[yellow]dropping {len(problems)} bad record(s)[/] (see smearsight data check)")
    out_split = split or ds.split
    try:
        result = write_dataset(ds, out, dst_fmt, out_split, image_mode="link" if link else "copy")
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise InputError(f"--out {out}: cannot write the dataset ({exc.strerror or exc}{where})") from None
    console.print(
        f"wrote {len(ds)} images, {ds.num_boxes} boxes, {len(ds.class_names)} classes as {dst_fmt.lower()} "
        f"to {result}",
        markup=False,
    )
