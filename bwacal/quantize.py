"""Which layers get quantized, and the quantized network the fitting loop trains.

A ``QuantizedNetwork`` wraps a loaded (BatchNorm-folded) model: every selected Conv/Gemm/MatMul
weight becomes a ``QuantizedWeight`` (grid, codes, bit weights, learned rounding); with activation
bits, a ``bwacal::ActQuant`` node is inserted at each quantized layer's data input, its state an
``ActivationQuantizer``. The weights never live in the graph: ``params()`` composes them for each
forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from bwacal.engine import Engine
from bwacal.graph import Graph, Node
from bwacal.model import Model
from bwacal.quant.activations import ActivationQuantizer, calibrate_activation_step
from bwacal.quant.bwa import bit_scale
from bwacal.quant.weights import QuantizedWeight, quantize_weights

PROTOCOLS = ("first-last-8bit", "all-layers")
EDGE_BITS = 8  # first and last layer width under the default protocol (BRECQ/QDrop convention)


@dataclass
class QuantLayer:
    """One quantized layer: its node, weight initializer, output-channel axis and widths."""

    node: str
    op_type: str
    weight: str
    axis: int
    bits: int
    data_input: str
    act_bits: int | None = None


def select_layers(graph: Graph, bits: int, protocol: str = "first-last-8bit",
                  act_bits: int | None = None) -> list[QuantLayer]:
    """Conv, Gemm and MatMul nodes whose weight is an initializer, in graph order.

    A MatMul's weight is its second operand, 2-D (a linear layer, also on the 3-D activations of a
    transformer); a MatMul of two activations (attention) is never quantized. ``skipped_layers``
    gives the reason for every candidate left out. Under ``first-last-8bit`` the first and the last
    of them stay at 8 bits (weights and input activations); under ``all-layers`` every one gets the
    requested widths.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    layers = []
    for node in graph.nodes:
        axis, _ = _weight_axis(graph, node)
        if axis is not None:
            layers.append(QuantLayer(node.name, node.op_type, node.inputs[1], axis, bits, node.inputs[0], act_bits))
    if protocol == "first-last-8bit" and layers:
        for edge in {0, len(layers) - 1}:
            layers[edge].bits = max(bits, EDGE_BITS)
            if act_bits is not None:
                layers[edge].act_bits = max(act_bits, EDGE_BITS)
    return layers


@dataclass
class SkippedLayer:
    """A Conv, Gemm or MatMul ``select_layers`` does not quantize, and why."""

    node: str
    op_type: str
    reason: str


def skipped_layers(graph: Graph) -> list[SkippedLayer]:
    """Every Conv, Gemm and MatMul node ``select_layers`` leaves out, in graph order, with the reason."""
    out = []
    for node in graph.nodes:
        axis, reason = _weight_axis(graph, node)
        if axis is None and reason is not None:
            out.append(SkippedLayer(node.name, node.op_type, reason))
    return out


def _weight_axis(graph: Graph, node) -> tuple[int | None, str | None]:
    """(output-channel axis of the weight, None) for a layer to quantize, (None, reason) for a Conv,
    Gemm or MatMul that is not, (None, None) for any other op."""
    if node.op_type not in ("Conv", "Gemm", "MatMul"):
        return None, None
    inits = graph.initializers
    data, weight = node.inputs[0], node.inputs[1]
    if weight not in inits:
        if data in inits:
            return None, "the constant operand is the first one (its weight layout is not a layer's)"
        if node.op_type == "MatMul":
            return None, "MatMul of two activations"
        return None, "weight is not a constant"
    if data in inits:
        return None, "both operands are constants"
    w = inits[weight]
    if w.dtype.kind != "f":
        return None, f"weight is {w.dtype}, not floating point"
    if node.op_type == "Conv":
        return 0, None
    if node.op_type == "Gemm":
        if node.attrs.get("transA", 0):
            return None, "Gemm with transA"
        return (0 if node.attrs.get("transB", 0) else 1), None
    if w.ndim != 2:
        return None, f"weight is {w.ndim}-D (a linear layer's is 2-D)"
    return 1, None


@dataclass
class QuantizedNetwork:
    """A model whose selected weights are ``QuantizedWeight``s (one per layer, in layer order) and
    whose quantized layers read their inputs through ``ActivationQuantizer``s (``acts``)."""

    model: Model
    layers: list[QuantLayer]
    weights: list[QuantizedWeight]
    acts: list[ActivationQuantizer] = field(default_factory=list)
    graph: Graph | None = None
    engine: Engine | None = None

    def params(self, hard: bool = False) -> dict:
        """Initializer overrides for one forward: composed weights (+ activation bit weights); ``hard``:
        learned codes as they would harden (what the network is once fitting ends)."""
        out = {qw.name: qw.compose(hard) for qw in self.weights}
        out.update({aq.alpha_name: aq.alpha for aq in self.acts if aq.alpha is not None})
        return out

    def forward(self, x, params=None):
        values, _ = self.engine.run({self.model.input_name: x}, params=params or self.params())
        return self.model.logits(values)


def quantize_network(model: Model, layers: list[QuantLayer], weight_method: str = "mse",
                     act_samples: dict | None = None, act_method: str = "mse", act_bwa: bool = False,
                     steps: dict | None = None) -> QuantizedNetwork:
    """Quantize the selected weights (uniform, round to nearest) and insert activation quantizers.

    ``act_samples`` maps each quantized layer's data-input name to a sample of its FP values; it is
    required when any layer has ``act_bits``. ``steps`` (weight name -> per-channel steps) goes with
    ``weight_method="output"``.
    """
    weights = [quantize_weights(model.graph.initializers[layer.weight], layer.bits, method=weight_method,
                                axis=layer.axis, node=layer.node, name=layer.weight,
                                step=(steps or {}).get(layer.weight)) for layer in layers]
    net = QuantizedNetwork(model, layers, weights)
    graph = model.graph
    if any(layer.act_bits for layer in layers):
        graph, net.acts = _insert_act_quant(graph, layers, act_samples, act_method, act_bwa)
    net.graph = graph
    net.engine = Engine(graph)
    return net


def _insert_act_quant(graph: Graph, layers, samples, method, bwa):
    """One ActQuant per (value, width), shared by every quantized layer that reads the value."""
    quantizers: dict[tuple, ActivationQuantizer] = {}
    by_node = {layer.node: layer for layer in layers if layer.act_bits}
    inits = dict(graph.initializers)
    nodes = []
    for node in graph.nodes:
        layer = by_node.get(node.name)
        if layer is not None:
            key = (layer.data_input, layer.act_bits)
            if key not in quantizers:
                sample = samples[layer.data_input]
                signed = bool(np.min(sample) < 0)
                step = calibrate_activation_step(sample, layer.act_bits, signed, method=method)
                name = f"{layer.data_input}.actq{layer.act_bits}"
                aq = ActivationQuantizer(layer.act_bits, signed, step, value=layer.data_input, node=name)
                inputs = [layer.data_input]
                if bwa:
                    aq.alpha, aq.alpha_name = bit_scale(layer.act_bits), f"{name}.alpha"
                    inits[aq.alpha_name] = aq.alpha
                    inputs.append(aq.alpha_name)
                quantizers[key] = aq
                nodes.append(Node("bwacal::ActQuant", name, inputs, [name],
                                  {"step": float(step), "bits": layer.act_bits, "signed": int(signed)}))
            node = replace(node, inputs=[quantizers[key].node] + node.inputs[1:])
        nodes.append(node)
    return replace(graph, nodes=nodes, initializers=inits), list(quantizers.values())


def collect_activation_samples(model: Model, names, batches, max_values: int = 1 << 20, seed: int = 0,
                               net: QuantizedNetwork | None = None) -> dict:
    """Up to ``max_values`` FP values per named activation, drawn evenly from the given batches (the
    values of the quantized network ``net`` instead, when given)."""
    names = sorted(set(names))
    rng = np.random.default_rng(seed)
    parts = {n: [] for n in names}
    engine, params = (model.engine, None) if net is None else (net.engine, net.params())
    for x in batches:
        values, _ = engine.run({model.input_name: x}, params=params, outputs=names)
        for n in names:
            v = values[n].reshape(-1)
            keep = max_values // 4
            if v.size > keep:
                v = v[rng.choice(v.size, keep, replace=False)]
            parts[n].append(v.astype(np.float32))
    out = {}
    for n in names:
        v = np.concatenate(parts[n])
        if v.size > max_values:
            v = v[rng.choice(v.size, max_values, replace=False)]
        out[n] = v
    return out
