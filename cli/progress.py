"""Progress bars: rich, on stderr, only on a terminal and never with --quiet."""

from __future__ import annotations

import contextlib
import sys

from cli.common import use_color


@contextlib.contextmanager
def progress_bar(description: str, total: int, quiet: bool = False):
    """Yield a ``progress(done, total)`` callback; it draws nothing unless stderr is a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True, no_color=not use_color())
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done, total=total):
            bar.update(task, completed=done, total=total)

        yield update
