"""Pieces every command shares: the error and interrupt guards, the command group, output helpers."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import signal
import sys
import traceback

import typer
import typer.core
from typer._click.exceptions import NoArgsIsHelpError, NoSuchOption, UsageError

from bwacal.errors import BwacalError
from bwacal.files import JSON_SCHEMA

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130



@contextlib.contextmanager
def user_errors(verbose: bool = False):
    """Turn a ``BwacalError`` (bad input) into one line on stderr and exit code 2.

    With ``verbose`` the traceback is printed too, for bug reports.
    """
    try:
        yield
    except BwacalError as exc:
        if verbose:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def interrupts(message: str):
    """SIGTERM is handled as Ctrl-C; either ends the command with ``message`` on stderr and exit 130."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {message}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def use_color() -> bool:
    """Colour only on a terminal, never when NO_COLOR is set or TERM is dumb."""
    return sys.stderr.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def table(headers, rows, right=()) -> list[str]:
    """Rows as aligned text columns (``right``: the indices of right-aligned columns), two spaces in."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for r in cells:
        out.append("  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                    for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return out


def echo_json(doc: dict):
    """``doc`` with the schema version first, indented, on stdout."""
    typer.echo(json.dumps({"schema": JSON_SCHEMA, **doc}, indent=2))


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except NoArgsIsHelpError:
        raise
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "bwacal"
        message = exc.format_message()
        if isinstance(exc, NoSuchOption) and exc.possibilities:
            close = difflib.get_close_matches(exc.option_name, exc.possibilities, n=1, cutoff=0.0)
            message = f"{exc.message}; did you mean {close[0]}?"
        typer.echo(f"error: {message} (see '{where} -h')", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


class Group(typer.core.TyperGroup):
    """The command group: a usage error (unknown option, missing value) is one ``error:`` line and exit 2,
    with click's suggestion, instead of a boxed usage text."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


def _flag_type(display_type_rich):
    # typer prints a "<bool>" type beside every on/off flag (--force <bool>), which reads as if the
    # flag took a value; a flag has no value to describe
    def without_bool(self, ctx):
        return None if self.is_flag else display_type_rich(self, ctx)

    return without_bool


typer.core.TyperOption.display_type_rich = _flag_type(typer.core.TyperOption.display_type_rich)
