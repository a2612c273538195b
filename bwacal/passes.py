"""Graph passes run at load: constant folding, shape-subgraph folding, BatchNorm folding, cleanup.

Each pass takes a ``Graph`` and returns a new one; initializer arrays are shared, never mutated.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bwacal.graph import Graph, Node
from bwacal.ops import Unsupported, make_op

# ops whose output depends only on input shapes, never on input values
_SHAPE_SOURCES = {"Shape"}


def constants_to_initializers(graph: Graph) -> Graph:
    """Turn every node whose inputs are all initializers (Constant included) into an initializer."""
    inits = dict(graph.initializers)
    graph_inputs = {v.name for v in graph.inputs}
    outputs = {v.name for v in graph.outputs}
    nodes = []
    for node in graph.nodes:
        ins = [n for n in node.inputs if n]
        foldable = all(n in inits and n not in graph_inputs for n in ins) and len(node.outputs) == 1 \
            and node.outputs[0] not in outputs
        if foldable:
            try:
                op = make_op(node.op_type, node.attrs, graph.opset)
                out, _ = op.forward(*[inits[n] if n else None for n in node.inputs])
            except (Unsupported, ValueError, TypeError, IndexError):
                nodes.append(node)
                continue
            inits[node.outputs[0]] = np.asarray(out[0] if isinstance(out, tuple) else out)
        else:
            nodes.append(node)
    return replace(graph, nodes=nodes, initializers=inits)


def shape_derived_values(graph: Graph) -> set:
    """Values computed only from tensor shapes and constants (what ``x.view(x.size(0), -1)`` exports)."""
    derived = set()
    for node in graph.nodes:
        ins = [n for n in node.inputs if n]
        if node.op_type in _SHAPE_SOURCES or (ins and all(n in derived or n in graph.initializers for n in ins)):
            derived.update(node.outputs)
    return derived


def fold_shape_subgraphs(graph: Graph, evaluate) -> Graph:
    """Replace shape subgraphs that feed data ops with constants, keeping the batch dim dynamic.

    ``evaluate(batch, names)`` runs the graph on a batch of the given size and returns the named
    values. Entries that change with the batch size become 0 (copy the input's dim) at position 0 of
    a Reshape target, or -1 elsewhere; a subgraph that cannot be expressed so is left to run.
    """
    derived = shape_derived_values(graph)
    if not derived:
        return graph
    boundary = sorted({n for node in graph.nodes if not set(node.outputs) <= derived
                       for n in node.inputs if n in derived})
    if not boundary:
        return graph
    v1, v2 = evaluate(1, boundary), evaluate(2, boundary)
    reshape_targets = {node.inputs[1] for node in graph.nodes if node.op_type == "Reshape"}
    consumers = graph.consumers()
    inits = dict(graph.initializers)
    for name in boundary:
        a, b = np.asarray(v1[name]), np.asarray(v2[name])
        if a.shape == b.shape and np.array_equal(a, b):
            inits[name] = a
            continue
        only_reshape = all(c.op_type == "Reshape" and c.inputs[1] == name and c.inputs[0] != name
                           for c in consumers.get(name, []))
        if name not in reshape_targets or not only_reshape or a.ndim != 1 or a.shape != b.shape:
            continue
        diff = np.flatnonzero(a != b)
        if len(diff) != 1 or (-1 in a and diff[0] != 0):
            continue
        fixed = a.copy()
        fixed[diff[0]] = 0 if diff[0] == 0 else -1
        if diff[0] == 0 and any(c.attrs.get("allowzero", 0) for c in consumers[name]):
            continue
        inits[name] = fixed
    produced_constant = {n for n in boundary if n in inits}
    nodes = [n for n in graph.nodes if not (set(n.outputs) & produced_constant)]
    return remove_dead_nodes(replace(graph, nodes=nodes, initializers=inits))


def remove_dead_nodes(graph: Graph) -> Graph:
    """Drop nodes none of whose outputs reach a graph output, and initializers nobody reads."""
    needed = {v.name for v in graph.outputs}
    keep = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.outputs):
            keep.append(node)
            needed.update(n for n in node.inputs if n)
    keep.reverse()
    inits = {k: v for k, v in graph.initializers.items() if k in needed}
    return replace(graph, nodes=keep, initializers=inits)


def remove_identities(graph: Graph) -> Graph:
    """Bypass Identity and inference Dropout nodes (unless they produce a graph output)."""
    outputs = {v.name for v in graph.outputs}
    rename = {}
    nodes = []
    for node in graph.nodes:
        single = node.op_type == "Identity" or (node.op_type == "Dropout" and len([o for o in node.outputs if o]) == 1)
        if single and node.outputs[0] not in outputs and node.inputs[0] not in graph.initializers:
            rename[node.outputs[0]] = rename.get(node.inputs[0], node.inputs[0])
            continue
        nodes.append(replace(node, inputs=[rename.get(n, n) for n in node.inputs]))
    return replace(graph, nodes=nodes)


def fold_batchnorm(graph: Graph) -> Graph:
    """Fold inference BatchNormalization into the Conv or Gemm (transB=1) that feeds it alone.

    W' = W * g / sqrt(v + eps) per output channel, b' = (b - m) * g / sqrt(v + eps) + beta.
    """
    consumers = graph.consumers()
    producers = graph.producers()
    inits = dict(graph.initializers)
    outputs = {v.name for v in graph.outputs}
    replaced: dict[str, Node] = {}
    dropped = set()
    for bn in graph.nodes:
        if bn.op_type != "BatchNormalization" or len([o for o in bn.outputs if o]) != 1:
            continue
        if bn.attrs.get("training_mode", 0) or not all(n in inits for n in bn.inputs[1:5]):
            continue
        prev = producers.get(bn.inputs[0])
        if prev is None or prev.name in replaced or len(consumers.get(bn.inputs[0], [])) != 1 \
                or bn.inputs[0] in outputs:
            continue
        if prev.op_type == "Conv" and prev.inputs[1] in inits:
            w = inits[prev.inputs[1]]
        elif prev.op_type == "Gemm" and prev.inputs[1] in inits and prev.attrs.get("transB", 0) == 1 \
                and not prev.attrs.get("transA", 0) and prev.attrs.get("alpha", 1.0) == 1.0 \
                and prev.attrs.get("beta", 1.0) == 1.0:
            w = inits[prev.inputs[1]]
        else:
            continue
        if len(consumers.get(prev.inputs[1], [])) != 1:
            continue  # shared weight: folding would change the other user
        gamma, beta, mean, var = (inits[n].astype(np.float64) for n in bn.inputs[1:5])
        scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        bias = inits[prev.inputs[2]].astype(np.float64) if len(prev.inputs) > 2 and prev.inputs[2] else 0.0
        w_name, b_name = prev.inputs[1], f"{prev.name}.folded_bias"
        inits[w_name] = (w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        inits[b_name] = ((bias - mean) * scale + beta).astype(w.dtype)
        replaced[prev.name] = replace(prev, inputs=[prev.inputs[0], w_name, b_name], outputs=list(bn.outputs))
        dropped.add(bn.name)
    if not replaced:
        return graph
    nodes = [replaced.get(n.name, n) for n in graph.nodes if n.name not in dropped]
    return remove_dead_nodes(replace(graph, nodes=nodes, initializers=inits))
