"""Pieces every command shares: the error guard and output helpers."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import typer

from bwacal.errors import BwacalError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


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


def use_color() -> bool:
    """Colour only on a terminal and never when NO_COLOR is set."""
    return sys.stderr.isatty() and "NO_COLOR" not in os.environ
