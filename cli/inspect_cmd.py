"""``bwacal inspect``: what a model contains and how bwacal would treat it."""

from __future__ import annotations

from collections import Counter

from pathlib import Path
from typing import Annotated

import typer

from cli.common import EXIT_BAD_INPUT, echo_json, table, user_errors
from bwacal.config import CONFIG_KEYS
from cli.options import Config, Exclude, InputShape, Json, LayerBits, Quiet, Verbose, with_config


def _shape(v) -> str:
    return "?" if v["shape"] is None else "[" + ", ".join(map(str, v["shape"])) + "]"


def _accuracy(value) -> str:
    """Accuracies are stored as fractions (as ``bwacal.evaluate`` gives them); None when not measured."""
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "n/a"


def render(info: dict) -> list[str]:
    lines = [f"model: {info['model']}", f"opset: {info['opset']}"]
    lines += [f"input: {v['name']} {v['dtype']} {_shape(v)}" for v in info["inputs"]]
    lines += [f"output: {v['name']} {v['dtype']} {_shape(v)}" for v in info["outputs"]]
    if info["layout"] is not None:
        lines.append(f"layout: {info['layout'].upper()}")
    if info["num_classes"] is not None:
        lines.append(f"classes: {info['num_classes']}")
    lines.append("ops: " + ", ".join(f"{k} x{n}" for k, n in info["ops"].items()))
    lines.append(f"parameters: {info['parameters']}")
    layers = info["layers"]
    folded = ", after BatchNorm folding" if info["batchnorm_folded"] else ""
    rules = " and the per-layer rules" if info.get("exclude") or info.get("layer_bits") else ""
    lines.append(f"quantized layers: {len(layers)}{folded}; weight bits per protocol at --bits {info['bits']}{rules}:")
    if layers:
        rows = [(r["layer"], r["op"], "x".join(map(str, r["shape"])), r["axis"], r["params"],
                 r["bits"]["first-last-8bit"], r["bits"]["all-layers"]) for r in layers]
        lines += table(("layer", "op", "weight", "axis", "params", "first-last-8bit", "all-layers"), rows,
                        right=(3, 4, 5, 6))
    if info["skipped"]:
        lines.append(f"not quantized: {len(info['skipped'])}")
        lines += table(("layer", "op", "reason"), [(r["layer"], r["op"], r["reason"]) for r in info["skipped"]])
    if info["unsupported"]:
        lines.append(f"unsupported ops ({len(info['unsupported'])} nodes):")
        lines += [f"  {u['op']} (node '{u['node']}'): {u['reason']}" for u in info["unsupported"]]
    meta = info["bwacal"]
    if meta is not None:
        weights = (f"mixed ({meta['mixed'].get('avg_bits') or 0:.3f} bits on average)" if isinstance(meta.get("mixed"), dict)
                   else f"{meta['bits']} bits")
        lines.append(f"bwacal calibration: version {meta['version']}, format {meta['format']}, weights "
                     f"{weights}, activations {meta['act_bits']} (BWA {meta['act_bwa']}), "
                     f"protocol {meta['protocol']}")
        mixed = meta.get("mixed")
        if isinstance(mixed, dict):
            asked = (f"--avg-bits {mixed['avg_bits_budget']:g}" if mixed.get("avg_bits_budget") is not None else
                     f"--size-budget {mixed['size_budget_mb']:g} MB" if mixed.get("size_budget_mb") is not None else
                     f"--max-drop {mixed.get('max_drop')} ({mixed.get('steps')} steps, drop {mixed.get('drop', 0):.2f})")
            lines.append(f"  mixed precision ({asked}): average {mixed.get('avg_bits') or 0:.3f} weight bits, "
                         f"{(mixed.get('size_bytes') or 0) / 1e6:.3f} MB; each layer's width below")
        if meta.get("source_sha256"):
            lines.append(f"  source model sha256: {meta['source_sha256']}")
        if meta["calib_sha256"]:
            lines.append(f"  calibration data sha256: {meta['calib_sha256']}")
        if meta["accuracy"]:
            lines.append("  top-1: " + ", ".join(f"{k} {_accuracy(v)}" for k, v in meta["accuracy"].items()))
        if meta["layers"]:
            rows = []
            for r in meta["layers"]:
                a, g = r.get("alpha"), r.get("gamma")
                rows.append((r["layer"], r["bits"], r["channels"],
                             " ".join(f"{v:.3f}" for v in a["rel_mean_per_plane"]) if a else "-",
                             f"{a['rel_min']:.3f}..{a['rel_max']:.3f}" if a else "-",
                             f"{g['mean']:.3g}" if g else "-"))
            lines += ["  " + s for s in table(("layer", "bits", "channels", "alpha/2^k mean per plane",
                                                "alpha/2^k range", "gamma mean"), rows, right=(1, 2))]
        if meta["activations"]:
            lines.append(f"  activation quantizers: {len(meta['activations'])}")
    for k, v in info["metadata"].items():
        lines.append(f"metadata: {k} = {v}")
    kernels = info.get("kernels")
    if kernels is not None:
        lines += _kernel_lines(kernels)
    return lines


def _kernel_lines(kernels: dict) -> list[str]:
    """Which Conv/Gemm/MatMul/Add nodes the runtime runs as integer kernels, and which in float."""
    if kernels.get("error"):
        return [f"{kernels['runtime']}: cannot load the model ({kernels['error']})"]
    rows = kernels["nodes"]
    counts = []
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        counts.append(f"{sum(r['integer'] for r in mine)} of {len(mine)} {op}")
    lines = [f"{kernels['runtime']} runs as integer ops: " + ", ".join(counts)]
    kinds = Counter(r["kernel"] for r in rows if r["integer"])
    if kinds:
        lines.append("  integer kernels: " + ", ".join(f"{k} x{n}" for k, n in kinds.items()))
    floats = [r for r in rows if not r["integer"]]
    if floats:
        lines.append(f"  in float ({len(floats)}): " + ", ".join(f"{r['node']} ({r['kernel']})" for r in floats[:12])
                     + (", ..." if len(floats) > 12 else ""))
    return lines


# the calibrate options of a --config file that do not change the plan inspect shows
IGNORED_CONFIG_KEYS = frozenset(CONFIG_KEYS) - {"bits", "input_shape", "exclude", "layer_bits"}


def inspect_model(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    *,
    bits: Annotated[int, typer.Option("--bits", help="Weight width (2-8) for the per-protocol plan.")] = 3,
    input_shape: InputShape = None,
    exclude: Exclude = None,
    layer_bits: LayerBits = None,
    config: Config = None,
    json_out: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Show a model's inputs, outputs, op counts, the layers calibration quantizes (weight shape, axis, the bit
    width under each protocol) and why every other Conv, Gemm and MatMul is not, every op left unsupported
    after load-time folding, and the calibration record of a model bwacal wrote.

    Exits 2 (after printing the rest) when the model has unsupported ops or is not a classifier bwacal can run.

    Example: bwacal inspect data/zoo/resnet20.onnx --bits 3
    """
    from bwacal.errors import BwacalError, ModelError
    from bwacal.inspection import describe_model
    from bwacal.layer_rules import parse_layer_bits
    from bwacal.model import parse_input_shape

    with user_errors(verbose):
        given = with_config(ctx, {"bits": bits, "input_shape": input_shape, "exclude": exclude,
                                  "layer_bits": layer_bits}, config, ignore=IGNORED_CONFIG_KEYS)
        bits, input_shape = given["bits"], given["input_shape"]
        rules = [parse_layer_bits(r) for r in given["layer_bits"] or ()]
        shape = parse_input_shape(input_shape) if input_shape is not None else None
        try:
            info = describe_model(model, bits=bits, input_shape=shape, exclude=given["exclude"] or (), rules=rules)
        except BwacalError:
            raise
        except Exception as exc:  # the analysis met a graph too malformed to describe
            raise ModelError(f"{model}: cannot be inspected, the graph is malformed "
                             f"({type(exc).__name__}: {exc}); --verbose shows where") from exc
    if json_out:
        echo_json(info)
    else:
        for line in render(info):
            typer.echo(line)
    if not quiet:
        for w in info["warnings"]:
            typer.echo(f"warning: {w}", err=True)
    if info["error"] is not None:
        typer.echo(f"error: {info['error']}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
