"""``bwacal inspect``: what a model contains and how bwacal would treat it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from cli.common import user_errors
from cli.main import app


@app.command("inspect")
def inspect_model(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    *,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False,
):
    """Show a model's inputs, outputs, op counts and parameters.

    Example: bwacal inspect data/zoo/resnet20.onnx
    """
    from bwacal import load_model

    with user_errors(verbose):
        m = load_model(model)
    g = m.graph
    typer.echo(f"model: {model}")
    typer.echo(f"opset: {g.opset}")
    for v in g.inputs:
        typer.echo(f"input: {v.name} {v.shape}")
    for v in g.outputs:
        typer.echo(f"output: {v.name} {v.shape}")
    typer.echo("ops: " + ", ".join(f"{k} x{n}" for k, n in sorted(Counter(n.op_type for n in g.nodes).items())))
    total = sum(int(a.size) for a in g.initializers.values())
    typer.echo(f"parameters: {total}")
