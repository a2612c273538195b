"""``bwacal calibrate``: quantize a model, fit its bit weights, write it as ONNX."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import user_errors
from cli.main import app
from cli.options import InputShape, Quiet, Verbose


def default_output(model: Path, bits: int, act_bits: int | None) -> Path:
    """``<model>.w<bits>[a<act_bits>].onnx`` beside the input."""
    tag = f"w{bits}" + (f"a{act_bits}" if act_bits else "")
    return model.with_name(f"{model.stem}.{tag}.onnx")


def check_output(path: Path, model: Path, force: bool, what: str = "output"):
    """Refuse, before any work is done, an output that would clobber the input or cannot be written."""
    from bwacal.errors import BwacalError

    if model.exists() and path.exists() and path.resolve() == model.resolve():
        raise BwacalError(f"{path}: the {what} path is the input model; choose another with -o")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BwacalError(f"{path}: the {what} directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BwacalError(f"{path}: the {what} directory {parent} is not writable")
    if path.exists() and not force:
        raise BwacalError(f"{path}: already exists; pass --force to overwrite it")


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@app.command("calibrate")
def calibrate_cmd(
    model: Annotated[Path, typer.Argument(help="Full-precision ONNX classifier.")],
    *,
    calib: Annotated[Path, typer.Option("--calib", help="Calibration HDF5 file ('images', optional 'labels').")],
    bits: Annotated[int, typer.Option("--bits", help="Weight bits, 2 to 8.")] = 3,
    act_bits: Annotated[Optional[int], typer.Option("--act-bits", help="Quantize activations at the input of each quantized layer to this many bits (default: float activations).")] = None,
    act_bwa: Annotated[bool, typer.Option("--act-bwa", help="Fit bit weights for activations too (needs --act-bits).")] = False,
    all_layers: Annotated[bool, typer.Option("--all-layers", help="Quantize the first conv and last linear layer at the requested width too (default: they stay at 8 bits).")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output ONNX file (default: <model>.w<bits>.onnx beside the input).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="fake: float weights holding the BWA values; packed: uint8 codes + per-channel level tables (smaller file).")] = "fake",
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the calibration report (accuracies, per-layer bit weights, history) as JSON.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval", help="Report accuracies on this HDF5 file instead of the held-out split.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the calibration set.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per fitting step.")] = 64,
    micro_batch: Annotated[Optional[int], typer.Option("--micro-batch", help="Images per recorded forward of a step (gradients are summed over the step's micro-batches); default: the largest whose recording for backward stays under 768 MiB, so 224x224 models fit in memory.")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate on the normalised bit weights (cosine decay).")] = 1e-3,
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction of the calibration set held out to pick the best epoch.")] = 0.2,
    split: Annotated[str, typer.Option("--split", help="How the held-out part is drawn: random, source (whole sources on one side: needs the file's 'sources'), blocks (contiguous blocks of the file), or auto (source when the file has sources, else random).")] = "auto",
    loss: Annotated[str, typer.Option("--loss", help="kl (distil the full-precision model; no labels needed), ce (cross-entropy with the labels) or both.")] = "kl",
    weight_method: Annotated[str, typer.Option("--weight-method", help="The uniform grid fitting starts from: mse (per-channel step minimising weight error), minmax, output (per-channel step minimising the layer's output error on calibration activations), or auto (whichever of the three gives the lowest held-out loss).")] = "auto",
    act_method: Annotated[str, typer.Option("--act-method", help="Activation step calibration: mse or percentile.")] = "mse",
    method: Annotated[str, typer.Option("--method", help="bwa: bit weights on round-to-nearest codes (the paper); adaround: learned rounding layer by layer, uniform levels; bwa-codes: bit weights and the codes' rounding fitted together end to end; adaround-bwa (default, the most accurate measured): AdaRound's codes, then bit weights end to end.")] = "adaround-bwa",
    adaround_iterations: Annotated[int, typer.Option("--adaround-iterations", help="AdaRound iterations per layer (adaround, adaround-bwa).")] = 10000,
    adaround_images: Annotated[int, typer.Option("--adaround-images", help="Calibration images (of the fitting split) AdaRound reconstructs each layer's output on.")] = 1024,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split and shuffling; same seed, same output bytes.")] = 0,
    input_shape: InputShape = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Quantize MODEL's weights (and optionally activations) and fit bit-weight adjustment factors
    (and, with --method, the rounding of the codes).

    Example: bwacal calibrate data/zoo/resnet20.onnx --calib data/fmnist_calib.h5 --bits 3
    """
    from bwacal.calibrate import CalibrationOptions, calibrate
    from bwacal.errors import BwacalError
    from bwacal.export import FORMATS, write_quantized
    from bwacal.onnx_io import write_bytes_atomically

    opts = CalibrationOptions(bits=bits, act_bits=act_bits, act_bwa=act_bwa,
                              protocol="all-layers" if all_layers else "first-last-8bit",
                              weight_method=weight_method, act_method=act_method, epochs=epochs,
                              batch_size=batch_size, micro_batch=micro_batch, lr=lr, holdout=holdout, split=split, loss=loss, seed=seed, method=method,
                              adaround_iterations=adaround_iterations, adaround_images=adaround_images,
                              input_shape=input_shape)
    out = output or default_output(model, bits, act_bits)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with user_errors(verbose):
            opts.validate()
            if fmt not in FORMATS:
                raise BwacalError(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
            check_output(out, model, force)
            if report is not None:
                check_output(report, model, force, "report")
            log = None if quiet else (lambda m: typer.echo(m, err=True))
            with _fit_progress(opts.epochs, quiet) as progress:
                result = calibrate(model, calib, opts, eval_path=eval_data, progress=progress, log=log)
            written, target = [], out
            try:  # the model and the report are written together or not at all
                size = write_quantized(result.net, result.report, out, fmt)
                written.append(out)
                rep = result.report
                rep.update({"output": str(out), "format": fmt, "size_bytes": size,
                            "size_ratio": model.stat().st_size / size})
                if report is not None:
                    target = report
                    write_bytes_atomically(report, (json.dumps(rep, indent=1) + "\n").encode())
            except BaseException as exc:
                for path in written:
                    path.unlink(missing_ok=True)
                if isinstance(exc, OSError):
                    raise BwacalError(f"{target}: cannot write it ({exc.strerror or exc})") from exc
                raise
    except KeyboardInterrupt:
        typer.echo("interrupted: no output written", err=True)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_summary(rep, out)


METHOD_LABELS = {"bwa": "BWA", "adaround": "AdaRound", "bwa-codes": "BWA, learned codes",
                 "adaround-bwa": "AdaRound + BWA"}


def _print_summary(rep, out):
    acc = rep["accuracy"]
    where = "held-out split" if rep["eval"] == "heldout" else rep["eval"]
    typer.echo(f"top-1 on {where} ({rep['eval_images']} images):")
    names = {"fp": "full precision", "uniform_minmax": "uniform min-max", "uniform_mse": "uniform MSE",
             "uniform_output": "uniform output", rep["method"]: METHOD_LABELS[rep["method"]]}
    for key, label in names.items():
        if key == "uniform_output" and key not in acc:
            continue
        value = acc.get(key)
        typer.echo(f"  {label:<16} {'n/a' if value is None else f'{100 * value:6.2f}%'}")
    if rep.get("divergence"):
        typer.echo(f"note: {rep['divergence']}")
    opts = rep["options"]
    typer.echo(f"bits W{opts['bits']}" + (f"A{opts['act_bits']}" if opts["act_bits"] else "")
               + f" ({opts['protocol']}), best epoch {rep['best_epoch']}, {rep['seconds']:.1f} s")
    typer.echo(f"wrote {out} ({rep['format']}, {rep['size_bytes'] / 1e6:.2f} MB; "
               f"input/output size ratio {rep['size_ratio']:.2f})")


class _fit_progress:
    """A rich bar over fitting steps on a terminal; plain per-epoch lines otherwise."""

    def __init__(self, epochs, quiet):
        self.epochs, self.quiet = epochs, quiet
        self.bar = None

    def __enter__(self):
        if self.quiet:
            return None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            from cli.common import use_color
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True, no_color=not use_color()), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("fitting", total=None)
        return self.update

    def update(self, epoch, step, steps, loss, top1, heldout):
        acc = "" if top1 is None else f", held-out top-1 {100 * top1:.2f}%"
        if self.bar is not None:
            self.bar.update(self.task, total=max(self.epochs * steps, 1), completed=(epoch - 1) * steps + step if epoch else 0,
                            description=f"epoch {epoch}/{self.epochs} loss {loss:.4f}{acc}")
        if heldout:  # end of an epoch (epoch 0: the uniform start)
            line = f"epoch {epoch}/{self.epochs}: held-out loss {loss:.4f}{acc}"
            if self.bar is not None:
                self.bar.console.print(line)
            else:
                typer.echo(line, err=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
