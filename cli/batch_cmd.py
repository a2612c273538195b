"""``bwacal batch``: quantize every model of a zoo at several widths, locally or on a Dask cluster."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import EXIT_CHECK_FAILED, user_errors
from cli.main import app
from cli.options import InputShape, Quiet, Verbose


def parse_bits(text: str) -> list[int]:
    """``"2,3,4"`` -> ``[2, 3, 4]``."""
    from bwacal.errors import BwacalError

    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BwacalError(f"--bits must be a comma-separated list of integers, got {text!r}") from None
    if not widths:
        raise BwacalError("--bits needs at least one width")
    return widths


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@app.command("batch")
def batch_cmd(
    source: Annotated[Path, typer.Argument(help="A directory of *.onnx models, or a TOML manifest listing models with their own data and options.")],
    *,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory: <model>.w<b>.onnx (.w<b>a<A>.onnx with --act-bits) and a .json report per job; summary.md, .csv, .json, .png.")],
    bits: Annotated[str, typer.Option("--bits", help="Weight widths, comma-separated; one job per model and width.")] = "3",
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration HDF5 file shared by the models (a manifest entry may name its own).")] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval", help="Evaluation HDF5 file shared by the models (default: the held-out calibration split).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Local worker processes (default: one per core); BLAS/numba threads per worker = cores // workers.")] = None,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Run the jobs on the Dask cluster at this scheduler address (tcp://HOST:8786) instead of locally.")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Exit 1 when any model loses more than this many points of top-1 (FP - BWA).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="fake (float weights) or packed (uint8 codes + level tables).")] = "fake",
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the calibration set per job.")] = 5,
    act_bits: Annotated[Optional[int], typer.Option("--act-bits", help="Quantize activations too, to this many bits.")] = None,
    all_layers: Annotated[bool, typer.Option("--all-layers", help="Quantize the first and last layers at the requested width too.")] = False,
    input_shape: InputShape = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Quantize every model of SOURCE at every width of --bits; finished jobs are skipped on a rerun.

    Example: bwacal batch data/zoo --calib data/fmnist_calib.h5 --eval data/fmnist_val.h5 --bits 2,3,4 -o out/
    """
    from bwacal.batch import local_layout, plan_jobs, run_jobs, summary_markdown, write_summary
    from bwacal.calibrate import CalibrationOptions
    from bwacal.errors import BwacalError

    previous = signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    try:
        with user_errors(verbose):
            if workers is not None and workers < 1:
                raise BwacalError(f"--workers must be at least 1, got {workers}")
            if output.exists() and not output.is_dir():
                raise BwacalError(f"{output}: exists and is not a directory")
            base = CalibrationOptions(act_bits=act_bits, epochs=epochs,
                                      protocol="all-layers" if all_layers else "first-last-8bit",
                                      input_shape=input_shape)
            jobs = plan_jobs(source, parse_bits(bits), output, calib=calib, eval_path=eval_data, options=base, fmt=fmt)
            output.mkdir(parents=True, exist_ok=True)
            if scheduler:
                where = f"on the Dask cluster at {scheduler}"
            else:
                n, threads = local_layout(len(jobs), workers)
                where = f"on {n} worker{'s' * (n > 1)} x {threads} thread{'s' * (threads > 1)}"
            if not quiet:
                models = len({job.name for job in jobs})
                typer.echo(f"{len(jobs)} jobs ({models} models) {where}", err=True)
            rows = {}
            for done, (job, row) in enumerate(run_jobs(jobs, workers, scheduler), 1):
                rows[job.output] = row
                if not quiet or row["status"] == "failed":
                    typer.echo(f"[{done}/{len(jobs)}] {_progress(job, row)}", err=True)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished jobs are kept; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)

    ordered = [rows[job.output] for job in jobs]
    meta = {"source": str(source), "scheduler": scheduler, "workers": None if scheduler else local_layout(len(jobs), workers)[0],
            "max_drop": max_drop, "wall_seconds": round(time.perf_counter() - started, 3)}
    written = write_summary(ordered, output, meta)
    typer.echo(summary_markdown(ordered), nl=False)
    if not quiet:
        typer.echo(f"wrote {', '.join(p.name for p in written)} in {output} "
                   f"({meta['wall_seconds']:.1f} s wall)", err=True)
    failed = [r for r in ordered if r["status"] == "failed"]
    over = [r for r in ordered if max_drop is not None and r["drop"] is not None and r["drop"] > max_drop]
    if failed:
        typer.echo(f"FAIL: {len(failed)} of {len(ordered)} jobs failed", err=True)
    if over:
        names = ", ".join(f"{r['model']} W{r['width']} ({r['drop']:.2f})" for r in over)
        typer.echo(f"FAIL: drop over --max-drop {max_drop:g} points: {names}", err=True)
    if failed or over:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _progress(job, row) -> str:
    head = f"{job.name} {job.width}: {row['status']}"
    if row["status"] == "failed":
        return f"{head}: {row['error']}"
    if row["bwa"] is None:
        return f"{head}, no labels to score, {row['seconds']:.1f} s"
    return (f"{head}, BWA {row['bwa']:.2f}% (FP {row['fp']:.2f}%, uniform {row['uniform']:.2f}%, "
            f"drop {row['drop']:.2f}), {row['size_ratio']:.2f}x smaller, {row['seconds']:.1f} s")
