"""``bwacal check``: gate CI on a quantized model's accuracy drop (exit 0 pass, 1 fail, 2 bad input)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import EXIT_CHECK_FAILED, echo_json, user_errors
from cli.evaluate_cmd import load_pair, open_for
from cli.options import DEFAULT_BATCH_SIZE, BatchSize, Data, InputShape, Json, Quiet, Runtime, Verbose
from cli.progress import progress_bar


def check_cmd(
    model: Annotated[Path, typer.Argument(help="The quantized ONNX model.")],
    *,
    reference: Annotated[Path, typer.Option("--reference", help="The full-precision ONNX model to compare with.")],
    data: Data,
    max_drop: Annotated[float, typer.Option("--max-drop", help="Largest allowed drop, in percentage points.")] = 1.0,
    metric: Annotated[Optional[str], typer.Option(
        "--metric", help="top1 (FP top-1 minus quantized top-1) or agreement (100 minus top-1 agreement with "
                         "the FP model). Default: top1 when the data has labels, else agreement.")] = None,
    junit: Annotated[Optional[Path], typer.Option(
        "--junit", help="Also write a JUnit XML report here (with an <error> case when the check cannot run).")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Fail (exit 1) when MODEL records that it was made from another model than --reference.")] = False,
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
    from bwacal.errors import BwacalError
    from bwacal.evaluate import evaluate
    from bwacal.files import check_output_path, write_bytes_atomically
    from bwacal.gate import check_max_drop, choose_metric, error_junit, judge, reference_warning
    from bwacal.onnx_io import read_metadata

    start = time.perf_counter()
    with user_errors(verbose):
        if junit is not None:
            check_output_path(junit, inputs=(model, reference, data))
        try:
            max_drop = check_max_drop(max_drop)
            loaded, ref = load_pair(model, reference, runtime, data, input_shape)
            warning = reference_warning(model, reference, read_metadata(model))
            if warning and not quiet:
                typer.echo(f"warning: {warning}" + ("" if strict else " (--strict fails the check)"), err=True)
            with open_for(data, loaded) as ds:
                chosen = choose_metric(metric, ds.has_labels, str(data))
                with progress_bar("checking", ds.n, quiet) as progress:
                    result = evaluate(loaded.forward, ds, batch_size=batch_size, reference=ref.forward,
                                      progress=progress)
            verdict = judge(result, chosen, max_drop, str(model), str(reference), str(data),
                            [warning] if warning else [], strict)
            report = verdict.to_junit(time.perf_counter() - start)
        except BwacalError as exc:
            if junit is not None:  # the CI report step still finds a file, saying why nothing was measured
                with contextlib.suppress(OSError):
                    write_bytes_atomically(junit, error_junit(str(exc), time.perf_counter() - start, str(model)))
            raise
        if junit is not None:
            try:
                write_bytes_atomically(junit, report)
            except OSError as exc:
                raise BwacalError(f"{junit}: cannot write the JUnit report ({exc.strerror or exc})") from None

    if json_out:
        echo_json(verdict.to_dict())
    else:
        typer.echo(verdict.summary())
    if not verdict.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)
