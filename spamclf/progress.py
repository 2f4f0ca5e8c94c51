"""Progress bars for long work outside Lightning's loops (the prefix cache build, prediction over a file),
in the style of the trainer's rich bar, on stderr, and quiet when stderr is not a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True,
                 console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`. Draws a bar when `enabled` and the console is a terminal (stderr by default);
    otherwise `advance` does nothing. The bar disappears when the work ends (the log line stays)."""
    console = console or Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield lambda n: None
        return
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
