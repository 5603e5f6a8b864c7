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


def _main_as_another_user(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in a forked child that is not the files' owner (root reads any file: it drops to nobody;
    a fork, as this Python may live where nobody may execute it); returns the exit code and stderr."""
    import os

    main(argv)  # once as this user: every module the command imports is loaded before the child drops rights
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            sys.stderr = os.fdopen(write_end, "w")  # where the CLI's console writes (pytest captures the rest)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            code = main(argv)
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        err = pipe.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


@pytest.fixture
def shared_dir():
    """A folder that any user can reach (pytest's tmp_path is private to its owner), removed afterwards."""
    import shutil
    import tempfile
    from pathlib import Path

    top = Path(tempfile.mkdtemp(prefix="smearsight-perm-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("unreadable", ["manifest.json", "model.onnx"])
def test_a_file_this_user_may_not_read_is_one_line_not_a_traceback(unreadable: str, shared_dir, capsys) -> None:
    """A models folder copied as root and read by the device's own user: one line naming the file."""
    import os
    import shutil
    from pathlib import Path

    import smearsight

    models = shared_dir / "m"
    shutil.copytree(Path(smearsight.__file__).parent / "models" / "morphology_head", models)
    models.chmod(0o755)
    target = models / unreadable
    code, err = _main_as_another_user(["export", "inspect", str(models)])
    assert code == 0, err  # readable: the command works for the other user
    target.chmod(0)
    if os.geteuid() != 0 and os.access(target, os.R_OK):
        pytest.skip("this user reads files whatever their mode")
    capsys.readouterr()
    code, err = _main_as_another_user(["export", "inspect", str(models)])
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(target) in lines[0] and "ermission denied" in lines[0], err


def test_a_file_another_user_owns_is_named_not_the_temporary_file_beside_it(shared_dir, capsys) -> None:
    """deploy bundle --out over a bundle another user made in a shared sticky folder (such as /tmp): the folder
    check passes (anyone may add files there), but only the file's owner may replace it. The one line must name
    the output; before, it named the write's temporary file (.b.tar.gz.XXXXXXXX.tmp), which no longer exists."""
    import os
    import shutil
    from pathlib import Path

    import smearsight

    if os.geteuid() != 0:
        pytest.skip("needs root to leave a file owned by another user")
    models = shared_dir / "m"
    shutil.copytree(Path(smearsight.__file__).parent / "models" / "morphology_head", models)
    for path in (models, *models.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    folder = shared_dir / "out"
    folder.mkdir()
    out = folder / "b.tar.gz"
    out.write_bytes(b"another user's bundle")
    folder.chmod(0o1777)
    code, err = _main_as_another_user(["deploy", "bundle", str(models), "--version", "1.0", "--out", str(out)])
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {out}: ") and ".tmp" not in lines[0], err
    assert [p.name for p in folder.iterdir()] == ["b.tar.gz"]  # no temporary file left
