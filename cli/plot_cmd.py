"""``bwacal plot``: a picture of a calibration report or of a batch summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import user_errors
from cli.options import Force, Verbose


def plot_cmd(
    report: Annotated[Path, typer.Argument(help="A report from 'bwacal calibrate --report' or a batch summary.json.")],
    *,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")],
    layers: Annotated[Optional[str], typer.Option("--layers", help="Comma-separated layer names (default: the three whose levels moved most).")] = None,
    frontier: Annotated[bool, typer.Option(
        "--frontier", help="For a batch summary or a sensitivity run: model size against top-1, uniform widths and "
                           "mixed allocations as separate series.")] = False,
    force: Force = False,
    verbose: Verbose = False,
):
    """Draw weight histograms with the uniform grid and the learned BWA levels, and the fitting curves;
    for a batch summary, BWA accuracy against bit width per model (--frontier: against model size, uniform
    and mixed precision apart); for a 'bwacal sensitivity' run, each layer's sensitivity and the frontier.

    Example: bwacal plot resnet20.w3.json -o resnet20.w3.png
    """
    from bwacal.errors import BwacalError
    from bwacal.files import check_output_path, write_bytes_atomically
    from bwacal.plot import (plot_calibration, plot_frontier, plot_sensitivity, plot_summary,
                             sensitivity_frontier_points, summary_frontier_points)

    with user_errors(verbose):
        if not report.is_file():
            raise BwacalError(f"{report}: no such file")
        check_output_path(output, (report,), force)
        head = report.read_bytes()[:64]
        if report.suffix.lower() == ".onnx" or head.lstrip()[:1] not in (b"{", b"["):
            raise BwacalError(f"{report}: not a JSON report; plot draws a report from 'bwacal calibrate --report "
                              "R.json' or a batch's summary.json (for a model, 'bwacal inspect' shows what it holds)")
        try:
            data = json.loads(report.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise BwacalError(f"{report}: not a JSON report ({exc})") from None
        rows = None
        if isinstance(data, dict) and isinstance(data.get("jobs"), list):
            rows = data["jobs"]
        elif isinstance(data, list) and all(isinstance(r, dict) and "model" in r for r in data):
            rows = data
        sensitivity = isinstance(data, dict) and "widths" in data and "fisher_seconds" in data
        if sensitivity:
            png = plot_frontier(*sensitivity_frontier_points(data)) if frontier else plot_sensitivity(data)
            if png is None:
                raise BwacalError(f"{report}: the sensitivity run has no frontier (it had no held-out images)")
        elif rows is not None and (frontier or any(r.get("avg_bits_budget") is not None
                                                   or r.get("size_budget") is not None for r in rows)):
            png = plot_frontier(*summary_frontier_points(rows))
        elif isinstance(data, dict) and "layers" in data and "model" in data:
            from bwacal.calibrate import load_for_data

            model = load_for_data(data["model"], data.get("calib") or "", (data.get("options") or {}).get("input_shape"))
            png = plot_calibration(data, model.graph.initializers, layers.split(",") if layers else None)
        elif rows is not None:
            png = plot_summary(rows)
        else:
            raise BwacalError(f"{report}: neither a calibration report nor a batch summary")
        if png is None:
            raise BwacalError(f"{report}: no job of the summary has an accuracy to plot")
        write_bytes_atomically(output, png)
    typer.echo(f"wrote {output}")
