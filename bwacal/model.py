"""A loaded classifier: one float image input (NCHW, or NHWC as tf2onnx writes), one logits output."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from bwacal import passes
from bwacal.engine import Engine, Tape
from bwacal.errors import BwacalError, ModelError, UnsupportedOpError
from bwacal.graph import Graph, ValueInfo, reads, toposort
from bwacal.onnx_io import MAX_SUBGRAPH_DEPTH, read_model

MAX_INPUT_ELEMENTS = 1 << 24  # C*H*W of one image: 16M values, e.g. 3x2364x2364
# fold, inline constant Ifs, fold again: each round brings up the next level of nested Ifs
MAX_FOLD_ROUNDS = MAX_SUBGRAPH_DEPTH + 1
LAYOUTS = ("nchw", "nhwc")
# ops a channels-last input may pass through (preprocessing) before its Transpose to NCHW
_PREPROCESSING = {"Cast", "Identity", "Add", "Sub", "Mul", "Div", "Clip"}


class Model:
    """An image classifier on bwacal's engine.

    ``forward(x)`` gives (batch, classes) logits for a float32 batch of shape ``(batch,) +
    input_shape`` (``input_shape`` is (C, H, W), or (H, W, C) when ``layout`` is "nhwc");
    ``forward(x, record=True, wrt=...)`` also returns a ``Tape`` from which ``backward(tape, dlogits,
    wrt)`` computes gradients of the input (its name is ``input_name``) and of any initializers named
    in ``wrt``. A graph whose output is (batch, K, 1, 1) or (batch, 1, K) keeps it; the Model squeezes
    it to (batch, K).
    """

    def __init__(self, graph: Graph, source: str = "model", layout: str | None = None):
        self.source = source
        self.graph = graph
        self.layout = layout or detect_layout(graph)
        self.engine = Engine(graph)
        self.input_name = graph.inputs[0].name
        self.output_name = graph.outputs[0].name
        self.input_shape = tuple(graph.inputs[0].shape[1:])
        values, _ = self.engine.run({self.input_name: np.zeros((2,) + self.input_shape, dtype=np.float32)})
        out = np.shape(values[self.output_name])
        heads = len(out) == 2 or (len(out) == 4 and out[2:] == (1, 1)) or (len(out) == 3 and out[1] == 1)
        if not heads or out[0] != 2:
            raise ModelError(f"{source}: output '{self.output_name}' has shape {out} for a batch of 2; expected "
                             "(batch, classes) logits, or (batch, classes, 1, 1) or (batch, 1, classes)")
        self.output_shape = tuple(out[1:])  # per image, as the graph computes it
        self.num_classes = int(np.prod(out[1:]))

    def forward(self, x: np.ndarray, params: dict | None = None, record: bool = False, wrt=()):
        """Logits for the batch ``x``; with ``record`` returns ``(logits, tape)``."""
        values, tape = self.engine.run({self.input_name: x}, params=params, record=record, wrt=wrt)
        logits = self.logits(values)
        return (logits, tape) if record else logits

    def backward(self, tape: Tape, dlogits: np.ndarray, wrt) -> dict:
        """Gradients for the names in ``wrt`` given dL/dlogits from a recorded forward."""
        return self.engine.backward(tape, self.output_seed(dlogits), wrt=wrt)

    def logits(self, values: dict) -> np.ndarray:
        """The (batch, classes) logits among the values an engine run returned."""
        out = values[self.output_name]
        return out if out.ndim == 2 else out.reshape(len(out), self.num_classes)

    def output_seed(self, dlogits: np.ndarray) -> dict:
        """dL/dlogits as ``Engine.backward`` takes it: in the graph output's own shape."""
        return {self.output_name: dlogits.reshape((len(dlogits),) + self.output_shape)}

    def initializer(self, name: str) -> np.ndarray:
        return self.graph.initializers[name]


def detect_layout(graph: Graph) -> str:
    """"nhwc" when every way the input leaves its preprocessing is a Transpose with perm (0, 3, 1, 2).

    That is how tf2onnx writes a channels-last Keras model: input (N, H, W, C), optional Cast or
    element-wise scaling (Mul, Add, Sub, Div, Clip), then a Transpose to NCHW. Shape nodes reading the
    input are ignored. Anything else is "nchw".
    """
    consumers = graph.consumers()
    frontier, seen, todo = [], set(), [graph.inputs[0].name]
    while todo:
        name = todo.pop()
        for node in consumers.get(name, []):
            if node.name in seen or node.op_type in ("Shape", "Size"):
                continue
            seen.add(node.name)
            if node.op_type in _PREPROCESSING:
                todo.extend(o for o in node.outputs if o)
            else:
                frontier.append(node)
    nhwc = frontier and all(n.op_type == "Transpose" and list(n.attrs.get("perm") or []) == [0, 3, 1, 2]
                            for n in frontier)
    return "nhwc" if nhwc else "nchw"


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``"3x224x224"`` -> ``(3, 224, 224)``: an image's channels, height and width."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise BwacalError(f"--input-shape must be CxHxW with three positive integers (e.g. 3x224x224), got {text!r}")
    return dims


def check_input_shape(shape) -> tuple[int, int, int] | None:
    """``shape`` as (C, H, W) of positive ints, or None; accepts a ``"CxHxW"`` string."""
    if shape is None:
        return None
    if isinstance(shape, str):
        return parse_input_shape(shape)
    dims = tuple(shape)
    if len(dims) != 3 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                                 for d in dims):
        raise BwacalError(f"input_shape must be (C, H, W) with three positive integers, got {shape!r}")
    return tuple(int(d) for d in dims)


def image_dims(inp: ValueInfo, layout: str, input_shape, data_shape, source: str) -> tuple:
    """The input's per-image dims in the model's layout, dynamic ones filled from ``input_shape`` (C, H, W)
    or else from ``data_shape`` (a data file's per-image shape, stored in the model's layout)."""
    declared = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape[1:])
    shown = "(N, " + ", ".join("?" if d is None else str(d) for d in declared) + ")"
    given, what = None, None
    if input_shape is not None:
        c, h, w = check_input_shape(input_shape)
        given, what = ((c, h, w) if layout == "nchw" else (h, w, c)), "input_shape " + "x".join(map(str, (c, h, w)))
    elif data_shape is not None and None in declared:
        given, what = tuple(int(d) for d in data_shape), "the data file's images " + "x".join(map(str, data_shape))
    if given is None:
        if None in declared:
            names = "C, H, W" if layout == "nchw" else "H, W, C"
            raise ModelError(f"{source}: input '{inp.name}' has shape {shown} ({layout.upper()}: {names}) with "
                             "dynamic dims; give the image size as input_shape=(C, H, W) (--input-shape CxHxW)")
        return declared
    if len(given) != 3 or any(d is not None and d != g for d, g in zip(declared, given)):
        raise ModelError(f"{source}: {what} does not fit input '{inp.name}' of shape {shown} ({layout.upper()})")
    return given


def prepare_graph(graph: Graph, source: str, fold_batchnorm: bool = True, input_shape=None,
                  data_shape=None) -> Graph:
    """Validate the classifier interface, fix the image dims and run the load-time passes.

    Every node computed from constants and from tensor shapes alone is evaluated once, an ``If`` with
    a constant condition is replaced by its taken branch, and only then must the remaining ops be
    ones the engine implements. The batch dim stays dynamic.
    """
    if len(graph.inputs) != 1:
        names = ", ".join(v.name for v in graph.inputs)
        raise ModelError(f"{source}: expected one image input, found {len(graph.inputs)} ({names})")
    if len(graph.outputs) != 1:
        raise ModelError(f"{source}: expected one logits output, found {len(graph.outputs)}")
    inp = graph.inputs[0]
    if inp.shape is None or len(inp.shape) != 4:
        raise ModelError(f"{source}: input '{inp.name}' has shape {inp.shape}; expected (batch, C, H, W) "
                         "or (batch, H, W, C)")
    if inp.dtype is not None and inp.dtype != np.float32:
        raise ModelError(f"{source}: input '{inp.name}' is {inp.dtype}; expected float32")
    dims = image_dims(inp, detect_layout(graph), input_shape, data_shape, source)
    if int(np.prod(dims, dtype=np.float64)) > MAX_INPUT_ELEMENTS:
        raise ModelError(f"{source}: input '{inp.name}' has shape {(None,) + dims}; more than {MAX_INPUT_ELEMENTS} "
                         "values per image is not an image classifier bwacal can run")
    inp = replace(inp, shape=(None,) + dims)
    graph = replace(graph, inputs=[inp])
    _check_wiring(graph, source)
    try:
        nodes = toposort(graph.nodes, set(graph.initializers) | {inp.name})
    except ValueError:
        raise ModelError(f"{source}: the graph has a cycle") from None
    graph = fold_static(replace(graph, nodes=nodes))
    try:
        Engine(graph)  # reports every op left that the engine does not implement, before anything runs
    except UnsupportedOpError as exc:
        raise UnsupportedOpError([(op, name, _IF_REASON if op == "If" else why) for op, name, why in exc.problems],
                                 exc.opset, exc.supported) from None
    if fold_batchnorm:
        graph = passes.fold_batchnorm(graph)
    return passes.remove_dead_nodes(graph)


_IF_REASON = ("its condition is computed from the input at run time; only an If whose condition is a "
              "constant (replaced by its branch at load) is supported")


def fold_static(graph: Graph) -> Graph:
    """Constant folding, shape-subgraph folding and If inlining, repeated until nothing changes."""
    for _ in range(MAX_FOLD_ROUNDS):
        graph = passes.remove_identities(passes.fold_constants(graph))
        graph = passes.fold_shape_subgraphs(graph, _probe(graph))
        inlined = passes.inline_constant_ifs(graph)
        if inlined is graph:
            break
        graph = inlined
    return graph


def _probe(graph: Graph):
    """``evaluate(batch, names)`` for ``passes.fold_shape_subgraphs``: the named values on a zero batch."""
    inp = graph.inputs[0]

    def evaluate(batch, names):
        x = np.zeros((batch,) + tuple(inp.shape[1:]), dtype=np.float32)
        return passes.evaluate_values(graph, set(names), {inp.name: x})

    return evaluate


def _check_wiring(graph: Graph, source: str) -> None:
    """Every value a node reads, and the output, must come from the input, an initializer or a node."""
    available = set(graph.initializers) | {v.name for v in graph.inputs}
    produced = {out for node in graph.nodes for out in node.outputs if out}
    missing = [(node.name, name) for node in graph.nodes for name in reads(node)
               if name not in available and name not in produced]
    if missing:
        listed = "; ".join(f"node '{node}' reads '{name}'" for node, name in missing[:5])
        raise ModelError(f"{source}: {len(missing)} value(s) are read but never produced ({listed})")
    out = graph.outputs[0].name
    if out not in produced and out not in available:
        raise ModelError(f"{source}: output '{out}' is produced by no node")


def load_model(path, fold_batchnorm: bool = True, input_shape=None, data_shape=None) -> Model:
    """Load an ONNX classifier, fold what it computes from constants and shapes and (by default) its
    BatchNormalization.

    ``input_shape`` (C, H, W) fixes the image dims the model leaves dynamic (it must agree with the
    fixed ones); without it they come from ``data_shape``, the per-image shape of the calibration or
    evaluation file (stored in the model's own layout). Model files are untrusted: every failure to
    read, check or run the graph on a probe batch is a ``ModelError`` naming the file.
    """
    source = "model" if hasattr(path, "graph") else str(path)
    try:
        graph = read_model(Path(path) if not hasattr(path, "graph") else path)
        return Model(prepare_graph(graph, source, fold_batchnorm, input_shape, data_shape), source)
    except ModelError as exc:
        if not str(exc).startswith(source):
            exc.args = (f"{source}: {exc}",)
        raise
    except BwacalError:
        raise
    except MemoryError as exc:
        raise ModelError(f"{source}: running the graph on a probe batch of 2 needs more memory than is "
                         f"available ({exc}); its shapes or attributes are likely wrong") from exc
    except Exception as exc:  # an op meeting inputs or attributes it cannot handle: a malformed graph
        raise ModelError(f"{source}: the graph cannot be run ({type(exc).__name__}: {exc}); "
                         "--verbose shows where") from exc
