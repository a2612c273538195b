"""The executor: a plain loop over topologically sorted nodes and a dict of named values.

``Engine.run`` evaluates the graph (optionally recording what backward needs) and
``Engine.backward`` walks the recording in reverse, un-broadcasting and accumulating gradients
across consumers, so a value read by two nodes (a residual Add) gets the sum of both gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bwacal.errors import ModelError, UnsupportedOpError
from bwacal.graph import Graph
from bwacal.ops import REGISTRY, Unsupported, make_op


@dataclass
class Tape:
    """What a recorded forward pass keeps for backward: per node, the op's context and input shapes."""

    entries: list = field(default_factory=list)
    requires_grad: set = field(default_factory=set)


def unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum ``grad`` down to ``shape``, undoing NumPy broadcasting."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def build_ops(graph: Graph) -> list:
    """Instantiate one op per node; collect every unsupported node before failing."""
    shapes = {name: a.shape for name, a in graph.initializers.items()}
    shapes.update({v.name: v.shape for v in graph.inputs})
    ops, problems = [], []
    for node in graph.nodes:
        try:
            op = make_op(node.op_type, node.attrs, graph.opset, len([o for o in node.outputs if o]))
            check = getattr(op, "check", None)
            if check is not None:
                check([shapes.get(name) if name else None for name in node.inputs])
            ops.append(op)
        except Unsupported as exc:
            problems.append((node.op_type, node.name, str(exc)))
        except TypeError as exc:
            problems.append((node.op_type, node.name, f"bad attributes ({exc})"))
    if problems:
        raise UnsupportedOpError(problems, graph.opset, REGISTRY.keys())
    return ops


class Engine:
    """Runs a ``Graph`` forward and backward on NumPy arrays."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.ops = build_ops(graph)
        self._last_use = self._compute_last_use()

    def _compute_last_use(self) -> dict:
        last = {}
        for i, node in enumerate(self.graph.nodes):
            for name in node.inputs:
                if name:
                    last[name] = i
        keep = {v.name for v in self.graph.outputs}
        return {name: i for name, i in last.items() if name not in keep and name not in self.graph.initializers}

    def run(self, feeds: dict, params: dict | None = None, record: bool = False, wrt=(),
            outputs=None):
        """Evaluate the graph.

        ``feeds`` maps graph-input names to arrays; ``params`` overrides initializers by name (the
        fitting loop passes quantized weights this way). With ``record`` the returned ``Tape`` lets
        ``backward`` compute gradients for the names in ``wrt`` (graph inputs or initializers).
        Returns ``(values, tape)`` where ``values`` maps each requested output name to its array.
        """
        values = dict(self.graph.initializers)
        if params:
            values.update(params)
        values.update(feeds)
        wanted = list(outputs) if outputs is not None else [v.name for v in self.graph.outputs]
        tape = Tape(requires_grad=set(wrt)) if record else None
        drop_after = {}
        for name, i in self._last_use.items():
            if name not in wanted:
                drop_after.setdefault(i, []).append(name)
        for i, (node, op) in enumerate(zip(self.graph.nodes, self.ops)):
            try:
                args = [values[name] if name else None for name in node.inputs]
            except KeyError as exc:
                raise ModelError(f"node '{node.name}' ({node.op_type}) reads '{exc.args[0]}', "
                                 "which no input, initializer or earlier node provides") from None
            try:
                out, ctx = op.forward(*args)
            except (ValueError, IndexError) as exc:
                shapes = [None if a is None else tuple(np.shape(a)) for a in args]
                raise ModelError(f"node '{node.name}' ({node.op_type}) failed on input shapes "
                                 f"{shapes}: {exc}") from None
            if not isinstance(out, tuple):
                out = (out,)
            for name, value in zip(node.outputs, out):
                if name:
                    values[name] = value
            if record:
                needs = any(name in tape.requires_grad for name in node.inputs if name)
                if needs and op.differentiable:
                    tape.requires_grad.update(n for n in node.outputs[:1] if n)
                    tape.entries.append((i, ctx, [None if a is None else np.shape(a) for a in args]))
            for name in drop_after.get(i, ()):
                values.pop(name, None)
        return {name: values[name] for name in wanted}, tape

    def backward(self, tape: Tape, seeds: dict, wrt=()) -> dict:
        """Gradients of the names in ``wrt`` given ``seeds`` (output name -> dL/d output)."""
        grads = dict(seeds)
        wrt = set(wrt)
        for i, ctx, shapes in reversed(tape.entries):
            node, op = self.graph.nodes[i], self.ops[i]
            dy = grads.get(node.outputs[0])
            if dy is None:
                continue
            if node.outputs[0] not in wrt:
                del grads[node.outputs[0]]
            need = tuple(bool(name) and name in tape.requires_grad for name in node.inputs)
            gin = op.backward(ctx, dy, need)
            for name, g, shape, wanted in zip(node.inputs, gin, shapes, need):
                if g is None or not wanted:
                    continue
                g = unbroadcast(np.asarray(g), shape)
                if name in grads:
                    grads[name] = grads[name] + g
                else:
                    grads[name] = g
        return {name: grads.get(name) for name in wrt}
