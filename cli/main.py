"""The typer application: every command is a plain function in its own module, registered here."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import (batch_cmd, calibrate_cmd, check_cmd, evaluate_cmd, inspect_cmd, make_calib_cmd, plot_cmd,
                 sensitivity_cmd)
from cli.common import Group

app = typer.Typer(
    name="bwacal",
    help="Post-training quantization of ONNX image classifiers with bit-weight adjustment (BWA).",
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool):
    if value:
        from bwacal import __version__

        typer.echo(f"bwacal {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_print_version, is_eager=True,
                                          help="Print bwacal's version and exit.")] = False,
):
    """Post-training quantization of ONNX image classifiers with bit-weight adjustment (BWA)."""


app.command("inspect")(inspect_cmd.inspect_model)
app.command("make-calib")(make_calib_cmd.make_calib)
app.command("evaluate")(evaluate_cmd.evaluate_cmd)
app.command("check")(check_cmd.check_cmd)
app.command("calibrate")(calibrate_cmd.calibrate_cmd)
app.command("batch")(batch_cmd.batch_cmd)
app.command("plot")(plot_cmd.plot_cmd)
app.command("sensitivity")(sensitivity_cmd.sensitivity_cmd)

if __name__ == "__main__":
    app()
