"""Every op's backward against float64 central differences, run through a one-node ``Engine`` graph.

``check_grad`` builds the node as an ONNX model, checks the engine's forward against ONNX's reference
evaluator, then the gradient of L = sum(r * y) for every differentiable float input against central
differences. Going through ``Engine`` (not the op alone) also checks un-broadcasting and the
accumulation of gradients for a value read twice.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bwacal.engine import Engine
from bwacal.onnx_io import read_model

EPS = 1e-6
# attribute defaults are float32 in the spec (HardSigmoid's 0.2): forward values agree to ~1e-8
VALUE_TOL = dict(rtol=1e-7, atol=1e-7)
GRAD_RTOL = 1e-6  # of the largest gradient entry


class const:
    """Marks a float input as a constant (an initializer, not differentiated)."""

    def __init__(self, value):
        self.value = np.asarray(value)


def rnd(*shape, seed=0, lo=-1.0, hi=1.0):
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def away(*shape, seed=0, margin=0.1):
    """Values in [-1, -margin] U [margin, 1]: no kink of Relu-like ops within reach of EPS."""
    rng = np.random.default_rng(seed)
    return rng.uniform(margin, 1.0, shape) * rng.choice([-1.0, 1.0], shape)


def distinct(*shape, seed=0):
    """A random permutation of well-separated values, so every max has one clear winner."""
    n = int(np.prod(shape))
    return np.random.default_rng(seed).permutation(np.linspace(-1, 1, n)).reshape(shape)


def ints(*values):
    return np.array(values, dtype=np.int64)


def _model(nodes, feeds, consts, outputs, opset):
    def info(name, a):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)

    graph = helper.make_graph(nodes, "t", [info(k, v) for k, v in feeds.items()],
                              [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def check_graph_grad(model, feeds, output="y", want=None):
    """Forward against ``want`` (default: ONNX's reference evaluator), then backward of sum(r * y)
    for every feed against central differences."""
    engine = Engine(read_model(model))
    values, tape = engine.run(feeds, record=True, wrt=list(feeds))
    y = values[output]
    if want is None:
        want = ReferenceEvaluator(model).run(None, feeds)[0]
    assert y.dtype == np.float64 and y.shape == want.shape
    np.testing.assert_allclose(y, want, **VALUE_TOL)

    r = np.random.default_rng(99).standard_normal(y.shape)
    grads = engine.backward(tape, {output: r}, wrt=list(feeds))

    def loss(name, a):
        out, _ = engine.run({**feeds, name: a})
        return float((r * out[output]).sum())

    for name, x in feeds.items():
        numeric = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[i] += EPS
            minus[i] -= EPS
            numeric[i] = (loss(name, plus) - loss(name, minus)) / (2 * EPS)
        got = grads[name]
        assert got is not None, f"no gradient for input '{name}'"
        got = np.asarray(got)
        assert got.shape == x.shape, f"gradient of '{name}' has shape {got.shape}, input {x.shape}"
        scale = max(np.abs(numeric).max(), 1e-3)
        np.testing.assert_allclose(got, numeric, rtol=0, atol=GRAD_RTOL * scale, err_msg=name)


def check_grad(op_type, attrs, inputs, opset=17, want=None):
    """One node ``op_type(*inputs)``: float arrays are differentiated, ``const`` and integer arrays
    become initializers, ``None`` is an omitted optional input. ``want`` replaces the reference
    evaluator where it is wrong (negative pads, opset-11 Softmax)."""
    names, feeds, consts = [], {}, {}
    for k, a in enumerate(inputs):
        if a is None:
            names.append("")
            continue
        name = f"in{k}"
        names.append(name)
        if isinstance(a, const):
            consts[name] = a.value
        elif np.asarray(a).dtype.kind == "f":
            feeds[name] = np.asarray(a, dtype=np.float64)
        else:
            consts[name] = np.asarray(a)
    node = helper.make_node(op_type, names, ["y"], **attrs)
    check_graph_grad(_model([node], feeds, consts, ["y"], opset), feeds, want=want)


X = rnd(2, 3, 5, 5, seed=1)  # an NCHW activation
W = rnd(4, 3, 3, 3, seed=2)
B = rnd(4, seed=3)


# Conv
def test_conv_plain(): check_grad("Conv", {}, [X, W, B])
def test_conv_no_bias(): check_grad("Conv", {}, [X, W])
def test_conv_strided(): check_grad("Conv", {"strides": [2, 2]}, [X, W, B])
def test_conv_strided_uneven(): check_grad("Conv", {"strides": [2, 3], "pads": [1, 0, 0, 1]}, [X, W, B])
def test_conv_padded(): check_grad("Conv", {"pads": [1, 1, 1, 1]}, [X, W, B])
def test_conv_padded_asymmetric(): check_grad("Conv", {"pads": [0, 2, 1, 0]}, [X, W])
def test_conv_dilated(): check_grad("Conv", {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, [X, W, B])
def test_conv_dilated_strided(): check_grad("Conv", {"dilations": [2, 1], "strides": [2, 1]}, [X, W])
def test_conv_grouped(): check_grad("Conv", {"group": 2}, [rnd(2, 4, 5, 5, seed=4), rnd(6, 2, 3, 3, seed=5), B[:3].repeat(2)])
def test_conv_grouped_padded(): check_grad("Conv", {"group": 2, "pads": [1, 1, 1, 1], "strides": [2, 2]},
                                           [rnd(1, 4, 5, 5, seed=4), rnd(4, 2, 3, 3, seed=5)])
def test_conv_depthwise(): check_grad("Conv", {"group": 3, "pads": [1, 1, 1, 1]}, [X, rnd(3, 1, 3, 3, seed=6), B[:3]])
def test_conv_depthwise_strided(): check_grad("Conv", {"group": 3, "pads": [1, 1, 1, 1], "strides": [2, 2]},
                                             [X, rnd(3, 1, 3, 3, seed=6)])
def test_conv_depthwise_multiplier(): check_grad("Conv", {"group": 3, "pads": [1, 1, 1, 1]},
                                                 [X, rnd(6, 1, 3, 3, seed=7), rnd(6, seed=8)])
def test_conv_depthwise_dilated(): check_grad("Conv", {"group": 3, "dilations": [2, 2]}, [X, rnd(3, 1, 2, 2, seed=6)])
def test_conv_1x1(): check_grad("Conv", {}, [X, rnd(5, 3, 1, 1, seed=9), rnd(5, seed=10)])
def test_conv_1x1_strided(): check_grad("Conv", {"strides": [2, 2]}, [X, rnd(5, 3, 1, 1, seed=9)])
def test_conv_auto_pad_same_upper(): check_grad("Conv", {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
                                                [rnd(1, 3, 5, 5, seed=11), rnd(2, 3, 2, 2, seed=12)])
def test_conv_auto_pad_same_lower(): check_grad("Conv", {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
                                                [rnd(1, 3, 5, 5, seed=11), rnd(2, 3, 2, 2, seed=12)])
def test_conv_auto_pad_valid(): check_grad("Conv", {"auto_pad": "VALID", "strides": [2, 2]}, [X, W, B])
def test_conv_non_square_kernel(): check_grad("Conv", {"pads": [1, 0, 1, 0]}, [X, rnd(2, 3, 3, 1, seed=13)])


# Gemm and MatMul
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_transposes(trans_a, trans_b):
    a = rnd(*((4, 3) if trans_a else (3, 4)), seed=1)
    b = rnd(*((5, 4) if trans_b else (4, 5)), seed=2)
    check_grad("Gemm", {"transA": trans_a, "transB": trans_b}, [a, b, rnd(5, seed=3)])


def test_gemm_alpha_beta(): check_grad("Gemm", {"alpha": 0.7, "beta": -1.3, "transB": 1}, [rnd(3, 4), rnd(5, 4), rnd(3, 5)])
def test_gemm_bias_column(): check_grad("Gemm", {"beta": 2.0}, [rnd(3, 4), rnd(4, 5), rnd(3, 1)])
def test_gemm_bias_row(): check_grad("Gemm", {}, [rnd(3, 4), rnd(4, 5), rnd(1, 5)])
def test_gemm_bias_scalar(): check_grad("Gemm", {"alpha": 0.5}, [rnd(3, 4), rnd(4, 5), rnd(1)])
def test_gemm_no_bias(): check_grad("Gemm", {"transA": 1}, [rnd(4, 3), rnd(4, 5)])
def test_matmul_2d(): check_grad("MatMul", {}, [rnd(3, 4), rnd(4, 5)])
def test_matmul_batched(): check_grad("MatMul", {}, [rnd(2, 3, 4), rnd(2, 4, 5)])
def test_matmul_broadcast_batch(): check_grad("MatMul", {}, [rnd(2, 1, 3, 4), rnd(3, 4, 2)])
def test_matmul_broadcast_matrix(): check_grad("MatMul", {}, [rnd(2, 3, 4), rnd(4, 5)])
def test_matmul_vector_left(): check_grad("MatMul", {}, [rnd(4), rnd(2, 4, 5)])
def test_matmul_vector_right(): check_grad("MatMul", {}, [rnd(2, 3, 4), rnd(4)])
def test_matmul_vector_left_2d(): check_grad("MatMul", {}, [rnd(4), rnd(4, 5)])
def test_matmul_vector_right_2d(): check_grad("MatMul", {}, [rnd(3, 4), rnd(4)])
def test_matmul_vectors(): check_grad("MatMul", {}, [rnd(4), rnd(4, seed=1)])


# arithmetic with broadcasting
BROADCASTS = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 3, 4), (3, 1)), ((1, 3, 1), (2, 1, 4)),
              ((2, 3, 4), ()), ((3, 1, 1), (2, 3, 4, 5))]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
def test_arithmetic_broadcast(op, shapes):
    a, b = rnd(*shapes[0], seed=1), rnd(*shapes[1], seed=2)
    if op == "Div":
        b = away(*shapes[1], seed=2, margin=0.5)
    check_grad(op, {}, [a, b])


# activations
def test_relu(): check_grad("Relu", {}, [away(2, 3, 4)])
def test_leaky_relu(): check_grad("LeakyRelu", {"alpha": 0.1}, [away(2, 3, 4)])
def test_leaky_relu_default(): check_grad("LeakyRelu", {}, [away(2, 3, 4)])
def test_prelu_channel(): check_grad("PRelu", {}, [away(2, 3, 4, 4), rnd(3, 1, 1, seed=5)])
def test_prelu_scalar(): check_grad("PRelu", {}, [away(2, 3, 4), rnd(1, seed=5)])
def test_prelu_full(): check_grad("PRelu", {}, [away(2, 3, 4), rnd(2, 3, 4, seed=5)])
def test_clip_inputs(): check_grad("Clip", {}, [away(2, 3, 4) * 2, const(np.float64(-0.5)), const(np.float64(0.75))])
def test_clip_min_only(): check_grad("Clip", {}, [away(2, 3, 4) * 2, const(np.float64(-0.5))])
def test_clip_max_only(): check_grad("Clip", {}, [away(2, 3, 4) * 2, None, const(np.float64(0.5))])
def test_clip_relu6(): check_grad("Clip", {}, [away(2, 3, 4) * 8, const(np.float64(0)), const(np.float64(6))])
def test_clip_attributes(): check_grad("Clip", {"min": -0.5, "max": 0.75}, [away(2, 3, 4) * 2], opset=10)
def test_sigmoid(): check_grad("Sigmoid", {}, [rnd(2, 3, 4) * 4])
def test_hard_sigmoid(): check_grad("HardSigmoid", {}, [np.linspace(-4.1, 4.3, 24).reshape(2, 3, 4)])
def test_hard_sigmoid_attrs(): check_grad("HardSigmoid", {"alpha": 0.5, "beta": 0.4}, [np.linspace(-2.05, 2.1, 24).reshape(4, 6)])
def test_hard_swish(): check_grad("HardSwish", {}, [np.linspace(-4.5, 4.6, 24).reshape(2, 3, 4)])
def test_tanh(): check_grad("Tanh", {}, [rnd(2, 3, 4) * 3])


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset,axis", [(13, None), (13, 1), (13, 0), (13, -2), (11, None), (11, 2), (11, 0), (11, -1)])
def test_softmax(op, opset, axis):
    x = rnd(2, 3, 4) * 3
    want = None
    if opset < 13:  # the reference evaluator ignores the opset-11 rule: flatten to 2-D at axis
        a = (1 if axis is None else axis) % 3
        v = x.reshape(int(np.prod(x.shape[:a])), -1)
        s = v - v.max(axis=1, keepdims=True)
        s = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        want = (s if op == "LogSoftmax" else np.exp(s)).reshape(x.shape)
    check_grad(op, {} if axis is None else {"axis": axis}, [x], opset=opset, want=want)


def test_batchnorm():
    check_grad("BatchNormalization", {"epsilon": 1e-3},
               [X, rnd(3, seed=4), rnd(3, seed=5), const(rnd(3, seed=6)), const(rnd(3, seed=7, lo=0.5, hi=2))])


def test_batchnorm_2d(): check_grad("BatchNormalization", {}, [rnd(4, 3), rnd(3, seed=4), rnd(3, seed=5),
                                                              const(rnd(3, seed=6)), const(rnd(3, lo=0.5, hi=2))])


# pooling
XP = distinct(2, 2, 7, 7, seed=3)


def test_maxpool(): check_grad("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, [XP])
def test_maxpool_overlapping(): check_grad("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}, [XP])
def test_maxpool_pads(): check_grad("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, [XP])
def test_maxpool_negative_with_pads(): check_grad("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, [XP - 2])
def test_maxpool_ceil_mode(): check_grad("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, [XP])
def test_maxpool_ceil_mode_pads(): check_grad("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1,
                                                          "pads": [1, 0, 1, 0]}, [XP[:, :, :6]])
def test_maxpool_dilations(): check_grad("MaxPool", {"kernel_shape": [2, 2], "dilations": [2, 2]}, [XP])
def test_maxpool_auto_pad(): check_grad("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, [XP[:, :, :6, :6]])
def test_averagepool(): check_grad("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, [X])


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("ceil_mode", [0, 1])
def test_averagepool_pads(count_include_pad, ceil_mode):
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 0, 1], "ceil_mode": ceil_mode,
             "count_include_pad": count_include_pad}
    check_grad("AveragePool", attrs, [rnd(1, 2, 6, 7)])


def test_averagepool_ceil_mode(): check_grad("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, [XP])
def test_global_averagepool(): check_grad("GlobalAveragePool", {}, [X])
def test_global_maxpool(): check_grad("GlobalMaxPool", {}, [XP])


# reductions
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [[1], [2, 3], [-1], [0, 2], None])
def test_reduce_mean_attribute(axes, keepdims):
    attrs = {"keepdims": keepdims} | ({} if axes is None else {"axes": axes})
    check_grad("ReduceMean", attrs, [rnd(2, 3, 4, 2)], opset=13)


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [[2, 3], [-3], [0]])
def test_reduce_mean_input(axes, keepdims):
    check_grad("ReduceMean", {"keepdims": keepdims}, [rnd(2, 3, 4, 2), ints(*axes)], opset=18)


def test_reduce_mean_no_axes_input(): check_grad("ReduceMean", {"keepdims": 0}, [rnd(2, 3, 4)], opset=18)


# data movement
def test_flatten(): check_grad("Flatten", {}, [X])
def test_flatten_axis(): check_grad("Flatten", {"axis": 2}, [X])
def test_flatten_axis_0(): check_grad("Flatten", {"axis": 0}, [rnd(2, 3, 2)])
def test_flatten_axis_negative(): check_grad("Flatten", {"axis": -1}, [rnd(2, 3, 2)])
def test_reshape(): check_grad("Reshape", {}, [X, ints(2, -1)])
def test_reshape_zero(): check_grad("Reshape", {}, [X, ints(0, 3, -1, 5)])
def test_transpose(): check_grad("Transpose", {"perm": [0, 2, 3, 1]}, [X])
def test_transpose_default(): check_grad("Transpose", {}, [rnd(2, 3, 4)])
def test_squeeze_input(): check_grad("Squeeze", {}, [rnd(2, 1, 3, 1), ints(1, -1)])
def test_squeeze_all(): check_grad("Squeeze", {}, [rnd(2, 1, 3, 1)])
def test_squeeze_attribute(): check_grad("Squeeze", {"axes": [3]}, [rnd(2, 1, 3, 1)], opset=11)
def test_unsqueeze_input(): check_grad("Unsqueeze", {}, [rnd(2, 3), ints(0, -1)])
def test_unsqueeze_attribute(): check_grad("Unsqueeze", {"axes": [1, 3]}, [rnd(2, 3)], opset=11)
def test_concat(): check_grad("Concat", {"axis": 1}, [rnd(2, 1, 3), rnd(2, 3, 3, seed=1), rnd(2, 2, 3, seed=2)])
def test_concat_negative_axis(): check_grad("Concat", {"axis": -1}, [rnd(2, 3, 1), rnd(2, 3, 2, seed=1)])
def test_pad(): check_grad("Pad", {}, [rnd(2, 3, 4), ints(0, 1, 2, 0, 2, 1), const(np.float64(0.5))])
# the reference evaluator refuses negative pads: the expected values are written out
XQ = rnd(2, 3, 4)
def test_pad_negative(): check_grad("Pad", {}, [XQ, ints(0, -1, 2, 1, 0, -2)],
                                    want=np.pad(XQ, [(0, 1), (0, 0), (2, 0)])[:, 1:, :-2])
def test_pad_axes(): check_grad("Pad", {}, [XQ, ints(1, -1, 2, 0), None, ints(-1, 0)], opset=18,
                                want=np.pad(XQ, [(0, 0), (0, 0), (1, 2)])[1:])
def test_pad_attribute(): check_grad("Pad", {"pads": [0, 1, 1, 0, -1, 2], "value": 1.5}, [XQ], opset=10,
                                     want=np.pad(XQ, [(0, 0), (1, 0), (1, 2)], constant_values=1.5)[:, :-1])
def test_gather_axis0(): check_grad("Gather", {}, [rnd(4, 3), ints(3, 0, -1, 1)])
def test_gather_repeated(): check_grad("Gather", {"axis": 1}, [rnd(2, 4, 3), ints(1, 1, -3)])
def test_gather_2d_indices(): check_grad("Gather", {"axis": 1}, [rnd(2, 4, 3), np.array([[0, 3], [2, 0]])])
def test_gather_scalar_index(): check_grad("Gather", {"axis": 2}, [rnd(2, 4, 3), np.array(-1)])


def test_identity(): check_grad("Identity", {}, [X])
def test_dropout(): check_grad("Dropout", {}, [X])


# the engine: gradients accumulate across consumers
def test_accumulates_across_consumers():
    """x feeds a Tanh branch and, through a conv, a second one; the branches are Added (a residual)."""
    nodes = [helper.make_node("Tanh", ["x"], ["t"]),
             helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["x", "x"], ["sq"]),  # one node reading x twice
             helper.make_node("Add", ["c", "sq"], ["s"]),
             helper.make_node("Add", ["s", "t"], ["y"])]
    feeds = {"x": rnd(2, 3, 4, 4, seed=1), "w": rnd(3, 3, 3, 3, seed=2)}
    check_graph_grad(_model(nodes, feeds, {}, ["y"], 17), feeds)


def test_accumulates_across_broadcast_consumers():
    """A per-channel vector read by a Mul and an Add, both broadcasting it over NCHW."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]),
             helper.make_node("Add", ["m", "s"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    feeds = {"x": rnd(2, 3, 2, 2, seed=1) + 2.0, "s": rnd(3, 1, 1, seed=2, lo=0.5, hi=1.0)}
    check_graph_grad(_model(nodes, feeds, {}, ["y"], 17), feeds)


def test_gradient_of_a_graph_input_read_by_a_later_output():
    """The seed output is also read by a node after it in order: backward must keep both paths."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["h"]),
             helper.make_node("Conv", ["h", "w"], ["c"]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Mul", ["c", "g"], ["y"])]
    feeds = {"x": rnd(1, 2, 5, 5, seed=1), "w": rnd(3, 2, 2, 2, seed=2)}
    check_graph_grad(_model(nodes, feeds, {}, ["y"], 17), feeds)


# a conv output (which the engine may keep in its own layout) read by every other kind of op
def _after_conv(op_type, extra_inputs=(), **attrs):
    return [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 0, 0]),
            helper.make_node(op_type, ["c", *extra_inputs], ["y"], **attrs)]


AFTER_CONV = {
    "add_input": (_after_conv("Add", ["x"]), {}),  # a residual straight from the graph input
    "mul_channel": (_after_conv("Mul", ["s"]), {"s": rnd(3, 1, 1, seed=5)}),
    "mul_rank4": (_after_conv("Mul", ["s"]), {"s": rnd(1, 3, 1, 1, seed=5)}),
    "sub_scalar": (_after_conv("Sub", ["s"]), {"s": rnd(1, seed=5)}),
    "div_row": (_after_conv("Div", ["s"]), {"s": rnd(3, seed=5, lo=0.5, hi=1.0)}),
    "add_full": (_after_conv("Add", ["s"]), {"s": rnd(2, 3, 3, 3, seed=5)}),
    "prelu": (_after_conv("PRelu", ["s"]), {"s": rnd(3, 1, 1, seed=5)}),
    "concat_channels": (_after_conv("Concat", ["x"], axis=1), {}),
    "concat_width": (_after_conv("Concat", ["x"], axis=-1), {}),
    "transpose": (_after_conv("Transpose", perm=[0, 2, 3, 1]), {}),
    "flatten": (_after_conv("Flatten"), {}),
    "softmax_channels": (_after_conv("Softmax", axis=1), {}),
    "logsoftmax_last": (_after_conv("LogSoftmax"), {}),
    "reduce_mean": (_after_conv("ReduceMean", axes=[2, 3], keepdims=0), {}),
    "reduce_mean_channels": (_after_conv("ReduceMean", axes=[1]), {}),
    "global_average_pool": (_after_conv("GlobalAveragePool"), {}),
    "global_max_pool": (_after_conv("GlobalMaxPool"), {}),
    "batchnorm": (_after_conv("BatchNormalization", ["s", "b", "m", "v"]),
                  {"s": rnd(3, seed=5), "b": rnd(3, seed=6), "m": rnd(3, seed=7), "v": rnd(3, seed=8, lo=0.5, hi=2)}),
    "averagepool": (_after_conv("AveragePool", kernel_shape=[2, 2], strides=[2, 2]), {}),
    "maxpool": (_after_conv("MaxPool", kernel_shape=[2, 2], strides=[2, 2]), {}),
    "sigmoid": (_after_conv("Sigmoid"), {}),
    "clip": (_after_conv("Clip", ["lo", "hi"]), {}),
}
AFTER_CONV_CONSTS = {"clip": {"lo": np.array(-10.0), "hi": np.array(10.0)}}


@pytest.mark.parametrize("case", list(AFTER_CONV))
def test_after_conv(case):
    nodes, extra = AFTER_CONV[case]
    feeds = {"x": rnd(2, 3, 3, 3, seed=1), "w": rnd(3, 3, 2, 2, seed=2), **extra}
    consts = AFTER_CONV_CONSTS.get(case, {})
    if case == "batchnorm":
        consts = {k: feeds.pop(k) for k in ("m", "v")}
    check_graph_grad(_model(nodes, feeds, consts, ["y"], 17), feeds)


def test_conv_output_read_by_conv_and_reshape():
    """One conv output read by a second conv and by a Reshape; both reach the output."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 0, 0]),
             helper.make_node("Conv", ["c", "w2"], ["d"], strides=[2, 2]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[1], keepdims=0),
             helper.make_node("Flatten", ["d"], ["f"]),
             helper.make_node("Concat", ["f", "m"], ["y"], axis=1)]
    feeds = {"x": rnd(2, 3, 3, 3, seed=1), "w": rnd(3, 3, 2, 2, seed=2), "w2": rnd(2, 3, 2, 2, seed=3)}
    check_graph_grad(_model(nodes, feeds, {"shape": ints(2, 3, 9)}, ["y"], 17), feeds)
