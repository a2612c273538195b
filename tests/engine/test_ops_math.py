"""Math, logic and tensor-making ops (issue 15): forward against ONNX's reference evaluator (or
ONNX Runtime, torch), every float input's gradient against float64 central differences, one line a
case through the helpers of ``test_gradients.py``."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.backend.test.case.node import collect_testcases

from bwacal.engine import Engine
from bwacal.onnx_io import read_model
from tests.engine.test_gradients import away, check_graph_grad, check_grad, const, distinct, ints, rnd


def _model(nodes, feeds, consts=None, output="y", opset=20, out_dtype=None):
    """A graph of ``nodes`` over ``feeds`` and initializers ``consts``, output ``output`` (its element
    type given only where ONNX Runtime runs the model: the engine and the reference evaluator do not
    need it)."""
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    elem = TensorProto.UNDEFINED if out_dtype is None else helper.np_dtype_to_tensor_dtype(np.dtype(out_dtype))
    graph = helper.make_graph(nodes, "t", inputs, [helper.make_tensor_value_info(output, elem, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in (consts or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def near_ints(*shape, seed=0, margin=0.15):
    """Values in (-3, 3) at least ``margin`` from every integer and half-integer: Floor, Ceil, Round
    and Sign are constant within EPS of each."""
    rng = np.random.default_rng(seed)
    return rng.integers(-6, 6, shape) / 2 + rng.uniform(margin, 0.5 - margin, shape)


def parted(*shapes, seed=0):
    """Arrays of the given shapes holding distinct, well-separated values (no ties across them)."""
    sizes = [int(np.prod(s)) for s in shapes]
    flat = distinct(sum(sizes), seed=seed)
    cuts = np.cumsum(sizes)[:-1]
    return [part.reshape(s) for part, s in zip(np.split(flat, cuts), shapes)]


# unary math
def test_neg(): check_grad("Neg", {}, [rnd(2, 3, 4)])
def test_abs(): check_grad("Abs", {}, [away(2, 3, 4)])
def test_exp(): check_grad("Exp", {}, [rnd(2, 3, 4) * 3])
def test_log(): check_grad("Log", {}, [rnd(2, 3, 4, lo=0.2, hi=3.0)])
def test_sqrt(): check_grad("Sqrt", {}, [rnd(2, 3, 4, lo=0.2, hi=3.0)])
def test_reciprocal(): check_grad("Reciprocal", {}, [away(2, 3, 4, margin=0.3)])
def test_sign(): check_grad("Sign", {}, [away(2, 3, 4)])
def test_floor(): check_grad("Floor", {}, [near_ints(2, 3, 4)])
def test_ceil(): check_grad("Ceil", {}, [near_ints(2, 3, 4)])
def test_round(): check_grad("Round", {}, [near_ints(2, 3, 4)])
def test_round_half_to_even(): check_grad("Round", {}, [const(np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]))],
                                          want=np.array([-2.0, -2.0, -0.0, 0.0, 2.0, 2.0]))


# activations
def test_erf(): check_grad("Erf", {}, [rnd(2, 3, 4) * 3])
def test_gelu(): check_grad("Gelu", {}, [rnd(2, 3, 4) * 4], opset=20)
def test_gelu_tanh(): check_grad("Gelu", {"approximate": "tanh"}, [rnd(2, 3, 4) * 4], opset=20)
def test_gelu_tails(): check_grad("Gelu", {}, [np.array([-40.0, -12.0, -6.0, 6.0, 12.0, 40.0])], opset=20)
def test_elu(): check_grad("Elu", {}, [away(2, 3, 4) * 3])
def test_elu_alpha(): check_grad("Elu", {"alpha": 0.5}, [away(2, 3, 4) * 3])
def test_selu(): check_grad("Selu", {}, [away(2, 3, 4) * 3])
def test_selu_attrs(): check_grad("Selu", {"alpha": 2.0, "gamma": 0.5}, [away(2, 3, 4) * 3])
def test_celu(): check_grad("Celu", {}, [away(2, 3, 4) * 3])
def test_celu_alpha(): check_grad("Celu", {"alpha": 2.0}, [away(2, 3, 4) * 3])
def test_softplus(): check_grad("Softplus", {}, [rnd(2, 3, 4) * 5])
def test_softplus_tails(): check_grad("Softplus", {}, [np.array([-800.0, -40.0, -20.0, 20.0, 40.0, 800.0])])
def test_softsign(): check_grad("Softsign", {}, [away(2, 3, 4) * 3])
def test_mish(): check_grad("Mish", {}, [rnd(2, 3, 4) * 5], opset=18)
def test_mish_tails(): check_grad("Mish", {}, [np.array([-800.0, -40.0, -20.0, 20.0, 40.0, 800.0])], opset=18)


# Pow: gradients for the base and the exponent
def test_pow(): check_grad("Pow", {}, [rnd(2, 3, 4, lo=0.3, hi=2.0), rnd(2, 3, 4, seed=1, lo=-2.0, hi=3.0)])
def test_pow_scalar_exponent(): check_grad("Pow", {}, [rnd(2, 3, 4, lo=0.3, hi=2.0), rnd(seed=1, lo=0.5, hi=2.0)])
def test_pow_row_exponent(): check_grad("Pow", {}, [rnd(2, 3, 4, lo=0.3, hi=2.0), rnd(4, seed=1, lo=-1.0, hi=2.0)])
def test_pow_broadcast_base(): check_grad("Pow", {}, [rnd(3, 1, lo=0.3, hi=2.0), rnd(2, 3, 4, seed=1)])
def test_pow_negative_base_int_exponent(): check_grad("Pow", {}, [rnd(2, 3, 4), ints(3)])
def test_pow_square_const(): check_grad("Pow", {}, [rnd(2, 3, 4), const(np.float64(2.0))])


def test_pow_exponent_gradient_zero_at_non_positive_base():
    """A real power of a base <= 0 has no derivative in the exponent: the engine gives 0 there."""
    a = np.array([-2.0, 0.0, 3.0])
    b = np.array([2.0, 2.0, 2.0])
    node = helper.make_node("Pow", ["a", "b"], ["y"])
    engine = Engine(read_model(_model([node], {"a": a, "b": b})))
    values, tape = engine.run({"a": a, "b": b}, record=True, wrt=["a", "b"])
    grads = engine.backward(tape, {"y": np.ones(3)}, wrt=["a", "b"])
    np.testing.assert_allclose(grads["b"], [0.0, 0.0, 9.0 * np.log(3.0)])
    np.testing.assert_allclose(grads["a"], [-4.0, 0.0, 6.0])


# Mod: dL/da = dy; dL/db = -dy * the quotient the remainder was taken with
A_MOD = np.array([[5.3, -5.3, 7.9], [-7.9, 1.2, -0.4]])
B_MOD = np.array([[2.1, 2.1, -3.3], [-3.3, 0.7, 0.9]])
def test_mod_fmod(): check_grad("Mod", {"fmod": 1}, [A_MOD, B_MOD])
def test_mod_floor(): check_grad("Mod", {}, [A_MOD, B_MOD])
def test_mod_broadcast(): check_grad("Mod", {"fmod": 1}, [A_MOD, np.array([2.1, -3.3, 0.9])])


# variadic ops, broadcasting
VARIADIC_SHAPES = [[(2, 3, 4)], [(2, 3, 4), (2, 3, 4)], [(2, 3, 4), (4,)], [(3, 1), (2, 3, 4), ()],
                   [(1, 3, 1), (2, 1, 4), (3, 4), (1,)]]


@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
@pytest.mark.parametrize("shapes", VARIADIC_SHAPES, ids=str)
def test_variadic(op, shapes):
    xs = parted(*shapes, seed=len(shapes))
    # the reference evaluator's Mean adds in place into its first input, which fails when that one broadcasts
    want = sum(np.broadcast_arrays(*xs)) / len(xs) if op == "Mean" else None
    check_grad(op, {}, xs, want=want)


def test_max_with_int_const(): check_grad("Max", {}, [rnd(2, 3), const(np.array([0.0, 0.5, -0.5]))])


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_extremum_ties_match_torch(op):
    """Two-way ties: each input gets half the gradient, as torch.maximum/minimum give."""
    a = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    b = np.array([[1.0, 0.0, 5.0], [0.5, -1.0, 2.0]])  # ties at (0, 0), (1, 0), (1, 1)
    dy = np.random.default_rng(3).standard_normal(a.shape)
    got = _run_grads(op, {"a": a, "b": b}, dy)
    ta, tb = (torch.tensor(v, requires_grad=True) for v in (a, b))
    (torch.maximum if op == "Max" else torch.minimum)(ta, tb).backward(torch.tensor(dy))
    np.testing.assert_allclose(got["a"], ta.grad.numpy(), rtol=1e-15)
    np.testing.assert_allclose(got["b"], tb.grad.numpy(), rtol=1e-15)


def test_max_three_way_tie_and_broadcast():
    """k inputs tied for the result get dy / k each; a broadcast input sums its shares."""
    a = np.array([2.0, 2.0, 1.0, 0.0])
    b = np.array([2.0, 1.0, 1.0, 3.0])
    c = np.array([2.0])  # broadcast over all four
    dy = np.array([6.0, 6.0, 6.0, 6.0])
    got = _run_grads("Max", {"a": a, "b": b, "c": c}, dy)
    np.testing.assert_allclose(got["a"], [2.0, 3.0, 0.0, 0.0])
    np.testing.assert_allclose(got["b"], [2.0, 0.0, 0.0, 6.0])
    np.testing.assert_allclose(got["c"], [2.0 + 3.0 + 6.0])


# logic: comparisons give bool and no gradient; Where gives X and Y theirs
def test_where(): check_grad("Where", {}, [np.array([True, False, True, False]), rnd(2, 3, 4), rnd(2, 3, 4, seed=1)])
def test_where_broadcast(): check_grad("Where", {}, [np.array([[True], [False], [True]]), rnd(2, 3, 4), rnd(seed=1)])
def test_where_broadcast_condition(): check_grad("Where", {}, [np.random.default_rng(4).random((2, 3, 4)) > 0.5,
                                                                rnd(3, 1), rnd(4, seed=1)])


@pytest.mark.parametrize("op", ["Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"])
def test_comparison_gates_where(op):
    """Where(op(z, t), x, y) with ties between z and t (the edge of the OrEqual ops)."""
    z = np.array([[0.1, -0.2, 0.5, 0.3], [0.9, 0.0, 0.1, -1.0]])
    t = np.array([0.1, 0.0, 0.5, -1.0])
    nodes = [helper.make_node(op, ["z", "t"], ["c"]), helper.make_node("Where", ["c", "x", "y"], ["out"])]
    feeds = {"x": rnd(2, 4, seed=1), "y": rnd(2, 4, seed=2)}
    check_graph_grad(_model(nodes, feeds, {"z": z, "t": t}, "out"), feeds, output="out")


def test_comparison_of_the_differentiated_input():
    """Where(Greater(x, 0), x, 0.1 x): a leaky relu; Greater passes no gradient of its own."""
    nodes = [helper.make_node("Greater", ["x", "zero"], ["c"]), helper.make_node("Mul", ["x", "k"], ["s"]),
             helper.make_node("Where", ["c", "x", "s"], ["y"])]
    feeds = {"x": away(2, 3, 4)}
    check_graph_grad(_model(nodes, feeds, {"zero": np.array(0.0), "k": np.array(0.1)}), feeds)


@pytest.mark.parametrize("op,fn", [("And", np.logical_and), ("Or", np.logical_or), ("Xor", np.logical_xor)])
def test_boolean_broadcast(op, fn):
    a = np.random.default_rng(5).random((2, 3, 4)) > 0.5
    b = np.array([True, False, True, False])
    node = helper.make_node(op, ["a", "b"], ["y"])
    out, _ = Engine(read_model(_model([node], {"a": a, "b": b}))).run({"a": a, "b": b})
    assert out["y"].dtype == np.bool_
    np.testing.assert_array_equal(out["y"], fn(a, b))


def test_comparison_outputs_bool_and_no_gradient():
    x = rnd(2, 3)
    node = helper.make_node("Greater", ["x", "t"], ["y"])
    engine = Engine(read_model(_model([node], {"x": x}, {"t": np.array(0.0)})))
    values, tape = engine.run({"x": x}, record=True, wrt=["x"])
    assert values["y"].dtype == np.bool_
    np.testing.assert_array_equal(values["y"], x > 0)
    assert tape.entries == []


# tensor-making ops
def test_constant_of_shape_default():
    node = helper.make_node("ConstantOfShape", ["s"], ["y"])
    out, _ = Engine(read_model(_model([node], {}, {"s": ints(2, 3)}))).run({})
    assert out["y"].dtype == np.float32 and out["y"].shape == (2, 3) and not out["y"].any()


def test_constant_of_shape_value_feeds_mul():
    """x times a ConstantOfShape of 2.5: x's gradient; the constant takes none."""
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["k"], value=numpy_helper.from_array(np.array([2.5]))),
             helper.make_node("Mul", ["x", "k"], ["y"])]
    feeds = {"x": rnd(2, 3)}
    check_graph_grad(_model(nodes, feeds, {"s": ints(2, 3)}), feeds)


@pytest.mark.parametrize("start,limit,delta", [(0, 5, 1), (10, 4, -3), (1, 1, 1), (5, 1, 2),
                                               (0.5, 2.0, 0.3), (3.0, -1.0, -0.7), (-(2**40), -(2**40) + 7, 2)])
def test_range(start, limit, delta):
    dtype = np.int64 if isinstance(start, int) else np.float32
    node = helper.make_node("Range", ["a", "b", "c"], ["y"])
    consts = {k: np.array(v, dtype=dtype) for k, v in zip("abc", (start, limit, delta))}
    out, _ = Engine(read_model(_model([node], {}, consts))).run({})
    sess = ort.InferenceSession(_model([node], {}, consts, out_dtype=dtype).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    want = sess.run(None, {})[0]
    assert out["y"].dtype == want.dtype
    np.testing.assert_allclose(out["y"], want, rtol=1e-6)


SCALAR_INPUT_CASES = [c for c in collect_testcases() if c.name.startswith("test_range_") and "_expanded" not in c.name
                      and "bfloat16" not in c.name
                      or c.name.startswith("test_clip_") and c.name.endswith("_expanded")
                      or c.name.startswith("test_convinteger_")]  # scalar zero points


@pytest.mark.parametrize("case", SCALAR_INPUT_CASES, ids=lambda c: c.name)
def test_node_case_scalar_inputs(case):
    """ONNX node cases whose inputs are NumPy scalars (Range; the expanded Clip, Less + Where;
    ConvInteger's zero points), which test_node_cases.py's element-type check skips."""
    engine = Engine(read_model(case.model))
    for inputs, expected in case.data_sets:
        out, _ = engine.run(dict(zip([v.name for v in engine.graph.inputs], map(np.asarray, inputs))))
        for v, want in zip(engine.graph.outputs, expected):
            want = np.asarray(want)
            assert out[v.name].dtype == want.dtype and out[v.name].shape == want.shape
            np.testing.assert_allclose(out[v.name], want, rtol=case.rtol, atol=case.atol)


# channel-major activations: element-wise ops reading a conv output with mixed-rank operands
def _run_grads(op, feeds, dy):
    node = helper.make_node(op, list(feeds), ["y"])
    engine = Engine(read_model(_model([node], feeds)))
    _, tape = engine.run(feeds, record=True, wrt=list(feeds))
    return engine.backward(tape, {"y": dy}, wrt=list(feeds))


def _conv_then(*nodes):
    return [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), *nodes]


CNHW_GRAPHS = {
    "erf_max_channel_gap": (_conv_then(helper.make_node("Erf", ["c"], ["e"]),
                                       helper.make_node("Max", ["e", "k"], ["m"]),
                                       helper.make_node("GlobalAveragePool", ["m"], ["y"])),
                            {"k": rnd(3, 1, 1, seed=5, lo=-0.3, hi=0.3)}),
    "min_three_ranks": (_conv_then(helper.make_node("Min", ["c", "k", "r"], ["y"])),
                        {"k": rnd(3, 1, 1, seed=5, lo=-0.3, hi=0.3), "r": rnd(4, seed=6, lo=-0.5, hi=0.5)}),
    "sum_mean": (_conv_then(helper.make_node("Sum", ["c", "k", "x"], ["s"]),
                            helper.make_node("Mean", ["s", "c", "r"], ["y"])),
                 {"k": rnd(3, 1, 1, seed=5), "r": rnd(1, seed=6)}),
    "where_greater": (_conv_then(helper.make_node("Greater", ["c", "t"], ["g"]),
                                 helper.make_node("Where", ["g", "c", "r"], ["y"])),
                      {"t": rnd(3, 1, 1, seed=5, lo=-0.3, hi=0.3), "r": rnd(1, 3, 1, 1, seed=6)}),
    "where_channel_condition": (_conv_then(helper.make_node("Where", ["cond", "c", "x"], ["y"])),
                                {"cond": np.array([[[True]], [[False]], [[True]]])}),
    "gelu_mish_softplus_elu": (_conv_then(helper.make_node("Gelu", ["c"], ["a"]),
                                          helper.make_node("Mish", ["a"], ["b"]),
                                          helper.make_node("Softplus", ["b"], ["d"]),
                                          helper.make_node("Elu", ["c"], ["e"]),
                                          helper.make_node("Add", ["d", "e"], ["y"])), {}),
    "pow_channel_exponent": (_conv_then(helper.make_node("Abs", ["c"], ["a"]),
                                        helper.make_node("Add", ["a", "one"], ["p"]),
                                        helper.make_node("Pow", ["p", "k"], ["y"])),
                             {"k": rnd(3, 1, 1, seed=5, lo=0.5, hi=2.0), "one": np.array([1.0])}),
    "mod_sqrt_log": (_conv_then(helper.make_node("Mul", ["c", "c"], ["sq"]),
                                helper.make_node("Add", ["sq", "one"], ["p"]),
                                helper.make_node("Sqrt", ["p"], ["s"]),
                                helper.make_node("Log", ["s"], ["l"]),
                                helper.make_node("Mod", ["l", "k"], ["y"], fmod=1)),
                     {"k": rnd(3, 1, 1, seed=5, lo=2.0, hi=3.0), "one": np.array([1.0])}),
}
NO_GRAD = {"cond", "one", "t"}  # constants, not differentiated (t only reaches a comparison)


@pytest.mark.parametrize("case", list(CNHW_GRAPHS))
def test_after_conv(case):
    """Forward in float32 against ONNX Runtime, then every gradient in float64 against central
    differences, with the conv output stored channel-major."""
    nodes, extra = CNHW_GRAPHS[case]
    feeds = {"x": rnd(2, 3, 4, 4, seed=1), "w": rnd(3, 3, 3, 3, seed=2, lo=-0.5, hi=0.5), **extra}
    consts = {k: feeds.pop(k) for k in list(feeds) if k in NO_GRAD}
    f32 = {k: v.astype(np.float32) for k, v in feeds.items()}
    c32 = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in consts.items()}
    model32 = _model(nodes, f32, c32, out_dtype=np.float32)
    want32 = ort.InferenceSession(model32.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f32)[0]
    engine = Engine(read_model(model32))
    got32, _ = engine.run(f32)
    assert got32["y"].dtype == want32.dtype
    np.testing.assert_allclose(got32["y"], want32, rtol=2e-5, atol=2e-6)
    model = _model(nodes, feeds, consts)
    _, tape = Engine(read_model(model)).run(feeds, record=True, wrt=list(feeds))
    assert tape.cnhw == {o for n in nodes for o in n.output}  # every op ran on channel-major operands
    check_graph_grad(model, feeds)
