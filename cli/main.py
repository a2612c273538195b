"""The typer application; each command lives in its own module and is registered here."""

import typer

app = typer.Typer(
    name="bwacal",
    help="Post-training quantization of ONNX image classifiers with bit-weight adjustment (BWA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from cli import inspect_cmd  # noqa: E402,F401  (commands register themselves on import)
from cli import make_calib_cmd  # noqa: E402,F401
from cli import evaluate_cmd  # noqa: E402,F401
from cli import check_cmd  # noqa: E402,F401
from cli import calibrate_cmd  # noqa: E402,F401
from cli import batch_cmd  # noqa: E402,F401
from cli import plot_cmd  # noqa: E402,F401

if __name__ == "__main__":
    # NOTE: under ``python -m cli.main`` this module is ``__main__``; the commands registered
    # themselves on ``cli.main.app`` (imported afresh above), not on this module's ``app``.
    from cli.main import app as registered

    registered()
