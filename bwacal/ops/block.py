"""Inverted-residual blocks (MobileNetV2) found in a graph, for the one-kernel forward of
``bwacal/kernels/block.py``: ``pointwise Conv + clip -> depthwise Conv + clip -> pointwise Conv [->
Add of the block input] [+ clip]``. Float32 forward runs that record nothing take it; a recorded run
(backward needs the intermediate values) runs the nodes one by one; ``Engine`` decides which.

Blocks without the expansion conv run node by node: copying the channel-major input into the
channels-innermost image cost more than the block saved (MobileNetV2's first block: 6.4 ms in one
kernel, 4.7-5.4 ms node by node in two profiling runs). The same fusion was tried for ResNet's
basic block (Conv + Relu, Conv, Add of the input, Relu): no gain on ResNet-20 (82.6 against 83.2 ms
forward) or ResNet-18 (195 against 191 ms), since there the convs' own work dominates and
``dense_forward`` splits it by output channels as well as images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bwacal.kernels.block import run_inverted_residual


@dataclass(frozen=True)
class Block:
    """Node indices of a block: ``convs`` in order (``expand, depthwise, project``) and the
    residual ``add`` (None without one); ``nodes``: all of them, activations included; ``inner``: the
    value names that exist only inside the block."""

    convs: tuple
    add: int | None
    nodes: tuple
    inner: tuple

    @property
    def members(self) -> tuple:
        """The convs and the Add: the nodes whose activations the block applies."""
        return self.convs + (() if self.add is None else (self.add,))


def run_block(blk, ops, x, params, clips):
    """The output (CNHW) of ``blk`` for its CNHW input ``x``, or None when the kernel does not take
    these inputs (the caller then runs the nodes). ``ops`` and ``params`` (weight, bias or None) are
    per conv, ``clips`` per member (None for no activation)."""
    if x.ndim != 4 or x.dtype != np.float32:
        return None
    (we, be), (wd, bd), (wp, bp) = params
    hidden = wd.shape[0]
    if we.shape != (hidden, x.shape[0], 1, 1) or wd.shape[1] != 1 or wp.shape[1:] != (hidden, 1, 1):
        return None
    residual = x if blk.add is not None else None
    return run_inverted_residual(x, (we, be, clips[0]), (ops[1], wd, bd, clips[1]), (wp, bp), residual, clips[-1])


def _is_pointwise(op, w):
    return (w is not None and w.ndim == 4 and w.shape[2:] == (1, 1) and op.group == 1
            and all(s == 1 for s in (op.strides or (1, 1))) and not any(op.pads or ())
            and op.auto_pad in ("NOTSET", "VALID"))


def _is_depthwise(op, w):
    return w is not None and w.ndim == 4 and w.shape[1] == 1 and op.group == w.shape[0] > 1


def find_blocks(graph, ops, fusable) -> dict:
    """The blocks ``run_block`` can run: index of the block's first node -> ``Block``.

    ``fusable`` is ``Engine._find_fusable``'s map (a Conv or Add -> its activation). Every value
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
    act_of = {j: i for i, (j, _, _) in fusable.items()}  # activation -> the node it is fused into

    def conv_weight(i):
        node = nodes[i] if i is not None else None
        if node is None or node.op_type != "Conv" or len(node.inputs) < 2 or node.inputs[1] not in inits:
            return None
        if len(node.inputs) > 2 and node.inputs[2] and node.inputs[2] not in inits:
            return None
        return np.asarray(inits[node.inputs[1]])

    def out(i):  # what a node's output is called once its activation is fused
        return nodes[fusable[i][0]].outputs[0] if i in fusable else nodes[i].outputs[0]

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
        indices = tuple(sorted(set(members) | {fusable[k][0] for k in members if k in fusable}))
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
