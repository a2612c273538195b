"""The executor: a plain loop over topologically sorted nodes and a dict of named values.

``Engine.run`` evaluates the graph (optionally recording what backward needs) and
``Engine.backward`` walks the recording in reverse, un-broadcasting and accumulating gradients
across consumers, so a value read by two nodes (a residual Add) gets the sum of both gradients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from bwacal.errors import ModelError, UnsupportedOpError
from bwacal.graph import Graph
from bwacal.ops import REGISTRY, Unsupported, make_op
from bwacal.kernels.pointwise import add_clip
from bwacal.ops.block import find_blocks, run_block


@dataclass
class Tape:
    """What a recorded forward pass keeps for backward.

    ``entries`` holds, per recorded node, the op's context, the shapes its inputs had as the op saw
    them, how each input was re-laid-out for it (see ``_to_op``) and the name of the output whose
    gradient its backward takes (a tuple of every output's name for an op with
    ``grads_all_outputs``); ``cnhw`` names the values that were stored channel-major.
    """

    entries: list = field(default_factory=list)
    requires_grad: set = field(default_factory=set)
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
# logical NCHW. The permutation (1, 0, 2, 3) is its own inverse.
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
        self._fusable = self._find_fusable()
        self._blocks = find_blocks(graph, self.ops, self._fusable)

    def _find_fusable(self) -> dict:
        """Nodes whose op can apply a clip as it writes its output (``fuses_clip``: Conv, Add) and
        whose only reader is a Relu, or a Clip with constant bounds: index of the node -> (index of
        the activation, (lo, hi), names of the bound initializers). Fused, the activation costs no
        pass of its own over the tensor, forward or backward."""
        readers = {}
        for j, node in enumerate(self.graph.nodes):
            for name in node.inputs:
                if name:
                    readers.setdefault(name, []).append(j)
        outputs = {v.name for v in self.graph.outputs}
        inits = self.graph.initializers
        fusable = {}
        for i, node in enumerate(self.graph.nodes):
            if not getattr(self.ops[i], "fuses_clip", False) or node.outputs[0] in outputs:
                continue
            after = readers.get(node.outputs[0], [])
            if len(after) != 1:
                continue
            j = after[0]
            act, op = self.graph.nodes[j], self.ops[j]
            if act.inputs[0] != node.outputs[0] or len([o for o in act.outputs if o]) != 1:
                continue
            if act.op_type == "Relu":
                fusable[i] = (j, (0.0, np.inf), ())
            elif act.op_type == "Clip":
                bounds = [getattr(op, "lo_attr", None), getattr(op, "hi_attr", None)]
                names = tuple(n for n in act.inputs[1:] if n)
                for k, name in enumerate(act.inputs[1:3]):
                    if name:
                        if name not in inits or np.size(inits[name]) != 1:
                            break
                        bounds[k] = float(np.asarray(inits[name]).reshape(()))
                else:
                    lo = -np.inf if bounds[0] is None else float(bounds[0])
                    hi = np.inf if bounds[1] is None else float(bounds[1])
                    fusable[i] = (j, (lo, hi), names)
        return fusable

    def _compute_last_use(self) -> dict:
        last = {}
        for i, node in enumerate(self.graph.nodes):
            for name in node.inputs:
                if name:
                    last[name] = i
        keep = {v.name for v in self.graph.outputs}
        return {name: i for name, i in last.items() if name not in keep and name not in self.graph.initializers}

    def run(self, feeds: dict, params: dict | None = None, record: bool = False, wrt=(),
            outputs=None, profile: dict | None = None):
        """Evaluate the graph.

        ``feeds`` maps graph-input names to arrays; ``params`` overrides initializers by name (the
        fitting loop passes quantized weights this way). With ``record`` the returned ``Tape`` lets
        ``backward`` compute gradients for the names in ``wrt`` (graph inputs or initializers).
        Returns ``(values, tape)``: each requested output (default: the graph outputs), in NCHW.
        ``profile``, if given, accumulates seconds per node name.
        """
        values = dict(self.graph.initializers)
        if params:
            values.update(params)
        values.update(feeds)
        wanted = list(outputs) if outputs is not None else [v.name for v in self.graph.outputs]
        tape = Tape(requires_grad=set(wrt)) if record else None
        cnhw = set()  # names whose stored array is channel-major
        relaid = {}  # (name, how) -> the re-laid-out copy, shared by all consumers of a run
        drop_after = {}
        for name, i in self._last_use.items():
            if name not in wanted:
                drop_after.setdefault(i, []).append(name)
        fused = {}  # index of a Conv or Add -> (index of its activation, bounds), for this run
        for i, (j, bounds, names) in self._fusable.items():
            if self.graph.nodes[i].outputs[0] not in wanted and not (params and any(n in params for n in names)):
                fused[i] = (j, bounds)
        skip = {j for j, _ in fused.values()}
        blocks = {}  # index of a block's first node -> the block, run by one kernel (nothing recorded)
        if not record:
            for first, blk in self._blocks.items():
                if (all(k in fused for k in blk.members if k in self._fusable)
                        and not any(name in wanted for name in blk.inner)):
                    blocks[first] = blk
                    skip.update(k for k in blk.nodes if k != first)

        def drop(i):
            for name in drop_after.get(i, ()):
                values.pop(name, None)
                relaid.pop((name, "T"), None)

        for i, (node, op) in enumerate(zip(self.graph.nodes, self.ops)):
            if i in skip:  # the Conv or Add it is fused into, or its block, wrote its output already
                drop(i)
                continue
            if i in blocks:
                if self._run_block(blocks[i], values, cnhw, relaid, fused, profile):
                    drop(i)
                    continue
                # inputs the kernel does not take (dtype, shapes): the block's nodes run one by one
                skip.difference_update(blocks[i].members)
            out_names = node.outputs
            if i in fused:
                act = self.graph.nodes[fused[i][0]]
                out_names = [act.outputs[0]]
            try:
                stored = [values[name] if name else None for name in node.inputs]
            except KeyError as exc:
                raise ModelError(f"node '{node.name}' ({node.op_type}) reads '{exc.args[0]}', "
                                 "which no input, initializer or earlier node provides") from None
            start = time.perf_counter() if profile is not None else 0.0
            args = stored
            try:  # NOTE: re-laying-out is inside: a rank-5 operand of a channel-major op fails here
                args, hows, out_cnhw = self._to_op(op, node.inputs, stored, cnhw, relaid)
                out, ctx = op.forward(*args, clip=fused[i][1]) if i in fused else op.forward(*args)
            except (ValueError, IndexError) as exc:
                shapes = [None if a is None else tuple(np.shape(a)) for a in args]
                raise ModelError(f"node '{node.name}' ({node.op_type}) failed on input shapes "
                                 f"{shapes}: {exc}") from None
            if profile is not None:
                profile[node.name] = profile.get(node.name, 0.0) + time.perf_counter() - start
            if not isinstance(out, tuple):
                out = (out,)
            for k, (name, value) in enumerate(zip(out_names, out)):
                if name:
                    values[name] = value
                    if out_cnhw and k == 0:
                        cnhw.add(name)
            if record:
                needs = any(name in tape.requires_grad for name in node.inputs if name)
                if needs and op.differentiable:
                    if op.grads_all_outputs:  # a tuple of names: see _output_grads
                        out_key = tuple(out_names)
                        tape.requires_grad.update(n for n in out_key if n)
                    else:
                        out_key = out_names[0]
                        tape.requires_grad.update(n for n in out_names[:1] if n)
                    tape.entries.append((i, ctx, [None if a is None else np.shape(a) for a in args], hows,
                                         out_key))
            drop(i)
        if record:
            tape.cnhw = cnhw
        return {name: (values[name].transpose(_SWAP) if name in cnhw else values[name])
                for name in wanted}, tape

    def _run_block(self, blk, values, cnhw, relaid, fused, profile) -> bool:
        """Run a block (``bwacal/ops/block.py``) with one kernel, storing its output; False (nothing
        run) when its input or weights are not what the kernel takes."""
        nodes = self.graph.nodes
        first = nodes[blk.convs[0]]
        start = time.perf_counter() if profile is not None else 0.0
        (x,), _, _ = self._to_op(self.ops[blk.convs[0]], first.inputs[:1], [values[first.inputs[0]]], cnhw, relaid)
        params = []
        for k in blk.convs:
            inputs = nodes[k].inputs
            params.append((np.asarray(values[inputs[1]]), values[inputs[2]] if len(inputs) > 2 and inputs[2] else None))
        y = run_block(blk, [self.ops[k] for k in blk.convs], x, params,
                      [fused[k][1] if k in fused else None for k in blk.members])
        if y is None:
            return False
        last = blk.members[-1]
        name = nodes[fused[last][0]].outputs[0] if last in fused else nodes[last].outputs[0]
        values[name] = y
        cnhw.add(name)
        if profile is not None:
            profile[first.name] = profile.get(first.name, 0.0) + time.perf_counter() - start
        return True

    @staticmethod
    def _to_op(op, names, stored, cnhw, relaid):
        """Bring each input to the layout ``op`` works in; returns (args, hows, output_is_cnhw)."""
        mode = getattr(op, "layout", None)
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

    def backward(self, tape: Tape, seeds: dict, wrt=()) -> dict:
        """Gradients of the names in ``wrt`` given ``seeds`` (value name -> dL/d value, in NCHW)."""
        grads = {name: (np.asarray(g).transpose(_SWAP) if name in tape.cnhw else g) for name, g in seeds.items()}
        wrt = set(wrt)
        for i, ctx, shapes, hows, out_name in reversed(tape.entries):
            node, op = self.graph.nodes[i], self.ops[i]
            dy = grads.get(out_name)
            if dy is None:
                # NOTE: an op taking every output's gradient is recorded under a tuple of names,
                # never a key of grads: it lands here, so the single-output path pays nothing for it
                if out_name.__class__ is not tuple:
                    continue
                dy = _output_grads(out_name, grads, wrt)
                if dy is None:
                    continue
            elif out_name not in wrt:
                del grads[out_name]
            need = tuple(bool(name) and name in tape.requires_grad for name in node.inputs)
            gin = op.backward(ctx, dy, need)
            for name, g, shape, how, wanted in zip(node.inputs, gin, shapes, hows, need):
                if g is None or not wanted:
                    continue
                g = _grad_back(unbroadcast(np.asarray(g), shape), how)
                if name in grads:
                    grads[name] = _sum(grads[name], g)
                else:
                    grads[name] = g
        return {name: (grads[name].transpose(_SWAP) if name in tape.cnhw and grads.get(name) is not None
                       else grads.get(name)) for name in wrt}
