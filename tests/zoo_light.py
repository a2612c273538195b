"""The nine ONNX model-zoo graphs the onnx package ships (``onnx/backend/test/data/light/``), materialized
with seeded random weights: a public corpus of caffe2-era graphs (opset 9).

The files store each weight as a ``ConstantOfShape`` of its shape, filled with 0.02. ``materialize``
replaces every such node by a random initializer of that shape, scaled by what reads it so activations
stay finite through 50-120 layers: He init (std sqrt(2 / fan_in)) for Conv and Gemm weights, scales
and variances in [0.5, 1.5] (BatchNormalization, and the Unsqueeze -> Mul form DenseNet and Inception
v2 write), small normal values for biases and means. Reshape targets fixed at batch 1 on activations
([1, 9216]) get 0 at position 0 (copy the batch dim), and the input and output batch dims become
dynamic, so bwacal's batch-2 probe and a random batch run. Inputs no node reads (ResNet-50's and
ZFNet's label queue) are dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
NAMES = sorted(p.stem[len("light_"):] for p in LIGHT.glob("light_*.onnx"))
# ops a weight passes through on its way to the op that uses it
_PASS_THROUGH = {"Reshape", "Unsqueeze", "Squeeze", "Transpose", "Flatten"}


def _role(name, consumers, shape):
    """(op reading the tensor, input index, the shape it has there, the node), through reshapes of it."""
    while True:
        users = consumers.get(name, [])
        if not users:
            return None, None, shape, None
        node = users[0]
        if node.op_type in _PASS_THROUGH and node.input[0] == name:
            name = node.output[0]
            continue
        return node.op_type, list(node.input).index(name), shape, node


def _random_weight(rng, shape, role):
    op, index, _, node = role
    shape = tuple(int(d) for d in shape)
    if op == "Conv" and index == 1:
        return rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    if op == "Gemm" and index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return rng.normal(0, np.sqrt(2.0 / shape[1 if trans_b else 0]), shape)
    if (op == "BatchNormalization" and index in (1, 4)) or op == "Mul":
        return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0, 0.05, shape)


def materialize(name: str, seed: int = 0) -> onnx.ModelProto:
    """``light_<name>.onnx`` with random weights, batch-dynamic; see the module docstring."""
    model = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    graph = model.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    constant = set(inits)
    keep, weights = [], {}
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = inits[node.input[0]]
            out = node.output[0]
            weights[out] = _random_weight(rng, shape, _role(out, consumers, shape)).astype(np.float32)
            constant.add(out)
            continue
        if node.input and all(i in constant for i in node.input if i):
            constant.update(node.output)
        keep.append(node)
    for node in keep:  # batch-1 Reshape targets of activations: copy the batch dim instead
        if node.op_type == "Reshape" and node.input[0] not in constant and node.input[1] in inits:
            target = inits[node.input[1]].copy()
            if target[0] == 1:
                target[0] = 0
                inits[node.input[1]] = target
    del graph.node[:]
    graph.node.extend(keep)
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in {**inits, **weights}.items()
                             if k in consumers)
    defined = {t.name for t in graph.initializer}
    data = [v for v in graph.input if v.name not in defined and v.name not in weights and v.name in consumers]
    del graph.input[:]
    graph.input.extend(data)
    for value in list(graph.input) + list(graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    model.ir_version = max(model.ir_version, 4)  # initializers need not be listed as inputs from IR 4
    onnx.checker.check_model(model)
    return model
