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
from bwacal.layer_rules import apply_layer_rules
from bwacal.quantize import PROTOCOLS, select_layers, skipped_layers

METADATA_KEYS = ("bwacal_version", "bwacal_format", "bwacal_bits", "bwacal_act_bits", "bwacal_act_bwa",
                 "bwacal_protocol", "bwacal_method", "bwacal_calib_sha256", "bwacal_source_sha256", "bwacal_accuracy", "bwacal_layers", "bwacal_activations",
                 "bwacal_mixed")


@dataclass
class WeightLayer:
    """A layer calibration would quantize: node, weight name and shape, output-channel axis, parameters
    (with bias), output channels."""

    name: str
    op_type: str
    weight: str
    shape: tuple
    axis: int
    params: int
    channels: int


def weight_layers(graph: Graph) -> list[WeightLayer]:
    """The layers ``bwacal calibrate`` quantizes (``quantize.select_layers``), in graph order."""
    nodes = {n.name: n for n in graph.nodes}
    layers = []
    for q in select_layers(graph, 8, "all-layers"):
        node = nodes[q.node]
        w = graph.initializers[q.weight]
        bias = graph.initializers.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        params = int(w.size) + (int(bias.size) if bias is not None else 0)
        layers.append(WeightLayer(q.node, q.op_type, q.weight, tuple(int(d) for d in w.shape), q.axis, params,
                                  int(w.shape[q.axis])))
    return layers


def layer_bits(graph: Graph, bits: int, protocol: str, exclude=(), rules=()) -> list:
    """Weight width per layer of ``weight_layers(graph)`` under ``protocol`` and the per-layer rules
    (``exclude`` patterns, ``rules`` (pattern, bits) pairs; see ``bwacal.layer_rules``), exactly as
    calibration assigns it; ``"float"`` for a layer the rules keep in float."""
    if protocol not in PROTOCOLS:
        raise BwacalError(f"unknown protocol '{protocol}', expected one of: {', '.join(PROTOCOLS)}")
    kept, excluded = apply_layer_rules(select_layers(graph, bits, protocol), exclude, rules)
    widths = {q.node: q.bits for q in kept} | {q.node: "float" for q in excluded}
    return [widths[q.node] for q in select_layers(graph, bits, protocol)]


def check_inspect_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise BwacalError(f"--bits must be an integer from 2 to 8, got {bits!r}")
    return int(bits)


def _value(v) -> dict:
    return {"name": v.name, "dtype": None if v.dtype is None else str(v.dtype),
            "shape": None if v.shape is None else ["N" if d is None else d for d in v.shape]}


def summarise_gamma(gamma) -> dict:
    """Mean, min and max of the per-channel gamma, rounded to 6 decimals."""
    g = np.asarray(gamma, dtype=np.float64)
    return {"mean": round(float(g.mean()), 6), "min": round(float(g.min()), 6), "max": round(float(g.max()), 6)}


def summarise_alpha(alpha) -> dict:
    """Bit weights (channels, bits) relative to their uniform values 2**k: mean per bit plane, min and max."""
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"alpha has shape {a.shape}, expected (channels, bits)")
    rel = a / 2.0 ** np.arange(a.shape[1])
    return {"rel_mean_per_plane": [round(float(v), 4) for v in rel.mean(axis=0)],
            "rel_min": round(float(rel.min()), 4), "rel_max": round(float(rel.max()), 4)}


def bwacal_metadata(meta: dict) -> tuple[dict | None, list[str]]:
    """The calibration record bwacal stores in ``metadata_props`` (None if absent) and any warnings."""
    if not any(k in meta for k in METADATA_KEYS):
        return None, []
    warnings = []
    out = {k[len("bwacal_"):]: meta.get(k) for k in METADATA_KEYS}
    out.update(accuracy=None, layers=None, activations=None, mixed=None)
    if "bwacal_mixed" in meta:
        try:
            out["mixed"] = json.loads(meta["bwacal_mixed"])
        except ValueError as exc:
            warnings.append(f"metadata bwacal_mixed is not valid JSON ({exc})")
    out["method"] = meta.get("bwacal_method", "bwa")  # written only for other methods than the paper's
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
                # per-channel lists (fake), or the summaries themselves (the compact formats)
                alpha, gamma = row.get("alpha"), row.get("gamma")
                if alpha is not None:
                    entry["alpha"] = dict(alpha) if isinstance(alpha, dict) else summarise_alpha(alpha)
                if gamma is not None:
                    entry["gamma"] = dict(gamma) if isinstance(gamma, dict) else summarise_gamma(gamma)
                layers.append(entry)
            out["layers"] = layers
        except (ValueError, TypeError, AttributeError) as exc:
            warnings.append(f"metadata bwacal_layers cannot be read ({exc})")
    if "bwacal_activations" in meta:
        try:
            acts = json.loads(meta["bwacal_activations"])
            out["activations"] = [{"value": a.get("value"), "bits": a.get("bits"), "signed": a.get("signed")}
                                  for a in acts]
        except (ValueError, TypeError, AttributeError) as exc:
            warnings.append(f"metadata bwacal_activations cannot be read ({exc})")
    return out, warnings


# kernels of ONNX Runtime's CPU provider that compute on integers (its QDQ fusions and the standard ops)
INTEGER_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm", "ConvInteger",
                             "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                             "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid",
                             "QLinearLeakyRelu", "QLinearSoftmax"})
# the ops whose kernel inspect reports
COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "Add", "ConvInteger", "MatMulInteger")
QUANTIZED_OPS = frozenset({"DequantizeLinear", "ConvInteger", "MatMulInteger"})


def onnxruntime_kernels(path, graph: Graph) -> dict | None:
    """Which kernel ONNX Runtime's CPU provider runs for each Conv, Gemm, MatMul and Add of ``graph``
    (read from ``path``) after its graph optimizations: ``{"runtime", "nodes": [{"node", "op",
    "kernel", "integer"}]}`` ("?" for a node it renamed), or None when the model has no
    DequantizeLinear or integer op (nothing to fuse) or ONNX Runtime is not installed. Fused nodes keep
    the name of the node they replace (ONNX Runtime appends ``_token_N``)."""
    import re
    import tempfile
    from pathlib import Path

    if not any(n.op_type in QUANTIZED_OPS for n in graph.nodes):
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001  (the report says so; evaluate shows the runtime's error)
            return {"runtime": f"onnxruntime {ort.__version__} (CPU)", "error": str(exc).splitlines()[0][:200],
                    "nodes": []}
        optimized = read_model(Path(tmp) / "optimized.onnx")
    kernels = {}
    for node in optimized.nodes:
        base = re.sub(r"(_token_\d+|_nchwc)+$", "", node.name)
        kernels.setdefault(base, node.op_type.split("::")[-1])
    rows = []
    for node in graph.nodes:
        if node.op_type in COMPUTE_OPS:
            kernel = kernels.get(node.name, "?")
            rows.append({"node": node.name, "op": node.op_type, "kernel": kernel, "integer": kernel in INTEGER_KERNELS})
    return {"runtime": f"onnxruntime {ort.__version__} (CPU)", "nodes": rows}


def describe_model(path, bits: int = 3, input_shape=None, exclude=(), rules=()) -> dict:
    """Everything ``bwacal inspect`` shows, as a JSON-ready dict.

    Raises ``ModelError`` only when the file cannot be parsed at all; later problems (unsupported
    ops, a graph that is not a classifier) are reported under ``"error"`` with the rest filled in.
    ``"unsupported"`` lists every node left unsupported after load-time folding; ``"layers"`` the
    layers calibration quantizes and ``"skipped"`` every other Conv, Gemm and MatMul with the reason.
    ``input_shape`` (C, H, W) fixes dims the model leaves dynamic; ``exclude`` and ``rules`` are the
    per-layer rules whose plan ``"bits"`` shows.
    """
    from bwacal.model import load_model

    bits = check_inspect_bits(bits)
    raw = read_model(path)
    info = {"model": str(path), "opset": raw.opset,
            "inputs": [_value(v) for v in raw.inputs], "outputs": [_value(v) for v in raw.outputs],
            "ops": dict(sorted(Counter(n.op_type for n in raw.nodes).items())),
            "parameters": int(sum(a.size for a in raw.initializers.values())),
            "layout": None, "num_classes": None, "batchnorm_folded": False, "unsupported": [], "error": None,
            "warnings": []}

    graph = raw
    try:
        model = load_model(path, input_shape=input_shape)
        graph = model.graph
        info.update(num_classes=model.num_classes, layout=model.layout, batchnorm_folded=True)
    except UnsupportedOpError as exc:
        info["unsupported"] = [{"op": op, "node": name, "reason": why} for op, name, why in exc.problems]
        info["error"] = str(exc)
    except BwacalError as exc:
        info["error"] = str(exc)
    if info["error"] is not None:
        graph = _constants_folded(raw)

    layers = weight_layers(graph)
    widths = {p: layer_bits(graph, bits, p, exclude, rules) for p in PROTOCOLS}
    info["bits"] = bits
    info["exclude"], info["layer_bits"] = list(exclude), [list(r) for r in rules]
    info["layers"] = [{"layer": layer.name, "op": layer.op_type, "weight": layer.weight, "shape": list(layer.shape),
                       "axis": layer.axis, "params": layer.params, "channels": layer.channels,
                       "bits": {p: widths[p][i] for p in PROTOCOLS}} for i, layer in enumerate(layers)]
    info["skipped"] = [{"layer": s.node, "op": s.op_type, "reason": s.reason} for s in skipped_layers(graph)]
    info["bwacal"], info["warnings"] = bwacal_metadata(raw.metadata)
    info["metadata"] = {k: v for k, v in raw.metadata.items() if k not in METADATA_KEYS}
    info["kernels"] = onnxruntime_kernels(path, raw)
    return info


def _constants_folded(raw: Graph) -> Graph:
    """The graph with its constant subgraphs folded (weights written as ConstantOfShape, transposed
    weights), for listing layers of a model that does not load; the graph as read if even that fails."""
    try:
        graph = replace(raw, nodes=toposort(raw.nodes, set(raw.initializers) | {v.name for v in raw.inputs}))
        return passes.remove_identities(passes.fold_constants(graph))
    except Exception:  # a graph too broken to fold is still listed as read
        return raw
