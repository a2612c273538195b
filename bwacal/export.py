"""Writing a calibrated network as a standard ONNX model.

- ``fake``: the (BatchNorm-folded) graph with every quantized weight replaced by its BWA values.
- ``packed``: each quantized weight stored as its b bit planes, eight weights to a byte, with the
  per-channel ``step * alpha_k`` and ``step * gamma`` (float32); BitShift, Reshape, Cast, Mul, Split,
  Sum and Add (opset 11 on) rebuild ``sum_k (step alpha_k) B_k + step gamma``, within a few float32
  ulps of the fake format's weights. ONNX Runtime folds the subgraph once, when the session starts.
  A W3 weight costs 3/8 of a byte instead of four.
- ``qdq``: int8 weights (each channel's BWA levels snapped to an int8 grid, ``int8_levels``) behind a
  per-channel DequantizeLinear, activations as QuantizeLinear + DequantizeLinear on their own grid,
  and, given ``qdq_steps``, 8-bit Q/DQ at the outputs of layers and residual Adds (``_qdq_plan``), so
  that ONNX Runtime runs every Conv as QLinearConv and every residual Add as QLinearAdd.
- ``bitplanes``: the paper's form, ``W x = s sum_k alpha_k (B_k x) + s gamma sum(x)``: every
  quantized layer as ``bits`` ConvInteger/MatMulInteger of the activation codes with the binary
  planes, one more with an all-ones weight, scaled per channel and summed in float32.

In ``fake`` and ``packed`` activation quantizers become Clip + QuantizeLinear (uint8 codes) + Cast +
Gather from the table of the 2**A levels (uniform, or the BWA levels with bit weights on activations).
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
from bwacal.quant.bwa import bit_scale
from bwacal.quantize import QuantizedNetwork

FORMATS = ("fake", "packed", "qdq", "bitplanes")
# the widest activation grid a QDQ model stores, and the largest int8 a snapped level takes (symmetric)
QDQ_ACT_BITS, INT8_MAX = 8, 127


def quantized_graph(net: QuantizedNetwork, fmt: str = "fake", qdq_steps: dict | None = None) -> Graph:
    """The standard-op graph that computes what ``net.forward`` computes (``qdq``: on the int8 grid,
    with 8-bit Q/DQ at the tensors ``qdq_steps`` gives steps for, see ``qdq_tensors``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    for qw in net.weights:
        if qw.rounding is not None:
            raise ValueError(f"weight '{qw.name}' of node '{qw.node}' still has soft rounding; harden() it first")
    if fmt in ("qdq", "bitplanes"):
        check_qdq(net, fmt)
    if fmt == "bitplanes":
        return _bitplanes_graph(net)
    graph = net.graph
    inits = dict(graph.initializers)
    params = net.params()
    extra_nodes = []
    for index, qw in enumerate(net.weights):
        if fmt == "fake":
            inits[qw.name] = params[qw.name].astype(np.float32)
        elif fmt == "packed":
            del inits[qw.name]
            extra_nodes += _packed_weight(qw, index, graph.opset, inits)
        else:
            del inits[qw.name]
            extra_nodes += _qdq_weight(qw, index, inits)
    nodes = list(extra_nodes)
    renamed = {}
    if fmt == "qdq" and qdq_steps:  # without them only the activation quantizers become Q/DQ
        points, renamed = _qdq_plan(net)
        renamed.update({t: f"{t}.qdq" for t in points if t in qdq_steps})
    for node in graph.nodes:
        if node.op_type != "bwacal::ActQuant":
            node = replace(node, inputs=[renamed.get(i, i) for i in node.inputs])
        if node.op_type == "bwacal::ActQuant":
            make = _act_qdq_nodes if fmt == "qdq" else _act_quant_nodes
            nodes += make(net, node, inits)
        else:
            nodes.append(node)
        for out in node.outputs:
            if renamed.get(out) == f"{out}.qdq":
                step, signed = qdq_steps[out]
                nodes += _qdq_pair(out, f"{out}.qdq", np.float32(step), signed, inits)
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


def check_qdq(net: QuantizedNetwork, fmt: str = "qdq"):
    """BwacalError unless ``net`` can be written as ``fmt`` (qdq or bitplanes): opset 13 or newer
    (per-channel DequantizeLinear), every quantized layer reading a uniform activation quantizer."""
    if fmt == "qdq" and net.graph.opset < 13:
        raise BwacalError(f"--format qdq needs opset 13 or newer (per-channel DequantizeLinear); the model's is "
                          f"{net.graph.opset}")
    missing = [layer.node for layer in net.layers if not layer.act_bits]
    if missing:
        raise BwacalError(f"--format {fmt} needs quantized activations at every quantized layer (--act-bits); "
                          f"{len(missing)} layers read float activations, e.g. '{missing[0]}'")
    if any(aq.alpha is not None for aq in net.acts):
        raise BwacalError(f"--format {fmt} computes on the activations' uniform grid; it cannot carry bit weights on "
                          "activations (--act-bwa): use --format fake or packed")


def int8_levels(qw) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's 2**bits BWA levels on an int8 grid: ``(q, scale)``, int8 (C, 2**bits) and
    float32 (C,), with ``scale[c] * q[c, u]`` the value code ``u`` takes.

    A channel whose bit weights are still uniform keeps its own step and integers (exact; -128 only
    at 8 bits). Any other takes the scale ``max|L_c| / m``, m in 96..127, with the least squared
    error over the channel's weights (each level weighed by how many weights use it), so no value
    moves by more than half a scale, ``max|L_c| / 192``."""
    levels = qw.levels().astype(np.float64)
    channels, n = levels.shape
    counts = np.stack([np.bincount(row, minlength=n) for row in qw.codes]).astype(np.float64)
    amax = np.abs(levels).max(axis=1)
    best_err = np.full(channels, np.inf)
    scale = np.ones(channels, dtype=np.float32)
    q = np.zeros((channels, n), dtype=np.int8)
    for m in range(96, INT8_MAX + 1):
        s_m = np.where(amax > 0, amax / m, 1.0).astype(np.float32)
        q_m = np.clip(np.round(levels / s_m[:, None]), -INT8_MAX, INT8_MAX)
        err = (counts * (q_m * s_m[:, None] - levels) ** 2).sum(axis=1)
        better = err < best_err
        best_err[better], scale[better], q[better] = err[better], s_m[better], q_m[better]
    uniform = np.all(qw.alpha == bit_scale(qw.bits), axis=1) & (qw.gamma == -qw.offset)
    scale[uniform] = qw.step[uniform]
    q[uniform] = np.arange(n) - qw.offset
    return q, scale


def snapping_errors(net: QuantizedNetwork) -> list[dict]:
    """Per quantized layer, how far the QDQ format's int8 levels lie from the BWA levels:
    ``max_rel`` the largest move relative to the channel's largest level, ``rms_rel`` the RMS move over
    all weights relative to the RMS weight."""
    rows = []
    for layer, qw in zip(net.layers, net.weights):
        q, scale = int8_levels(qw)
        levels = qw.levels().astype(np.float64)
        moved = np.take_along_axis(q * scale[:, None].astype(np.float64) - levels, qw.codes.astype(np.int64), 1)
        values = np.take_along_axis(levels, qw.codes.astype(np.int64), 1)
        amax = np.maximum(np.abs(levels).max(axis=1, keepdims=True), np.finfo(np.float64).tiny)
        rms = np.sqrt(np.mean(values**2)) or 1.0
        rows.append({"layer": layer.node, "bits": qw.bits, "max_rel": float(np.max(np.abs(moved) / amax)),
                     "rms_rel": float(np.sqrt(np.mean(moved**2)) / rms)})
    return rows


def _qdq_weight(qw, index: int, inits) -> list[Node]:
    """The weight as int8 on its channel's grid (``int8_levels``) and a per-channel DequantizeLinear."""
    base = f"bwacal.w{index}"
    q, scale = int8_levels(qw)
    inits[f"{base}.int8"] = np.ascontiguousarray(qw.restore(np.take_along_axis(q, qw.codes.astype(np.int64), 1)))
    inits[f"{base}.scale"] = scale
    inits[f"{base}.zero_point"] = np.zeros(qw.channels, dtype=np.int8)
    return [Node("DequantizeLinear", f"{base}.dequantize", [f"{base}.int8", f"{base}.scale", f"{base}.zero_point"],
                 [qw.name], {"axis": qw.axis})]


# ops ONNX Runtime folds into a preceding integer kernel (a Relu or Clip whose range the 8-bit grid holds)
ACTIVATION_OPS = ("Relu", "Clip")


def _qdq_plan(net: QuantizedNetwork) -> tuple[list[str], dict]:
    """Where a QDQ model needs 8-bit Q/DQ besides the activation quantizers, for ONNX Runtime to run
    each quantized layer and each residual Add as an integer kernel (whose output must be quantized):
    ``(points, redirect)``.

    ``points``: float tensors to put Q/DQ on: the output of every quantized layer and every Add
    (after a Relu/Clip that alone reads it), and every Add input, when some op other than an
    activation quantizer reads it. ``redirect``: a tensor an 8-bit activation quantizer already
    quantizes -> that quantizer's output, for the tensor's other readers (a residual Add reads the
    block input on the grid the block's first conv reads)."""
    graph = net.graph
    users = graph.consumers()
    outputs = {v.name for v in graph.outputs}
    act8 = {aq.value: aq.node for aq in net.acts if aq.bits == QDQ_ACT_BITS}
    layers = {layer.node for layer in net.layers}

    def settled(t):
        while t not in outputs and len(users.get(t, [])) == 1 and users[t][0].op_type in ACTIVATION_OPS:
            t = users[t][0].outputs[0]
        return t

    wanted = []
    for node in graph.nodes:
        if node.name in layers or node.op_type == "Add":
            wanted.append(settled(node.outputs[0]))
        if node.op_type == "Add":
            wanted += [t for t in node.inputs if t and t not in graph.initializers]
    points, redirect = [], {}
    for t in dict.fromkeys(wanted):
        readers = [n for n in users.get(t, []) if n.op_type != "bwacal::ActQuant"]
        if t in outputs or not readers:
            continue
        if t in act8:
            redirect[t] = act8[t]
        else:
            points.append(t)
    return points, redirect


def qdq_tensors(net: QuantizedNetwork) -> list[str]:
    """The tensors ``quantized_graph(net, "qdq", steps)`` wants 8-bit steps for (see ``_qdq_plan``)."""
    return _qdq_plan(net)[0]


def qdq_steps(net: QuantizedNetwork, batches, method: str = "mse", seed: int = 0) -> dict:
    """``{tensor: (step, signed)}`` for ``qdq_tensors(net)``: 8-bit steps calibrated on the quantized
    network's own values over ``batches`` (an iterable of image arrays)."""
    from bwacal.quant.activations import calibrate_activation_step
    from bwacal.quantize import collect_activation_samples

    names = qdq_tensors(net)
    tied = _tied_steps(net, names)
    free = [n for n in names if n not in tied]
    out = dict(tied)
    if free:
        samples = collect_activation_samples(net.model, free, batches, seed=seed, net=net)
        for name in free:
            signed = bool(np.min(samples[name]) < 0)
            out[name] = (calibrate_activation_step(samples[name], QDQ_ACT_BITS, signed, method), signed)
    return out


def _tied_steps(net: QuantizedNetwork, names) -> dict:
    """``{tensor: (step, signed)}`` for the tensors of ``names`` read only by a MaxPool whose output an
    8-bit activation quantizer reads: they take that quantizer's grid, on which the max of quantized
    values is the quantized max (no error added), and ONNX Runtime pools the uint8 codes directly."""
    users = net.graph.consumers()
    act8 = {aq.value: aq for aq in net.acts if aq.bits == QDQ_ACT_BITS}
    out = {}
    for name in names:
        readers = users.get(name, [])
        if len(readers) == 1 and readers[0].op_type == "MaxPool" and readers[0].outputs[0] in act8:
            aq = act8[readers[0].outputs[0]]
            out[name] = (aq.step, aq.signed)
    return out


def qdq_steps_from_file(net: QuantizedNetwork, path, images: int = 64, batch_size: int = 32, seed: int = 0) -> dict:
    """``qdq_steps`` on a seeded sample of ``images`` images of the HDF5 file ``path`` (the calibration data)."""
    from bwacal.data import open_dataset

    model = net.model
    with open_dataset(path, input_shape=model.input_shape, num_classes=model.num_classes, layout=model.layout) as data:
        pick = np.sort(np.random.default_rng(seed).permutation(data.n)[:images])
        x, _ = data.read(pick)
    return qdq_steps(net, (x[i:i + batch_size] for i in range(0, len(x), batch_size)), seed=seed)


def _qdq_pair(x: str, y: str, step, signed: bool, inits) -> list[Node]:
    """QuantizeLinear + DequantizeLinear from ``x`` to ``y`` on uint8 codes: zero point 0, or 128 when
    signed (the int8 grid [-128, 127] shifted, which ONNX Runtime's x86 kernels take without a
    conversion of their own)."""
    inits[f"{y}.scale"] = np.array(step, dtype=np.float32)
    inits[f"{y}.zero_point"] = np.array(128 if signed else 0, dtype=np.uint8)
    return [Node("QuantizeLinear", f"{y}.quantize", [x, f"{y}.scale", f"{y}.zero_point"], [f"{y}.codes"]),
            Node("DequantizeLinear", f"{y}.dequantize", [f"{y}.codes", f"{y}.scale", f"{y}.zero_point"], [y])]


def _act_qdq_nodes(net, node, inits) -> list[Node]:
    """QuantizeLinear + DequantizeLinear on the activation's own grid (``_qdq_pair``), after a Clip
    to the grid's range when it is narrower than 8 bits."""
    aq = next(a for a in net.acts if a.node == node.name)
    name, x = node.name, node.inputs[0]
    nodes = []
    if aq.bits < QDQ_ACT_BITS:
        inits[f"{name}.lo"] = np.array(np.float32(aq.qmin) * aq.step, dtype=np.float32)
        inits[f"{name}.hi"] = np.array(np.float32(aq.qmax) * aq.step, dtype=np.float32)
        nodes.append(Node("Clip", f"{name}.clip", [x, f"{name}.lo", f"{name}.hi"], [f"{name}.clipped"]))
        x = f"{name}.clipped"
    return nodes + _qdq_pair(x, node.outputs[0], aq.step, aq.signed, inits)


def _bitplanes_graph(net: QuantizedNetwork) -> Graph:
    """Every quantized Conv/Gemm/MatMul as ``bits`` integer products of its input's activation codes
    with the binary planes B_k, plus one with an all-ones weight (the sum of the inputs), scaled and
    summed in float32: ``y = s_x sum_k (s_c alpha_k) (B_k * q) + s_x s_c gamma (1 * q) + bias``, with q
    the integer activation (code minus zero point)."""
    graph = net.graph
    inits = dict(graph.initializers)
    acts = {aq.node: aq for aq in net.acts}
    layers = {layer.node: (layer, qw) for layer, qw in zip(net.layers, net.weights)}
    nodes = []
    for node in graph.nodes:
        if node.op_type == "bwacal::ActQuant":
            nodes += _act_quant_nodes(net, node, inits)[:2]  # Clip + QuantizeLinear: the uint8 codes
            del inits[f"{node.name}.levels"]
        elif node.name in layers:
            layer, qw = layers[node.name]
            inits.pop(qw.name, None)
            nodes += _bitplane_layer(node, qw, acts[node.inputs[0]], inits)
        else:
            nodes.append(node)
    for aq in net.acts:
        if aq.alpha_name:
            inits.pop(aq.alpha_name, None)
    return replace(graph, nodes=nodes, initializers=inits)


def _bitplane_layer(node: Node, qw, aq, inits) -> list[Node]:
    base, out = node.name, node.outputs[0]
    codes, zero_point = f"{aq.node}.codes", f"{aq.node}.zero_point"  # _act_quant_nodes' uint8 codes
    is_conv = node.op_type == "Conv"
    op = "ConvInteger" if is_conv else "MatMulInteger"
    attrs = {k: v for k, v in node.attrs.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads",
                                                           "strides")} if is_conv else {}
    factor = np.float64(aq.step) * qw.step.astype(np.float64) * float(node.attrs.get("alpha", 1.0))
    if is_conv:
        shape, ones_shape = (1, qw.channels) + (1,) * (len(qw.shape) - 2), qw.shape
    else:
        shape, ones_shape = (qw.channels,), (qw.codes.shape[1], 1 if qw.axis else qw.channels)

    def as_matrix(plane2d):  # the weight operand as the op takes it: (K, C) for Gemm and MatMul
        w = qw.restore(plane2d)
        return np.ascontiguousarray(w.T) if (not is_conv and qw.axis == 0) else w

    terms = []
    for k in range(qw.bits):
        inits[f"{base}.plane{k}"] = as_matrix(qw.planes[k]).astype(np.uint8)
        inits[f"{base}.scale{k}"] = (factor * qw.alpha[:, k]).astype(np.float32).reshape(shape)
        terms.append((f"{base}.plane{k}", f"{base}.scale{k}"))
    # the sum of the inputs under each output: one output channel serves all when there are no groups
    if is_conv and node.attrs.get("group", 1) == 1:
        ones_shape = (1,) + tuple(qw.shape[1:])
    inits[f"{base}.ones"] = np.ones(ones_shape, dtype=np.uint8)
    inits[f"{base}.offset"] = (factor * qw.gamma).astype(np.float32).reshape(shape)
    terms.append((f"{base}.ones", f"{base}.offset"))
    nodes, scaled = [], []
    for i, (weight, scale) in enumerate(terms):
        nodes += [Node(op, f"{base}.int{i}", [codes, weight, zero_point], [f"{base}.acc{i}"], attrs),
                  Node("Cast", f"{base}.float{i}", [f"{base}.acc{i}"], [f"{base}.accf{i}"], {"to": 1}),
                  Node("Mul", f"{base}.scaled{i}", [f"{base}.accf{i}", scale], [f"{base}.term{i}"])]
        scaled.append(f"{base}.term{i}")
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    total = out if bias is None else f"{base}.nobias"
    nodes.append(Node("Sum", f"{base}.sum", scaled, [total]))
    if bias is not None:
        if is_conv:
            inits[f"{base}.bias_shape"] = np.array(shape, dtype=np.int64)
            nodes.append(Node("Reshape", f"{base}.bias_reshape", [bias, f"{base}.bias_shape"], [f"{base}.bias"]))
            bias = f"{base}.bias"
        elif node.attrs.get("beta", 1.0) != 1.0:
            inits[f"{base}.beta"] = np.array(node.attrs["beta"], dtype=np.float32)
            nodes.append(Node("Mul", f"{base}.beta_mul", [bias, f"{base}.beta"], [f"{base}.bias"]))
            bias = f"{base}.bias"
        nodes.append(Node("Add", f"{base}.bias_add", [total, bias], [out]))
    return nodes


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
    if fmt == "qdq":
        return size + channels * 5
    if fmt == "bitplanes":  # a uint8 plane per bit and the all-ones weight (one channel's worth at most)
        return (bits + 1) * size + channels * (bits + 1) * 4
    return 4 * size


def metadata(net: QuantizedNetwork, report: dict, fmt: str) -> dict:
    """The ``bwacal_*`` metadata_props every written model carries (``bwacal_method`` only for methods
    other than ``bwa``, so a BWA file is byte for byte what it was before methods existed).

    ``bwacal_layers`` holds each layer's bit weights per channel in ``fake``; the other formats,
    whose tensors hold them, keep the summaries ``bwacal inspect`` shows (per channel, the JSON text
    was a quarter of a W3 ResNet-20 packed file)."""
    from bwacal.inspection import summarise_alpha, summarise_gamma

    opts = report.get("options", {})
    layers = [{k: r[k] for k in ("layer", "weight", "bits", "channels", "alpha", "gamma")}
              for r in report.get("layers", [])]
    if fmt != "fake":
        for row in layers:
            row["alpha"], row["gamma"] = summarise_alpha(row["alpha"]), summarise_gamma(row["gamma"])
    mixed = mixed_record(report)
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
        "bwacal_layers": json.dumps(layers),
        "bwacal_activations": json.dumps(report.get("activations", [])),
        **({"bwacal_mixed": json.dumps(mixed)} if mixed else {}),
    }


def mixed_record(report: dict) -> dict | None:
    """What chose the layers' widths (``--avg-bits``, ``--size-budget``, ``--max-drop``), for the
    metadata; None for widths given by the options alone. The widths are in ``bwacal_layers``."""
    alloc, control = report.get("allocation"), report.get("accuracy_control")
    if not alloc and not control:
        return None
    out = {"avg_bits": report.get("avg_weight_bits"), "size_bytes": report.get("quantized_size_bytes")}
    if alloc:
        out.update(avg_bits_budget=alloc["avg_bits_budget"], size_budget_mb=alloc["size_budget_mb"],
                   estimated_loss=alloc["estimated_loss"], exact=alloc["exact"])
    if control:
        out.update(max_drop=control["max_drop"], steps=len(control["steps"]), drop=control["steps"][-1]["drop"])
    return out


def size_change(ratio: float) -> str:
    """``"3.03x smaller"`` or ``"1.09x larger"``: the written file against the input model, from
    ``ratio`` = input bytes / output bytes."""
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"


def write_quantized(net: QuantizedNetwork, report: dict, path, fmt: str = "fake", qdq_steps: dict | None = None) -> int:
    """Write the calibrated model atomically; returns the file size in bytes. ``qdq_steps``: see
    ``quantized_graph``."""
    graph = quantized_graph(net, fmt, qdq_steps)
    meta = dict(graph.metadata)
    meta.update(metadata(net, report, fmt))
    if graph.opset < 11:
        raise BwacalError(f"the model's opset {graph.opset} predates GatherElements/QuantizeLinear; "
                          "re-export it at opset 11 or newer")
    graph = replace(graph, metadata=meta)
    write_model(graph, path)
    return Path(path).stat().st_size
