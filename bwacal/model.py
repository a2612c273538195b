"""A loaded classifier: one NCHW float input, one (batch, classes) logits output."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from bwacal import passes
from bwacal.engine import Engine, Tape
from bwacal.errors import ModelError
from bwacal.graph import Graph, toposort
from bwacal.onnx_io import read_model

MAX_INPUT_ELEMENTS = 1 << 24  # C*H*W of one image: 16M values, e.g. 3x2364x2364


class Model:
    """An image classifier on bwacal's engine.

    ``forward(x)`` gives logits for an NCHW float32 batch; ``forward(x, record=True, wrt=...)``
    also returns a ``Tape`` from which ``backward(tape, dlogits, wrt)`` computes gradients of the
    input (its name is ``input_name``) and of any initializers named in ``wrt``.
    """

    def __init__(self, graph: Graph, source: str = "model"):
        self.source = source
        self.graph = graph
        self.engine = Engine(graph)
        self.input_name = graph.inputs[0].name
        self.output_name = graph.outputs[0].name
        self.input_shape = tuple(graph.inputs[0].shape[1:])
        logits = self.forward(np.zeros((2,) + self.input_shape, dtype=np.float32))
        if logits.ndim != 2 or logits.shape[0] != 2:
            raise ModelError(f"{source}: output '{self.output_name}' has shape {logits.shape} for a batch "
                             "of 2; expected (batch, classes) logits")
        self.num_classes = int(logits.shape[1])

    def forward(self, x: np.ndarray, params: dict | None = None, record: bool = False, wrt=()):
        """Logits for the batch ``x``; with ``record`` returns ``(logits, tape)``."""
        values, tape = self.engine.run({self.input_name: x}, params=params, record=record, wrt=wrt)
        logits = values[self.output_name]
        return (logits, tape) if record else logits

    def backward(self, tape: Tape, dlogits: np.ndarray, wrt) -> dict:
        """Gradients for the names in ``wrt`` given dL/dlogits from a recorded forward."""
        return self.engine.backward(tape, {self.output_name: dlogits}, wrt=wrt)

    def initializer(self, name: str) -> np.ndarray:
        return self.graph.initializers[name]


def prepare_graph(graph: Graph, source: str, fold_batchnorm: bool = True) -> Graph:
    """Validate the classifier interface and run the load-time passes."""
    if len(graph.inputs) != 1:
        names = ", ".join(v.name for v in graph.inputs)
        raise ModelError(f"{source}: expected one image input, found {len(graph.inputs)} ({names})")
    if len(graph.outputs) != 1:
        raise ModelError(f"{source}: expected one logits output, found {len(graph.outputs)}")
    inp = graph.inputs[0]
    if inp.shape is None or len(inp.shape) != 4 or any(d is None or d <= 0 for d in inp.shape[1:]):
        raise ModelError(f"{source}: input '{inp.name}' has shape {inp.shape}; expected (batch, C, H, W) "
                         "with fixed C, H, W")
    if int(np.prod(inp.shape[1:], dtype=np.float64)) > MAX_INPUT_ELEMENTS:
        raise ModelError(f"{source}: input '{inp.name}' has shape {inp.shape}; more than {MAX_INPUT_ELEMENTS} "
                         "values per image is not an image classifier bwacal can run")
    if inp.dtype is not None and inp.dtype != np.float32:
        raise ModelError(f"{source}: input '{inp.name}' is {inp.dtype}; expected float32")
    _check_wiring(graph, source)
    try:
        nodes = toposort(graph.nodes, set(graph.initializers) | {inp.name})
    except ValueError:
        raise ModelError(f"{source}: the graph has a cycle") from None
    graph = replace(graph, nodes=nodes)
    graph = passes.constants_to_initializers(graph)
    graph = passes.remove_identities(graph)
    engine = Engine(graph)  # reports every unsupported op before anything runs

    def evaluate(batch, names):
        x = np.zeros((batch,) + tuple(inp.shape[1:]), dtype=np.float32)
        values, _ = engine.run({inp.name: x}, outputs=names)
        return values

    graph = passes.fold_shape_subgraphs(graph, evaluate)
    if fold_batchnorm:
        graph = passes.fold_batchnorm(graph)
    return passes.remove_dead_nodes(graph)


def _check_wiring(graph: Graph, source: str) -> None:
    """Every value a node reads, and the output, must come from the input, an initializer or a node."""
    available = set(graph.initializers) | {v.name for v in graph.inputs}
    produced = {out for node in graph.nodes for out in node.outputs if out}
    missing = [(node.name, name) for node in graph.nodes for name in node.inputs
               if name and name not in available and name not in produced]
    if missing:
        listed = "; ".join(f"node '{node}' reads '{name}'" for node, name in missing[:5])
        raise ModelError(f"{source}: {len(missing)} value(s) are read but never produced ({listed})")
    out = graph.outputs[0].name
    if out not in produced and out not in available:
        raise ModelError(f"{source}: output '{out}' is produced by no node")


def load_model(path, fold_batchnorm: bool = True) -> Model:
    """Load an ONNX classifier, fold its shape subgraphs and (by default) its BatchNormalization.

    Model files are untrusted: every failure to read, check or run the graph on a probe batch is a
    ``ModelError`` naming the file.
    """
    source = "model" if hasattr(path, "graph") else str(path)
    try:
        graph = read_model(Path(path) if not hasattr(path, "graph") else path)
        return Model(prepare_graph(graph, source, fold_batchnorm), source)
    except ModelError as exc:
        if not str(exc).startswith(source):
            exc.args = (f"{source}: {exc}",)
        raise
    except MemoryError as exc:
        raise ModelError(f"{source}: running the graph on a probe batch of 2 needs more memory than is "
                         f"available ({exc}); its shapes or attributes are likely wrong") from exc
    except Exception as exc:  # an op meeting inputs or attributes it cannot handle: a malformed graph
        raise ModelError(f"{source}: the graph cannot be run ({type(exc).__name__}: {exc}); "
                         "--verbose shows where") from exc
