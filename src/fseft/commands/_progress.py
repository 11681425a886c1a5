"""The one progress-bar layout of the CLI (rich): description, bar, done/total, extra fields, times."""

from __future__ import annotations

from typing import Any


def progress_bar(console: Any = None, *fields: str, transient: bool = True) -> Any:
    """A ``rich.progress.Progress`` with fseft's standard columns.

    Args:
        console: The rich console to draw on (None: rich's default). On a console that is not a
            terminal the bar is disabled, so logs and pipes get no control characters.
        fields: Extra text columns, rich format strings such as ``"loss {task.fields[loss]}"``.
        transient: Remove the bar when done.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    kwargs: dict[str, Any] = {"transient": transient}
    if console is not None:
        kwargs.update(console=console, disable=not console.is_terminal)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        **kwargs,
    )
