"""The live display: one rich progress display on stderr, notes printed above it, never into it.

It is drawn only when stderr is a terminal, not with ``--quiet``, not with ``TERM=dumb``; otherwise
notes are plain lines on stderr (none with ``--quiet``) and phases draw nothing. numba compiles are
shown as their own row while they run ("compiling numba kernels (first run only)"), since the first
run of a new install spends a minute or more there.
"""

from __future__ import annotations

import contextlib
import os
import sys

import typer

from cli.common import use_color


def live_terminal(quiet: bool = False) -> bool:
    """Whether a live display is drawn: stderr is a terminal, not ``--quiet``, ``TERM`` is not dumb."""
    return not quiet and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class Display:
    """Phases with a bar and ETA (when their size is known), numba compiles, and notes above them."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.live = live_terminal(quiet)
        self.progress = None
        self.phase_name = None
        self.compiled = 0
        self.compile_seconds = 0.0
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        from bwacal.jitcache import watch_compiles

        if self.live:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            console = Console(stderr=True, no_color=not use_color(), highlight=False)
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                                     TimeRemainingColumn(), console=console, transient=True)
            self._stack.enter_context(self.progress)
            self.task = self.progress.add_task("starting", total=None)
            self.compile_task = self.progress.add_task("", total=None, visible=False)
        self._stack.enter_context(watch_compiles(self._compile_started, self._compile_ended))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self.progress = None
        return False

    def note_cold_cache(self):
        """Say, before any work, that numba has none of bwacal's kernels cached (a first run)."""
        from bwacal.jitcache import FIRST_RUN_SECONDS, cache_state

        state = cache_state()
        if state is not None and state.kernels and state.cold == state.kernels:
            self.note(f"first run: numba compiles bwacal's kernels as they are first used, once (about "
                      f"{FIRST_RUN_SECONDS} s on 2 idle cores, longer on a busy machine); they are cached in "
                      f"{state.where}")

    def note(self, message: str):
        """A line above the display (a plain stderr line without one); nothing with ``--quiet``."""
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            typer.echo(message, err=True)

    def phase(self, name: str, done: int = 0, total: int | None = None):
        """Show phase ``name``, ``done`` of ``total`` (no bar or ETA when ``total`` is None)."""
        if self.progress is None:
            return
        if name != self.phase_name:
            self.phase_name = name
            self.progress.reset(self.task, total=total, completed=done, description=name)
        else:
            self.progress.update(self.task, total=total, completed=done)

    def update(self, done: int, total: int | None = None, description: str | None = None):
        """Move the current phase's bar; ``description`` replaces its text (the phase keeps its name)."""
        if self.progress is not None:
            fields = {"completed": done, "description": description or self.phase_name or ""}
            if total is not None:
                fields["total"] = total
            self.progress.update(self.task, **fields)

    def _compile_started(self, name):
        if self.progress is not None:
            done = f", {self.compiled} done" if self.compiled else ""
            self.progress.update(self.compile_task, visible=True,
                                 description=f"compiling numba kernels (first run only{done}): {name}")
        elif self.compiled == 0 and not self.quiet:
            typer.echo("compiling numba kernels (first run only; later runs load them from numba's cache)",
                       err=True)

    def _compile_ended(self, name, seconds):
        self.compiled += 1
        self.compile_seconds += seconds
        if self.progress is not None:
            self.progress.update(self.compile_task, visible=False)


@contextlib.contextmanager
def progress_bar(description: str, total: int, quiet: bool = False):
    """Yield a ``progress(done, total)`` callback over one phase; None when nothing is drawn."""
    with Display(quiet) as display:
        if not display.live:
            yield None
            return
        display.phase(description, 0, total)

        def update(done, total=total):
            display.update(done, total)

        yield update
