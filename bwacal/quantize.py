"""Which layers get quantized, and the quantized network the fitting loop trains.

A ``QuantizedNetwork`` wraps a loaded (BatchNorm-folded) model: every selected Conv/Gemm/MatMul
weight is uniformly quantized once (fixed codes and steps) and dequantized through per-channel bit
weights; with activation bits, a ``bwacal::ActQuant`` node is inserted at each quantized layer's
data input. The weights never live in the graph: ``params()`` composes them for each forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from bwacal.engine import Engine
from bwacal.graph import Graph, Node
from bwacal.model import Model
from bwacal.quant.activations import calibrate_activation_step
from bwacal.quant.bwa import BitWeights
from bwacal.quant.weights import WeightQuant, quantize_weights

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
class ActQuantSpec:
    """An activation quantizer inserted before the layers reading ``value``."""

    node: str
    value: str
    bits: int
    signed: bool
    step: np.float32
    alpha_name: str | None = None  # initializer holding the activation bit weights (with BWA)


@dataclass
class QuantizedNetwork:
    model: Model
    layers: list[QuantLayer]
    weights: dict[str, WeightQuant]
    planes: dict[str, np.ndarray]
    bit_weights: dict[str, BitWeights]
    acts: list[ActQuantSpec] = field(default_factory=list)
    graph: Graph | None = None
    engine: Engine | None = None
    act_alpha: dict[str, np.ndarray] = field(default_factory=dict)

    def params(self, bit_weights=None, act_alpha=None) -> dict:
        """Initializer overrides for one forward: composed weights (+ activation bit weights)."""
        bit_weights = bit_weights or self.bit_weights
        out = {}
        for layer in self.layers:
            wq = self.weights[layer.weight]
            w2d = bit_weights[layer.weight].compose(self.planes[layer.weight], wq.step)
            out[layer.weight] = wq.restore(w2d)
        out.update(act_alpha if act_alpha is not None else self.act_alpha)
        return out

    def forward(self, x, params=None):
        values, _ = self.engine.run({self.model.input_name: x}, params=params or self.params())
        return self.model.logits(values)


def quantize_network(model: Model, layers: list[QuantLayer], weight_method: str = "mse",
                     act_samples: dict | None = None, act_method: str = "mse", act_bwa: bool = False
                     ) -> QuantizedNetwork:
    """Quantize the selected weights (uniform, fixed codes) and insert activation quantizers.

    ``act_samples`` maps each quantized layer's data-input name to a sample of its FP values; it is
    required when any layer has ``act_bits``.
    """
    weights, planes, bws = {}, {}, {}
    for layer in layers:
        wq = quantize_weights(model.graph.initializers[layer.weight], layer.bits, method=weight_method, axis=layer.axis)
        weights[layer.weight] = wq
        planes[layer.weight] = wq.planes()
        bws[layer.weight] = BitWeights.uniform(wq.channels, layer.bits)
    net = QuantizedNetwork(model, layers, weights, planes, bws)
    graph = model.graph
    if any(layer.act_bits for layer in layers):
        graph, net.acts, net.act_alpha = _insert_act_quant(graph, layers, act_samples, act_method, act_bwa)
    net.graph = graph
    net.engine = Engine(graph)
    return net


def _insert_act_quant(graph: Graph, layers, samples, method, bwa):
    """One ActQuant per (value, width), shared by every quantized layer that reads the value."""
    specs: dict[tuple, ActQuantSpec] = {}
    by_node = {layer.node: layer for layer in layers if layer.act_bits}
    inits = dict(graph.initializers)
    alphas = {}
    nodes = []
    for node in graph.nodes:
        layer = by_node.get(node.name)
        if layer is not None:
            key = (layer.data_input, layer.act_bits)
            if key not in specs:
                sample = samples[layer.data_input]
                signed = bool(np.min(sample) < 0)
                step = calibrate_activation_step(sample, layer.act_bits, signed, method=method)
                name = f"{layer.data_input}.actq{layer.act_bits}"
                alpha_name = f"{name}.alpha" if bwa else None
                spec = ActQuantSpec(name, layer.data_input, layer.act_bits, signed, step, alpha_name)
                specs[key] = spec
                inputs = [layer.data_input] + ([alpha_name] if bwa else [])
                if bwa:
                    alphas[alpha_name] = 2.0 ** np.arange(layer.act_bits)
                    inits[alpha_name] = alphas[alpha_name]
                nodes.append(Node("bwacal::ActQuant", name, inputs, [name],
                                  {"step": float(step), "bits": layer.act_bits, "signed": int(signed)}))
            spec = specs[key]
            node = replace(node, inputs=[spec.node] + node.inputs[1:])
        nodes.append(node)
    return replace(graph, nodes=nodes, initializers=inits), list(specs.values()), alphas


def collect_activation_samples(model: Model, names, batches, max_values: int = 1 << 20, seed: int = 0) -> dict:
    """Up to ``max_values`` FP values per named activation, drawn evenly from the given batches."""
    names = sorted(set(names))
    rng = np.random.default_rng(seed)
    parts = {n: [] for n in names}
    for x in batches:
        values, _ = model.engine.run({model.input_name: x}, outputs=names)
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
