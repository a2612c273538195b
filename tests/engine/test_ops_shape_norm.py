"""Slicing, splitting, reductions, normalizations and the transformer shapes of MatMul/Softmax:
forward against ONNX's reference evaluator (or a written-out formula where it is wrong), every input
gradient against float64 central differences through ``Engine``, the attention and window-partition
blocks also against torch autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import bwacal
from bwacal.engine import Engine
from bwacal.errors import UnsupportedOpError
from bwacal.onnx_io import read_model
from bwacal.ops import REGISTRY
from tests import torch_models as tm
from tests.engine.test_gradients import _model, away, check_graph_grad, check_grad, const, distinct, ints, rnd
from tests.engine.test_models import _rel_err

I64_MAX, I64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min
X4 = rnd(2, 3, 4, 5, seed=1)


# Slice: attributes before opset 10, inputs from 10 on
def test_slice_attributes(): check_grad("Slice", {"starts": [0, 1], "ends": [2, 3], "axes": [1, 2]}, [X4], opset=9)
def test_slice_attributes_no_axes(): check_grad("Slice", {"starts": [1, 0], "ends": [2, -1]}, [X4], opset=9)
def test_slice_inputs(): check_grad("Slice", {}, [X4, ints(1, 0), ints(3, 4), ints(2, 3)], opset=13)
def test_slice_inputs_no_axes(): check_grad("Slice", {}, [X4, ints(0, 1), ints(1, 3)], opset=10)
def test_slice_negative_indices(): check_grad("Slice", {}, [X4, ints(-3, -4), ints(-1, 100), ints(-2, -1)], opset=13)
def test_slice_clamped(): check_grad("Slice", {}, [X4, ints(-100, 2), ints(100, 1000), ints(1, 3)], opset=13)
def test_slice_int64_sentinels(): check_grad("Slice", {}, [X4, ints(1, I64_MIN), ints(I64_MAX, 3), ints(2, 3)], opset=13)
def test_slice_steps(): check_grad("Slice", {}, [X4, ints(0, 1), ints(5, 5), ints(3, 2), ints(2, 3)], opset=13)
def test_slice_negative_step(): check_grad("Slice", {}, [X4, ints(-1), ints(I64_MIN), ints(3), ints(-1)], opset=13)
def test_slice_negative_step_strided(): check_grad("Slice", {}, [X4, ints(I64_MAX, 2), ints(0, -100), ints(3, 1), ints(-2, -1)], opset=13)
# ONNX clamps a start below 0 stepping back to 0 (Python's x[-20::-1] would be empty)
def test_slice_negative_step_start_clamped(): check_grad("Slice", {}, [X4, ints(-20), ints(I64_MIN), ints(3), ints(-1)], opset=13,
                                                         want=X4[..., :1])
def test_slice_empty(): check_grad("Slice", {}, [X4, ints(3), ints(1), ints(1)], opset=13)


# Split: every output reaches the loss through a consumer of its own (a reversed Concat)
def check_split(attrs, x, opset, n, split_input=None, axis=0):
    outs = [f"s{k}" for k in range(n)]
    inputs = ["x"] + (["split"] if split_input is not None else [])
    nodes = [helper.make_node("Split", inputs, outs, **attrs),
             helper.make_node("Concat", outs[::-1], ["y"], axis=axis)]
    consts = {} if split_input is None else {"split": split_input}
    feeds = {"x": x}
    check_graph_grad(_model(nodes, feeds, consts, ["y"], opset), feeds)


def test_split_equal_default(): check_split({}, rnd(6, 2), opset=11, n=3)
def test_split_attribute(): check_split({"axis": 1, "split": [1, 3, 1]}, rnd(2, 5, 2), opset=11, n=3, axis=1)
def test_split_input(): check_split({"axis": -1}, rnd(2, 3, 5), opset=13, n=2, split_input=ints(2, 3), axis=-1)
def test_split_equal_opset13(): check_split({"axis": 1}, rnd(2, 4, 3), opset=13, n=2, axis=1)
def test_split_num_outputs(): check_split({"axis": 1, "num_outputs": 3}, rnd(2, 6, 2), opset=18, n=3, axis=1)
def test_split_num_outputs_uneven(): check_split({"axis": 1, "num_outputs": 3}, rnd(2, 7, 2), opset=18, n=3, axis=1)


def test_split_two_consumers():
    """ShuffleNetV2's chunk: one half feeds a Tanh and a later Add, the other a Mul."""
    nodes = [helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2),
             helper.make_node("Tanh", ["a"], ["t"]),
             helper.make_node("Mul", ["t", "b"], ["m"]),
             helper.make_node("Add", ["m", "a"], ["y"])]
    feeds = {"x": rnd(2, 4, 3, 3, seed=2)}
    check_graph_grad(_model(nodes, feeds, {}, ["y"], 18), feeds)


def test_split_output_unused():
    """Only the middle output reaches the loss: the other two get no gradient (zeros in dx)."""
    nodes = [helper.make_node("Split", ["x", "split"], ["a", "b", "c"], axis=0),
             helper.make_node("Sigmoid", ["b"], ["y"])]
    feeds = {"x": rnd(6, 3, seed=3)}
    check_graph_grad(_model(nodes, feeds, {"split": ints(1, 2, 3)}, ["y"], 13), feeds)


def test_split_after_conv():
    """A conv output (kept channel-major by the engine) split along channels."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Split", ["c"], ["a", "b"], axis=1),
             helper.make_node("Mul", ["a", "b"], ["y"])]
    feeds = {"x": rnd(2, 3, 3, 3, seed=1), "w": rnd(4, 3, 2, 2, seed=2)}
    check_graph_grad(_model(nodes, feeds, {}, ["y"], 11), feeds)


# Expand and Tile
def test_expand(): check_grad("Expand", {}, [rnd(3, 1), ints(2, 3, 4)])
def test_expand_ones_in_shape(): check_grad("Expand", {}, [rnd(2, 1, 4), ints(1, 3, 1)])
def test_expand_lower_rank_shape(): check_grad("Expand", {}, [rnd(2, 1, 1, 4), ints(3, 1)])
def test_tile(): check_grad("Tile", {}, [rnd(2, 3), ints(2, 3)])
def test_tile_ones(): check_grad("Tile", {}, [rnd(2, 1, 3), ints(1, 4, 1)])


# Transpose and Reshape up to 6-D
def test_transpose_6d(): check_grad("Transpose", {"perm": [0, 1, 3, 2, 4, 5]}, [rnd(1, 2, 2, 2, 2, 3)])
def test_reshape_6d(): check_grad("Reshape", {}, [rnd(2, 4, 6, 3), ints(2, 2, 2, 3, 2, 3)])


def _window_partition_model(n, h, w, c, win):
    """Swin's window partition: (N, H, W, C) -> (N, H/w, w, W/w, w, C) -> windows (N*nW, w, w, C)."""
    nodes = [helper.make_node("Reshape", ["x", "s6"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 3, 2, 4, 5]),
             helper.make_node("Reshape", ["t", "s4"], ["y"])]
    consts = {"s6": ints(n, h // win, win, w // win, win, c), "s4": ints(-1, win, win, c)}
    return nodes, consts


def test_swin_window_partition():
    x = rnd(2, 4, 6, 3, seed=4)
    nodes, consts = _window_partition_model(2, 4, 6, 3, 2)
    feeds = {"x": x}
    check_graph_grad(_model(nodes, feeds, consts, ["y"], 17), feeds)

    engine = Engine(read_model(_model(nodes, feeds, consts, ["y"], 17)))
    values, tape = engine.run(feeds, record=True, wrt=["x"])
    xt = torch.tensor(x, requires_grad=True)
    yt = xt.view(2, 2, 2, 3, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, 2, 2, 3)
    r = np.random.default_rng(5).standard_normal(yt.shape)
    (yt * torch.tensor(r)).sum().backward()
    np.testing.assert_array_equal(values["y"], yt.detach().numpy())
    np.testing.assert_array_equal(engine.backward(tape, {"y": r}, wrt=["x"])["x"], xt.grad.numpy())


# reductions: axes an attribute before opset 13 (ReduceSum) or 18 (the rest), an input after
REDUCE_OPS = ["ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceProd",
              "ReduceMax", "ReduceMin"]
AXES_INPUT_FROM = {"ReduceSum": 13}


def _reduce_input(op):
    if op in ("ReduceMax", "ReduceMin"):
        return distinct(2, 3, 4, seed=1)
    if op == "ReduceL1":
        return away(2, 3, 4, seed=1)
    return rnd(2, 3, 4, seed=1, lo=0.5, hi=1.5) if op == "ReduceProd" else rnd(2, 3, 4, seed=1)


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [[1], [0, 2], [-1], None])
def test_reduce_axes_attribute(op, axes, keepdims):
    attrs = {"keepdims": keepdims} | ({} if axes is None else {"axes": axes})
    check_grad(op, attrs, [_reduce_input(op)], opset=AXES_INPUT_FROM.get(op, 18) - 1)


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [[2, 0], [-2], []])
def test_reduce_axes_input(op, axes, keepdims):
    inputs = [_reduce_input(op)] + ([ints(*axes)] if axes else [])
    check_grad(op, {"keepdims": keepdims}, inputs, opset=18)


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce_noop_with_empty_axes(op): check_grad(op, {"noop_with_empty_axes": 1}, [_reduce_input(op)], opset=18)


def test_reduce_prod_zeros():
    """One zero in a slice: its gradient is the product of the others; two zeros: all zero."""
    x = rnd(3, 4, seed=2, lo=0.5, hi=1.5)
    x[0, 1] = 0.0
    x[1, 0] = x[1, 3] = 0.0
    check_grad("ReduceProd", {"axes": [1]}, [x], opset=13)


def test_reduce_l2_zero_slice():
    """A slice of zeros: the gradient there is 0 (torch's subgradient), not NaN."""
    x = rnd(3, 4, seed=2)
    x[1] = 0.0
    engine = Engine(read_model(_model([helper.make_node("ReduceL2", ["x"], ["y"], axes=[1])], {"x": x}, {}, ["y"], 13)))
    _, tape = engine.run({"x": x}, record=True, wrt=["x"])
    got = engine.backward(tape, {"y": np.ones((3, 1))}, wrt=["x"])["x"]
    xt = torch.tensor(x, requires_grad=True)
    torch.linalg.vector_norm(xt, dim=1, keepdim=True).sum().backward()
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
def test_reduce_extreme_ties_share_the_gradient(op):
    """Tied winners share dy equally, as torch's amax/amin do."""
    x = np.array([[1.0, 3.0, 3.0, -2.0], [-2.0, 0.5, -2.0, -2.0]])
    model = _model([helper.make_node(op, ["x"], ["y"], axes=[1], keepdims=0)], {"x": x}, {}, ["y"], 13)
    engine = Engine(read_model(model))
    _, tape = engine.run({"x": x}, record=True, wrt=["x"])
    r = np.array([0.7, -1.3])
    got = engine.backward(tape, {"y": r}, wrt=["x"])["x"]
    xt = torch.tensor(x, requires_grad=True)
    ((torch.amax if op == "ReduceMax" else torch.amin)(xt, dim=1) * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-15)


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("attrs", [{}, {"axis": -1, "keepdims": 0}, {"axis": 1, "select_last_index": 1}])
def test_arg_extreme(op, attrs):
    """Indices (int64) against the reference evaluator, ties included; no gradient flows."""
    x = np.round(rnd(3, 4, 5, seed=3) * 2)  # integers in [-2, 2]: many ties
    model = _model([helper.make_node(op, ["x"], ["y"], **attrs)], {"x": x}, {}, ["y"], 13)
    engine = Engine(read_model(model))
    values, tape = engine.run({"x": x}, record=True, wrt=["x"])
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert values["y"].dtype == np.int64
    np.testing.assert_array_equal(values["y"], want)
    assert not tape.entries


# normalizations
def test_layer_norm_last_axis(): check_grad("LayerNormalization", {}, [rnd(2, 3, 5), rnd(5, seed=2), rnd(5, seed=3)])
def test_layer_norm_no_bias(): check_grad("LayerNormalization", {"epsilon": 1e-3}, [rnd(4, 6), rnd(6, seed=2)])
def test_layer_norm_axis_1(): check_grad("LayerNormalization", {"axis": 1}, [rnd(2, 3, 4), rnd(3, 4, seed=2), rnd(3, 4, seed=3)])
def test_layer_norm_negative_axis_4d(): check_grad("LayerNormalization", {"axis": -2}, [X4, rnd(4, 5, seed=2), rnd(5, seed=3)])
def test_layer_norm_const_scale(): check_grad("LayerNormalization", {}, [rnd(3, 6), const(rnd(6, seed=2)), rnd(6, seed=3)])


def test_layer_norm_statistics():
    """Mean and InvStdDev (float32, the stash type) against the reference evaluator."""
    x = rnd(2, 3, 4, seed=5).astype(np.float32)
    scale, bias = rnd(3, 4, seed=6).astype(np.float32), rnd(3, 4, seed=7).astype(np.float32)
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"], axis=1)
    model = _model([node], {"x": x}, {"s": scale, "b": bias}, ["y", "mean", "inv"], 17)
    values, _ = Engine(read_model(model)).run({"x": x})
    for name, want in zip(["y", "mean", "inv"], ReferenceEvaluator(model).run(None, {"x": x})):
        assert values[name].dtype == np.float32 and values[name].shape == want.shape
        np.testing.assert_allclose(values[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_instance_norm_4d(): check_grad("InstanceNormalization", {}, [X4, rnd(3, seed=2), rnd(3, seed=3)])
def test_instance_norm_3d(): check_grad("InstanceNormalization", {"epsilon": 1e-2}, [rnd(2, 3, 5), rnd(3, seed=2), rnd(3, seed=3)])
def test_group_norm_per_channel(): check_grad("GroupNormalization", {"num_groups": 2}, [rnd(2, 4, 3, 2), rnd(4, seed=2), rnd(4, seed=3)], opset=21)
def test_group_norm_per_group(): check_grad("GroupNormalization", {"num_groups": 2, "epsilon": 1e-2},
                                            [rnd(2, 4, 3, 2), rnd(2, seed=2), rnd(2, seed=3)], opset=18)
def test_group_norm_one_group_3d(): check_grad("GroupNormalization", {"num_groups": 1}, [rnd(2, 3, 5), rnd(3, seed=2), rnd(3, seed=3)], opset=21)


def test_instance_norm_after_conv():
    """The conv output arrives channel-major (CNHW): statistics stay per image and channel."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("InstanceNormalization", ["c", "s", "b"], ["y"])]
    feeds = {"x": rnd(2, 3, 3, 3, seed=1), "w": rnd(4, 3, 2, 2, seed=2), "s": rnd(4, seed=3), "b": rnd(4, seed=4)}
    check_graph_grad(_model(nodes, feeds, {}, ["y"], 17), feeds)


def _lrn(x, size, alpha=1e-4, beta=0.75, bias=1.0):
    """The spec's formula, one channel at a time (the reference evaluator's LRN loops over N, not C)."""
    sq = np.zeros_like(x)
    for c in range(x.shape[1]):
        lo, hi = max(0, c - math.floor((size - 1) / 2)), min(x.shape[1], c + math.ceil((size - 1) / 2) + 1)
        sq[:, c] = np.sum(x[:, lo:hi] ** 2, axis=1)
    return x / (bias + alpha / size * sq) ** beta


XL = rnd(2, 5, 3, 3, seed=4) * 3  # large enough for the window sum to matter


@pytest.mark.parametrize("size", [1, 3, 4, 5, 7])
def test_lrn(size): check_grad("LRN", {"size": size, "alpha": 0.3, "beta": 0.6, "bias": 1.5}, [XL],
                               want=_lrn(XL, size, 0.3, 0.6, 1.5))


def test_lrn_defaults(): check_grad("LRN", {"size": 5}, [XL], want=_lrn(XL, 5))
def test_lrn_3d(): check_grad("LRN", {"size": 3, "alpha": 0.5}, [XL[..., 0]], want=_lrn(XL[..., :1], 3, 0.5)[..., 0])


def test_lrn_after_conv():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("LRN", ["c"], ["y"], size=3, alpha=0.5)]
    feeds = {"x": rnd(2, 3, 3, 3, seed=1), "w": rnd(4, 3, 2, 2, seed=2)}
    model = _model(nodes, feeds, {}, ["y"], 17)
    conv = ReferenceEvaluator(_model(nodes[:1], feeds, {}, ["c"], 17)).run(None, feeds)[0]
    check_graph_grad(model, feeds, want=_lrn(conv, 3, alpha=0.5))


@pytest.mark.skipif(not {"Pow", "Sqrt"} <= REGISTRY.keys(), reason="Pow and Sqrt come with the element-wise ops")
def test_decomposed_layer_norm():
    """The layer norm older exporters write: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]),
             helper.make_node("Sub", ["x", "mu"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"]),
             helper.make_node("Mul", ["n", "s"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"])]
    feeds = {"x": rnd(2, 3, 5, seed=1), "s": rnd(5, seed=2), "b": rnd(5, seed=3)}
    consts = {"two": np.array(2.0), "eps": np.array(1e-5)}
    check_graph_grad(_model(nodes, feeds, consts, ["y"], 13), feeds)


# Softmax on attention scores (N, heads, T, T)
S4 = rnd(2, 2, 3, 4, seed=6) * 3


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [-1, -2, 1, 3])
def test_softmax_4d(op, axis): check_grad(op, {"axis": axis}, [S4], opset=13)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [-1, 2])
def test_softmax_4d_legacy(op, axis):
    """Before opset 13 the input is flattened to 2-D at axis (the reference evaluator ignores it)."""
    a = axis % 4
    v = S4.reshape(int(np.prod(S4.shape[:a])), -1)
    s = v - v.max(axis=1, keepdims=True)
    s = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    check_grad(op, {"axis": axis}, [S4], opset=11, want=(s if op == "LogSoftmax" else np.exp(s)).reshape(S4.shape))


# MatMul in transformers
def test_matmul_rows_times_matrix(): check_grad("MatMul", {}, [rnd(2, 3, 4), rnd(4, 5, seed=1)])  # ViT's Linear
def test_matmul_4d_times_matrix(): check_grad("MatMul", {}, [rnd(2, 2, 3, 4), rnd(4, 5, seed=1)])
def test_matmul_rows_times_const_matrix(): check_grad("MatMul", {}, [rnd(2, 3, 4), const(rnd(4, 5, seed=1))])
def test_matmul_attention_scores(): check_grad("MatMul", {}, [rnd(2, 2, 3, 4), rnd(2, 2, 4, 3, seed=1)])
def test_matmul_4d_broadcast_heads(): check_grad("MatMul", {}, [rnd(2, 1, 3, 4), rnd(1, 2, 4, 3, seed=1)])
def test_matmul_4d_times_3d(): check_grad("MatMul", {}, [rnd(2, 2, 3, 4), rnd(2, 4, 3, seed=1)])
def test_matmul_matrix_times_3d(): check_grad("MatMul", {}, [rnd(3, 4), rnd(2, 4, 5, seed=1)])


def _attention_model(n, t, d, heads):
    """One multi-head self-attention block as torch.onnx writes it (no biases)."""
    hd = d // heads
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q0"]),
             helper.make_node("MatMul", ["x", "wk"], ["k0"]),
             helper.make_node("MatMul", ["x", "wv"], ["v0"]),
             helper.make_node("Reshape", ["q0", "heads"], ["q1"]),
             helper.make_node("Reshape", ["k0", "heads"], ["k1"]),
             helper.make_node("Reshape", ["v0", "heads"], ["v1"]),
             helper.make_node("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
             helper.make_node("MatMul", ["q", "kt"], ["s0"]),
             helper.make_node("Mul", ["s0", "scale"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o0"]),
             helper.make_node("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["o1", "merged"], ["o"]),
             helper.make_node("MatMul", ["o", "wo"], ["y"])]
    consts = {"heads": ints(n, t, heads, hd), "merged": ints(n, t, d), "scale": np.array(hd ** -0.5)}
    return nodes, consts


def _attention_torch(x, wq, wk, wv, wo, heads):
    n, t, d = x.shape
    split = lambda a: a.view(n, t, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
    p = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)
    return (p @ v).transpose(1, 2).reshape(n, t, d) @ wo


def test_attention_block_central_differences():
    n, t, d, heads = 2, 3, 4, 2
    feeds = {"x": rnd(n, t, d, seed=1), **{w: rnd(d, d, seed=k + 2) for k, w in enumerate(["wq", "wk", "wv", "wo"])}}
    nodes, consts = _attention_model(n, t, d, heads)
    check_graph_grad(_model(nodes, feeds, consts, ["y"], 17), feeds)


def test_attention_block_against_torch():
    n, t, d, heads = 3, 7, 8, 2
    feeds = {"x": rnd(n, t, d, seed=1) * 2, **{w: rnd(d, d, seed=k + 2) for k, w in enumerate(["wq", "wk", "wv", "wo"])}}
    nodes, consts = _attention_model(n, t, d, heads)
    engine = Engine(read_model(_model(nodes, feeds, consts, ["y"], 17)))
    values, tape = engine.run(feeds, record=True, wrt=list(feeds))
    r = np.random.default_rng(9).standard_normal(values["y"].shape)
    grads = engine.backward(tape, {"y": r}, wrt=list(feeds))

    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in feeds.items()}
    y = _attention_torch(*(tensors[k] for k in ["x", "wq", "wk", "wv", "wo"]), heads)
    (y * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(values["y"], y.detach().numpy(), rtol=1e-12, atol=1e-12)
    for k, tensor in tensors.items():
        np.testing.assert_allclose(grads[k], tensor.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


# whole small models as torch.onnx writes them: forward and every gradient against torch autograd
class _ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: chunk into halves, convolve one, concatenate, shuffle the channels."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.branch = nn.Conv2d(c // 2, c // 2, 3, padding=1)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, torch.relu(self.branch(b))], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(x.mean((2, 3)))


class _TinyViT(nn.Module):
    """Patch embedding, class token, one pre-norm encoder block (ReLU MLP), head on the class token."""

    def __init__(self, d=16, heads=2, patch=4, size=8):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        x = x + self.fc2(torch.relu(self.fc1(self.ln2(x))))
        return self.head(x[:, 0])


def _initializer_of(model, p):
    """The initializer holding torch parameter ``p``, as is or transposed (the dynamo exporter
    stores a Linear's weight as the (in, out) operand of a MatMul): (name, transposed)."""
    q = p.detach().numpy()
    for name, value in model.graph.initializers.items():
        for transposed, want in ((False, q), (True, q.T)):
            if value.shape == want.shape and np.allclose(value, want, rtol=1e-6, atol=0):
                return name, transposed
    raise AssertionError(f"no initializer holds a parameter of shape {tuple(p.shape)}")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("build", [_ShuffleUnit, _TinyViT], ids=["shufflenet_unit", "tiny_vit"])
def test_exported_model_against_torch(tmp_path, build, exporter):
    torch.manual_seed(0)
    torch_model = build().eval()
    with torch.no_grad():  # distinct values everywhere (LayerNorm's ones and zeros get shared)
        for p in torch_model.parameters():
            p.normal_(0.0, 0.5)
    path = tmp_path / "m.onnx"
    tm.export(torch_model, path, torch.randn(2, 3, 8, 8), exporter=exporter)
    try:
        model = bwacal.load_model(path)
    except UnsupportedOpError as exc:  # torchscript's ViT: Equal, Where, Pow, ConstantOfShape
        pytest.skip(str(exc).split(". Supported ops")[0])
    params = {pname: _initializer_of(model, p) for pname, p in torch_model.named_parameters()}
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    r = np.random.default_rng(2).standard_normal((2, 10)).astype(np.float32)
    wrt = [model.input_name, *(name for name, _ in params.values())]
    logits, tape = model.forward(x, record=True, wrt=wrt)
    grads = model.backward(tape, r, wrt=wrt)

    xt = torch.tensor(x, requires_grad=True)
    want = torch_model(xt)
    (torch.tensor(r) * want).sum().backward()
    assert _rel_err(logits, want.detach().numpy()) <= 1e-5
    assert _rel_err(grads[model.input_name], xt.grad.numpy()) <= 1e-4, "input"
    for pname, p in torch_model.named_parameters():
        name, transposed = params[pname]
        got = grads[name].T if transposed else grads[name]
        assert _rel_err(got, p.grad.numpy()) <= 1e-4, pname


# ScatterND: Swin's shifted-window mask (``mask[h0:h1, w0:w1] = v``); index tuples of 1 and 2 entries,
# a negative index, and the "add" reduction with a repeated index
def test_scatternd_rows(): check_grad("ScatterND", {}, [rnd(4, 3, 2), np.array([[2], [0]]), rnd(2, 3, 2, seed=1)])
def test_scatternd_elements(): check_grad("ScatterND", {}, [rnd(3, 4), np.array([[0, 1], [2, -1]]), rnd(2, seed=1)])
def test_scatternd_add(): check_grad("ScatterND", {"reduction": "add"}, [rnd(4, 3), np.array([[1], [1], [3]]), rnd(3, 3, seed=1)], opset=18)
