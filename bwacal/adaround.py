"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020).

Layer by layer, in graph order, every weight of a quantized layer learns whether it rounds down or
up (``QuantizedWeight.start_rounding``: ``W~ = step * clip(floor(W / step) + h(V), qmin, qmax)``) by
minimising the reconstruction error of the layer's output before its activation,

    ||W x + b - (W~ x~ + b)||^2  (summed over output channels, averaged over images and positions)
    + lambda * sum(1 - |2 h(V) - 1|**beta)

where ``x`` is the layer's input in the full-precision model and ``x~`` its input in the quantized
network with every earlier layer already rounded (and activations quantized, if they are). The
exponent ``beta`` anneals from 20 to 2 after a warm-up without the regulariser; at the end each
weight takes the code its ``h`` is nearer to.

The reconstruction error is quadratic in the layer's weights, so over a fixed set of images it is
exactly ``sum_c w~_c^T G w~_c - 2 w~_c^T X w_c + w_c^T F w_c`` with the second moments of the layer's
input rows (im2col patches of a conv, rows of a Gemm/MatMul input), ``G = E[x~ x~^T]``,
``X = E[x~ x^T]``, ``F = E[x x^T]`` (one per group of a grouped conv). Where the rows are long
(``K``) and few, the paper's mini-batches through the engine's own Conv/Gemm/MatMul op are cheaper;
otherwise (every layer of a 32x32 classifier, the early layers of a 224x224 one) each iteration is
one small product with ``G`` on all the images at once: the exact gradient of the objective the
paper's mini-batches estimate, at a fraction of their cost. ``AdaRoundOptions.solver`` chooses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from bwacal.engine import Engine
from bwacal.fit import Adam
from bwacal.graph import ValueInfo
from bwacal.passes import remove_dead_nodes
from bwacal.quant.output_steps import layer_rows
from bwacal.quant.rounding import annealed_beta, learn_rounding, rounding_regularizer
from bwacal.quant.weights import channels_first
from bwacal.quantize import QuantizedNetwork
from bwacal.runtime import blas_on_all_cores

LAYER_OPS = ("Conv", "Gemm", "MatMul")
# Images per engine pass while collecting a layer's inputs (bounds the memory of one pass).
COLLECT_BATCH = 128
# Bytes of one copy of the input rows built at a time for the moments (there are two: FP and
# quantized). At 224x224 a ResNet stem's rows are 7.4 MB per image: 128 images would be 1.9 GB.
ROWS_BYTES = 128 << 20
SOLVERS = ("auto", "moments", "batches")


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
    # moments: exact full-set gradients through the inputs' second moments; batches: the paper's
    # mini-batches of batch_size images; auto: whichever costs fewer multiply-adds for the layer
    solver: str = "auto"
    # multiply-adds one layer's iterations may take: a layer whose ``iterations`` would cost more
    # runs fewer, down to ``min_iterations`` (0: no budget). 5e12 leaves every layer of the 32x32 zoo
    # at up to 10,000 (the largest, VGG-small's layer of 3.4e8 per iteration, needs 3.4e12) and caps the
    # 3x3 convs of a 224x224 ResNet's last stage (1.1e10 per iteration) at 1,000; seconds per
    # iteration: benchmarks/adaround_cost.py
    layer_budget: float = 5e12
    min_iterations: int = 1000


def _node_index(graph, name: str) -> int:
    for i, node in enumerate(graph.nodes):
        if node.name == name:
            return i
    raise ValueError(f"node '{name}' is not in the quantized graph")


def _engine_until(graph, value) -> Engine:
    """An engine over only the nodes ``value`` depends on (a layer's input needs no later layer)."""
    return Engine(remove_dead_nodes(replace(graph, outputs=[ValueInfo(value, None, None)])))


def _collect(engine, input_name, value, images, params=None) -> np.ndarray:
    """The named value for every image, NCHW (or whatever rank it has), float32."""
    engine = _engine_until(engine.graph, value)
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


class _MomentProblem:
    """One layer's reconstruction through the second moments of its input rows (module docstring).

    ``gram`` (G, K, K) ``E[x~ x~^T]``, ``cross`` (G, K, K) ``E[x~ x^T]`` and ``target_energy``
    ``sum_c E[(w_c . x)^2]``, all float64 over every row of every image; ``w_fp`` (C, K) the FP
    weight rows, channel c in group ``c // (C // G)``.
    """

    images = None  # every image at once: nothing to sample

    def __init__(self, gram, cross, target_energy, w_fp, shape, axis):
        self.gram, self.shape, self.axis = gram, shape, axis
        groups = gram.shape[0]
        self.w_fp = np.asarray(w_fp, np.float64).reshape(groups, -1, gram.shape[1])
        self.pull = np.matmul(self.w_fp, cross.transpose(0, 2, 1))  # (G, C/G, K): rows of X w_c
        self.target_energy = float(target_energy)

    def loss_and_grad(self, idx, w) -> tuple[float, np.ndarray]:
        """Reconstruction loss on every image (``idx`` is ignored) and its gradient wrt ``w``
        (the weight in its original shape), as :meth:`_LayerProblem.loss_and_grad` on all images."""
        w2d = channels_first(w, self.axis).astype(np.float64).reshape(self.w_fp.shape)
        gw = np.matmul(w2d, self.gram)  # gram is symmetric
        loss = float(np.sum(w2d * gw) - 2.0 * np.sum(w2d * self.pull) + self.target_energy)
        grad = (2.0 * (gw - self.pull)).reshape(-1, w2d.shape[-1])
        moved = (self.shape[self.axis],) + tuple(d for i, d in enumerate(self.shape) if i != self.axis)
        return max(loss, 0.0), np.moveaxis(grad.reshape(moved), 0, self.axis).astype(np.float32)


def _rows(node, x, weight_shape) -> np.ndarray:
    """float32 (G, P, K): the input rows of the layer, split by group."""
    groups = int(node.attrs.get("group", 1)) if node.op_type == "Conv" else 1
    rows = layer_rows(node.op_type, node.attrs, x, weight_shape)
    if node.op_type == "Gemm" and node.attrs.get("alpha", 1.0) != 1.0:
        rows = rows * np.float32(node.attrs["alpha"])
    return np.ascontiguousarray(rows.reshape(len(rows), groups, -1).transpose(1, 0, 2), dtype=np.float32)


def _moments_apply(node) -> bool:
    """Whether the layer's output is ``w_c . row`` of rows :func:`layer_rows` gives."""
    return not (node.op_type == "Gemm" and node.attrs.get("transA", 0))


def _moment_problem(net: QuantizedNetwork, index: int, images) -> _MomentProblem:
    layer, qw = net.layers[index], net.weights[index]
    model = net.model
    node = net.graph.nodes[_node_index(net.graph, layer.node)]
    w_fp = model.graph.initializers[layer.weight]
    w2d = channels_first(w_fp, qw.axis).astype(np.float64)
    params = net.params()
    fp_engine = _engine_until(model.graph, layer.data_input)
    q_engine = _engine_until(net.graph, node.inputs[0])
    gram = cross = None
    energy, rows, step = 0.0, 0, None
    for start in range(0, len(images), COLLECT_BATCH):
        chunk = images[start:start + COLLECT_BATCH]
        fp, _ = fp_engine.run({model.input_name: chunk}, outputs=[layer.data_input])
        q, _ = q_engine.run({model.input_name: chunk}, params=params, outputs=[node.inputs[0]])
        fp_x, q_x = fp[layer.data_input], q[node.inputs[0]]
        if step is None:  # images whose rows fit ROWS_BYTES: the same for every chunk
            step = max(1, ROWS_BYTES // max(_rows(node, fp_x[:1], w_fp.shape).nbytes, 1))
        for part in range(0, len(chunk), step):
            x = _rows(node, fp_x[part:part + step], w_fp.shape)
            xq = _rows(node, q_x[part:part + step], w_fp.shape)
            # float32 products (a chunk's rounding error, ~1e-7 of each entry, is far below what the
            # rounding changes), summed over chunks in float64; no numba kernel runs beside them
            with blas_on_all_cores():
                g_part = np.matmul(xq.transpose(0, 2, 1), xq).astype(np.float64)
                c_part = np.matmul(xq.transpose(0, 2, 1), x).astype(np.float64)
            gram = g_part if gram is None else gram + g_part
            cross = c_part if cross is None else cross + c_part
            w_groups = w2d.reshape(x.shape[0], -1, x.shape[2]).astype(np.float32)  # (G, C/G, K)
            energy += float(np.sum(np.square(np.matmul(x, w_groups.transpose(0, 2, 1)), dtype=np.float64)))
            rows += x.shape[1]
    rows = max(rows, 1)
    return _MomentProblem(gram / rows, cross / rows, energy / rows, w2d, tuple(w_fp.shape), qw.axis)


def _solver_for(net: QuantizedNetwork, index: int, images, options: AdaRoundOptions) -> tuple[str, float]:
    """``moments`` where building and using the moments costs fewer multiply-adds than the paper's
    mini-batches would (module docstring), else ``batches``; with the multiply-adds of one of its
    iterations (forward and weight gradient for the batches)."""
    layer = net.layers[index]
    node = net.graph.nodes[_node_index(net.graph, layer.node)]
    weight = net.model.graph.initializers[layer.weight]
    channels = weight.shape[net.weights[index].axis]
    k = int(weight.size // channels)  # row length of one group
    per_iteration = {"moments": float(channels * k * k)}
    if options.solver == "moments" and _moments_apply(node):
        return "moments", per_iteration["moments"]
    groups = int(node.attrs.get("group", 1)) if node.op_type == "Conv" else 1
    probe, _ = _engine_until(net.model.graph, layer.data_input).run({net.model.input_name: images[:1]},
                                                                     outputs=[layer.data_input])
    rows_per_image = len(layer_rows(node.op_type, node.attrs, probe[layer.data_input], weight.shape))
    per_iteration["batches"] = 2.0 * channels * k * rows_per_image * min(options.batch_size, len(images))
    if options.solver == "batches" or not _moments_apply(node):
        return "batches", per_iteration["batches"]
    rows = rows_per_image * len(images)
    moments = 2 * rows * groups * k * k + options.iterations * 2 * channels * k * k
    batches = options.iterations * per_iteration["batches"]
    solver = "moments" if moments <= batches else "batches"
    return solver, per_iteration[solver]


def iterations_for(per_iteration: float, options: AdaRoundOptions) -> int:
    """``options.iterations``, or fewer (at least ``min_iterations``) where they would cost more
    than ``layer_budget`` multiply-adds."""
    if not options.layer_budget or per_iteration * options.iterations <= options.layer_budget:
        return options.iterations
    return max(min(options.iterations, options.min_iterations), int(options.layer_budget // per_iteration))


def _learn_rounding_batches(problem: _LayerProblem, qw, options: AdaRoundOptions, rng):
    """The paper's loop: Adam on V, each step on ``batch_size`` images drawn at random."""
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


def _learn_rounding_moments(problem: _MomentProblem, qw, options: AdaRoundOptions):
    """The same Adam on V with the exact gradient on every image (``rounding.learn_rounding``):
    ``W~ = lo + h(V) (hi - lo)``, the values of each weight's two codes under the fixed bit weights."""
    lo, hi = qw.soft_ends()
    shape = problem.w_fp.shape
    v = np.ascontiguousarray(qw.rounding.v, dtype=np.float64).reshape(shape)
    learn_rounding(v, lo.reshape(shape), (hi - lo).reshape(shape), problem.gram, problem.pull,
                   options.iterations, options.lr, options.reg, options.warmup, options.beta_start,
                   options.beta_end)
    qw.rounding.v = v.reshape(qw.rounding.v.shape)


def reconstruction_error(net: QuantizedNetwork, index: int, images) -> float:
    """Layer ``index``'s output error with its current weights, on its inputs in ``net`` (earlier
    layers as they are) against the full-precision layer on FP inputs: the loss AdaRound minimises,
    without the regulariser."""
    problem = _problem(net, index, images)
    return problem.loss_and_grad(np.arange(problem.images), net.weights[index].compose())[0]


def _problem(net: QuantizedNetwork, index: int, images) -> _LayerProblem:
    layer = net.layers[index]
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
    node, solver, iterations (``iterations_for``: fewer than ``options.iterations`` only on layers
    above the budget), reconstruction loss at round-to-nearest and after (on all ``images``), codes
    moved off round-to-nearest, seconds.
    """
    options = options or AdaRoundOptions()
    if options.solver not in SOLVERS:
        raise ValueError(f"unknown AdaRound solver {options.solver!r}; use one of {', '.join(SOLVERS)}")
    rng = np.random.default_rng(options.seed)
    stats = []
    for index, qw in enumerate(net.weights):
        started = time.perf_counter()
        solver, per_iteration = _solver_for(net, index, images, options)
        layer_options = replace(options, iterations=iterations_for(per_iteration, options))
        problem = _moment_problem(net, index, images) if solver == "moments" else _problem(net, index, images)
        everything = None if solver == "moments" else np.arange(problem.images)
        nearest_codes = qw.codes.copy()
        before = problem.loss_and_grad(everything, qw.compose())[0]
        qw.start_rounding(net.model.graph.initializers[qw.name])
        trains_bit_weights, qw.train_bit_weights = qw.train_bit_weights, False  # V alone here
        if solver == "moments":
            _learn_rounding_moments(problem, qw, layer_options)
        else:
            _learn_rounding_batches(problem, qw, layer_options, rng)
        qw.harden()
        qw.train_bit_weights = trains_bit_weights
        after = problem.loss_and_grad(everything, qw.compose())[0]
        stats.append({"node": qw.node, "solver": solver, "iterations": layer_options.iterations, "loss_nearest": before, "loss": after,
                      "codes_moved": int(np.count_nonzero(qw.codes != nearest_codes)),
                      "seconds": time.perf_counter() - started})
        if progress:
            progress(index, len(net.weights), stats[-1])
    return stats
