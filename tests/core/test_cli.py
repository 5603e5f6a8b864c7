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


def test_an_error_raised_while_ctrl_c_unwinds_is_reported_as_interrupted(monkeypatch, capsys):
    """A file writer cut short by Ctrl-C (torch.save) can fail again as it closes: still 'interrupted'."""
    import smearsight.cli as cli

    def command(**_kw):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("unexpected pos 1234 vs 1200")  # noqa: B012 - what the writer's close does

    monkeypatch.setattr(cli, "app", command)
    assert main(["anything"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"

    def bug(**_kw):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(cli, "app", bug)
    with pytest.raises(RuntimeError, match="a real bug"):  # not every error is an interruption
        main(["anything"])
