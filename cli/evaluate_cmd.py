"""``bwacal evaluate``: accuracy of a model on an HDF5 file, optionally against a reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np

import typer

from cli.common import echo_json, user_errors
from cli.options import DEFAULT_BATCH_SIZE, BatchSize, Data, InputShape, Json, Quiet, Reference, Runtime, Verbose
from cli.progress import progress_bar


def load_pair(model: Path, reference: Path | None, runtime: str, data: Path, input_shape: str | None = None,
              threads: int | None = None):
    """A model and its optional reference loaded on one runtime (see ``bwacal.evaluate.load_forward``); both
    must take the same input and give the same classes. Dynamic image dims come from ``input_shape``
    (CxHxW) or else from the images in ``data``."""
    from bwacal.data import data_image_shape
    from bwacal.errors import BwacalError, ModelError
    from bwacal.evaluate import RUNTIMES, load_forward
    from bwacal.model import parse_input_shape

    if runtime not in RUNTIMES:
        raise BwacalError(f"--runtime must be one of: {', '.join(RUNTIMES)}; got '{runtime}'")
    shape = parse_input_shape(input_shape) if input_shape is not None else None
    data_shape = data_image_shape(data, shape)
    loaded = load_forward(model, runtime, shape, data_shape, threads)
    ref = None
    if reference is not None:
        ref = load_forward(reference, runtime, shape, data_shape, threads)
        if (ref.input_shape, ref.num_classes) != (loaded.input_shape, loaded.num_classes):
            raise ModelError(f"{reference}: takes {ref.input_shape} and gives {ref.num_classes} classes but {model} "
                             f"takes {loaded.input_shape} and gives {loaded.num_classes}; a reference must match "
                             "the model")
    return loaded, ref


def open_for(data: Path, loaded):
    """``data`` opened and checked against a loaded model's input, layout and classes."""
    from bwacal.data import open_dataset

    return open_dataset(data, input_shape=loaded.input_shape, num_classes=loaded.num_classes, layout=loaded.layout)


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def evaluate_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    *,
    data: Data,
    reference: Reference = None,
    runtime: Runtime = "bwacal",
    json_out: Json = False,
    batch_size: BatchSize = DEFAULT_BATCH_SIZE,
    input_shape: InputShape = None,
    latency: Annotated[bool, typer.Option(
        "--latency", help="Also time the model (and the reference): median wall time of a forward pass per "
                          "--latency-batch size, on images of --data.")] = False,
    latency_batch: Annotated[Optional[list[int]], typer.Option(
        "--latency-batch", help="Batch size to time with --latency (repeatable; default 1 and 32).")] = None,
    latency_runs: Annotated[int, typer.Option("--latency-runs", help="Timed forward passes per batch size.")] = 20,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", help="ONNX Runtime's intra-op threads (default: its own choice).")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Top-1 (top-5 with more than 5 classes) and per-class accuracy; with --reference, top-1 agreement;
    with --latency, the median time of a forward pass per batch size.

    Example: bwacal evaluate data/zoo/resnet20.onnx --data data/fmnist_val.h5 --runtime onnxruntime --latency
    """
    from bwacal.errors import BwacalError
    from bwacal.evaluate import evaluate, measure_latency

    with user_errors(verbose):
        if threads is not None and threads < 1:
            raise BwacalError(f"--threads must be a positive integer, got {threads}")
        loaded, ref = load_pair(model, reference, runtime, data, input_shape, threads)
        with open_for(data, loaded) as ds:
            with progress_bar("evaluating", ds.n, quiet) as progress:
                result = evaluate(loaded.forward, ds, batch_size=batch_size, reference=ref and ref.forward,
                                  progress=progress)
            timings = None
            if latency:
                batches = list(latency_batch or (1, 32))
                images, _ = ds.read(np.arange(min(ds.n, max(batches))))
                timings = {"model": measure_latency(loaded.forward, images, batches, latency_runs)}
                if ref is not None:
                    timings["reference"] = measure_latency(ref.forward, images, batches, latency_runs)

    if json_out:
        out = {"model": str(model), "data": str(data), "runtime": runtime,
               "reference": None if reference is None else str(reference), "num_classes": loaded.num_classes,
               **result.to_dict(), **({"latency": timings} if timings else {})}
        echo_json(out)
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
    if timings:
        threads_note = f", {threads} threads" if threads else ""
        typer.echo(f"latency ({runtime}{threads_note}; median of {latency_runs} runs):")
        for who, rows in timings.items():
            name = model if who == "model" else reference
            for row in rows:
                typer.echo(f"  {str(name)}: batch {row['batch']:>4}  {row['median_ms']:9.2f} ms  "
                           f"({row['median_ms'] / row['batch']:.2f} ms per image)")
