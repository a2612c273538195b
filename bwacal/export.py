"""Writing a calibrated network as a standard ONNX model.

- ``fake``: the (BatchNorm-folded) graph with every quantized weight replaced by its BWA values.
- ``packed``: each quantized weight stored as its b bit planes, eight weights to a byte, with the
  per-channel ``step * alpha_k`` and ``step * gamma`` (float32); BitShift, Reshape, Cast, Mul, Split,
  Sum and Add (opset 11 on) rebuild ``sum_k (step alpha_k) B_k + step gamma``, within a few float32
  ulps of the fake format's weights. ONNX Runtime folds the subgraph once, when the session starts.
  A W3 weight costs 3/8 of a byte instead of four.

Activation quantizers become Clip + QuantizeLinear (uint8 codes) + Cast + Gather from the table of
the 2**A levels (uniform, or the BWA levels with bit weights on activations).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from bwacal import __version__
from bwacal.errors import BwacalError
from bwacal.graph import Graph, Node
from bwacal.kernels.quant import pack_bitplanes
from bwacal.onnx_io import write_model
from bwacal.quantize import QuantizedNetwork

FORMATS = ("fake", "packed")


def quantized_graph(net: QuantizedNetwork, fmt: str = "fake") -> Graph:
    """The standard-op graph that computes what ``net.forward`` computes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    graph = net.graph
    inits = dict(graph.initializers)
    params = net.params()
    extra_nodes = []
    for index, qw in enumerate(net.weights):
        if qw.rounding is not None:
            raise ValueError(f"weight '{qw.name}' of node '{qw.node}' still has soft rounding; harden() it first")
        if fmt == "fake":
            inits[qw.name] = params[qw.name].astype(np.float32)
        else:
            del inits[qw.name]
            extra_nodes += _packed_weight(qw, index, graph.opset, inits)
    nodes = list(extra_nodes)
    for node in graph.nodes:
        if node.op_type == "bwacal::ActQuant":
            nodes += _act_quant_nodes(net, node, inits)
        else:
            nodes.append(node)
    for aq in net.acts:
        if aq.alpha_name:
            inits.pop(aq.alpha_name, None)
    return replace(graph, nodes=nodes, initializers=inits)


# constants every packed weight shares: byte b's bit j is (b << (7 - j)) >> 7 in uint8 arithmetic
SHIFTS, SEVEN = "bwacal.unpack.shifts", "bwacal.unpack.seven"
START, AXIS1 = "bwacal.unpack.start", "bwacal.unpack.axis1"


def _packed_weight(qw, index: int, opset: int, inits) -> list[Node]:
    """The bit planes of ``qw`` packed eight weights to a byte with the per-channel ``step * alpha_k``
    and ``step * gamma`` (float32), and the nodes that rebuild ``sum_k (step alpha_k) B_k + step gamma``:
    elementwise ops only, so a channel's weights take at most 2**bits values.

    Values and nodes are named ``bwacal.w<index>.*`` (short: a model has a dozen of them per weight)."""
    base, bits = f"bwacal.w{index}", qw.bits
    channels, k = qw.codes.shape
    n = channels * k
    packed = pack_bitplanes(qw.planes.reshape(bits, 1, n))  # (bits, 1, ceil(n / 8)): no padding per row
    inits[f"{base}.planes"] = packed.reshape(bits, -1, 1)
    inits[SHIFTS] = (7 - np.arange(8)).astype(np.uint8)
    inits[SEVEN] = np.array(7, dtype=np.uint8)
    step = qw.step.astype(np.float64)
    inits[f"{base}.scales"] = (qw.alpha.T * step[None, :]).astype(np.float32)[:, :, None]  # (bits, C, 1)
    inits[f"{base}.offsets"] = (qw.gamma * step).astype(np.float32).reshape(1, channels, 1)
    inits[f"{base}.planes_shape"] = np.array([bits, channels, k], dtype=np.int64)
    nodes = [
        Node("BitShift", f"{base}.shift_left", [f"{base}.planes", SHIFTS], [f"{base}.high"], {"direction": "LEFT"}),
        Node("BitShift", f"{base}.shift_right", [f"{base}.high", SEVEN], [f"{base}.bits"], {"direction": "RIGHT"}),
    ]
    unpacked = f"{base}.bits"
    if packed.shape[-1] * 8 != n:  # the last byte is padding
        rows = f"bwacal.unpack.rows{bits}"
        inits[rows] = np.array([bits, -1], dtype=np.int64)
        inits[START], inits[AXIS1] = np.array([0], dtype=np.int64), np.array([1], dtype=np.int64)
        inits[f"{base}.end"] = np.array([n], dtype=np.int64)
        nodes += [Node("Reshape", f"{base}.flatten", [unpacked, rows], [f"{base}.flat"]),
                  Node("Slice", f"{base}.unpad", [f"{base}.flat", START, f"{base}.end", AXIS1], [f"{base}.flat_n"])]
        unpacked = f"{base}.flat_n"
    split = {"split": [1] * bits} if opset < 13 else {}
    if opset >= 13:
        inits[f"bwacal.unpack.split{bits}"] = np.ones(bits, dtype=np.int64)
    terms = [f"{base}.term{bit}" for bit in range(bits)]
    nodes += [
        Node("Reshape", f"{base}.planes_reshape", [unpacked, f"{base}.planes_shape"], [f"{base}.planes3"]),
        Node("Cast", f"{base}.planes_cast", [f"{base}.planes3"], [f"{base}.planes_float"], {"to": 1}),
        Node("Mul", f"{base}.weigh", [f"{base}.planes_float", f"{base}.scales"], [f"{base}.terms"]),
        Node("Split", f"{base}.split", [f"{base}.terms"] + ([f"bwacal.unpack.split{bits}"] if opset >= 13 else []),
             terms, {"axis": 0, **split}),
        Node("Sum", f"{base}.sum", terms, [f"{base}.sum"]),
        Node("Add", f"{base}.offset", [f"{base}.sum", f"{base}.offsets"], [f"{base}.values"]),
    ]
    return nodes + _restore_nodes(qw, f"{base}.values", base, inits)


def _restore_nodes(qw, values: str, base: str, inits) -> list[Node]:
    """Reshape (and transpose) a value of C * K elements to the weight ``qw.name`` in its own shape and
    axis order; the nodes and values are named ``base.*``."""
    moved = (qw.shape[qw.axis],) + tuple(d for i, d in enumerate(qw.shape) if i != qw.axis)
    inits[f"{base}.shape"] = np.array(moved, dtype=np.int64)
    if qw.axis == 0:
        return [Node("Reshape", f"{base}.reshape", [values, f"{base}.shape"], [qw.name])]
    perm = list(range(1, len(moved)))
    perm.insert(qw.axis, 0)
    return [Node("Reshape", f"{base}.reshape", [values, f"{base}.shape"], [f"{base}.moved"]),
            Node("Transpose", f"{base}.transpose", [f"{base}.moved"], [qw.name], {"perm": perm})]


def _act_quant_nodes(net, node, inits) -> list[Node]:
    aq = next(a for a in net.acts if a.node == node.name)
    qmin, qmax, step = aq.qmin, aq.qmax, aq.step
    name, x = node.name, node.inputs[0]
    inits[f"{name}.lo"] = np.array(np.float32(qmin) * step, dtype=np.float32)
    inits[f"{name}.hi"] = np.array(np.float32(qmax) * step, dtype=np.float32)
    inits[f"{name}.scale"] = np.array(step, dtype=np.float32)
    inits[f"{name}.zero_point"] = np.array(-qmin, dtype=np.uint8)
    inits[f"{name}.levels"] = aq.levels()
    # NOTE: no DequantizeLinear, even for uniform levels: after a DequantizeLinear, ONNX Runtime's
    # default optimizations re-quantize the next Conv's float weights to int8, which moves the
    # logits by about 1% here. A Gather from the level table is exact in every runtime.
    return [
        Node("Clip", f"{name}.clip", [x, f"{name}.lo", f"{name}.hi"], [f"{name}.clipped"]),
        Node("QuantizeLinear", f"{name}.quantize", [f"{name}.clipped", f"{name}.scale", f"{name}.zero_point"],
             [f"{name}.codes"]),
        Node("Cast", f"{name}.cast", [f"{name}.codes"], [f"{name}.index"], {"to": 7}),
        Node("Gather", f"{name}.gather", [f"{name}.levels", f"{name}.index"], node.outputs, {"axis": 0}),
    ]


def weight_bytes(size: int, channels: int, bits: int, fmt: str) -> int:
    """About how many bytes a quantized weight of ``size`` values and ``channels`` output channels
    takes in ``fmt`` (the unpacking nodes and names not counted)."""
    if fmt == "packed":
        return -(-bits * size // 8) + channels * (bits + 1) * 4
    return 4 * size


def metadata(net: QuantizedNetwork, report: dict, fmt: str) -> dict:
    """The ``bwacal_*`` metadata_props every written model carries (``bwacal_method`` only for methods
    other than ``bwa``, so a BWA file is byte for byte what it was before methods existed)."""
    opts = report.get("options", {})
    return {
        "bwacal_version": __version__,
        "bwacal_format": fmt,
        "bwacal_bits": str(opts.get("bits")),
        "bwacal_act_bits": str(opts.get("act_bits") or "none"),
        "bwacal_act_bwa": str(bool(opts.get("act_bwa"))).lower(),
        "bwacal_protocol": str(opts.get("protocol")),
        **({"bwacal_method": opts["method"]} if opts.get("method", "bwa") != "bwa" else {}),
        "bwacal_calib_sha256": report.get("calib_sha256", ""),
        "bwacal_source_sha256": report.get("model_sha256", ""),
        "bwacal_accuracy": json.dumps(report.get("accuracy", {})),
        "bwacal_layers": json.dumps([{k: r[k] for k in ("layer", "weight", "bits", "channels", "alpha", "gamma")}
                                     for r in report.get("layers", [])]),
        "bwacal_activations": json.dumps(report.get("activations", [])),
    }


def size_change(ratio: float) -> str:
    """``"3.03x smaller"`` or ``"1.09x larger"``: the written file against the input model, from
    ``ratio`` = input bytes / output bytes."""
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"


def write_quantized(net: QuantizedNetwork, report: dict, path, fmt: str = "fake") -> int:
    """Write the calibrated model atomically; returns the file size in bytes."""
    graph = quantized_graph(net, fmt)
    meta = dict(graph.metadata)
    meta.update(metadata(net, report, fmt))
    if graph.opset < 11:
        raise BwacalError(f"the model's opset {graph.opset} predates GatherElements/QuantizeLinear; "
                          "re-export it at opset 11 or newer")
    graph = replace(graph, metadata=meta)
    write_model(graph, path)
    return Path(path).stat().st_size
