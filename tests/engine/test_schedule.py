"""The executor's schedule (``bwacal/schedule.py``): what each step of a run does, that values are
dropped after their last reader (live values stay bounded however deep the graph), that schedules
are built once per set of run options, and that an op declaring nothing gets the base class's
defaults."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from onnx import helper

from bwacal import schedule as schedule_module
from bwacal.engine import Engine
from bwacal.graph import Graph, Node, ValueInfo
from bwacal.onnx_io import read_model
from bwacal.ops import REGISTRY, Op
from tests.engine.test_gradients import _model


class Probe(Op):
    """``y = x + 1`` (and, asked for, a second output ``x - 1``); at each forward, counts how many of
    the arrays earlier probes returned are still alive (held by nothing but the run's values)."""

    max_outputs = 2
    made: list = []  # weakrefs to every array a probe returned, in order
    alive: list = []  # per forward, how many of them were alive when it started

    def forward(self, x):
        Probe.alive.append(sum(ref() is not None for ref in Probe.made))
        y, z = x + 1, x - 1
        Probe.made += [weakref.ref(y), weakref.ref(z)]
        return (y, z), None

    def backward(self, ctx, dy, need):
        return (dy,)


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(REGISTRY, "Probe", Probe)
    monkeypatch.setattr(Probe, "made", [])
    monkeypatch.setattr(Probe, "alive", [])
    return Probe


def probe_chain(depth):
    """``h0 = x``, ``h{k+1}, d{k+1} = Probe(h{k})``; the ``d`` outputs are read by nothing."""
    nodes = [Node("Probe", f"p{k}", [f"h{k}"], [f"h{k + 1}", f"d{k + 1}"]) for k in range(depth)]
    return Graph(nodes, [ValueInfo("h0", np.dtype(np.float64), (2, 3))], [ValueInfo(f"h{depth}", None, None)], {}, 13)


def live_values(steps, feeds, initializers=()):
    """Walk ``steps`` as a run does: the values alive before each step, checking every input is."""
    live, sizes = set(feeds), []
    for step in steps:
        assert all(name in live or name in initializers for name in step.inputs if name), step.node.name
        sizes.append(len(live))
        live.update(name for name in step.outputs if name)
        live.difference_update(step.drop)
    return live, sizes


def test_run_frees_each_value_after_its_last_reader(probe):
    """20 probes in a row: when each runs, only its own input is alive (the value before it and the
    unread second outputs are gone), so the live values do not grow with depth."""
    engine = Engine(probe_chain(20))
    x = np.zeros((2, 3))
    values, _ = engine.run({"h0": x})
    np.testing.assert_array_equal(values["h20"], x + 20)
    assert probe.alive == [0] + [1] * 19
    asked, _ = engine.run({"h0": x}, outputs=["h5", "d7", "h20"])
    np.testing.assert_array_equal(asked["h5"], x + 5)
    np.testing.assert_array_equal(asked["d7"], x + 5)
    np.testing.assert_array_equal(asked["h20"], x + 20)


def test_drops_are_at_each_values_last_reader():
    """A residual chain: each value is dropped by the last step that reads it, wanted values and
    initializers never; at most three values are alive at a time, whatever the depth."""
    depth = 30
    nodes = [helper.make_node("Mul", ["h0", "c"], ["h1"])]
    for k in range(1, depth):  # h{k+1} = h{k} * c + h{k-1}: every value read by the next two nodes
        nodes += [helper.make_node("Mul", [f"h{k}", "c"], [f"m{k}"]),
                  helper.make_node("Add", [f"m{k}", f"h{k - 1}"], [f"h{k + 1}"])]
    x = np.random.default_rng(0).standard_normal((2, 3))
    c = np.array(0.5)
    engine = Engine(read_model(_model(nodes, {"h0": x}, {"c": c}, [f"h{depth}"], 13)))
    steps = engine.schedule()
    last = {}
    for k, step in enumerate(steps):
        for name in step.inputs:
            last[name] = k
    for k, step in enumerate(steps):
        assert set(step.drop) == {n for n, j in last.items() if j == k and n != "c"}, step.node.name
    live, sizes = live_values(steps, ["h0"], engine.graph.initializers)
    assert live == {f"h{depth}"} and max(sizes) <= 3
    want = [x, x * 0.5]
    for _ in range(1, depth):
        want.append(want[-1] * 0.5 + want[-2])
    values, _ = engine.run({"h0": x})
    np.testing.assert_allclose(values[f"h{depth}"], want[-1], rtol=1e-12)
    kept = engine.schedule(outputs=["h3", f"h{depth}"])
    assert all("h3" not in step.drop for step in kept)


def test_schedules_are_built_once_per_set_of_options(monkeypatch):
    calls = []
    build = schedule_module.build_schedule
    monkeypatch.setattr("bwacal.engine.build_schedule", lambda *a: calls.append(a[4:]) or build(*a))
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    x, w = np.ones((2, 3)), np.full((2, 3), -2.0)
    engine = Engine(read_model(_model(nodes, {"x": x}, {"w": w}, ["y"], 13)))
    for _ in range(3):
        engine.run({"x": x})
        engine.run({"x": x}, record=True, wrt=["w"])
        engine.run({"x": x}, outputs=["h"])
    engine.run({"x": x}, record=True, wrt=["x", "w"])
    assert [c[0] for c in calls] == [("y",), ("y",), ("h",), ("y",)]
    assert engine.schedule() is engine.schedule(outputs=["y"])


def test_recorded_steps_and_the_gradients_they_want():
    """With ``wrt=["x"]`` a step reading only constants is not recorded; the Mul is, wanting dL/dx
    only; the Relu after it, wanting its input's."""
    nodes = [helper.make_node("Neg", ["w"], ["c"]), helper.make_node("Mul", ["x", "c"], ["h"]),
             helper.make_node("Relu", ["h"], ["y"])]
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    engine = Engine(read_model(_model(nodes, {"x": x}, {"w": w}, ["y"], 13)))
    steps = engine.schedule(record=True, wrt=["x"])
    assert [(s.node.op_type, s.record, s.need) for s in steps] == [
        ("Neg", False, ()), ("Mul", True, (True, False)), ("Relu", True, (True,))]
    assert not any(s.record for s in engine.schedule())
    values, tape = engine.run({"x": x}, record=True, wrt=["x"])
    assert [record.step.node.op_type for record in tape.entries] == ["Mul", "Relu"]
    seed = rng.standard_normal((2, 3))
    grads = engine.backward(tape, {"y": seed}, wrt=["x"])
    np.testing.assert_allclose(grads["x"], seed * (x * -w > 0) * -w, rtol=1e-12)


def test_fused_steps_and_which_steps_may_relayout():
    """Conv + Relu is one step applying the clip; the Neg after it may read a channel-major value,
    and so may the Flatten after that; a branch of NCHW-only values never re-lays-out."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Neg", ["r"], ["n"], name="neg"),
             helper.make_node("Flatten", ["n"], ["y"], name="flatten"),
             helper.make_node("Neg", ["v"], ["u"], name="neg_v"),
             helper.make_node("Relu", ["u"], ["z"], name="relu_v")]
    rng = np.random.default_rng(2)
    x, v, w = rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((2, 3)), rng.standard_normal((3, 2, 3, 3))
    engine = Engine(read_model(_model(nodes, {"x": x, "v": v}, {"w": w}, ["y", "z"], 13)))
    assert [(s.node.name, s.outputs, s.clip, s.relayout) for s in engine.schedule()] == [
        ("conv", ("r",), (0.0, np.inf), True), ("neg", ("n",), None, True), ("flatten", ("y",), None, True),
        ("neg_v", ("u",), None, False), ("relu_v", ("z",), None, False)]
    values, _ = engine.run({"x": x, "v": v})
    conv = np.zeros((2, 3, 4, 4))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(3):
        for j in range(3):
            conv += np.einsum("ncij,oc->noij", xp[:, :, i:i + 4, j:j + 4], w[:, :, i, j])
    np.testing.assert_allclose(values["y"], -np.maximum(conv, 0).reshape(2, -1), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(values["z"], np.maximum(-v, 0))


class Bare(Op):
    """An op that declares nothing: only forward and backward."""

    def forward(self, x):
        return 3 * x, None

    def backward(self, ctx, dy, need):
        return (3 * dy,)


def test_an_op_declaring_nothing_gets_the_defaults(monkeypatch):
    op = Bare()
    assert (op.differentiable, op.max_outputs, op.layout, op.grads_all_outputs, op.fuses_clip) == \
        (True, 1, None, False, False)
    assert op.check([(2, 3)]) is None
    assert op.as_clip([]) is None
    monkeypatch.setitem(REGISTRY, "Bare", Bare)
    graph = Graph([Node("Bare", "b", ["x"], ["h"]), Node("Relu", "r", ["h"], ["y"])],
                  [ValueInfo("x", np.dtype(np.float64), (2, 3))], [ValueInfo("y", None, None)], {}, 13)
    engine = Engine(graph)
    assert engine.fusable == {}  # Bare does not apply clips: the Relu runs on its own
    assert [(s.node.name, s.clip, s.relayout) for s in engine.schedule()] == [("b", None, False), ("r", None, False)]
    x = np.array([[-1.0, 2.0, 0.5], [3.0, -0.25, 1.0]])
    values, tape = engine.run({"x": x}, record=True, wrt=["x"])
    np.testing.assert_array_equal(values["y"], np.maximum(3 * x, 0))
    np.testing.assert_array_equal(engine.backward(tape, {"y": np.ones((2, 3))}, wrt=["x"])["x"], 3.0 * (x > 0))
