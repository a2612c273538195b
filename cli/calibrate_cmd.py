"""``bwacal calibrate``: quantize a model, fit its bit weights, write it as ONNX."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import echo_json, interrupts, table, user_errors
from cli.options import (DEFAULTS, ActBits, ActBwa, ActMethod, AdaRoundImages, AdaRoundIterations, AllLayers, Calib,
                         Config, Epochs, EvalData, Exclude, FitBatch, Force, Format, Holdout, InputShape, Json,
                         LayerBits, Loss, Lr, Method, MicroBatch, NumImages, OldEval, Quiet, Seed, Split, Verbose,
                         WeightMethod, calibration_options, pick, with_config)
from cli.options import AvgBits, MaxDrop, SizeBudget
from cli.progress import Display
from cli.sensitivity_cmd import allocation_lines, control_lines

def output_path(output: Path | None, model: Path, bits: int, act_bits: int | None) -> Path:
    """Where the model is written: ``-o`` as given; ``<model>.w<bits>[a<A>].onnx`` in the folder ``-o``
    names; without ``-o``, that name in the current folder (never beside the input, in a model folder)."""
    from bwacal.batch import output_name

    name = output_name(model.stem, bits, act_bits)
    if output is None:
        return Path(name)
    if output.is_dir():
        return output / name
    return output


def calibrate_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="Full-precision ONNX classifier.")],
    *,
    calib: Calib = None,
    bits: Annotated[int, typer.Option("--bits", help="Weight bits, 2 to 8.")] = DEFAULTS.bits,
    act_bits: ActBits = DEFAULTS.act_bits,
    act_bwa: ActBwa = DEFAULTS.act_bwa,
    all_layers: AllLayers = False,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Output ONNX file, or a folder to write <model>.w<bits>.onnx into "
                               "(default: <model>.w<bits>.onnx in the current folder).")] = None,
    fmt: Format = "fake",
    report: Annotated[Optional[Path], typer.Option(
        "--report", help="Write the calibration report (accuracies, per-layer bit weights, history) as JSON.")] = None,
    data: EvalData = None,
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
    avg_bits: AvgBits = None,
    size_budget: SizeBudget = None,
    max_drop: MaxDrop = None,
    config: Config = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show the plan (layers and their bits, the output's size, the work) and stop.")] = False,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    old_eval: OldEval = None,
):
    """Quantize MODEL's weights (and optionally activations) and fit bit-weight adjustment factors
    (and, with --method, the rounding of the codes).

    Example: bwacal calibrate data/zoo/resnet20.onnx --calib data/fmnist_calib.h5 --bits 3 -o resnet20.w3.onnx
    """
    from bwacal.calibrate import calibrate
    from bwacal.errors import BwacalError
    from bwacal.export import (FORMATS, QDQ_ACT_BITS, qdq_steps_from_file, size_change, snapping_errors,
                               write_quantized)
    from bwacal.files import JSON_SCHEMA, check_output_path, write_bytes_atomically

    with interrupts("no output written"):
        with user_errors(verbose):
            values = with_config(ctx, dict(
                calib=calib, bits=bits, act_bits=act_bits, act_bwa=act_bwa, all_layers=all_layers, fmt=fmt, data=data,
                num_images=num_images, epochs=epochs, batch_size=batch_size, micro_batch=micro_batch, lr=lr,
                holdout=holdout, split=split, loss=loss, weight_method=weight_method, act_method=act_method,
                method=method, adaround_iterations=adaround_iterations, adaround_images=adaround_images, seed=seed,
                input_shape=input_shape, exclude=exclude, layer_bits=layer_bits, avg_bits=avg_bits,
                size_budget=size_budget, max_drop=max_drop), config)
            calib, fmt = values["calib"], values["fmt"]
            if calib is None:
                raise BwacalError("calibrate needs the calibration data: --calib CALIB.h5 (or calib in --config)")
            eval_data = pick(values["data"], old_eval, "--data", "--eval")
            if fmt not in FORMATS:
                raise BwacalError(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
            integer = fmt in ("qdq", "bitplanes")  # integer kernels need quantized activations
            if integer and values["act_bits"] is None:
                values["act_bits"] = QDQ_ACT_BITS
                if not quiet:
                    typer.echo(f"note: --format {fmt} quantizes activations: calibrating with --act-bits "
                               f"{QDQ_ACT_BITS}", err=True)
            opts = calibration_options(values)
            opts.validate()
            if integer and opts.act_bwa:
                raise BwacalError(f"--format {fmt} computes on the activations' uniform grid; drop --act-bwa or use "
                                  "--format fake or packed")
            out = output_path(output, model, opts.bits, opts.act_bits)
            if dry_run:
                from bwacal.calibrate import plan

                planned = plan(model, calib, opts, fmt)
                if json_out:
                    echo_json({**planned, "output": str(out)})
                else:
                    for line in plan_lines(planned, model, opts, fmt, out):
                        typer.echo(line)
                return
            inputs = (model, calib, eval_data)
            check_output_path(out, inputs, force)
            if report is not None:
                check_output_path(report, inputs + (out,), force, "report")
            with Display(quiet) as display:
                display.note_cold_cache()
                result = calibrate(model, calib, opts, eval_path=eval_data, progress=_FitProgress(display, opts.epochs),
                                   log=display.note, stage=display.phase)
                if display.compiled:
                    display.note(f"compiled {display.compiled} numba kernels in {display.compile_seconds:.0f} s; "
                                 "later runs load them from numba's cache")
                control = result.report.get("accuracy_control")
                if control is not None and not control["met"]:  # nothing is written
                    for line in control_lines(result.report):
                        typer.echo(line)
                    raise typer.Exit(1)
                display.phase("writing")
                written, target = [], out
                steps = None
                if fmt == "qdq":
                    display.phase("8-bit steps for the integer kernels")
                    steps = qdq_steps_from_file(result.net, calib, seed=opts.seed)
                try:  # the model and the report are written together or not at all
                    size = write_quantized(result.net, result.report, out, fmt, steps)
                    written.append(out)
                    rep = {"schema": JSON_SCHEMA, **result.report}
                    if fmt == "qdq":
                        rep["qdq"] = {"snapping": snapping_errors(result.net), "extra_tensors": sorted(steps)}
                    rep.update({"output": str(out), "format": fmt, "size_bytes": size,
                                "input_size_bytes": model.stat().st_size,
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
    if json_out:
        typer.echo(json.dumps(rep, indent=2))
    else:
        for line in summary_lines(rep, size_change):
            typer.echo(line)


def plan_lines(p: dict, model: Path, opts, fmt: str, out: Path) -> list[str]:
    """The --dry-run text of ``bwacal.calibrate.plan``'s ``p``: every layer with its widths, what stays in
    float, the work and the output."""
    lines = [f"plan for {model} (W{opts.bits}" + (f"A{opts.act_bits}" if opts.act_bits else "") + f", {opts.protocol}):"]
    lines += table(("layer", "op", "params", "bits") + (("act bits",) if opts.act_bits else ()),
                   [(r["layer"], r["op"], r["params"], r["bits"]) + ((r["act_bits"],) if opts.act_bits else ())
                    for r in p["layers"]], right=(2, 3, 4))
    if p["excluded"]:
        lines.append("kept in float: " + ", ".join(p["excluded"]))
    if p.get("allocation"):
        lines.append(f"widths chosen for an average of {p['allocation']['avg_bits']:.3f} bits "
                     f"(estimated loss {p['allocation']['estimated_loss']:.4g})")
    lines.append(f"calibration: {p['images']} images ({p['fit_images']} fit, {p['heldout_images']} held out); "
                 f"{p['epochs']} epochs x {p['steps_per_epoch']} steps of {opts.batch_size} images")
    lines.append(f"work: one full-precision forward pass of {p['batch']} images took {p['forward_seconds']:.2f} s here; "
                 "each fitting step runs the quantized model forward and backward")
    lines.append(f"output: {out} ({fmt}, about {_size(p['estimated_size_bytes'])} before metadata); nothing written")
    return lines


def summary_lines(rep: dict, size_change) -> list[str]:
    """The result a person reads: a table of top-1 (or, without labels, agreement with full precision
    and KL) per network, the options, and what was written."""
    acc, agreement, kl = rep["accuracy"], rep.get("agreement") or {}, rep.get("kl") or {}
    where = "the held-out split" if rep["eval"] == "heldout" else rep["eval"]
    from bwacal.plot import LABELS

    names = {k: LABELS[k] for k in ("fp", "uniform_minmax", "uniform_mse", "uniform_output", rep["method"]) if k in acc}
    start = rep.get("start")
    if start and f"uniform_{start}" in names:
        names[f"uniform_{start}"] += " (start)"
    lines = []
    if not rep["eval_images"]:
        lines.append("accuracy: not measured (no held-out images; --data EVAL.h5 measures on another file)")
    else:
        labelled = any(v is not None for v in acc.values())
        head = f"{'':<24}" + (f"{'top-1':>8}" if labelled else "") + f"{'agreement':>11}{'KL':>9}"
        lines.append(f"on {where} ({rep['eval_images']} images{'' if labelled else ', no labels'}); "
                     "agreement and KL against full precision:")
        lines.append(head.rstrip())
        for key, label in names.items():
            row = f"  {label:<22}"
            if labelled:
                row += f"{100 * acc[key]:7.2f}%" if acc[key] is not None else f"{'-':>8}"
            a, d = agreement.get(key), kl.get(key)
            row += (f"{100 * a:10.2f}%" if a is not None else f"{'-':>11}") + (f"{d:9.4f}" if d is not None else f"{'-':>9}")
            lines.append(row.rstrip())
    if rep.get("divergence"):
        lines.append(f"note: {rep['divergence']}")
    lines += allocation_lines(rep) + control_lines(rep)
    opts = rep["options"]
    width = f"mixed {rep['avg_weight_bits']:.3f}" if rep.get("allocation") or rep.get("accuracy_control") else opts["bits"]
    lines.append(f"bits W{width}" + (f"A{opts['act_bits']}" if opts["act_bits"] else "")
                 + f" ({opts['protocol']}), best epoch {rep['best_epoch']}, {rep['seconds']:.1f} s")
    if rep.get("qdq"):
        worst = max((r["max_rel"] for r in rep["qdq"]["snapping"]), default=0.0)
        lines.append(f"qdq: weights snapped to int8 per channel (largest move {100 * worst:.2f}% of a channel's "
                     f"largest value); {len(rep['qdq']['extra_tensors'])} more tensors at 8 bits for integer kernels")
    lines.append(f"wrote {rep['output']} ({rep['format']}, {_size(rep['size_bytes'])}, "
                 f"{size_change(rep['size_ratio'])} than the input's {_size(rep['input_size_bytes'])})")
    return lines


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


class _FitProgress:
    """Fitting on the display: the bar over all steps with the epoch and loss; a note per epoch."""

    def __init__(self, display: Display, epochs: int):
        self.display, self.epochs = display, epochs
        self.losses = []

    def __call__(self, epoch, step, steps, loss, top1, heldout):
        acc = "" if top1 is None else f", held-out top-1 {100 * top1:.2f}%"
        if not heldout:
            self.losses.append(loss)
            self.display.update((epoch - 1) * steps + step, max(self.epochs * steps, 1),
                                f"fitting: epoch {epoch}/{self.epochs}, loss {loss:.4f}")
            return
        train = f"training loss {sum(self.losses) / len(self.losses):.4f}" if self.losses else ""
        self.losses = []
        if loss is None:  # nothing held out
            line = f"epoch {epoch}/{self.epochs}: " + (train or "the uniform start (no held-out images to score it)")
        else:
            line = f"epoch {epoch}/{self.epochs}: " + (f"{train}, " if train else "") + f"held-out loss {loss:.4f}{acc}"
        self.display.note(line)
