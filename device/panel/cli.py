"""``smearsight device serial-monitor`` and ``smearsight device panel-sim``."""

from __future__ import annotations

import sys

import typer

from smearsight.cli_app import device_app
from smearsight.errors import InputError


def _never_opened(port: str, reason: str) -> InputError:
    why = f" ({reason})" if reason else ""
    return InputError(f"{port}: could not be opened during the whole run{why}; check the device path and permissions")


def _check_common(port: str, baud: int, duration: float | None) -> None:
    if not port.strip():
        raise InputError("PORT: empty; expected a serial device such as /dev/ttyUSB0 or a pyserial URL (loop://)")
    if baud <= 0:
        raise InputError(f"--baud: {baud} is not a baud rate; expected a positive number such as 115200")
    if duration is not None and duration <= 0:
        raise InputError(f"--duration: {duration} must be positive (seconds)")


@device_app.command("serial-monitor")
def serial_monitor(
    port: str = typer.Argument(..., help="Serial device (/dev/ttyUSB0) or pyserial URL (loop://, socket://h:p)."),
    baud: int = typer.Option(115200, "--baud", help="Baud rate."),
    duration: float | None = typer.Option(None, "--duration", help="Stop after this many seconds (default: Ctrl-C)."),
    jsonl: bool = typer.Option(False, "--jsonl", help="One JSON object per event instead of pretty output."),
    stats_every: float = typer.Option(0.0, "--stats-every", help="Print the error counters every N seconds."),
    require_connect: bool = typer.Option(
        True, "--require-connect/--no-require-connect", help="Exit 1 if the port never opened."
    ),
) -> None:
    """Decode live panel-protocol traffic: every frame, CRC errors, garbage bytes, reconnects."""
    from smearsight.device.panel.monitor import run_monitor

    _check_common(port, baud, duration)
    stats = run_monitor(port, baudrate=baud, duration=duration, jsonl=jsonl, stats_every=stats_every)
    if require_connect and stats.opens == 0:
        raise _never_opened(port, stats.open_error)


@device_app.command("panel-sim")
def panel_sim(
    port: str = typer.Argument(..., help="Serial device or pyserial URL the simulated panel talks on."),
    baud: int = typer.Option(115200, "--baud", help="Baud rate."),
    script: str | None = typer.Option(
        None,
        "--script",
        help="Comma-separated commands sent one per interval: ping,start,stop,freeze,unfreeze,toggle,capture,wait.",
    ),
    interval: float = typer.Option(0.5, "--interval", help="Seconds between scripted commands."),
    duration: float | None = typer.Option(None, "--duration", help="Stop after this many seconds."),
    repeat: bool = typer.Option(False, "--repeat", help="Loop the script until --duration (or Ctrl-C)."),
    interactive: bool | None = typer.Option(
        None,
        "--interactive/--no-interactive",
        help="Single-key commands (p ping, s start, x stop, f freeze, c capture, q quit); default: on when "
        "stdin is a terminal and no --script is given.",
    ),
    label: str = typer.Option("", "--label", help="Slide label sent with 'start'."),
    jsonl: bool = typer.Option(False, "--jsonl", help="One JSON object per event instead of pretty output."),
) -> None:
    """Play a panel: show what the runtime sends, send start/stop/freeze/capture/ping."""
    from smearsight.device.panel.panel_sim import PanelSim, parse_script

    _check_common(port, baud, duration)
    if interval <= 0:
        raise InputError(f"--interval: {interval} must be positive (seconds)")
    try:
        words = parse_script(script) if script else []
    except ValueError as exc:
        raise InputError(f"--script: {exc}") from None
    if interactive is None:
        interactive = not words and sys.stdin.isatty()
    if interactive and not sys.stdin.isatty():
        raise InputError("--interactive: stdin is not a terminal; use --script ... instead")
    sim = PanelSim(port, baudrate=baud, label=label, jsonl=jsonl)
    result = sim.run(script=words, interval=interval, duration=duration, repeat=repeat, interactive=interactive)
    if not result.connected:
        raise _never_opened(port, sim.link.stats.open_error)
