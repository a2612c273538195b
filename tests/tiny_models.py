"""Tiny ONNX classifiers and matching HDF5 files, built in a few milliseconds for CLI and evaluation tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bwacal.data import write_dataset

SHAPE = (1, 8, 8)


def tiny_classifier(seed: int = 0, classes: int = 10, extra_nodes=(), metadata: dict | None = None,
                    dynamic_batch: bool = True) -> onnx.ModelProto:
    """Conv-ReLU-Conv-ReLU-GlobalAveragePool-Flatten-Gemm on a 1x8x8 input: ``classes`` logits.

    ``extra_nodes`` are (op_type, name) pairs inserted as unary nodes after the first ReLU (used to
    make a model with unsupported ops).
    """
    rng = np.random.default_rng(seed)
    inits = {
        "c1.w": rng.normal(0, 0.5, (4, 1, 3, 3)), "c1.b": rng.normal(0, 0.1, 4),
        "c2.w": rng.normal(0, 0.3, (8, 4, 3, 3)), "c2.b": rng.normal(0, 0.1, 8),
        "fc.w": rng.normal(0, 1.0, (classes, 8)), "fc.b": rng.normal(0, 0.1, classes),
    }
    nodes = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1")]
    last = "r1"
    for i, (op, name) in enumerate(extra_nodes):
        nodes.append(helper.make_node(op, [last], [f"x{i}"], name=name))
        last = f"x{i}"
    nodes += [helper.make_node("Conv", [last, "c2.w", "c2.b"], ["h2"], name="conv2", pads=[1, 1, 1, 1],
                               strides=[2, 2]),
              helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    batch = "N" if dynamic_batch else 1
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    return model


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def damaged(model: onnx.ModelProto, seed: int = 1, scale: float = 5.0) -> onnx.ModelProto:
    """A copy with heavy noise on every weight: what a botched quantization looks like."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.ndim > 1:
            noisy = w + scale * np.abs(w).mean() * rng.standard_normal(w.shape)
            t.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), t.name))
    return out


def labelled_data(path, model_path, n: int = 64, seed: int = 0, labels: bool = True, flip: int = 0) -> str:
    """Random float images labelled with the model's own predictions (so it scores 100%), ``flip`` of them wrong."""
    from bwacal import load_model

    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, *SHAPE)).astype(np.float32)
    model = load_model(model_path)
    y = model.forward(x).argmax(1).astype(np.int64)
    y[:flip] = (y[:flip] + 1) % model.num_classes
    write_dataset(path, x, y if labels else None)
    return str(path)
