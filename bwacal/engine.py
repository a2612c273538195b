"""The executor: a plain loop over the steps of a schedule and a dict of named values.

What a run does (fused activations, blocks, layouts, what to record, what to drop) is worked out
once per graph and set of run options (``bwacal/schedule.py``). ``Engine.run`` then evaluates the
steps in order, optionally recording what backward needs, and ``Engine.backward`` walks the
recording in reverse, un-broadcasting and accumulating gradients across consumers, so a value read
by two nodes (a residual Add) gets the sum of both gradients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import repeat
from typing import NamedTuple

import numpy as np

from bwacal.errors import ModelError, UnsupportedOpError
from bwacal.graph import Graph
from bwacal.kernels.block import run_inverted_residual
from bwacal.kernels.pointwise import add_clip
from bwacal.ops import REGISTRY, Unsupported, make_op
from bwacal.schedule import Step, build_schedule, find_blocks, find_fusable

# schedules an engine keeps (one per set of run options; the oldest goes first)
MAX_SCHEDULES = 32


class Record(NamedTuple):
    """One recorded step: the op's context, the shapes its inputs had as the op saw them, and how
    each input was re-laid-out for it (see ``_to_op``; None when none was)."""

    step: Step
    ctx: object
    shapes: list
    hows: list | None


@dataclass
class Tape:
    """What a recorded forward pass keeps for backward: a ``Record`` per recorded step, and the
    names of the values that were stored channel-major (``cnhw``)."""

    entries: list = field(default_factory=list)
    cnhw: set = field(default_factory=set)


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


# Layouts. 4-D activations live channel-major (CNHW) between ops that declare ``layout = "cnhw"``
# (Conv, pools, BatchNormalization: their 4-D data input arrives as CNHW and their output is CNHW)
# and ops that declare ``layout = "follow"`` (element-wise: with any CNHW input, every input is
# brought to CNHW, broadcasting operands included, and the output is CNHW). Every other op sees
# logical NCHW. The permutation (1, 0, 2, 3) is its own inverse. The schedule marks the steps that
# may need a conversion (``Step.relayout``: the op works channel-major or an input may be stored so);
# ``_to_op`` converts, from which values a run stored channel-major and their ranks.
_SWAP = (1, 0, 2, 3)


def _to_cnhw(a):
    """Logical NCHW (or lower-rank, broadcastable) array -> CNHW; returns (array, how)."""
    a = np.asarray(a)
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(_SWAP)), "T"
    if a.ndim < 4:
        return a.reshape((1,) * (4 - a.ndim) + a.shape).transpose(_SWAP), ("E", a.shape)
    raise ValueError(f"cannot broadcast a rank-{a.ndim} operand against a 4-D activation")


def _sum(a, b):
    """``a + b``: gradients from two readers of a value (a residual). Same-shape float arrays of 64K
    elements or more are added by a parallel kernel (ResNet-20's backward spent 14 ms per step in
    NumPy's single-threaded adds)."""
    if (a.shape == b.shape and a.dtype == b.dtype and a.dtype.kind == "f" and a.size >= 1 << 16
            and a.flags.c_contiguous and b.flags.c_contiguous):
        out = np.empty_like(a)
        add_clip(a, b, -np.inf, np.inf, out)
        return out
    return a + b


def _output_grads(out_names, grads, wrt):
    """The gradients of a multi-output node's outputs (None for one no gradient reached), taken out
    of ``grads`` unless asked for; None when no output has a gradient."""
    dys = tuple(grads.get(name) if name else None for name in out_names)
    if all(g is None for g in dys):
        return None
    for name in out_names:
        if name and name not in wrt:
            grads.pop(name, None)
    return dys


def _grad_back(g, how):
    """Map a gradient in the layout an op saw back to the stored value's layout."""
    if how is None:
        return g
    if how == "T":
        return g.transpose(_SWAP)
    return g.transpose(_SWAP).reshape(how[1])


def build_ops(graph: Graph) -> list:
    """Instantiate one op per node; collect every unsupported node before failing."""
    shapes = {name: a.shape for name, a in graph.initializers.items()}
    shapes.update({v.name: v.shape for v in graph.inputs})
    ops, problems = [], []
    for node in graph.nodes:
        try:
            op = make_op(node.op_type, node.attrs, graph.opset, len([o for o in node.outputs if o]))
            op.check([shapes.get(name) if name else None for name in node.inputs])
            ops.append(op)
        except Unsupported as exc:
            problems.append((node.op_type, node.name, str(exc)))
        except TypeError as exc:
            problems.append((node.op_type, node.name, f"bad attributes ({exc})"))
    if problems:
        raise UnsupportedOpError(problems, graph.opset, REGISTRY.keys())
    return ops


class _Run:
    """The state of one run: the values by name, the names stored channel-major, the re-laid-out
    copies shared by all readers of a value, the tape (None when not recording) and the profile."""

    __slots__ = ("values", "cnhw", "relaid", "tape", "profile")

    def __init__(self, values, tape, profile):
        self.values, self.cnhw, self.relaid, self.tape, self.profile = values, set(), {}, tape, profile

    def drop(self, names):
        for name in names:
            self.values.pop(name, None)
            self.relaid.pop((name, "T"), None)


class Engine:
    """Runs a ``Graph`` forward and backward on NumPy arrays.

    ``fusable`` (a Conv or Add -> the Relu/Clip it can apply) and ``blocks`` (inverted-residual
    blocks one kernel can run) are found once; ``schedule`` builds the steps of a run from them.
    """

    def __init__(self, graph: Graph):
        self.graph = graph
        self.ops = build_ops(graph)
        self.fusable = find_fusable(graph, self.ops)
        self.blocks = find_blocks(graph, self.ops, self.fusable)
        self._outputs = tuple(v.name for v in graph.outputs)
        self._bound_names = tuple(dict.fromkeys(n for f in self.fusable.values() for n in f.bound_names))
        self._schedules = {}

    def schedule(self, outputs=None, overridden=(), record: bool = False, wrt=()) -> list:
        """The steps of a run returning ``outputs`` (default: the graph outputs), with the fused
        Clip bounds named in ``overridden`` replaced by ``params``, recording for ``wrt`` when
        ``record`` (see ``schedule.build_schedule``); built once per set of options."""
        wanted = tuple(outputs) if outputs is not None else self._outputs
        key = (wanted, frozenset(overridden), record, frozenset(wrt) if record else None)
        steps = self._schedules.get(key)
        if steps is None:
            if len(self._schedules) >= MAX_SCHEDULES:
                del self._schedules[next(iter(self._schedules))]
            steps = build_schedule(self.graph, self.ops, self.fusable, self.blocks, wanted, overridden, record, wrt)
            self._schedules[key] = steps
        return steps

    def run(self, feeds: dict, params: dict | None = None, record: bool = False, wrt=(),
            outputs=None, profile: dict | None = None):
        """Evaluate the graph.

        ``feeds`` maps graph-input names to arrays; ``params`` overrides initializers by name (the
        fitting loop passes quantized weights this way). With ``record`` the returned ``Tape`` lets
        ``backward`` compute gradients for the names in ``wrt`` (graph inputs or initializers).
        Returns ``(values, tape)``: each requested output (default: the graph outputs), in NCHW.
        ``profile``, if given, accumulates seconds per node name.
        """
        wanted = tuple(outputs) if outputs is not None else self._outputs
        overridden = tuple(n for n in self._bound_names if n in params) if params else ()
        steps = self.schedule(wanted, overridden, record, wrt)
        values = dict(self.graph.initializers)
        if params:
            values.update(params)
        values.update(feeds)
        run = _Run(values, Tape() if record else None, profile)
        for step in steps:
            if step.block is None:
                self._run_op(step, run)
            elif not self._run_block(step, run):
                for member in step.members:  # inputs the kernel does not take (dtype, shapes): node by node
                    self._run_op(member, run)
                    run.drop(member.drop)
            run.drop(step.drop)
        if record:
            run.tape.cnhw = run.cnhw
        return {name: (values[name].transpose(_SWAP) if name in run.cnhw else values[name])
                for name in wanted}, run.tape

    @staticmethod
    def _run_op(step: Step, run: _Run):
        """Run one op step: its inputs brought to the op's layout, its outputs stored, its context
        recorded when the step is."""
        node = step.node
        try:
            stored = [run.values[name] if name else None for name in step.inputs]
        except KeyError as exc:
            raise ModelError(f"node '{node.name}' ({node.op_type}) reads '{exc.args[0]}', "
                             "which no input, initializer or earlier node provides") from None
        start = time.perf_counter() if run.profile is not None else 0.0
        args, hows, out_cnhw = stored, None, False
        try:  # NOTE: re-laying-out is inside: a rank-5 operand of a channel-major op fails here
            if step.relayout:
                args, hows, out_cnhw = _to_op(step.op, step.inputs, stored, run.cnhw, run.relaid)
            out, ctx = step.op.forward(*args) if step.clip is None else step.op.forward(*args, clip=step.clip)
        except (ValueError, IndexError) as exc:
            shapes = [None if a is None else tuple(np.shape(a)) for a in args]
            raise ModelError(f"node '{node.name}' ({node.op_type}) failed on input shapes "
                             f"{shapes}: {exc}") from None
        if run.profile is not None:
            run.profile[node.name] = run.profile.get(node.name, 0.0) + time.perf_counter() - start
        if not isinstance(out, tuple):
            out = (out,)
        for k, (name, value) in enumerate(zip(step.outputs, out)):
            if name:
                run.values[name] = value
                if out_cnhw and k == 0:
                    run.cnhw.add(name)
        if step.record:
            run.tape.entries.append(Record(step, ctx, [None if a is None else np.shape(a) for a in args], hows))

    @staticmethod
    def _run_block(step: Step, run: _Run) -> bool:
        """Run a block step with one kernel (``kernels.block``), storing its output (CNHW); False
        (nothing run) when its input or weights are not what the kernel takes."""
        start = time.perf_counter() if run.profile is not None else 0.0
        expand, depthwise, project = step.members[:3]
        (x,), _, _ = _to_op(expand.op, expand.inputs[:1], [run.values[expand.inputs[0]]], run.cnhw, run.relaid)
        if x.ndim != 4 or x.dtype != np.float32:
            return False
        (we, be), (wd, bd), (wp, bp) = [
            (np.asarray(run.values[conv.inputs[1]]),
             run.values[conv.inputs[2]] if len(conv.inputs) > 2 and conv.inputs[2] else None)
            for conv in (expand, depthwise, project)]
        hidden = wd.shape[0]
        if we.shape != (hidden, x.shape[0], 1, 1) or wd.shape[1] != 1 or wp.shape[1:] != (hidden, 1, 1):
            return False
        residual = x if step.block.add is not None else None
        run.values[step.outputs[0]] = run_inverted_residual(
            x, (we, be, expand.clip), (depthwise.op, wd, bd, depthwise.clip), (wp, bp), residual, step.members[-1].clip)
        run.cnhw.add(step.outputs[0])
        if run.profile is not None:
            run.profile[step.node.name] = run.profile.get(step.node.name, 0.0) + time.perf_counter() - start
        return True

    def backward(self, tape: Tape, seeds: dict, wrt=()) -> dict:
        """Gradients of the names in ``wrt`` given ``seeds`` (value name -> dL/d value, in NCHW)."""
        grads = {name: (np.asarray(g).transpose(_SWAP) if name in tape.cnhw else g) for name, g in seeds.items()}
        wrt = set(wrt)
        for step, ctx, shapes, hows in reversed(tape.entries):
            out = step.grad_of
            dy = grads.get(out)
            if dy is None:
                # NOTE: an op taking every output's gradient is recorded under a tuple of names,
                # never a key of grads: it lands here, so the single-output path pays nothing for it
                if out.__class__ is not tuple:
                    continue
                dy = _output_grads(out, grads, wrt)
                if dy is None:
                    continue
            elif out not in wrt:
                del grads[out]
            gin = step.op.backward(ctx, dy, step.need)
            for name, g, shape, how, wanted in zip(step.inputs, gin, shapes, hows or repeat(None), step.need):
                if g is None or not wanted:
                    continue
                g = _grad_back(unbroadcast(np.asarray(g), shape), how)
                if name in grads:
                    grads[name] = _sum(grads[name], g)
                else:
                    grads[name] = g
        return {name: (grads[name].transpose(_SWAP) if name in tape.cnhw and grads.get(name) is not None
                       else grads.get(name)) for name in wrt}


def _to_op(op, names, stored, cnhw, relaid):
    """Bring each input to the layout ``op`` works in; returns (args, hows, output_is_cnhw)."""
    mode = op.layout
    n = len(stored)
    hows = [None] * n
    args = list(stored)
    if mode == "cnhw":
        convert = [0] if n and stored[0] is not None and np.ndim(stored[0]) == 4 else []
        out_cnhw = bool(convert)
    elif mode == "follow" and any(name in cnhw for name in names[:op.follow_inputs] if name):
        convert = [k for k in range(min(n, op.follow_inputs)) if stored[k] is not None]
        out_cnhw = True
    else:
        convert = [k for k, name in enumerate(names) if name in cnhw]
        out_cnhw = False
    for k in convert:
        name = names[k]
        if (name in cnhw) == (mode is not None and out_cnhw):
            continue  # already in the layout the op wants
        if name in cnhw:  # channel-major value, op wants NCHW
            key = (name, "T")
            if key not in relaid:
                relaid[key] = np.ascontiguousarray(stored[k].transpose(_SWAP))
            args[k], hows[k] = relaid[key], "T"
        else:
            key = (name, "T")
            if np.ndim(stored[k]) == 4 and key in relaid:
                args[k], hows[k] = relaid[key], "T"
            else:
                args[k], hows[k] = _to_cnhw(stored[k])
                if hows[k] == "T":
                    relaid[key] = args[k]
    return args, hows, out_cnhw
