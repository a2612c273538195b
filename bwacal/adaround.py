"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020).

Layer by layer, in graph order, every weight of a quantized layer learns whether it rounds down or
up (``QuantizedWeight.start_rounding``: ``W~ = step * clip(floor(W / step) + h(V), qmin, qmax)``) by
minimising the reconstruction error of the layer's output before its activation,

    ||W x + b - (W~ x~ + b)||^2  (summed over output channels, averaged over images and positions)
    + lambda * sum(1 - |2 h(V) - 1|**beta)

where ``x`` is the layer's input in the full-precision model and ``x~`` its input in the quantized
network with every earlier layer already rounded (and activations quantized, if they are). The
exponent ``beta`` anneals from 20 to 2 after a warm-up without the regulariser; at the end each
weight takes the code its ``h`` is nearer to. The layer's forward and backward are the engine's own
Conv/Gemm/MatMul op, run on the layer's inputs alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from bwacal.fit import Adam
from bwacal.quant.rounding import annealed_beta, rounding_regularizer
from bwacal.quantize import QuantizedNetwork

LAYER_OPS = ("Conv", "Gemm", "MatMul")
# Images per engine pass while collecting a layer's inputs (bounds the memory of one pass).
COLLECT_BATCH = 128


@dataclass
class AdaRoundOptions:
    """AdaRound's hyper-parameters: the paper's (and AIMET's) except ``iterations``, sized for 2 CPU
    cores (see ``CalibrationOptions.adaround_iterations`` for the measured choice)."""

    iterations: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    reg: float = 0.01  # lambda
    warmup: float = 0.2  # fraction of the iterations without the regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    seed: int = 0


def _node_index(graph, name: str) -> int:
    for i, node in enumerate(graph.nodes):
        if node.name == name:
            return i
    raise ValueError(f"node '{name}' is not in the quantized graph")


def _collect(engine, input_name, value, images, params=None) -> np.ndarray:
    """The named value for every image, NCHW (or whatever rank it has), float32."""
    parts = []
    for start in range(0, len(images), COLLECT_BATCH):
        values, _ = engine.run({input_name: images[start:start + COLLECT_BATCH]}, params=params, outputs=[value])
        parts.append(np.asarray(values[value], dtype=np.float32))
    return np.concatenate(parts)


class _LayerProblem:
    """One layer's reconstruction: its op, bias and inputs laid out as the op takes them."""

    def __init__(self, op, op_type, x_fp, x_q, w_fp, bias):
        self.op, self.bias = op, bias
        # Conv works on channel-major (CNHW) activations: images on axis 1
        self.image_axis = 1 if op_type == "Conv" and x_fp.ndim == 4 else 0
        if self.image_axis:
            x_fp = np.ascontiguousarray(x_fp.transpose(1, 0, 2, 3))
            x_q = np.ascontiguousarray(x_q.transpose(1, 0, 2, 3))
        self.x_q = x_q
        self.images = x_q.shape[self.image_axis]
        self.target = self._chunked(x_fp, w_fp)

    def _chunked(self, x, w) -> np.ndarray:
        parts = []
        for start in range(0, self.images, COLLECT_BATCH):
            idx = np.arange(start, min(start + COLLECT_BATCH, self.images))
            parts.append(self.forward(np.take(x, idx, axis=self.image_axis), w)[0])
        return np.concatenate(parts, axis=self.image_axis)

    def forward(self, x, w):
        inputs = (x, w) if self.bias is None else (x, w, self.bias)
        return self.op.forward(*inputs)

    def loss_and_grad(self, idx, w) -> tuple[float, np.ndarray]:
        """Reconstruction loss on the images ``idx`` and its gradient wrt the weight ``w``."""
        x = np.take(self.x_q, idx, axis=self.image_axis)
        y, ctx = self.forward(x, w)
        diff = y.astype(np.float64) - np.take(self.target, idx, axis=self.image_axis)
        channels = y.shape[0] if self.image_axis else y.shape[-1]
        per = diff.size / channels  # images x positions: the sum over channels is averaged over these
        need = (False, True) if self.bias is None else (False, True, False)
        dw = self.op.backward(ctx, (2.0 / per * diff).astype(y.dtype), need)[1]
        return float(np.sum(diff * diff) / per), dw


def reconstruction_error(net: QuantizedNetwork, index: int, images) -> float:
    """Layer ``index``'s output error with its current weights, on its inputs in ``net`` (earlier
    layers as they are) against the full-precision layer on FP inputs: the loss AdaRound minimises,
    without the regulariser."""
    problem = _problem(net, index, images)
    return problem.loss_and_grad(np.arange(problem.images), net.weights[index].compose())[0]


def _problem(net: QuantizedNetwork, index: int, images) -> _LayerProblem:
    layer, qw = net.layers[index], net.weights[index]
    model = net.model
    i = _node_index(net.graph, layer.node)
    node, op = net.graph.nodes[i], net.engine.ops[i]
    if node.op_type not in LAYER_OPS:
        raise ValueError(f"AdaRound handles Conv, Gemm and MatMul; node '{node.name}' is {node.op_type}")
    x_fp = _collect(model.engine, model.input_name, layer.data_input, images)
    x_q = _collect(net.engine, model.input_name, node.inputs[0], images, net.params())
    bias = None
    if len(node.inputs) > 2 and node.inputs[2]:
        bias = net.graph.initializers[node.inputs[2]]
    w_fp = model.graph.initializers[layer.weight]
    return _LayerProblem(op, node.op_type, x_fp, x_q, w_fp, bias)


def adaround(net: QuantizedNetwork, images, options: AdaRoundOptions | None = None, progress=None) -> list[dict]:
    """Learn the rounding of every quantized weight of ``net`` in place, layer by layer, on ``images``
    (NCHW float32, the calibration images); the bit weights stay as they are.

    ``progress(layer_index, layers, stats)`` is called after each layer. Returns one dict per layer:
    node, reconstruction loss at round-to-nearest and after (on all ``images``), codes moved off
    round-to-nearest, seconds.
    """
    options = options or AdaRoundOptions()
    rng = np.random.default_rng(options.seed)
    stats = []
    for index, qw in enumerate(net.weights):
        started = time.perf_counter()
        problem = _problem(net, index, images)
        everything = np.arange(problem.images)
        nearest_codes = qw.codes.copy()
        before = problem.loss_and_grad(everything, qw.compose())[0]
        qw.start_rounding(net.model.graph.initializers[qw.name])
        trains_bit_weights, qw.train_bit_weights = qw.train_bit_weights, False  # V alone here
        theta = {"v": qw.rounding.v}
        adam = Adam(theta, options.lr)
        batch = min(options.batch_size, problem.images)
        for it in range(options.iterations):
            idx = np.sort(rng.choice(problem.images, batch, replace=False))
            _, dw = problem.loss_and_grad(idx, qw.compose())
            grad = qw.gradients(dw)["v"]
            beta = annealed_beta(it, options.iterations, options.warmup, options.beta_start, options.beta_end)
            if beta is not None:
                grad = grad + options.reg * rounding_regularizer(qw.rounding.v, beta)[1]
            adam.step(theta, {"v": grad}, options.lr)
        qw.harden()
        qw.train_bit_weights = trains_bit_weights
        after = problem.loss_and_grad(everything, qw.compose())[0]
        stats.append({"node": qw.node, "loss_nearest": before, "loss": after,
                      "codes_moved": int(np.count_nonzero(qw.codes != nearest_codes)),
                      "seconds": time.perf_counter() - started})
        if progress:
            progress(index, len(net.weights), stats[-1])
    return stats
