"""``bwacal evaluate``: accuracy of a model on an HDF5 file, optionally against a reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import user_errors
from cli.main import app
from cli.options import DEFAULT_BATCH_SIZE, BatchSize, Data, Json, Quiet, Reference, Runtime, Verbose
from cli.progress import progress_bar


def load_pair(model: Path, reference: Path | None, runtime: str):
    """Forwards for a model and its optional reference on one runtime; both must take the same input and classes."""
    from bwacal.errors import BwacalError, ModelError
    from bwacal.evaluate import RUNTIMES, load_forward

    if runtime not in RUNTIMES:
        raise BwacalError(f"--runtime must be one of: {', '.join(RUNTIMES)}; got '{runtime}'")
    forward, input_shape, num_classes = load_forward(model, runtime)
    ref_forward = None
    if reference is not None:
        ref_forward, ref_shape, ref_classes = load_forward(reference, runtime)
        if (ref_shape, ref_classes) != (input_shape, num_classes):
            raise ModelError(f"{reference}: takes {ref_shape} and gives {ref_classes} classes but {model} takes "
                             f"{input_shape} and gives {num_classes}; a reference must match the model")
    return forward, ref_forward, input_shape, num_classes


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    *,
    data: Data,
    reference: Reference = None,
    runtime: Runtime = "bwacal",
    json_out: Json = False,
    batch_size: BatchSize = DEFAULT_BATCH_SIZE,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Top-1 (top-5 with more than 5 classes) and per-class accuracy; with --reference, top-1 agreement.

    Example: bwacal evaluate data/zoo/resnet20.onnx --data data/fmnist_val.h5
    """
    from bwacal.data import open_dataset
    from bwacal.evaluate import evaluate

    with user_errors(verbose):
        forward, ref_forward, input_shape, num_classes = load_pair(model, reference, runtime)
        with open_dataset(data, input_shape=input_shape, num_classes=num_classes) as ds:
            with progress_bar("evaluating", ds.n, quiet) as progress:
                result = evaluate(forward, ds, batch_size=batch_size, reference=ref_forward, progress=progress)

    if json_out:
        out = {"model": str(model), "data": str(data), "runtime": runtime,
               "reference": None if reference is None else str(reference), "num_classes": num_classes,
               **result.to_dict()}
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"model: {model} ({runtime})")
    typer.echo(f"data: {data}, {result.n} images")
    if result.top1 is not None:
        typer.echo(f"top-1: {pct(result.top1)} ({result.correct}/{result.n})")
        if result.top5 is not None:
            typer.echo(f"top-5: {pct(result.top5)}")
    else:
        typer.echo("top-1: n/a (the data has no labels)")
    if result.agreement is not None:
        ref_acc = f", its top-1 {pct(result.reference_top1)}" if result.reference_top1 is not None else ""
        typer.echo(f"agreement with {reference}: {pct(result.agreement)} of top-1 predictions{ref_acc}")
    if result.per_class is not None:
        typer.echo("per class:")
        typer.echo(f"  {'class':>5}  {'images':>6}  {'top-1':>7}")
        for k, (acc, count) in enumerate(zip(result.per_class, result.class_counts)):
            typer.echo(f"  {k:>5}  {count:>6}  {pct(acc):>7}")
