"""Model and data files are untrusted: no reads outside the model's folder, no huge allocations, no unpickling."""

import re
import resource
import time
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bwacal
from bwacal.data import open_dataset
from bwacal.errors import DataError, ModelError
from tests.reliability.conftest import SHAPE, invoke

ROOT = Path(__file__).resolve().parents[2]


def _external(proto, name, location, length=None):
    """Mark initializer ``name`` as stored externally at ``location``."""
    t = next(t for t in proto.graph.initializer if t.name == name)
    nbytes = len(t.raw_data) if t.HasField("raw_data") else 4 * len(t.float_data)
    t.ClearField("raw_data")
    del t.float_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length or nbytes))):
        e = t.external_data.add()
        e.key, e.value = key, value
    return proto


@pytest.fixture
def layout(tmp_path):
    """A model folder and, beside it, a secret file outside the folder."""
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4096, dtype=np.float32).tobytes())
    return model_dir, secret


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked_dir"])
def test_external_data_escaping_the_model_directory_is_refused(tiny_proto, layout, valid, how):
    model_dir, secret = layout
    if how == "dotdot":
        location = "../secret.bin"
    elif how == "absolute":
        location = str(secret)
    elif how == "symlink":
        (model_dir / "weights.bin").symlink_to(secret)
        location = "weights.bin"
    else:
        (model_dir / "sub").symlink_to(secret.parent)
        location = "sub/secret.bin"
    path = model_dir / "m.onnx"
    onnx.save(_external(tiny_proto, "w1", location), str(path))
    with pytest.raises(ModelError, match="external"):
        bwacal.load_model(path)
    out = model_dir / "q.onnx"
    result = invoke("calibrate", path, "--calib", valid[1], "-o", out, "-q")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: {path}" in result.output and "w1" in result.output
    assert not out.exists()


def test_external_data_inside_the_model_directory_loads(tiny_proto, tmp_path, valid):
    model_dir = tmp_path / "ext"
    model_dir.mkdir()
    path = model_dir / "m.onnx"
    onnx.save_model(tiny_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (model_dir / "weights.bin").stat().st_size > 0
    stored = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    x = np.random.default_rng(0).normal(0, 1, (3,) + SHAPE).astype(np.float32)
    np.testing.assert_array_equal(bwacal.load_model(path).forward(x), bwacal.load_model(valid[0]).forward(x))


def test_external_data_length_that_lies_is_refused(tiny_proto, tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\x00" * 16)
    path = tmp_path / "m.onnx"
    onnx.save(_external(tiny_proto, "w1", "w.bin", length=16), str(path))
    with pytest.raises(ModelError, match="w1"):
        bwacal.load_model(path)


def _huge_model(dims, raw=b"\x00" * 16):
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=dims, raw_data=raw)  # a size that lies
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "huge",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("dims", [[10**6, 10**6], [4, 250_000_000], [2**40, 2**40, 2**40]])
def test_declared_tensor_sizes_are_checked_before_allocating(tmp_path, dims):
    path = tmp_path / "huge.onnx"
    onnx.save(_huge_model(dims), str(path))
    assert path.stat().st_size < 1000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ModelError, match="'w' declares"):
        bwacal.load_model(path)
    assert time.perf_counter() - start < 2.0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 100


def test_declared_tensor_size_through_the_cli(tmp_path, valid):
    path = tmp_path / "huge.onnx"
    onnx.save(_huge_model([10**6, 10**6]), str(path))
    result = invoke("calibrate", path, "--calib", valid[1], "-o", tmp_path / "q.onnx", "-q")
    assert result.exit_code == 2 and f"error: {path}" in result.output and "10000000" in result.output
    assert not (tmp_path / "q.onnx").exists()


def test_typed_data_shorter_than_declared_is_refused(tmp_path):
    model = _huge_model([4, 4])
    model.graph.initializer[0].CopyFrom(TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1000, 100_000],
                                                    float_data=[1.0, 2.0]))
    path = tmp_path / "short.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="'w'"):
        bwacal.load_model(path)


def test_a_huge_declared_input_is_refused_before_running(tiny_proto, tmp_path):
    dims = tiny_proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = 100_000
    path = tmp_path / "wide.onnx"
    onnx.save(tiny_proto, str(path))
    with pytest.raises(ModelError, match="values per image"):
        bwacal.load_model(path)


# ---------------------------------------------------------------- nothing is unpickled

_UNPICKLING = [
    re.compile(r"\bimport\s+(c?pickle|dill|joblib|shelve|marshal)\b"),
    re.compile(r"\bfrom\s+(c?pickle|dill|joblib|shelve|marshal)\b"),
    re.compile(r"\bpickle\.loads?\b"),
    re.compile(r"allow_pickle\s*=\s*True"),
    re.compile(r"\btorch\.load\("),
    re.compile(r"\bnp\.load\((?![^)]*allow_pickle\s*=\s*False)"),
]


def test_nothing_is_ever_unpickled():
    hits = []
    for folder in ("bwacal", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if any(p.search(line) for p in _UNPICKLING):
                    hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert hits == []


def _ragged():
    value = np.empty(1, dtype=object)
    value[0] = np.arange(2)
    return value


@pytest.mark.parametrize("field, make", [
    ("images", lambda f: f.create_dataset("images", (2, 1, 12, 12), dtype=h5py.vlen_dtype(np.float32))),
    ("images", lambda f: f.create_dataset("images", (2, 1, 12, 12), dtype=h5py.string_dtype())),
    ("images", lambda f: f.create_dataset("images", (2, 1, 12, 12), dtype=np.dtype([("a", "u1"), ("b", "f4")]))),
    ("labels", lambda f: f.create_dataset("labels", (2,), dtype=h5py.vlen_dtype(np.int64))),
    ("labels", lambda f: f.create_dataset("labels", (2,), dtype=h5py.string_dtype())),
    ("mean", lambda f: f["images"].attrs.create("mean", _ragged(), dtype=h5py.vlen_dtype(np.int64))),
])
def test_hdf5_object_and_variable_length_types_are_refused(tmp_path, field, make):
    path = tmp_path / "obj.h5"
    with h5py.File(path, "w") as f:
        if field != "images":
            f.create_dataset("images", data=np.zeros((2, 1, 12, 12), np.uint8))
        make(f)
    with pytest.raises(DataError, match=f"'{field}'|attribute '{field}'"):
        with open_dataset(path) as ds:
            list(ds.batches(2))


def test_attributes_that_blow_up_an_activation_get_an_error(tiny_proto, tmp_path):
    conv = next(n for n in tiny_proto.graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "pads").ints[:] = [10**6] * 4
    path = tmp_path / "pads.onnx"
    onnx.save(tiny_proto, str(path))
    start = time.perf_counter()
    with pytest.raises(ModelError, match="more memory than is available"):
        bwacal.load_model(path)
    assert time.perf_counter() - start < 2.0
