"""Reading and writing ONNX files. The only module in bwacal that imports ``onnx``.

Model files are untrusted: tensor sizes are checked against the bytes actually present before any
array is built, and external-data locations must stay inside the model's directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bwacal import files
from bwacal.errors import ModelError
from bwacal.graph import Graph, Node, ValueInfo

MIN_OPSET, MAX_OPSET = 7, 28
MAX_TENSOR_ELEMENTS = 1 << 31  # 8 GiB of float32: far beyond any classifier we calibrate
MAX_SUBGRAPH_DEPTH = 16  # If branches within If branches: exporters nest two or three levels


def read_model(source) -> Graph:
    """Parse an ONNX file (path) or an in-memory ``ModelProto`` into a ``Graph``."""
    if isinstance(source, onnx.ModelProto):
        proto, base_dir = source, None
    else:
        path = Path(source)
        if not path.exists():
            raise ModelError(f"{path}: no such file")
        if path.is_dir():
            raise ModelError(f"{path}: is a directory, expected an ONNX file")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises a variety of types on garbage
            raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
        base_dir = path.resolve().parent
        if not proto.graph.node and not proto.graph.output:
            raise ModelError(f"{path}: not an ONNX model (empty graph)")
    label = str(source) if base_dir is not None else "model"
    return _graph_from_proto(proto, base_dir, label)


def read_metadata(path) -> dict:
    """The ``metadata_props`` of an ONNX file as a dict (empty if the file cannot be parsed)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  (the model's own loader reports what is wrong with it)
        return {}
    return {p.key: p.value for p in proto.metadata_props}


def _opset_of(proto, label) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if not MIN_OPSET <= imp.version <= MAX_OPSET:
                raise ModelError(f"{label}: opset {imp.version} is outside the supported range "
                                 f"{MIN_OPSET}-{MAX_OPSET}")
            return int(imp.version)
    raise ModelError(f"{label}: the model imports no default-domain opset")


def _check_size(tensor, label):
    count = 1
    for d in tensor.dims:
        if d < 0:
            raise ModelError(f"{label}: tensor '{tensor.name}' declares a negative dimension")
        count *= d
    if count > MAX_TENSOR_ELEMENTS:
        raise ModelError(f"{label}: tensor '{tensor.name}' declares {count} elements, "
                         f"more than the {MAX_TENSOR_ELEMENTS} allowed")
    return count


def _external_location(tensor, base_dir, label) -> Path:
    info = {e.key: e.value for e in tensor.external_data}
    loc = info.get("location", "")
    if base_dir is None:
        raise ModelError(f"{label}: tensor '{tensor.name}' uses external data but no directory is known")
    if not loc or os.path.isabs(loc) or Path(loc).drive:
        raise ModelError(f"{label}: tensor '{tensor.name}' has an external-data location '{loc}' "
                         "that is not a relative path inside the model's directory")
    target = (base_dir / loc).resolve()
    if base_dir != target and base_dir not in target.parents:
        raise ModelError(f"{label}: tensor '{tensor.name}' external data '{loc}' escapes the model's directory")
    if not target.is_file():
        raise ModelError(f"{label}: tensor '{tensor.name}' external data file '{loc}' is missing")
    return target


def tensor_to_array(tensor, base_dir=None, label="model") -> np.ndarray:
    """Convert a ``TensorProto`` after checking its declared size against the data present."""
    count = _check_size(tensor, label)
    if tensor.data_type not in _ITEMSIZE:
        raise ModelError(f"{label}: tensor '{tensor.name}' has unsupported element type {tensor.data_type}")
    nbytes = count * _ITEMSIZE[tensor.data_type]
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        target = _external_location(tensor, base_dir, label)
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info.get("offset", 0) or 0), info.get("length")
        length = int(length) if length else target.stat().st_size - offset
        if length != nbytes or offset + length > target.stat().st_size:
            raise ModelError(f"{label}: tensor '{tensor.name}' declares {nbytes} bytes but its external "
                             f"data holds {length}")
        with open(target, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        t = onnx.TensorProto()
        t.CopyFrom(tensor)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = raw
        tensor = t
    elif tensor.HasField("raw_data") and len(tensor.raw_data) != nbytes:
        raise ModelError(f"{label}: tensor '{tensor.name}' declares {nbytes} bytes but holds "
                         f"{len(tensor.raw_data)}")
    try:
        return np.array(numpy_helper.to_array(tensor))
    except Exception as exc:
        raise ModelError(f"{label}: tensor '{tensor.name}' cannot be decoded ({exc})") from None


_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def _attr_value(attr, base_dir, label, opset, depth):
    if attr.type == onnx.AttributeProto.TENSOR:
        return tensor_to_array(attr.t, base_dir, label)
    if attr.type == onnx.AttributeProto.GRAPH:
        return _subgraph(attr.g, base_dir, label, opset, depth + 1)
    if attr.type == onnx.AttributeProto.GRAPHS:
        return [_subgraph(g, base_dir, label, opset, depth + 1) for g in attr.graphs]
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
    return value


def _subgraph(g, base_dir, label, opset, depth) -> Graph:
    """A control-flow body (an If branch) as a ``Graph``: its inputs, outputs, initializers and nodes.

    Names it reads but does not define come from the enclosing graph, as in ONNX.
    """
    if depth > MAX_SUBGRAPH_DEPTH:
        raise ModelError(f"{label}: subgraphs nest more than {MAX_SUBGRAPH_DEPTH} levels deep")
    return _graph_body(g, base_dir, label, opset, depth)


def _value_info(vi) -> ValueInfo:
    tt = vi.type.tensor_type
    dtype = None
    if tt.elem_type:
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = None
    shape = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    return ValueInfo(vi.name, dtype, shape)


def _graph_from_proto(proto, base_dir, label) -> Graph:
    graph = _graph_body(proto.graph, base_dir, label, _opset_of(proto, label), 0)
    graph.metadata = {p.key: p.value for p in proto.metadata_props}
    return graph


def _graph_body(g, base_dir, label, opset, depth) -> Graph:
    inits = {}
    for t in g.initializer:
        inits[t.name] = tensor_to_array(t, base_dir, label)
    nodes = []
    for i, n in enumerate(g.node):
        attrs = {a.name: _attr_value(a, base_dir, label, opset, depth) for a in n.attribute}
        op_type = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        nodes.append(Node(op_type, n.name or f"{n.op_type}_{i}", list(n.input), list(n.output), attrs))
    inputs = [_value_info(v) for v in g.input if v.name not in inits]
    outputs = [_value_info(v) for v in g.output]
    return Graph(nodes, inputs, outputs, inits, opset)


def graph_to_proto(graph: Graph, producer="bwacal") -> onnx.ModelProto:
    """Build a ``ModelProto`` from a ``Graph`` (used to write calibrated models)."""
    model = helper.make_model(_graph_proto(graph, "bwacal"), opset_imports=[helper.make_opsetid("", graph.opset)],
                              producer_name=producer)
    model.ir_version = min(model.ir_version, 8 if graph.opset <= 17 else 9)
    for k, v in graph.metadata.items():
        model.metadata_props.add(key=k, value=str(v))
    return model


def _graph_proto(graph: Graph, name: str) -> onnx.GraphProto:
    def attr(v, key):
        if isinstance(v, np.ndarray):
            return numpy_helper.from_array(v)
        if isinstance(v, Graph):
            return _graph_proto(v, key)
        if isinstance(v, list) and v and all(isinstance(g, Graph) for g in v):
            return [_graph_proto(g, key) for g in v]
        return v

    nodes = []
    for n in graph.nodes:
        attrs = {k: attr(v, k) for k, v in n.attrs.items()}
        op_type, domain = n.op_type, ""
        if "::" in op_type:
            domain, op_type = op_type.split("::", 1)
        nodes.append(helper.make_node(op_type, n.inputs, n.outputs, name=n.name, domain=domain, **attrs))

    def vi(v: ValueInfo):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(v.dtype or np.float32))
        # unknown dims get distinct names: one shared name would tell a runtime they are equal
        shape = None if v.shape is None else [d if d is not None else ("N" if i == 0 else f"{v.name}_d{i}")
                                              for i, d in enumerate(v.shape)]
        return helper.make_tensor_value_info(v.name, elem, shape)

    inits = [numpy_helper.from_array(np.asarray(a), k) for k, a in graph.initializers.items()]
    return helper.make_graph(nodes, name, [vi(v) for v in graph.inputs], [vi(v) for v in graph.outputs], inits)


def write_model(graph: Graph, path, check=True) -> None:
    """Write ``graph`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    proto = graph_to_proto(graph)
    if check:
        onnx.checker.check_model(proto)
    files.write_bytes_atomically(Path(path), proto.SerializeToString())
