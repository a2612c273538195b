"""The onnx package's nine model-zoo graphs (caffe2-era, opset 9) with random weights: each loads in bwacal
and matches ONNX Runtime within 1e-4 relative on a random batch of 2 at 224x224."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import bwacal
from tests.zoo_light import LIGHT, NAMES, materialize


@pytest.mark.parametrize("name", NAMES)
def test_zoo_graph_loads_and_matches_onnxruntime(name):
    model = materialize(name)
    loaded = bwacal.load_model(model)
    assert loaded.num_classes == 1000 and loaded.input_shape == (3, 224, 224)
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0].reshape(2, -1)
    got = loaded.forward(x)
    assert np.isfinite(want).all() and want.std() > 0
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-4


@pytest.mark.parametrize("name", ["squeezenet", "densenet121"])
def test_the_files_as_shipped_load_with_their_constantofshape_weights_folded(name):
    """No Reshape at batch 1 in these two: the shipped file itself loads, every weight folded at load."""
    path = LIGHT / f"light_{name}.onnx"
    loaded = bwacal.load_model(path)
    assert "ConstantOfShape" not in [n.op_type for n in loaded.graph.nodes]
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0].reshape(1, -1)
    assert float(np.abs(loaded.forward(x) - want).max() / np.abs(want).max()) < 1e-4
