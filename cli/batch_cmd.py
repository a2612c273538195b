"""``bwacal batch``: quantize every model of a zoo at several widths, locally or on a Dask cluster."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import EXIT_CHECK_FAILED, echo_json, interrupts, user_errors
from cli.options import (DEFAULTS, ActBits, ActBwa, ActMethod, AdaRoundImages, AdaRoundIterations, AllLayers, Epochs,
                         EvalData, Exclude, FitBatch, Format, Holdout, InputShape, Json, LayerBits, Loss, Lr, Method,
                         MicroBatch, NumImages, OldEval, Quiet, Seed, Split, Verbose, WeightMethod,
                         calibration_options, pick)
from cli.progress import Display


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


def parse_budgets(text: str | None, flag: str) -> list[float]:
    """``"2.5,3"`` -> ``[2.5, 3.0]``; None -> ``[]``."""
    from bwacal.errors import BwacalError

    try:
        return [float(part) for part in (text or "").split(",") if part.strip()]
    except ValueError:
        raise BwacalError(f"{flag} must be a comma-separated list of numbers, got {text!r}") from None


def batch_cmd(
    source: Annotated[Path, typer.Argument(
        help="A directory of *.onnx models (those bwacal wrote are skipped), one .onnx model, or a TOML "
             "manifest listing models with their own data and options.")],
    *,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Output directory: <model>.w<b>.onnx (.w<b>a<A>.onnx with --act-bits) and a .json "
                               "report per job; summary.md, .csv, .json, .png.")],
    bits: Annotated[str, typer.Option("--bits", help="Weight widths, comma-separated; one job per model and width.")] = "3",
    avg_bits: Annotated[Optional[str], typer.Option(
        "--avg-bits", help="Mixed precision: average weight widths, comma-separated; one more job per model and "
                           "average (see calibrate --avg-bits), written as <model>.avg<B>.onnx.")] = None,
    size_budget: Annotated[Optional[str], typer.Option(
        "--size-budget", help="Mixed precision: model sizes in MB, comma-separated; one more job per model and size "
                              "(see calibrate --size-budget).")] = None,
    calib: Annotated[Optional[Path], typer.Option(
        "--calib", help="Calibration HDF5 file shared by the models (a manifest entry may name its own).")] = None,
    data: EvalData = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", help="Local worker processes (default: one per core); BLAS/numba threads per worker = "
                          "cores // workers.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(
        "--scheduler", help="Run the jobs on the Dask cluster at this scheduler address (tcp://HOST:8786) "
                            "instead of locally.")] = None,
    max_drop: Annotated[Optional[float], typer.Option(
        "--max-drop", help="Exit 1 when any model loses more than this many points of top-1 (FP - calibrated).")] = None,
    fmt: Format = "fake",
    act_bits: ActBits = DEFAULTS.act_bits,
    act_bwa: ActBwa = DEFAULTS.act_bwa,
    all_layers: AllLayers = False,
    num_images: NumImages = DEFAULTS.num_images,
    epochs: Epochs = DEFAULTS.epochs,
    batch_size: FitBatch = DEFAULTS.batch_size,
    micro_batch: MicroBatch = DEFAULTS.micro_batch,
    lr: Lr = DEFAULTS.lr,
    holdout: Holdout = DEFAULTS.holdout,
    split: Split = DEFAULTS.split,
    loss: Loss = DEFAULTS.loss,
    weight_method: WeightMethod = DEFAULTS.weight_method,
    act_method: ActMethod = DEFAULTS.act_method,
    method: Method = DEFAULTS.method,
    adaround_iterations: AdaRoundIterations = DEFAULTS.adaround_iterations,
    adaround_images: AdaRoundImages = DEFAULTS.adaround_images,
    seed: Seed = DEFAULTS.seed,
    input_shape: InputShape = None,
    exclude: Exclude = None,
    layer_bits: LayerBits = None,
    json_out: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    old_eval: OldEval = None,
):
    """Quantize every model of SOURCE at every width of --bits; finished jobs are skipped on a rerun.

    Takes every option of 'bwacal calibrate'; a manifest entry may override them.

    Example: bwacal batch data/zoo --calib data/fmnist_calib.h5 --data data/fmnist_val.h5 --bits 2,3,4 -o out/
    """
    from bwacal.batch import local_layout, plan_jobs, run_jobs, summary_markdown, write_summary
    from bwacal.errors import BwacalError

    started = time.perf_counter()
    with interrupts("finished jobs are kept; run the same command again to resume"), Display(quiet) as display:
        with user_errors(verbose):
            if workers is not None and workers < 1:
                raise BwacalError(f"--workers must be at least 1, got {workers}")
            if output.exists() and not output.is_dir():
                raise BwacalError(f"{output}: exists and is not a directory")
            eval_data = pick(data, old_eval, "--data", "--eval")
            base = calibration_options(dict(
                act_bits=act_bits, act_bwa=act_bwa, all_layers=all_layers, num_images=num_images, epochs=epochs,
                batch_size=batch_size, micro_batch=micro_batch, lr=lr, holdout=holdout, split=split, loss=loss,
                weight_method=weight_method, act_method=act_method, method=method,
                adaround_iterations=adaround_iterations, adaround_images=adaround_images, seed=seed,
                input_shape=input_shape, exclude=exclude, layer_bits=layer_bits))
            jobs = plan_jobs(source, parse_bits(bits), output, calib=calib, eval_path=eval_data, options=base,
                             fmt=fmt, log=display.note, avg_bits=parse_budgets(avg_bits, "--avg-bits"),
                             size_budgets=parse_budgets(size_budget, "--size-budget"))
            display.note_cold_cache()
            output.mkdir(parents=True, exist_ok=True)
            if scheduler:
                where = f"on the Dask cluster at {scheduler}"
            else:
                n, threads = local_layout(len(jobs), workers)
                where = f"on {n} worker{'s' * (n > 1)} x {threads} thread{'s' * (threads > 1)}"
            models = len({job.name for job in jobs})
            display.note(f"{len(jobs)} jobs ({models} model{'s' * (models > 1)}) {where}")
            display.phase("jobs", 0, len(jobs))
            rows = {}
            with contextlib.closing(run_jobs(jobs, workers, scheduler)) as finished:
                for done, (job, row) in enumerate(finished, 1):
                    rows[job.output] = row
                    line = f"[{done}/{len(jobs)}] {_progress(job, row)}"
                    if row["status"] == "failed" and quiet:
                        typer.echo(line, err=True)
                    display.note(line)
                    display.update(done, len(jobs))

    ordered = [rows[job.output] for job in jobs]
    meta = {"source": str(source), "scheduler": scheduler, "workers": None if scheduler else local_layout(len(jobs), workers)[0],
            "max_drop": max_drop, "wall_seconds": round(time.perf_counter() - started, 3)}
    written = write_summary(ordered, output, meta)
    if json_out:
        echo_json({**meta, "jobs": ordered})
    else:
        typer.echo(summary_markdown(ordered), nl=False)
    if not quiet:
        typer.echo(f"wrote {', '.join(p.name for p in written)} in {output} "
                   f"({meta['wall_seconds']:.1f} s wall)", err=True)
    failed = [r for r in ordered if r["status"] == "failed"]
    over = [r for r in ordered if max_drop is not None and r["drop"] is not None and 100 * r["drop"] > max_drop + 1e-9]
    if failed:
        typer.echo(f"FAIL: {len(failed)} of {len(ordered)} jobs failed", err=True)
    if over:
        from bwacal.batch import width_label

        names = ", ".join(f"{r['model']} {width_label(r['width'], r.get('avg_bits_budget'), r.get('size_budget'))} "
                          f"({100 * r['drop']:.2f})" for r in over)
        typer.echo(f"FAIL: drop over --max-drop {max_drop:g} points: {names}", err=True)
    if failed or over:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _progress(job, row) -> str:
    from bwacal.export import size_change

    head = f"{job.name} {job.width}: {row['status']}"
    if row["status"] == "failed":
        return f"{head}: {row['error']}"
    if row["bwa"] is None:
        agreement = "" if row["agreement"] is None else f", top-1 agreement with FP {100 * row['agreement']:.2f}%"
        return f"{head}, no labels{agreement}, {size_change(row['size_ratio'])}, {row['seconds']:.1f} s"
    return (f"{head}, calibrated {100 * row['bwa']:.2f}% (FP {100 * row['fp']:.2f}%, uniform {row['start']} "
            f"{100 * row['uniform']:.2f}%, drop {100 * row['drop']:.2f} points), "
            f"{size_change(row['size_ratio'])}, {row['seconds']:.1f} s")
