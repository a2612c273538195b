"""``bwacal sensitivity``: how much each layer loses when quantized alone; and the mixed-precision
lines of ``bwacal calibrate``'s summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import echo_json, table, user_errors
from cli.options import DEFAULTS, Calib, Exclude, FitBatch, Force, InputShape, Json, Quiet, Seed, Verbose


def sensitivity_cmd(
    model: Annotated[Path, typer.Argument(help="Full-precision ONNX classifier.")],
    *,
    calib: Calib = None,
    bits: Annotated[str, typer.Option("--bits", help="Comma-separated weight widths to measure, 2 to 8.")] = "2,3,4,8",
    images: Annotated[Optional[int], typer.Option(
        "--images", help="Images of the calibration split the sensitivities are computed on (default 256).")] = None,
    fisher_only: Annotated[bool, typer.Option(
        "--fisher-only", help="Only the Fisher estimate (one backward pass per micro-batch); skip the measurement "
                              "(one forward pass per layer and width).")] = False,
    report: Annotated[Optional[Path], typer.Option(
        "--report", help="Write the run as JSON ('bwacal plot' draws it).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the sensitivities and the frontier as PNG.")] = None,
    batch_size: FitBatch = 256,
    seed: Seed = DEFAULTS.seed,
    input_shape: InputShape = None,
    exclude: Exclude = None,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Per quantized layer, the loss increase (KL to full precision on the calibration split) when that
    layer alone is quantized (round to nearest on the per-channel MSE-searched grid, no fitting) at each
    width, measured and estimated from the Fisher information (squared gradients of the engine's
    backward times the squared quantization error), with the time each took; and the size-accuracy
    frontier of uniform widths against mixed allocations on the held-out split.

    Example: bwacal sensitivity data/zoo/mobilenetv2.onnx --calib data/fmnist_calib.h5 --plot mnv2.sens.png
    """
    from bwacal.calibrate import CalibrationOptions
    from bwacal.errors import BwacalError
    from bwacal.files import JSON_SCHEMA, check_output_path, write_bytes_atomically
    from bwacal.mixed import sensitivity_run
    from bwacal.model import parse_input_shape
    from cli.progress import Display

    with user_errors(verbose):
        if calib is None:
            raise BwacalError("sensitivity needs the calibration data: --calib CALIB.h5")
        try:
            widths = [int(b) for b in bits.split(",") if b.strip()]
        except ValueError:
            raise BwacalError(f"--bits takes comma-separated integers (e.g. 2,3,4), got {bits!r}") from None
        if not widths:
            raise BwacalError("--bits: no widths")
        if images is not None and images < 1:
            raise BwacalError(f"--images must be at least 1, got {images}")
        for path in (report, plot):
            if path is not None:
                check_output_path(path, (model, calib), force, "output")
        options = CalibrationOptions(batch_size=batch_size, seed=seed, num_images=images,
                                     input_shape=parse_input_shape(input_shape) if input_shape else None,
                                     exclude=tuple(exclude or ()))
        with Display(quiet) as display:
            run = sensitivity_run(model, calib, widths, options, measure=not fisher_only, stage=display.phase)
            if plot is not None:
                from bwacal.plot import plot_sensitivity

                png = plot_sensitivity(run)
            doc = {"schema": JSON_SCHEMA, **run}
            if report is not None:
                write_bytes_atomically(report, (json.dumps(doc, indent=1) + "\n").encode())
            if plot is not None:
                write_bytes_atomically(plot, png)
    if json_out:
        echo_json(run)
        return
    for line in sensitivity_lines(run):
        typer.echo(line)
    for path in (report, plot):
        if path is not None:
            typer.echo(f"wrote {path}")


def sensitivity_lines(run: dict) -> list[str]:
    """The table of a sensitivity run: per layer its weights and the KL at each width (measured, then
    the Fisher estimate), the times, and the frontier."""
    widths = run["widths"]
    measured = run["layers"][0]["measured"] is not None
    heads = ["layer", "op", "params"]
    for b in widths:
        heads += ([f"W{b} KL"] if measured else []) + [f"W{b} Fisher"]
    rows = []
    for r in run["layers"]:
        row = [r["layer"], r["op_type"], r["params"]]
        for b in widths:
            row += ([f"{r['measured'][str(b)]:.2e}"] if measured else []) + [f"{r['fisher'][str(b)]:.2e}"]
        rows.append(row)
    lines = [f"{run['model']}: KL to full precision with one layer quantized ({run['method']}), on {run['images']} "
             "calibration images:"]
    lines += table(heads, rows, right=tuple(range(2, len(heads))))
    timing = f"Fisher estimate {run['fisher_seconds']:.1f} s (every layer and width)"
    if measured:
        timing += f"; measured {run['measured_seconds']:.1f} s"
        corr = ", ".join(f"W{b} {v:.2f}" for b, v in run["rank_correlation"].items() if v is not None)
        if corr:
            timing += f"; rank correlation of the two over the layers: {corr}"
    lines.append(timing)
    front = run.get("frontier")
    if front:
        key = "top1" if front["fp_top1"] is not None else "agreement"
        what = "top-1" if key == "top1" else "agreement with full precision"
        lines.append(f"round to nearest on {front['images']} held-out images ({what}"
                     + (f"; full precision {100 * front['fp_top1']:.2f}%" if key == "top1" else "") + "):")
        rows = [(f"uniform W{p['width']}", f"{p['avg_bits']:.2f}", f"{p['size_bytes'] / 1e6:.3f}", f"{100 * p[key]:.2f}%")
                for p in front["uniform"]]
        rows += [(f"mixed ({p['estimate']}), budget {p['avg_bits_budget']:g}", f"{p['avg_bits']:.2f}",
                  f"{p['size_bytes'] / 1e6:.3f}", f"{100 * p[key]:.2f}%") for p in front["mixed"]]
        lines += table(("network", "avg bits", "MB", what), rows, right=(1, 2, 3))
    return lines


def allocation_lines(rep: dict) -> list[str]:
    """calibrate's lines for ``--avg-bits`` / ``--size-budget``: the budget, the widths, the estimate."""
    alloc = rep.get("allocation")
    if not alloc:
        return []
    asked = (f"--avg-bits {alloc['avg_bits_budget']:g}" if alloc["avg_bits_budget"] is not None
             else f"--size-budget {alloc['size_budget_mb']:g} MB")
    how = "optimal" if alloc["exact"] else f"within {alloc['gap']:.3g} of the optimum"
    counts = {}
    for r in alloc["layers"]:
        counts[r["bits"]] = counts.get(r["bits"], 0) + 1
    return [f"mixed widths ({asked}): average {alloc['avg_bits']:.3f} bits, model size "
            f"{rep['quantized_size_bytes'] / 1e6:.3f} MB; "
            + ", ".join(f"{n} layers at {b} bits" for b, n in sorted(counts.items()))
            + f"; estimated loss {alloc['estimated_loss']:.4g} ({how}); chosen in {alloc['seconds']:.1f} s",
            "  " + " ".join(alloc["layer_bits"])]


def control_lines(rep: dict) -> list[str]:
    """calibrate's lines for ``--max-drop``: each step's widths, top-1 and drop, and the outcome."""
    control = rep.get("accuracy_control")
    if not control:
        return []
    lines = [f"accuracy control (--max-drop {control['max_drop']:g} points):"]
    rows = [(s["step"], f"{s['avg_bits']:.3f}", f"{100 * s['top1']:.2f}%", f"{s['drop']:.2f}",
             ", ".join(f"{k}->{b}" for k, b in s["raised"].items()) or "-") for s in control["steps"]]
    lines += table(("step", "avg bits", "top-1", "drop", "raised"), rows, right=(0, 1, 2, 3))
    if control["met"]:
        lines.append(f"met at step {len(control['steps'])}")
    else:
        last = control["steps"][-1]
        lines.append(f"error: --max-drop {control['max_drop']:g} cannot be met: the drop is {last['drop']:.2f} points "
                     "with every layer raised as far as it goes; nothing written")
    return lines
