"""``smearsight`` entry point: assembles the command groups and turns errors into one-line messages.

Exit codes: 0 success, 1 bad input (:class:`~smearsight.errors.InputError`), 2 a missing optional
dependency (:class:`~smearsight.errors.MissingDependencyError`), 130 interrupted. When the reader of stdout
goes away (``| head``) the command ends quietly with 1; a full disk behind a redirected stdout is a one-line
error (exit 1), not a silently cut file.

SIGTERM (``systemctl stop``, ``docker stop``) is handled like Ctrl-C, so that commands clean up: ``run``
ends its recorded session, closes the video it writes and writes its stats, then exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys

from smearsight.cli_app import app
from smearsight.errors import SmearSightError, StdoutError
from smearsight.interrupts import signals_as_interrupt

COMMAND_MODULES: tuple[str, ...] = (
    "smearsight.train.datasets.cli",
    "smearsight.train.datasets.synth_cli",
    "smearsight.train.detector.cli",
    "smearsight.train.morphology.cli",
    "smearsight.export.cli",
    "smearsight.runtime.cli",
    "smearsight.device.cli",
    "smearsight.device.panel.cli",
    "smearsight.deploy.cli",
)


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A command module that does not exist (yet) is skipped; a broken import inside one is not.
            if exc.name is None or not name.startswith(exc.name):
                raise


_register_commands()


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # only writes fail with these


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's exit flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _stdout_is_broken() -> bool:
    """True when stdout cannot take what is waiting for it (a full disk behind ``> file``, a closed pipe)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        return True
    return False


def _raised_while_interrupted(exc: BaseException) -> bool:
    """True when ``exc`` arose while a KeyboardInterrupt (Ctrl-C, SIGTERM) was unwinding the command."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return True
        seen.add(id(link))
        link = link.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code (also used by the console script)."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        with signals_as_interrupt():
            result = app(args=argv, prog_name="smearsight", standalone_mode=False)
        try:
            sys.stdout.flush()  # a full disk behind "> file" shows here, not silently at exit
        except BrokenPipeError:  # "| head" leaving early is normal: quiet, exit 1, like click
            return 1
        except OSError as exc:
            raise StdoutError(exc) from None
    except SmearSightError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except OSError as exc:
        # A write that failed for want of space, naming its file (fileio.atomic_open names it), or a file this
        # user may not read or write: one line. Anything else is a bug and shows its traceback.
        if exc.filename is not None and exc.errno in _WRITE_ERRNOS:
            err.print(f"[bold red]error:[/] {escape(str(exc.filename))}: cannot write ({escape(exc.strerror or '')})")
            return 1
        if exc.filename is not None and exc.errno in (errno.EACCES, errno.EPERM):  # a file this user may not use
            err.print(f"[bold red]error:[/] {escape(str(exc.filename))}: {escape(exc.strerror or 'permission denied')} "
                      "(check the file's owner and permissions)")
            return 1
        raise
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:
        if _raised_while_interrupted(exc):  # e.g. torch.save cut short by Ctrl-C fails as it closes its file
            err.print("interrupted")
            return 130
        # Usage errors from the (possibly vendored) click that typer uses: they know how to show themselves.
        import typer

        if isinstance(exc, typer.Exit):
            return exc.exit_code
        if isinstance(exc, typer.Abort):
            err.print("aborted")
            return 1
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            return code
        raise
    if result == 130:  # click hands typer's Exit(130), its form of Ctrl-C / SIGTERM, back as the result
        err.print("interrupted")
    return result if isinstance(result, int) else 0


def _exit_at_once(code: int) -> None:
    """End the process without the interpreter's shutdown, after flushing the logs and the console.

    For an interrupted command: what it left half-done (a ``torch.save`` cut short, whose zip writer writes
    as it is destroyed) can crash the shutdown after "interrupted" was printed ("Fatal Python error:
    PyThreadState_Get ... finalizing", exit -6, or an exit by the signal, -2; seen on a loaded 2-core CI
    machine). Everything this package writes is already durable by then (atomic, fsynced writes).
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def entry() -> None:  # pragma: no cover - console-script shim
    code = main()
    if _stdout_is_broken():
        _silence_stdout()
    if code == 130:
        _exit_at_once(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
