"""The executor's schedule: what a run of a graph does, worked out once before the run loop.

For a graph and a run's options (the values it returns, the Clip bounds it overrides, whether it
records for backward and for which names), :func:`build_schedule` lists the steps of the run. Each
step says which op runs on which inputs; the Relu/Clip it applies as it writes its output (a fused
activation, ``find_fusable``); whether an input may need re-laying-out (see the layout notes in
``bwacal/engine.py``); the inverted-residual block it runs in one kernel (``find_blocks``), with
the block's nodes as steps of their own for inputs the kernel does not take; whether it is recorded
for backward and which input gradients backward wants; and the values no later step reads, which
the run drops after it. ``Engine`` builds a schedule per set of options once and reuses it.

Blocks without the expansion conv run node by node: copying the channel-major input into the
channels-innermost image cost more than the block saved (MobileNetV2's first block: 6.4 ms in one
kernel, 4.7-5.4 ms node by node in two profiling runs). The same fusion was tried for ResNet's
basic block (Conv + Relu, Conv, Add of the input, Relu): no gain on ResNet-20 (82.6 against 83.2 ms
forward) or ResNet-18 (195 against 191 ms), since there the convs' own work dominates and
``dense_forward`` splits it by output channels as well as images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from bwacal.graph import Graph, Node
from bwacal.ops import Op


class Fusion(NamedTuple):
    """A Relu/Clip applied by the op that writes its input: the activation's node index, its bounds
    and the names of the initializers the bounds come from."""

    activation: int
    bounds: tuple
    bound_names: tuple


@dataclass(frozen=True)
class Block:
    """Node indices of an inverted-residual block: ``convs`` in order (``expand, depthwise,
    project``) and the residual ``add`` (None without one); ``nodes``: all of them, activations
    included; ``inner``: the value names that exist only inside the block."""

    convs: tuple
    add: int | None
    nodes: tuple
    inner: tuple

    @property
    def members(self) -> tuple:
        """The convs and the Add: the nodes whose activations the block applies."""
        return self.convs + (() if self.add is None else (self.add,))


@dataclass(eq=False)
class Step:
    """One step of a run: ``op`` (of ``node``, the graph's node ``index``) on the values named
    ``inputs`` ("" for an omitted one), writing ``outputs``.

    ``clip``: the bounds of a fused activation (``outputs`` is then the activation's output);
    ``relayout``: whether the op works channel-major or an input may be stored so; ``block``: an
    inverted-residual block this step runs in one kernel, ``members`` its nodes' steps for when the
    kernel does not take the inputs; ``record``: whether the step goes on the tape, ``need`` which
    input gradients its backward computes and ``grad_of`` the output whose gradient it takes (a tuple
    of every output for an op with ``grads_all_outputs``); ``drop``: the values no later step reads.
    """

    index: int
    node: Node
    op: Op
    inputs: tuple
    outputs: tuple
    clip: tuple | None = None
    relayout: bool = False
    block: Block | None = None
    members: tuple = ()
    record: bool = False
    need: tuple = ()
    grad_of: str | tuple | None = None
    drop: tuple = ()


def find_fusable(graph: Graph, ops: list) -> dict:
    """Nodes whose op can apply a clip as it writes its output (``fuses_clip``: Conv, Add) and whose
    only reader is an activation that is a clip of it (``Op.as_clip``: Relu, or Clip with constant
    bounds): index of the node -> ``Fusion``. Fused, the activation costs no pass of its own over the
    tensor, forward or backward."""
    readers = {}
    for j, node in enumerate(graph.nodes):
        for name in node.inputs:
            if name:
                readers.setdefault(name, []).append(j)
    outputs = {v.name for v in graph.outputs}
    inits = graph.initializers
    fusable = {}
    for i, node in enumerate(graph.nodes):
        if not ops[i].fuses_clip or node.outputs[0] in outputs:
            continue
        after = readers.get(node.outputs[0], [])
        if len(after) != 1:
            continue
        j = after[0]
        act = graph.nodes[j]
        if act.inputs[0] != node.outputs[0] or len([o for o in act.outputs if o]) != 1:
            continue
        names = tuple(n for n in act.inputs[1:] if n)
        if any(n not in inits for n in names):
            continue
        bounds = ops[j].as_clip([inits[n] if n else None for n in act.inputs[1:]])
        if bounds is not None:
            fusable[i] = Fusion(j, bounds, names)
    return fusable


def _is_pointwise(op, w):
    return (w is not None and w.ndim == 4 and w.shape[2:] == (1, 1) and op.group == 1
            and all(s == 1 for s in (op.strides or (1, 1))) and not any(op.pads or ())
            and op.auto_pad in ("NOTSET", "VALID"))


def _is_depthwise(op, w):
    return w is not None and w.ndim == 4 and w.shape[1] == 1 and op.group == w.shape[0] > 1


def find_blocks(graph, ops, fusable) -> dict:
    """The blocks ``kernels.block.run_inverted_residual`` can run: index of the block's first node
    -> ``Block``.

    ``fusable`` is ``find_fusable``'s map (a Conv or Add -> its activation). Every value
    inside a block must have one reader; weights must be initializers (their values, overridden or
    not, are read at run time); a residual must add the block's own input."""
    nodes, inits = graph.nodes, graph.initializers
    readers, producer = {}, {}
    for j, node in enumerate(nodes):
        for name in node.inputs:
            if name:
                readers.setdefault(name, []).append(j)
        for name in node.outputs:
            if name:
                producer[name] = j
    act_of = {f.activation: i for i, f in fusable.items()}  # activation -> the node it is fused into

    def conv_weight(i):
        node = nodes[i] if i is not None else None
        if node is None or node.op_type != "Conv" or len(node.inputs) < 2 or node.inputs[1] not in inits:
            return None
        if len(node.inputs) > 2 and node.inputs[2] and node.inputs[2] not in inits:
            return None
        return np.asarray(inits[node.inputs[1]])

    def out(i):  # what a node's output is called once its activation is fused
        return nodes[fusable[i].activation].outputs[0] if i in fusable else nodes[i].outputs[0]

    def only_reader(name):
        r = readers.get(name, [])
        return r[0] if len(r) == 1 else None

    def residual_add(i, block_input):
        """The Add that alone reads node i's (unfused) output and adds ``block_input`` to it."""
        a = only_reader(nodes[i].outputs[0]) if i not in fusable else None
        if a is not None and nodes[a].op_type == "Add" and len(nodes[a].inputs) == 2 \
                and set(nodes[a].inputs) == {nodes[i].outputs[0], block_input} and block_input != nodes[i].outputs[0]:
            return a
        return None

    def make(convs, add):
        members = convs + (() if add is None else (add,))
        indices = tuple(sorted(set(members) | {fusable[k].activation for k in members if k in fusable}))
        final = out(members[-1])
        inner = tuple(name for k in indices for name in nodes[k].outputs if name and name != final)
        return Block(convs, add, indices, inner)

    blocks = {}
    for d in range(len(nodes)):
        wd = conv_weight(d)
        if d not in fusable or not _is_depthwise(ops[d], wd):
            continue
        p = only_reader(out(d))
        wp = conv_weight(p)
        if wp is None or not _is_pointwise(ops[p], wp) or wp.shape[1] != wd.shape[0] or nodes[p].inputs[0] != out(d):
            continue
        e = act_of.get(producer.get(nodes[d].inputs[0]))
        we = conv_weight(e)
        if we is not None and _is_pointwise(ops[e], we) and we.shape[0] == wd.shape[0] and only_reader(out(e)) == d:
            blocks[e] = make((e, d, p), residual_add(p, nodes[e].inputs[0]))
    return blocks


def build_schedule(graph: Graph, ops: list, fusable: dict, blocks: dict, wanted: tuple, overridden=(),
                   record: bool = False, wrt=()) -> list:
    """The steps of a run returning the values ``wanted``, with the initializers named in
    ``overridden`` replaced (a fused Clip whose bound is overridden runs on its own), recording for
    gradients of the names in ``wrt`` when ``record``.

    A Conv or Add fuses its activation unless its own output is wanted; a block runs in one kernel
    in a run that records nothing, when every activation in it is fused and no value inside it is
    wanted."""
    nodes = graph.nodes
    overridden = set(overridden)
    fused = {i: f for i, f in fusable.items()
             if nodes[i].outputs[0] not in wanted and not overridden.intersection(f.bound_names)}
    activations = {f.activation for f in fused.values()}  # applied by the op they are fused into
    skip = set(activations)
    used = {}
    if not record:
        used = {first: blk for first, blk in blocks.items()
                if all(k in fused for k in blk.members if k in fusable) and not any(n in wanted for n in blk.inner)}
    for first, blk in used.items():
        skip.update(k for k in blk.nodes if k != first)
    requires_grad = set(wrt) if record else set()
    may_cnhw = set()  # values a run may store channel-major

    def op_step(i):
        node, op = nodes[i], ops[i]
        f = fused.get(i)
        step = Step(i, node, op, tuple(node.inputs),
                    (nodes[f.activation].outputs[0],) if f is not None else tuple(node.outputs),
                    clip=None if f is None else f.bounds)
        step.relayout = op.layout == "cnhw" or any(n in may_cnhw for n in step.inputs if n)
        if op.layout == "cnhw" or (op.layout == "follow"
                                   and any(n in may_cnhw for n in step.inputs[:op.follow_inputs] if n)):
            may_cnhw.add(step.outputs[0])
        if op.differentiable and any(n in requires_grad for n in step.inputs if n):
            step.record = True
            step.need = tuple(bool(n) and n in requires_grad for n in step.inputs)
            step.grad_of = step.outputs if op.grads_all_outputs else step.outputs[0]
            requires_grad.update(n for n in (step.outputs if op.grads_all_outputs else step.outputs[:1]) if n)
        return step

    steps = []
    for i in range(len(nodes)):
        if i in used:
            blk = used[i]
            members = tuple(op_step(k) for k in blk.nodes if k not in activations)
            outer = tuple(dict.fromkeys(n for m in members for n in m.inputs if n and n not in blk.inner))
            final = members[-1].outputs[0]
            may_cnhw.add(final)
            _set_drops(members, set(outer) | {final}, graph.initializers)
            steps.append(Step(i, nodes[i], ops[i], outer, (final,), relayout=True, block=blk, members=members))
        elif i not in skip:
            steps.append(op_step(i))
    _set_drops(steps, set(wanted), graph.initializers)
    return steps


def _set_drops(steps, keep: set, initializers: dict):
    """Set each step's ``drop``: the values it reads or writes that no later step reads, except those
    in ``keep`` and the initializers (dropping them would free nothing: the graph holds them)."""
    last = {}
    for k, step in enumerate(steps):
        for name in step.outputs:
            if name:
                last.setdefault(name, k)
        for name in step.inputs:
            if name:
                last[name] = k
    drops = [[] for _ in steps]
    for name, k in last.items():
        if name not in keep and name not in initializers:
            drops[k].append(name)
    for step, names in zip(steps, drops):
        step.drop = tuple(names)
