"""``bwacal make-calib``: build a calibration file (HDF5, see ``bwacal.data``) from images on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import user_errors
from cli.main import app


@app.command("make-calib")
def make_calib(
    source: Annotated[Optional[Path], typer.Argument(
        help="A folder with one subfolder of images per class, or an .npz with 'images' and 'labels'.")] = None,
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output HDF5 file.")],
    idx_images: Annotated[Optional[Path], typer.Option(help="IDX images file (MNIST layout, .gz or not).")] = None,
    idx_labels: Annotated[Optional[Path], typer.Option(help="IDX labels file matching --idx-images.")] = None,
    count: Annotated[Optional[int], typer.Option(help="Number of images to keep (default: all).")] = None,
    balanced: Annotated[bool, typer.Option("--balanced/--no-balanced",
                                           help="Take the same number of images from every class.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the random choice.")] = 0,
    size: Annotated[Optional[int], typer.Option(
        help="Image folders: resize the shorter side to SIZE, then centre-crop SIZE x SIZE.")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Per-channel mean after scaling to [0, 1], e.g. 0.2860.")] = None,
    std: Annotated[Optional[str], typer.Option(help="Per-channel std after scaling to [0, 1], e.g. 0.3530.")] = None,
    source_separator: Annotated[Optional[str], typer.Option(
        help="Image folders: files whose names agree before SEP come from one source (photo, video), "
             "e.g. '_' for photo12_crop3.png; stored as 'sources' so the held-out split keeps sources apart. "
             "An .npz gives its own 'sources' array.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False,
):
    """Build a calibration file: a seeded (class-balanced) choice of images, stored as uint8 with scale/mean/std.

    Example: bwacal make-calib --idx-images train-images-idx3-ubyte.gz --idx-labels train-labels-idx1-ubyte.gz
    --count 1024 --mean 0.2860 --std 0.3530 -o data/fmnist_calib.h5
    """
    from bwacal.makecalib import make_calibration_file, parse_channels

    with user_errors(verbose):
        summary = make_calibration_file(
            out, idx_images=idx_images, idx_labels=idx_labels, source=source, count=count,
            balanced=balanced, seed=seed, size=size, mean=parse_channels(mean, "--mean"),
            std=parse_channels(std, "--std"), force=force, source_separator=source_separator,
        )
    c, h, w = summary["image_shape"]
    typer.echo(f"wrote {summary['path']}: {summary['n']} images {c}x{h}x{w} {summary['dtype']}")
    if summary["classes"] is not None:
        typer.echo("per class: " + ", ".join(f"{k}:{v}" for k, v in enumerate(summary["classes"])))
    if summary["sources"] is not None:
        typer.echo(f"sources: {summary['sources']} distinct")
