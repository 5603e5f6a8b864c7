import subprocess
import sys

import pytest

from smearsight import __version__
from smearsight.cli import main
from smearsight.cli_app import app

GROUPS = ["data", "train", "eval", "predict", "export", "device", "sessions", "deploy"]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("group", GROUPS)
def test_group_help(group, capsys):
    assert main([group, "--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_every_registered_command_has_help(capsys):
    import typer.main

    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        subcommands = getattr(command, "commands", {}) or {None: command}
        for sub in subcommands:
            args = [name] + ([sub] if sub else []) + ["--help"]
            assert main(args) == 0, args
            out = capsys.readouterr().out
            assert "Usage" in out, args


def test_unknown_command_is_usage_error():
    assert main(["no-such-command"]) == 2


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "smearsight.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"smearsight {__version__}"
