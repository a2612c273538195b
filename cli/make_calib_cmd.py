"""``bwacal make-calib``: build a calibration file (HDF5, see ``bwacal.data``) from images on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import echo_json, user_errors
from cli.options import Force, Json, Verbose, pick


def model_image_size(model: Path) -> tuple[int, int, str]:
    """(side, channels, layout) of the images ``model`` takes: the crop ``--size`` and ``--grayscale/--rgb``
    default to them."""
    from bwacal.errors import BwacalError, ModelError
    from bwacal.model import load_model

    try:
        loaded = load_model(model)
    except ModelError as exc:
        if "dynamic dims" in str(exc):
            raise BwacalError(f"{model}: the model's image size is dynamic; give --size (and --grayscale or "
                              "--rgb)") from None
        raise
    shape = loaded.input_shape if loaded.layout == "nchw" else (loaded.input_shape[2], *loaded.input_shape[:2])
    c, h, w = shape
    if h != w:
        raise BwacalError(f"{model}: takes {h}x{w} images; make-calib crops squares, so --model needs a square input")
    return h, c, loaded.layout


def make_calib(
    source: Annotated[Optional[Path], typer.Argument(
        help="A folder with one subfolder of images per class, or an .npz with 'images' (and 'labels').")] = None,
    *,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output HDF5 file.")] = None,
    idx_images: Annotated[Optional[Path], typer.Option(help="IDX images file (MNIST layout, .gz or not).")] = None,
    idx_labels: Annotated[Optional[Path], typer.Option(help="IDX labels file matching --idx-images.")] = None,
    count: Annotated[Optional[int], typer.Option(help="Number of images to keep (default: all).")] = None,
    balanced: Annotated[Optional[bool], typer.Option(
        "--balanced/--no-balanced", show_default=False,
        help="Take the same number of images from every class (default: balanced when the source has labels).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random choice.")] = 0,
    model: Annotated[Optional[Path], typer.Option(
        "--model", help="The ONNX model the file is for: --size, the channels and the layout follow its input.")] = None,
    size: Annotated[Optional[int], typer.Option(
        help="Image folders: resize the shorter side to SIZE, then centre-crop SIZE x SIZE (default: --model's).")] = None,
    channels: Annotated[Optional[bool], typer.Option(
        "--grayscale/--rgb", show_default=False,
        help="Store 1 greyscale or 3 RGB channels (default: --model's; else as the source gives them).")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Per-channel mean after scaling to [0, 1], e.g. 0.2860.")] = None,
    std: Annotated[Optional[str], typer.Option(help="Per-channel std after scaling to [0, 1], e.g. 0.3530.")] = None,
    source_separator: Annotated[Optional[str], typer.Option(
        help="Image folders: files whose names agree before SEP come from one source (photo, video), "
             "e.g. '_' for photo12_crop3.png; stored as 'sources' so the held-out split keeps sources apart. "
             "An .npz gives its own 'sources' array.")] = None,
    force: Force = False,
    json_out: Json = False,
    verbose: Verbose = False,
    old_out: Annotated[Optional[Path], typer.Option("--out", hidden=True, help="Old name of --output.")] = None,
):
    """Build a calibration file: a seeded (class-balanced) choice of images, stored as uint8 with scale/mean/std.

    An image folder's class map (subfolder name -> label) is printed and stored with the labels.

    Example: bwacal make-calib --idx-images train-images-idx3-ubyte.gz --idx-labels train-labels-idx1-ubyte.gz
    --count 1024 --mean 0.2860 --std 0.3530 -o data/fmnist_calib.h5
    """
    from bwacal.errors import BwacalError
    from bwacal.makecalib import make_calibration_file, parse_channels

    with user_errors(verbose):
        out = pick(output, old_out, "--output", "--out")
        if out is None:
            raise BwacalError("make-calib needs the output file: -o CALIB.h5")
        want = None if channels is None else (1 if channels else 3)
        layout = "nchw"
        if model is not None:
            side, model_channels, layout = model_image_size(model)
            size = side if size is None else size
            want = model_channels if want is None else want
        summary = make_calibration_file(
            out, idx_images=idx_images, idx_labels=idx_labels, source=source, count=count,
            balanced=balanced, seed=seed, size=size, mean=parse_channels(mean, "--mean"),
            std=parse_channels(std, "--std"), force=force, source_separator=source_separator,
            channels=want, layout=layout,
        )
    if json_out:
        echo_json({**summary, "path": str(summary["path"]), "image_shape": list(summary["image_shape"])})
        return
    c, h, w = summary["image_shape"]
    typer.echo(f"wrote {summary['path']}: {summary['n']} images {c}x{h}x{w} {summary['dtype']}"
               + (", channels last" if layout == "nhwc" else ""))
    if summary["class_names"] is not None:
        typer.echo("classes (label: folder, images): " + ", ".join(
            f"{k}: {name} {n}" for k, (name, n) in enumerate(zip(summary["class_names"], summary["classes"]))))
    elif summary["classes"] is not None:
        typer.echo("per class: " + ", ".join(f"{k}:{v}" for k, v in enumerate(summary["classes"])))
    else:
        typer.echo("no labels: calibration distils the model's own outputs (--loss kl), and reports "
                   "agreement with full precision instead of top-1")
    if summary["sources"] is not None:
        typer.echo(f"sources: {summary['sources']} distinct")
