"""What a model contains and how bwacal would treat it (behind ``bwacal inspect``).

``describe_model`` never stops at the first problem: it lists every unsupported op and still
reports inputs, ops and layers, returning the problem for the caller to turn into an exit code.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from bwacal import passes
from bwacal.errors import BwacalError, UnsupportedOpError
from bwacal.graph import Graph, toposort
from bwacal.onnx_io import read_model

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
PROTOCOLS = ("first-last-8bit", "all-layers")
EDGE_BITS = 8  # width of the first conv and the last linear layer under "first-last-8bit"
METADATA_KEYS = ("bwacal_version", "bwacal_bits", "bwacal_act_bits", "bwacal_protocol", "bwacal_calib_sha256",
                 "bwacal_accuracy", "bwacal_layers")


@dataclass
class WeightLayer:
    """A layer with a weight initializer: its node, weight name and shape, parameters and output channels."""

    name: str
    op_type: str
    weight: str
    shape: tuple
    params: int
    channels: int


def weight_layers(graph: Graph) -> list[WeightLayer]:
    """Conv / Gemm / MatMul nodes whose weight is an initializer, in graph order."""
    layers = []
    for node in graph.nodes:
        if node.op_type not in WEIGHT_OPS or len(node.inputs) < 2 or node.inputs[1] not in graph.initializers:
            continue
        w = graph.initializers[node.inputs[1]]
        bias = graph.initializers.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attrs.get("transB", 0)):
            channels = int(w.shape[0]) if w.ndim else 1
        else:  # MatMul, Gemm without transB: (in, out)
            channels = int(w.shape[-1]) if w.ndim else 1
        params = int(w.size) + (int(bias.size) if bias is not None else 0)
        layers.append(WeightLayer(node.name, node.op_type, node.inputs[1], tuple(int(d) for d in w.shape),
                                  params, channels))
    return layers


def layer_bits(layers: list[WeightLayer], bits: int, protocol: str) -> list[int]:
    """Weight width per layer: ``bits`` everywhere ("all-layers"), or 8 for the first conv and last linear layer."""
    if protocol not in PROTOCOLS:
        raise BwacalError(f"unknown protocol '{protocol}', expected one of: {', '.join(PROTOCOLS)}")
    widths = [bits] * len(layers)
    if protocol == "first-last-8bit" and layers:
        convs = [i for i, layer in enumerate(layers) if layer.op_type == "Conv"]
        linears = [i for i, layer in enumerate(layers) if layer.op_type != "Conv"]
        widths[convs[0] if convs else 0] = max(bits, EDGE_BITS)
        widths[linears[-1] if linears else len(layers) - 1] = max(bits, EDGE_BITS)
    return widths


def check_inspect_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise BwacalError(f"--bits must be an integer from 2 to 8, got {bits!r}")
    return int(bits)


def _value(v) -> dict:
    return {"name": v.name, "dtype": None if v.dtype is None else str(v.dtype),
            "shape": None if v.shape is None else ["N" if d is None else d for d in v.shape]}


def _summarise_alpha(alpha, channels):
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"alpha has shape {a.shape}")
    # one row per channel, one column per bit plane (transpose if stored the other way round)
    if a.shape[0] != channels and a.shape[1] == channels:
        a = a.T
    return {"per_plane_mean": [round(float(v), 6) for v in a.mean(axis=0)],
            "min": round(float(a.min()), 6), "max": round(float(a.max()), 6)}


def bwacal_metadata(meta: dict) -> tuple[dict | None, list[str]]:
    """The calibration record bwacal stores in ``metadata_props`` (None if absent) and any warnings."""
    if not any(k in meta for k in METADATA_KEYS):
        return None, []
    warnings = []
    out = {"version": meta.get("bwacal_version"), "bits": meta.get("bwacal_bits"),
           "act_bits": meta.get("bwacal_act_bits"), "protocol": meta.get("bwacal_protocol"),
           "calib_sha256": meta.get("bwacal_calib_sha256"), "accuracy": None, "layers": None}
    if "bwacal_accuracy" in meta:
        try:
            acc = json.loads(meta["bwacal_accuracy"])
            if not isinstance(acc, dict):
                raise ValueError("not an object")
            out["accuracy"] = acc
        except ValueError as exc:
            warnings.append(f"metadata bwacal_accuracy is not valid JSON ({exc})")
    if "bwacal_layers" in meta:
        try:
            rows = json.loads(meta["bwacal_layers"])
            layers = []
            for row in rows:
                entry = {k: row.get(k) for k in ("layer", "weight", "bits", "channels")}
                if row.get("alpha") is not None:
                    entry["alpha"] = _summarise_alpha(row["alpha"], row.get("channels"))
                if row.get("gamma") is not None:
                    g = np.asarray(row["gamma"], dtype=np.float64)
                    entry["gamma"] = {"mean": round(float(g.mean()), 6), "min": round(float(g.min()), 6),
                                      "max": round(float(g.max()), 6)}
                layers.append(entry)
            out["layers"] = layers
        except (ValueError, TypeError, AttributeError) as exc:
            warnings.append(f"metadata bwacal_layers cannot be read ({exc})")
    return out, warnings


def describe_model(path, bits: int = 3) -> dict:
    """Everything ``bwacal inspect`` shows, as a JSON-ready dict.

    Raises ``ModelError`` only when the file cannot be parsed at all; later problems (unsupported
    ops, a graph that is not a classifier) are reported under ``"error"`` with the rest filled in.
    ``"unsupported"`` lists every unsupported node.
    """
    from bwacal.engine import build_ops
    from bwacal.model import load_model

    bits = check_inspect_bits(bits)
    raw = read_model(path)
    info = {"model": str(path), "opset": raw.opset,
            "inputs": [_value(v) for v in raw.inputs], "outputs": [_value(v) for v in raw.outputs],
            "ops": dict(sorted(Counter(n.op_type for n in raw.nodes).items())),
            "parameters": int(sum(a.size for a in raw.initializers.values())),
            "num_classes": None, "batchnorm_folded": False, "unsupported": [], "error": None, "warnings": []}

    graph = raw
    try:
        graph = replace(raw, nodes=toposort(raw.nodes, set(raw.initializers) | {v.name for v in raw.inputs}))
        graph = passes.remove_identities(passes.constants_to_initializers(graph))
        build_ops(graph)
    except ValueError:
        info["error"] = f"{path}: the graph has a cycle"
    except UnsupportedOpError as exc:
        info["unsupported"] = [{"op": op, "node": name, "reason": why} for op, name, why in exc.problems]
        info["error"] = str(exc).replace("unsupported op", f"{path}: unsupported op", 1)
    if info["error"] is None:
        try:
            model = load_model(path)
            graph = model.graph
            info["num_classes"] = model.num_classes
            info["batchnorm_folded"] = True
        except BwacalError as exc:
            info["error"] = str(exc)

    layers = weight_layers(graph)
    widths = {p: layer_bits(layers, bits, p) for p in PROTOCOLS}
    info["bits"] = bits
    info["layers"] = [{"layer": layer.name, "op": layer.op_type, "weight": layer.weight, "shape": list(layer.shape),
                       "params": layer.params, "channels": layer.channels,
                       "bits": {p: widths[p][i] for p in PROTOCOLS}} for i, layer in enumerate(layers)]
    info["bwacal"], info["warnings"] = bwacal_metadata(raw.metadata)
    info["metadata"] = {k: v for k, v in raw.metadata.items() if k not in METADATA_KEYS}
    return info

