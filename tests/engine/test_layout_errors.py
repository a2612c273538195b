"""An operand the channel-major layout cannot take is a one-line ModelError, not a traceback."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bwacal.engine import Engine
from bwacal.errors import ModelError
from bwacal.onnx_io import read_model


def test_rank5_operand_of_a_channel_major_value():
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    five = numpy_helper.from_array(np.ones((1, 1, 1, 1, 1), np.float32), "five")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Add", ["c", "five"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, five])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    engine = Engine(read_model(model))
    with pytest.raises(ModelError, match=r"node 'add' \(Add\) failed on input shapes"):
        engine.run({"x": np.ones((1, 1, 3, 3), np.float32)})
