"""``bwacal check``: gate CI on a quantized model's accuracy drop (exit 0 pass, 1 fail, 2 bad input)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import EXIT_CHECK_FAILED, user_errors
from cli.evaluate_cmd import load_pair, open_for
from cli.main import app
from cli.options import DEFAULT_BATCH_SIZE, BatchSize, Data, InputShape, Json, Quiet, Runtime, Verbose
from cli.progress import progress_bar


@app.command("check")
def check_cmd(
    model: Annotated[Path, typer.Argument(help="The quantized ONNX model.")],
    *,
    reference: Annotated[Path, typer.Option("--reference", help="The full-precision ONNX model to compare with.")],
    data: Data,
    max_drop: Annotated[float, typer.Option("--max-drop", help="Largest allowed drop, in percentage points.")] = 1.0,
    metric: Annotated[Optional[str], typer.Option(
        "--metric", help="top1 (FP top-1 minus quantized top-1) or agreement (100 minus top-1 agreement with "
                         "the FP model). Default: top1 when the data has labels, else agreement.")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write a JUnit XML report here.")] = None,
    runtime: Runtime = "bwacal",
    json_out: Json = False,
    batch_size: BatchSize = DEFAULT_BATCH_SIZE,
    input_shape: InputShape = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Pass (exit 0) if the quantized model's accuracy drop is within --max-drop points, fail (exit 1) if not.

    Prints one line a person can read in a CI log; --json and --junit for CI systems.

    Example: bwacal check data/zoo/resnet20.onnx --reference data/zoo/resnet20.onnx --data data/fmnist_val.h5 --max-drop 1.0
    """
    from bwacal.evaluate import evaluate
    from bwacal.gate import check_max_drop, check_output_path, choose_metric, judge, write_junit

    start = time.perf_counter()
    with user_errors(verbose):
        max_drop = check_max_drop(max_drop)
        if junit is not None:
            check_output_path(junit, inputs=(model, reference, data))
        loaded, ref = load_pair(model, reference, runtime, data, input_shape)
        with open_for(data, loaded) as ds:
            chosen = choose_metric(metric, ds.has_labels, str(data))
            with progress_bar("checking", ds.n, quiet) as progress:
                result = evaluate(loaded.forward, ds, batch_size=batch_size, reference=ref.forward, progress=progress)
        verdict = judge(result, chosen, max_drop, str(model), str(reference), str(data))
        if junit is not None:
            try:
                write_junit(verdict, junit, time.perf_counter() - start)
            except OSError as exc:
                from bwacal.errors import BwacalError

                raise BwacalError(f"{junit}: cannot write the JUnit report ({exc.strerror or exc})") from None

    if json_out:
        typer.echo(json.dumps(verdict.to_dict(), indent=2))
    else:
        typer.echo(verdict.summary())
    if not verdict.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)
