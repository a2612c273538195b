"""Fuzz targets: mutated ONNX and HDF5 files must load cleanly or raise ``BwacalError``, nothing else.

``onnx_target(data)`` writes the bytes as a model file, loads it with ``bwacal.load_model`` and runs a
forward pass on a batch of one; ``hdf5_target(path)`` opens a calibration file with
``bwacal.data.open_dataset`` and reads every batch. Any exception other than ``BwacalError`` is a
bug. The hypothesis strategies below build the mutated files from small valid seeds; the test suite
runs them briefly (``tests/reliability/test_fuzz.py``) and ``benchmarks/fuzz_long.py`` at length.
"""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path

import h5py
import numpy as np
import onnx
from hypothesis import strategies as st

import bwacal
from bwacal.data import open_dataset, write_dataset
from bwacal.errors import BwacalError
from tests.calibration.conftest import tiny_cnn

MODEL_SHAPE = (1, 12, 12)
NUM_CLASSES = 10


# ---------------------------------------------------------------- targets


def onnx_target(data: bytes) -> str:
    """Load ``data`` as an ONNX file and run one image; returns "ok" or "error" (a ``BwacalError``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(data)
        try:
            model = bwacal.load_model(path)
            model.forward(np.ones((1,) + model.input_shape, np.float32))
        except BwacalError:
            return "error"
    return "ok"


def inspect_target(data: bytes) -> str:
    """``bwacal inspect`` on ``data`` as a model file: exit 0 or 2, never an exception; returns the exit code."""
    from typer.testing import CliRunner

    from cli.main import app

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(data)
        result = CliRunner().invoke(app, ["inspect", str(path)])
    if result.exit_code not in (0, 2) or (result.exception and not isinstance(result.exception, SystemExit)):
        raise AssertionError(f"inspect exited {result.exit_code}: {result.exception!r}\n{result.output[-500:]}")
    return str(result.exit_code)


def hdf5_target(path: Path, input_shape=None, num_classes=None) -> str:
    """Open ``path`` as calibration data and read every batch; returns "ok" or "error"."""
    try:
        with open_dataset(path, input_shape=input_shape, num_classes=num_classes) as ds:
            for _ in ds.batches(3):
                pass
            ds.read(np.arange(ds.n)[::-1])
    except BwacalError:
        return "error"
    return "ok"


# ---------------------------------------------------------------- seeds


@functools.lru_cache(maxsize=None)
def onnx_seed() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return Path(tiny_cnn(Path(tmp) / "seed.onnx")).read_bytes()


@functools.lru_cache(maxsize=None)
def hdf5_seeds() -> tuple[bytes, ...]:
    """A uint8 file with scale/mean/std and labels, and a float32 file without labels."""
    rng = np.random.default_rng(0)
    seeds = []
    with tempfile.TemporaryDirectory() as tmp:
        p = write_dataset(Path(tmp) / "u8.h5", rng.integers(0, 256, (7,) + MODEL_SHAPE, dtype=np.uint8),
                          rng.integers(0, NUM_CLASSES, 7), mean=[0.5], std=[0.25])
        seeds.append(p.read_bytes())
        p = write_dataset(Path(tmp) / "f32.h5", rng.normal(0, 1, (5,) + MODEL_SHAPE).astype(np.float32))
        seeds.append(p.read_bytes())
    return tuple(seeds)


# ---------------------------------------------------------------- byte-level mutations


def _flip_bits(data: bytes, flips) -> bytes:
    buf = bytearray(data)
    for pos, bit in flips:
        buf[pos % len(buf)] ^= 1 << bit
    return bytes(buf)


@st.composite
def byte_mutations(draw, seed: bytes) -> bytes:
    """Bit flips, overwritten runs of bytes and truncation of ``seed``."""
    kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "flip+truncate"]))
    data = seed
    if "flip" in kind:
        flips = draw(st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 7)), min_size=1, max_size=8))
        data = _flip_bits(data, flips)
    if kind == "overwrite":
        pos = draw(st.integers(0, len(seed) - 1))
        junk = draw(st.binary(min_size=1, max_size=16))
        data = data[:pos] + junk + data[pos + len(junk):]
    if "truncate" in kind:
        data = data[:draw(st.integers(0, len(data) - 1))]
    return data


# ---------------------------------------------------------------- ONNX structural mutations

_SMALL_INT = st.integers(-3, 40)


@st.composite
def onnx_structural(draw) -> bytes:
    """Parse the seed model, change one to three things (dims, types, nodes, initializers, attributes)."""
    proto = onnx.load_from_string(onnx_seed())
    g = proto.graph
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["init_dims", "init_type", "init_data", "del_node", "del_init", "input_dims",
                                     "input_type", "output_dims", "op_type", "attr", "rename_input",
                                     "opset", "add_output", "external"]))
        if kind == "init_dims" and g.initializer:
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            dims = draw(st.lists(st.one_of(_SMALL_INT, st.sampled_from([10**6, 10**12, 2**62])), max_size=5))
            del t.dims[:]
            t.dims.extend(dims)
        elif kind == "init_type" and g.initializer:
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            t.data_type = draw(st.integers(0, 25))
        elif kind == "init_data" and g.initializer:
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            if draw(st.booleans()):
                t.raw_data = draw(st.binary(max_size=64))
            else:
                t.ClearField("raw_data")
                t.float_data.extend(draw(st.lists(st.floats(allow_nan=True), max_size=8)))
        elif kind == "del_node" and g.node:
            del g.node[draw(st.integers(0, len(g.node) - 1))]
        elif kind == "del_init" and g.initializer:
            del g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        elif kind in ("input_dims", "output_dims"):
            vi = (g.input if kind == "input_dims" else g.output)[0]
            dims = vi.type.tensor_type.shape.dim
            if dims:
                d = dims[draw(st.integers(0, len(dims) - 1))]
                d.dim_value = draw(st.one_of(_SMALL_INT, st.sampled_from([10**5, 10**9])))
            else:
                vi.type.tensor_type.ClearField("shape")
        elif kind == "input_type":
            g.input[0].type.tensor_type.elem_type = draw(st.integers(0, 25))
        elif kind == "op_type" and g.node:
            n = g.node[draw(st.integers(0, len(g.node) - 1))]
            n.op_type = draw(st.sampled_from(["Conv", "Relu", "Gemm", "MatMul", "Add", "Flatten", "Reshape",
                                              "MaxPool", "GlobalAveragePool", "Softmax", "Clip", "Erf",
                                              "Transpose", "Concat", "BatchNormalization", "Mul", "Loop"]))
        elif kind == "attr" and g.node:
            n = g.node[draw(st.integers(0, len(g.node) - 1))]
            if n.attribute:
                a = n.attribute[draw(st.integers(0, len(n.attribute) - 1))]
                if a.type == onnx.AttributeProto.INTS:
                    del a.ints[:]
                    a.ints.extend(draw(st.lists(_SMALL_INT, max_size=6)))
                elif a.type == onnx.AttributeProto.INT:
                    a.i = draw(_SMALL_INT)
                elif a.type == onnx.AttributeProto.FLOAT:
                    a.f = draw(st.floats(allow_nan=True))
                else:
                    a.type = draw(st.integers(0, 14))
            else:
                n.attribute.append(onnx.helper.make_attribute(
                    draw(st.sampled_from(["axis", "pads", "group", "strides", "transB"])),
                    draw(st.one_of(_SMALL_INT, st.lists(_SMALL_INT, min_size=1, max_size=4)))))
        elif kind == "rename_input" and g.node:
            n = g.node[draw(st.integers(0, len(g.node) - 1))]
            if n.input:
                n.input[draw(st.integers(0, len(n.input) - 1))] = draw(st.sampled_from(["", "input", "logits", "nope",
                                                                                       "w1", "r1"]))
        elif kind == "opset":
            proto.opset_import[0].version = draw(st.integers(-1, 40))
        elif kind == "add_output":
            g.output.append(onnx.helper.make_tensor_value_info("r1", onnx.TensorProto.FLOAT, None))
        elif kind == "external" and g.initializer:
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            e = t.external_data.add()
            e.key, e.value = "location", draw(st.sampled_from(["../x", "/etc/passwd", "missing.bin", "", "."]))
    return proto.SerializeToString()


def onnx_cases():
    """Every kind of ONNX mutation."""
    return st.one_of(byte_mutations(onnx_seed()), onnx_structural())


# ---------------------------------------------------------------- HDF5 structural mutations


# a short string attribute; h5py cannot store one holding NUL (it raised in the case generator,
# before the case reached bwacal), so NUL is left out
_ATTR_TEXT = st.text(max_size=3).filter(lambda t: "\x00" not in t)


@st.composite
def hdf5_structural(draw) -> bytes:
    """An HDF5 file built with wrong dtypes, shapes, attributes or labels."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n = draw(st.integers(0, 6))
    shape = draw(st.sampled_from([(n,) + MODEL_SHAPE, (n, 12, 12), (n, 1, 12, 12, 1), (n, 0, 12, 12), (n, 1, 0, 12),
                                  (n, 3, 12, 12), ()]))
    dtype = draw(st.sampled_from(["u1", "f4", "f2", "f8", "i4", "i1", "u2", "?", "c8", "S4", "vlen_str", "vlen_int",
                                  "compound", "enum"]))
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        images = _dataset(f, "images", shape, dtype, rng, draw(st.booleans()))
        if draw(st.booleans()) and images is not None:
            if draw(st.booleans()) and hasattr(images, "attrs"):
                images.attrs["scale"] = draw(st.one_of(st.floats(allow_nan=True), _ATTR_TEXT,
                                                       st.lists(st.floats(-2, 2), max_size=3)))
            if draw(st.booleans()) and hasattr(images, "attrs"):
                images.attrs["mean"] = draw(st.one_of(st.lists(st.floats(allow_nan=True), max_size=4),
                                                      _ATTR_TEXT))
            if draw(st.booleans()) and hasattr(images, "attrs"):
                images.attrs["std"] = np.asarray(draw(st.lists(st.floats(-1, 2), max_size=4)), np.float64)
        if draw(st.booleans()):
            m = draw(st.one_of(st.just(n), st.integers(0, 8)))
            lshape = draw(st.sampled_from([(m,), (m, 1), ()]))
            ldtype = draw(st.sampled_from(["i8", "i4", "u1", "f4", "vlen_int", "S2", "enum"]))
            _dataset(f, "labels", lshape, ldtype, rng, False, low=draw(st.integers(-3, 12)))
        if draw(st.booleans()):
            f.create_group("extra")
        if draw(st.booleans()) and "images" in f and draw(st.booleans()):
            del f["images"]
            if draw(st.booleans()):
                f.create_group("images")
    return buf.getvalue()


def _dataset(f, name, shape, dtype, rng, nonfinite, low=0):
    if dtype == "vlen_str":
        ds = f.create_dataset(name, shape, dtype=h5py.string_dtype())
        return ds
    if dtype == "vlen_int":
        return f.create_dataset(name, shape, dtype=h5py.vlen_dtype(np.int64))
    if dtype == "compound":
        return f.create_dataset(name, shape, dtype=np.dtype([("a", "u1"), ("b", "f4")]))
    if dtype == "enum":
        return f.create_dataset(name, shape, dtype=h5py.enum_dtype({"a": 0, "b": 1}, basetype="i1"))
    dt = np.dtype(dtype)
    if dt.kind == "f":
        data = rng.normal(0, 1, shape).astype(dt)
        if nonfinite and data.size:
            data.flat[rng.integers(0, data.size)] = rng.choice([np.nan, np.inf, -np.inf])
    elif dt.kind == "c":
        data = (rng.normal(0, 1, shape) + 1j).astype(dt)
    elif dt.kind == "S":
        data = np.full(shape, b"ab", dtype=dt)
    elif dt.kind == "b":
        data = rng.integers(0, 2, shape).astype(bool)
    else:
        info = np.iinfo(dt)
        data = rng.integers(max(low, info.min), min(low + 12, info.max), shape, endpoint=True).astype(dt)
    return f.create_dataset(name, data=data)


def hdf5_cases():
    """Byte mutations of the valid seeds, and structurally wrong files."""
    seeds = hdf5_seeds()
    return st.one_of(byte_mutations(seeds[0]), byte_mutations(seeds[1]), hdf5_structural())


@st.composite
def hdf5_with_model(draw):
    """(file bytes, input_shape, num_classes): sometimes checked against the tiny model's interface."""
    data = draw(hdf5_cases())
    if draw(st.booleans()):
        return data, MODEL_SHAPE, NUM_CLASSES
    return data, None, None


def run_hdf5(case) -> str:
    data, input_shape, num_classes = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calib.h5"
        path.write_bytes(data)
        return hdf5_target(path, input_shape, num_classes)
