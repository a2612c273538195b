"""The graph IR: plain dataclasses holding NumPy arrays. No onnx import here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ONNX TensorProto element types (stable numbers of the ONNX spec) to NumPy dtypes.
ONNX_DTYPES = {
    1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8), 4: np.dtype(np.uint16),
    5: np.dtype(np.int16), 6: np.dtype(np.int32), 7: np.dtype(np.int64), 9: np.dtype(np.bool_),
    10: np.dtype(np.float16), 11: np.dtype(np.float64), 12: np.dtype(np.uint32), 13: np.dtype(np.uint64),
}


@dataclass
class Node:
    """One operation: ``op_type`` applied to named ``inputs`` producing named ``outputs``.

    An empty string in ``inputs`` marks an omitted optional input, as in ONNX.
    """

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)


@dataclass
class ValueInfo:
    """A graph input or output: name, element type (NumPy dtype) and shape (None = unknown dim)."""

    name: str
    dtype: np.dtype | None
    shape: tuple | None


@dataclass
class Graph:
    """A topologically sorted list of nodes plus constant tensors (initializers).

    ``opset`` is the default-domain opset the model was written for.
    """

    nodes: list[Node]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    initializers: dict[str, np.ndarray]
    opset: int
    metadata: dict[str, str] = field(default_factory=dict)

    def consumers(self) -> dict[str, list[Node]]:
        """Map each value name to the nodes that read it."""
        users: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    users.setdefault(name, []).append(node)
        return users

    def producers(self) -> dict[str, Node]:
        """Map each value name to the node that writes it."""
        return {out: node for node in self.nodes for out in node.outputs}


def reads(node: Node) -> list[str]:
    """Every value ``node`` reads: its inputs and the enclosing-graph names its subgraphs (If branches) use."""
    names = [n for n in node.inputs if n]
    for value in node.attrs.values():
        for sub in (value if isinstance(value, list) else [value]):
            if isinstance(sub, Graph):
                names += sorted(outer_names(sub))
    return names


def outer_names(graph: Graph) -> set:
    """Names a subgraph reads but does not define: they come from the graph that encloses it."""
    defined = set(graph.initializers) | {v.name for v in graph.inputs}
    outer = set()
    for node in graph.nodes:
        outer.update(n for n in reads(node) if n not in defined)
        defined.update(node.outputs)
    outer.update(v.name for v in graph.outputs if v.name not in defined)
    return outer


def toposort(nodes: list[Node], available: set[str]) -> list[Node]:
    """Order ``nodes`` so every value is produced before it is read, by an input or by a subgraph
    (iterative Kahn's algorithm)."""
    produced_by = {out: i for i, n in enumerate(nodes) for out in n.outputs}
    deps = []
    for n in nodes:
        deps.append({produced_by[x] for x in reads(n) if x not in available and x in produced_by})
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    remaining = [len(d) for d in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    order = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for j in users.get(i, []):
            remaining[j] -= 1
            if remaining[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    return [nodes[i] for i in order]
