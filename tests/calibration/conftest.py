"""A small random-weight classifier and matching calibration data, built without torch."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bwacal.data import write_dataset


def tiny_cnn(path, seed=0, channels=(1, 8, 16), classes=10, size=12):
    """Conv-BN-Relu, depthwise conv, Conv-Relu, residual Add, GlobalAveragePool, Flatten, Gemm."""
    rng = np.random.default_rng(seed)
    c0, c1, c2 = channels

    def t(name, a):
        return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)

    inits = [
        t("w1", rng.normal(0, 0.5, (c1, c0, 3, 3))), t("b1", rng.normal(0, 0.1, c1)),
        t("bn_g", rng.uniform(0.5, 1.5, c1)), t("bn_b", rng.normal(0, 0.1, c1)),
        t("bn_m", rng.normal(0, 0.1, c1)), t("bn_v", rng.uniform(0.5, 1.5, c1)),
        t("wd", rng.normal(0, 0.5, (c1, 1, 3, 3))),
        t("w2", rng.normal(0, 0.3, (c1, c1, 1, 1))),
        t("w3", rng.normal(0, 0.3, (c2, c1, 3, 3))), t("b3", rng.normal(0, 0.1, c2)),
        t("fc_w", rng.normal(0, 0.5, (classes, c2))), t("fc_b", rng.normal(0, 0.1, classes)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_g", "bn_b", "bn_m", "bn_v"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd"], ["d1"], pads=[1, 1, 1, 1], group=c1),
        helper.make_node("Clip", ["d1", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "w2"], ["p1"]),
        helper.make_node("Add", ["p1", "r1"], ["s1"]),
        helper.make_node("Conv", ["s1", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    inits += [t("lo", 0.0), t("hi", 6.0)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c0, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model path, calibration h5 path): labels are the FP model's own predictions."""
    import bwacal

    d = tmp_path_factory.mktemp("tiny")
    path = tiny_cnn(d / "tiny.onnx")
    model = bwacal.load_model(path)
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (160, 1, 12, 12)).astype(np.float32)
    y = model.forward(x).argmax(axis=1)
    write_dataset(d / "calib.h5", x, y)
    write_dataset(d / "nolabels.h5", x)
    return path, d / "calib.h5"
