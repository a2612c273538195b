"""Graph passes run at load: constant folding, shape-subgraph folding, If inlining, BatchNorm folding, cleanup.

Each pass takes a ``Graph`` and returns a new one; initializer arrays are shared, never mutated.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bwacal.engine import Engine
from bwacal.errors import UnsupportedOpError
from bwacal.graph import Graph, Node, ValueInfo, reads
from bwacal.ops import Unsupported, make_op

# ops whose output depends only on their input's shape, never on its values
_SHAPE_SOURCES = {"Shape", "Size"}


def runnable(graph: Graph, nodes: list[Node], exclude=frozenset()) -> list[Node]:
    """The nodes of ``nodes`` the engine can instantiate (and not named in ``exclude``) whose inputs do
    not come from one it cannot."""
    blocked, keep = set(), []
    for node in nodes:
        if node.name in exclude or any(n in blocked for n in reads(node)):
            blocked.update(node.outputs)
            continue
        try:
            make_op(node.op_type, node.attrs, graph.opset, len([o for o in node.outputs if o]))
        except (Unsupported, TypeError):
            blocked.update(node.outputs)
            continue
        keep.append(node)
    return keep


def _static_values(graph: Graph) -> tuple[set, set]:
    """(constant, shape-derived) value names: computed from initializers alone, or also from tensor shapes.

    Neither depends on the input's values, so both can be computed once at load.
    """
    const, shaped = set(graph.initializers), set()
    for node in graph.nodes:
        ins = reads(node)
        if node.op_type in _SHAPE_SOURCES:
            shaped.update(node.outputs)
        elif all(n in const for n in ins):
            const.update(node.outputs)
        elif all(n in const or n in shaped for n in ins):
            shaped.update(node.outputs)
    return const - set(graph.initializers), shaped


def _needed_by_others(graph: Graph, names: set) -> set:
    """Values of ``names`` read by a node outside ``names``' producers, or that are graph outputs."""
    producers = {out for node in graph.nodes if set(node.outputs) & names for out in node.outputs}
    needed = {v.name for v in graph.outputs} & names
    for node in graph.nodes:
        if not set(node.outputs) <= producers:
            needed.update(n for n in reads(node) if n in names)
    return needed


def evaluate_values(graph: Graph, wanted: set, feeds: dict) -> dict:
    """Run the ancestors of ``wanted`` on the engine; returns the wanted values it could compute."""
    needed, order = set(wanted), []
    for node in reversed(graph.nodes):
        if set(node.outputs) & needed:
            order.append(node)
            needed.update(reads(node))
    excluded = set()
    while True:
        nodes = runnable(graph, order[::-1], excluded)
        produced = {out for node in nodes for out in node.outputs}
        targets = sorted(n for n in wanted if n in produced)
        if not targets:
            return {}
        sub = replace(graph, nodes=nodes, outputs=[ValueInfo(n, None, None) for n in targets])
        try:
            engine = Engine(sub)
        except UnsupportedOpError as exc:  # an op refusing its input shapes (``check``): run without it
            excluded.update(name for _, name, _ in exc.problems)
            continue
        values, _ = engine.run(feeds, outputs=targets)
        return values


def fold_constants(graph: Graph) -> Graph:
    """Evaluate, once and on the engine's own ops, every node whose inputs are all constants.

    Whatever the op: ConstantOfShape weights, a Transpose of a weight, Constant chains. Nodes the
    engine has no op for stay in the graph (and are reported as unsupported if they remain).
    """
    const, _ = _static_values(graph)
    wanted = _needed_by_others(graph, const) - {v.name for v in graph.outputs}
    if not wanted:
        return graph
    values = evaluate_values(graph, wanted, {})
    return _replace_by_initializers(graph, {k: np.asarray(v) for k, v in values.items()})


def _replace_by_initializers(graph: Graph, values: dict) -> Graph:
    """Turn ``values`` into initializers and drop the nodes no longer needed."""
    if not values:
        return graph
    values = dict(values)
    read = {v.name for v in graph.outputs} | {n for node in graph.nodes for n in reads(node)}
    nodes = []
    for node in graph.nodes:
        outs = [o for o in node.outputs if o]
        if outs and all(o in values or o not in read for o in outs):
            continue
        nodes.append(node)
        for o in outs:  # a node with one output left to compute keeps all of them
            values.pop(o, None)
    inits = dict(graph.initializers)
    inits.update(values)
    return remove_dead_nodes(replace(graph, nodes=nodes, initializers=inits))


def fold_shape_subgraphs(graph: Graph, evaluate) -> Graph:
    """Replace values computed from tensor shapes (what ``x.view(x.size(0), -1)`` exports) by constants,
    keeping the batch dim dynamic.

    ``evaluate(batch, names)`` runs the graph on a batch of the given size and returns those of the
    named values it can compute. A value equal at batch 1 and 2 becomes a constant. A value that
    changes with the batch in one entry and is read only as a Reshape target becomes a constant with
    that entry 0 (copy the input's dim) where the data input's dim there equals it at both batches,
    else -1 where the target has no other -1; any other batch-dependent value stays computed at run
    time. (Attention reshapes ``(N*heads, T, d)`` to ``(N, heads, T, d)``: position 0 is N, not the
    input's dim 0, so it gets -1.)
    """
    _, shaped = _static_values(graph)
    shaped -= {v.name for v in graph.outputs}
    if not shaped:
        return graph
    names = sorted(shaped)
    consumers = {}
    for node in graph.nodes:
        for n in reads(node):
            consumers.setdefault(n, []).append(node)
    reshaped = sorted({c.inputs[0] for n in names for c in consumers.get(n, [])
                       if c.op_type == "Reshape" and c.inputs[1] == n} - shaped)
    v1, v2 = evaluate(1, names + reshaped), evaluate(2, names + reshaped)
    folded = {}
    for name in names:
        if name not in v1 or name not in v2:
            continue
        a, b = np.asarray(v1[name]), np.asarray(v2[name])
        if a.shape == b.shape and np.array_equal(a, b):
            folded[name] = a
            continue
        users = consumers.get(name, [])
        only_reshape = users and all(c.op_type == "Reshape" and c.inputs[1] == name and c.inputs[0] != name
                                     and not c.attrs.get("allowzero", 0) for c in users)
        if not only_reshape or a.ndim != 1 or a.shape != b.shape:
            continue
        diff = np.flatnonzero(a != b)
        if len(diff) != 1:
            continue
        i = int(diff[0])

        def copies_input_dim(v, entry):
            return all(c.inputs[0] in v and np.ndim(v[c.inputs[0]]) > i and np.shape(v[c.inputs[0]])[i] == entry
                       for c in users)

        fixed = a.copy()
        if copies_input_dim(v1, a[i]) and copies_input_dim(v2, b[i]):
            fixed[i] = 0
        elif -1 not in a:
            fixed[i] = -1
        else:
            continue
        folded[name] = fixed
    return _replace_by_initializers(graph, folded)


def inline_constant_ifs(graph: Graph) -> Graph:
    """Replace every ``If`` whose condition is a constant by the nodes of the branch it takes.

    tf2onnx wraps batch normalization in such nodes. Branch nodes and values get names prefixed with
    the If's name (made unique), names from the enclosing graph are kept, and the branch's outputs
    are renamed to the If's outputs. Returns ``graph`` itself when there is nothing to inline.
    """
    taken = {}
    for node in graph.nodes:
        if node.op_type == "If" and node.inputs and node.inputs[0] in graph.initializers:
            cond = np.asarray(graph.initializers[node.inputs[0]])
            if cond.size != 1:
                continue
            branch = node.attrs.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
            if isinstance(branch, Graph) and len(branch.outputs) == len(node.outputs):
                taken[node.name] = branch
    if not taken:
        return graph
    used_values = {name for node in graph.nodes for name in node.outputs + node.inputs} | set(graph.initializers) \
        | {v.name for v in graph.inputs}
    used_nodes = {n.name for n in graph.nodes}
    inits = dict(graph.initializers)
    nodes = []
    for node in graph.nodes:
        branch = taken.get(node.name)
        if branch is None:
            nodes.append(node)
            continue
        rename = {}

        def fresh(name, used=used_values):
            candidate, k = f"{node.name}/{name}", 1
            while candidate in used:
                candidate, k = f"{node.name}/{name}.{k}", k + 1
            used.add(candidate)
            return candidate

        for name, value in branch.initializers.items():
            rename[name] = fresh(name)
            inits[rename[name]] = value
        produced = {o for n in branch.nodes for o in n.outputs if o}
        for k, out in enumerate(branch.outputs):
            if out.name in produced and out.name not in rename and node.outputs[k]:
                rename[out.name] = node.outputs[k]
        for name in produced:
            if name not in rename:
                rename[name] = fresh(name)
        for n in branch.nodes:
            nodes.append(Node(n.op_type, fresh(n.name, used_nodes), [rename.get(i, i) for i in n.inputs],
                              [rename.get(o, o) for o in n.outputs], _rename_attrs(n.attrs, rename)))
        for k, out in enumerate(branch.outputs):
            # an output read from outside the branch, or a branch constant, or one value given twice
            if node.outputs[k] and rename.get(out.name, out.name) != node.outputs[k]:
                nodes.append(Node("Identity", fresh(f"output{k}", used_nodes), [rename.get(out.name, out.name)],
                                  [node.outputs[k]]))
    return replace(graph, nodes=nodes, initializers=inits)


def _rename_attrs(attrs: dict, rename: dict) -> dict:
    """Apply ``rename`` to the enclosing-graph names a nested subgraph reads."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, Graph):
            value = _rename_outer(value, rename)
        elif isinstance(value, list) and value and all(isinstance(g, Graph) for g in value):
            value = [_rename_outer(g, rename) for g in value]
        out[key] = value
    return out


def _rename_outer(sub: Graph, rename: dict) -> Graph:
    defined = set(sub.initializers) | {v.name for v in sub.inputs} | {o for n in sub.nodes for o in n.outputs}
    local = {k: v for k, v in rename.items() if k not in defined}
    nodes = [replace(n, inputs=[local.get(i, i) for i in n.inputs], attrs=_rename_attrs(n.attrs, local))
             for n in sub.nodes]
    outputs = [v if v.name in defined else replace(v, name=local.get(v.name, v.name)) for v in sub.outputs]
    return replace(sub, nodes=nodes, outputs=outputs)


def remove_dead_nodes(graph: Graph) -> Graph:
    """Drop nodes none of whose outputs reach a graph output, and initializers nobody reads."""
    needed = {v.name for v in graph.outputs}
    keep = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.outputs):
            keep.append(node)
            needed.update(reads(node))
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
