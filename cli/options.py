"""Option types shared by the commands, so a flag means the same thing everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes; only results and errors.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Data = Annotated[Path, typer.Option("--data", help="Evaluation HDF5 file: 'images' (N, C, H, W), optional 'labels'.")]
Reference = Annotated[Optional[Path], typer.Option("--reference", help="The full-precision ONNX model to compare with.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
InputShape = Annotated[Optional[str], typer.Option(
    "--input-shape", help="Image size CxHxW (e.g. 3x224x224) for a model with dynamic dims "
                          "(default: the data file's image size).")]
Runtime = Annotated[str, typer.Option("--runtime", help="Where models run: bwacal (the built-in engine) or onnxruntime.")]

DEFAULT_BATCH_SIZE = 256
