"""Rich progress bars with ETA shared by the training tools (a no-op stand-in when disabled)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class _NullProgress:
    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def advance(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextlib.contextmanager
def make_progress(enabled: bool = True) -> Iterator[Any]:
    """A rich Progress (description, bar, count, elapsed, ETA, extra ``info`` field) or a no-op stand-in."""
    if not enabled:
        yield _NullProgress()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
    ) as bar:
        orig = bar.add_task

        def add_task(description: str, **kwargs: Any) -> int:
            kwargs.setdefault("info", "")
            return orig(description, **kwargs)

        bar.add_task = add_task  # type: ignore[method-assign]
        yield bar
