"""The typer application and its command groups.

Command modules (listed in :data:`smearsight.cli.COMMAND_MODULES`) import these objects and register
their commands on them. Command modules must stay light at import time: torch, tensorrt, pycuda and
other heavy libraries are imported inside the command functions.
"""

from __future__ import annotations

import typer

from smearsight import __version__


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"smearsight {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="smearsight",
    help="SmearSight: find cells in touch-print smears and judge sperm morphology at the microscope.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """SmearSight command line."""


def _group(name: str, help_text: str) -> typer.Typer:
    group = typer.Typer(name=name, help=help_text, no_args_is_help=True, pretty_exceptions_enable=False)
    app.add_typer(group, name=name)
    return group


data_app = _group("data", "Datasets: check, convert, synthesise smears, analyse anchors.")
train_app = _group("train", "Train the cell detector or a morphology model.")
eval_app = _group("eval", "Evaluate a checkpoint on a dataset split (metrics JSON and plots).")
predict_app = _group("predict", "Run a checkpoint on images and write annotated results.")
export_app = _group("export", "Export ONNX models and FP16 TensorRT engines with manifests; check parity.")
device_app = _group("device", "The device: information, serial panel link.")
sessions_app = _group("sessions", "Recorded sessions: list, show, export.")
deploy_app = _group("deploy", "Field updates: bundles, signed TUF repositories, install and rollback.")
