"""Option types shared by the commands, so a flag means the same thing, under the same name, everywhere.

Old spellings stay as hidden options (``--eval`` for ``--data``, ``--out`` for ``--output``) so
scripts written against them keep working; ``pick`` merges an option with its old name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bwacal.calibrate import CalibrationOptions
from bwacal.errors import BwacalError

DEFAULTS = CalibrationOptions()
"""The library's defaults: calibrate's and batch's options default to them, so the command and
``bwacal.calibrate()`` calibrate alike."""

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or notes; only results and errors.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (accuracies as fractions).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
Data = Annotated[Path, typer.Option("--data", help="Evaluation HDF5 file: 'images' (N, C, H, W), optional 'labels'.")]
EvalData = Annotated[Optional[Path], typer.Option(
    "--data", help="Report accuracies on this HDF5 file instead of the held-out calibration split.")]
OldEval = Annotated[Optional[Path], typer.Option("--eval", hidden=True, help="Old name of --data.")]
Reference = Annotated[Optional[Path], typer.Option("--reference", help="The full-precision ONNX model to compare with.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
InputShape = Annotated[Optional[str], typer.Option(
    "--input-shape", help="Image size CxHxW (e.g. 3x224x224) for a model with dynamic dims "
                          "(default: the data file's image size).")]
Runtime = Annotated[str, typer.Option("--runtime", help="Where models run: bwacal (the built-in engine) or onnxruntime.")]

DEFAULT_BATCH_SIZE = 256

# ---- calibration options, shared by calibrate and batch -------------------------------------------

Calib = Annotated[Optional[Path], typer.Option("--calib", help="Calibration HDF5 file ('images', optional 'labels').")]
ActBits = Annotated[Optional[int], typer.Option(
    "--act-bits", help="Quantize activations at the input of each quantized layer to this many bits "
                       "(default: float activations).")]
ActBwa = Annotated[bool, typer.Option("--act-bwa", help="Fit bit weights for activations too (needs --act-bits).")]
AllLayers = Annotated[bool, typer.Option(
    "--all-layers", help="Quantize the first conv and last linear layer at the requested width too "
                         "(default: they stay at 8 bits).")]
Format = Annotated[str, typer.Option(
    "--format", help="fake: float weights holding the BWA values; packed: the bit planes packed 8 weights to a "
                     "byte + per-channel step*alpha and step*gamma, unpacked by standard ops when the model loads "
                     "(a W3 file about 3/32 of the float one); qdq: int8 weights (the BWA levels snapped to a "
                     "per-channel int8 grid) and 8-bit QuantizeLinear/DequantizeLinear that ONNX Runtime runs as "
                     "integer kernels; activations are quantized (without --act-bits: at 8 bits), and the outputs "
                     "of layers and residual Adds get 8-bit steps from the calibration images; bitplanes: each "
                     "layer as one ConvInteger/MatMulInteger per bit plane of its binary weights (the paper's "
                     "form; activations quantized as with qdq).")]
Epochs = Annotated[int, typer.Option("--epochs", help="Passes over the calibration set.")]
FitBatch = Annotated[int, typer.Option("--batch-size", help="Images per fitting step.")]
MicroBatch = Annotated[Optional[int], typer.Option(
    "--micro-batch", help="Images per recorded forward of a step (gradients are summed over the step's "
                          "micro-batches); default: the largest whose recording for backward stays under "
                          "768 MiB, so 224x224 models fit in memory.")]
Lr = Annotated[float, typer.Option("--lr", help="Adam learning rate on the normalised bit weights (cosine decay).")]
Holdout = Annotated[float, typer.Option("--holdout", help="Fraction of the calibration set held out to pick the best epoch.")]
Split = Annotated[str, typer.Option(
    "--split", help="How the held-out part is drawn: random, source (whole sources on one side: needs the "
                    "file's 'sources'), blocks (contiguous blocks of the file), or auto (source when the file "
                    "has sources, else random).")]
Loss = Annotated[str, typer.Option(
    "--loss", help="kl (distil the full-precision model; no labels needed), ce (cross-entropy with the labels) "
                   "or both.")]
WeightMethod = Annotated[str, typer.Option(
    "--weight-method", help="The uniform grid fitting starts from: mse (per-channel step minimising weight "
                            "error), minmax, output (per-channel step minimising the layer's output error on "
                            "calibration activations), or auto (whichever of the three gives the lowest "
                            "held-out loss).")]
ActMethod = Annotated[str, typer.Option("--act-method", help="Activation step calibration: mse or percentile.")]
Method = Annotated[str, typer.Option(
    "--method", help="adaround-bwa (the most accurate measured): AdaRound's codes, then bit weights end to end; "
                     "bwa: bit weights on round-to-nearest codes (the paper, the fastest); adaround: learned "
                     "rounding layer by layer, uniform levels; bwa-codes: bit weights and the codes' rounding "
                     "fitted together end to end.")]
AdaRoundIterations = Annotated[int, typer.Option(
    "--adaround-iterations", help="AdaRound iterations per layer (adaround, adaround-bwa).")]
AdaRoundImages = Annotated[int, typer.Option(
    "--adaround-images", help="Calibration images (of the fitting split) AdaRound reconstructs each layer's output on.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for the split and shuffling; same seed, same output bytes.")]
NumImages = Annotated[Optional[int], typer.Option(
    "--num-images", help="Calibrate on a seeded random subset of this many images of --calib (read without "
                         "loading the rest); default: every image.")]


def pick(value, old, name: str, old_name: str):
    """``value`` or, when only the old spelling was given, ``old``; both given is an error."""
    if value is not None and old is not None:
        raise BwacalError(f"{old_name} is the old name of {name}; give only {name}")
    return old if value is None else value
Exclude = Annotated[Optional[list[str]], typer.Option(
    "--exclude", help="Keep the layers whose node or weight name matches this glob in float (repeatable), "
                      "e.g. --exclude 'classifier*'.")]
LayerBits = Annotated[Optional[list[str]], typer.Option(
    "--layer-bits", help="PATTERN=BITS: weight bits for the layers matching the glob, whatever the protocol "
                         "(repeatable; a later match wins), e.g. --layer-bits 'layer1.*=4'.")]
Config = Annotated[Optional[Path], typer.Option(
    "--config", help="TOML file of calibrate options (names with underscores) and per-layer rules "
                     "(exclude = [...], [layer_bits]); options given on the command line win.")]


def with_config(ctx: typer.Context, values: dict, config: Path | None, ignore=frozenset()) -> dict:
    """``values`` (a command's parameters by name) with the ``--config`` file's settings where the
    command line left a parameter at its default; the file's per-layer rules come before the command
    line's; keys in ``ignore`` are skipped. Returns a new dict; ``BwacalError`` for a bad file."""
    from typer._click.core import ParameterSource

    from bwacal.config import read_config

    values = dict(values)
    if config is None:
        return values
    table = read_config(config)
    if "protocol" in table:
        table["all_layers"] = table.pop("protocol") == "all-layers"
    for key, value in table.items():
        if key in ignore or (key == "all_layers" and "protocol" in ignore):
            continue
        name = {"format": "fmt"}.get(key, key)
        if name not in values:
            raise BwacalError(f"{config}: {key!r} does not apply to this command")
        if key == "exclude":
            values[name] = list(value) + list(values[name] or [])
        elif key == "layer_bits":
            values[name] = [f"{p}={b}" for p, b in value.items()] + list(values[name] or [])
        elif ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT):
            values[name] = value
    return values


def calibration_options(values: dict):
    """``CalibrationOptions`` from a command's parameters by name: ``all_layers`` as the protocol, the
    per-layer rules parsed; names that are no option (files, format) are left out."""
    from dataclasses import fields

    from bwacal.layer_rules import parse_layer_bits

    names = {f.name for f in fields(CalibrationOptions)} - {"protocol", "exclude", "layer_bits"}
    return CalibrationOptions(**{k: v for k, v in values.items() if k in names},
                              protocol="all-layers" if values.get("all_layers") else "first-last-8bit",
                              exclude=tuple(values.get("exclude") or ()),
                              layer_bits=tuple(parse_layer_bits(r) for r in values.get("layer_bits") or ()))
AvgBits = Annotated[Optional[float], typer.Option(
    "--avg-bits", help="Mixed precision: choose each layer's weight width from 2, 3, 4, 8 (by its estimated "
                       "sensitivity) for this average over all quantized weights, weighted by their counts, first "
                       "and last layer included (they stay at 8 bits unless --all-layers; --layer-bits pins others).")]
SizeBudget = Annotated[Optional[float], typer.Option(
    "--size-budget", help="Mixed precision like --avg-bits, for a model size in MB (10^6 bytes): quantized weights "
                          "bit-packed at their widths plus every other parameter at 4 bytes.")]
MaxDrop = Annotated[Optional[float], typer.Option(
    "--max-drop", help="Accuracy control: start at --bits and raise the most sensitive layers until top-1 on the "
                       "evaluation data (--data, else the held-out split; needs labels) is at most this many points "
                       "below full precision; exits 1, writing nothing, when it cannot be met.")]
