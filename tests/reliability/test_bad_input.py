"""Bad input gets one line, exit 2, the file named, no traceback and nothing left in the output directory."""

import hashlib
import os
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bwacal.data import write_dataset
from tests.reliability.conftest import CLASSES, SHAPE, invoke


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def assert_bad_input(result, *needles, out_dir=None, before=()):
    """Exit 2, one ``error:`` line containing every needle, no traceback, ``out_dir`` as it was."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    if out_dir is not None:
        assert sorted(os.listdir(out_dir)) == sorted(before), os.listdir(out_dir)
    return errors[0]


def calibrate(model, calib, out_dir, *extra):
    return invoke("calibrate", model, "--calib", calib, "-o", out_dir / "q.onnx", "--epochs", "1", "-q", *extra)


def save(proto, path):
    onnx.save(proto, str(path))
    return path


# ---------------------------------------------------------------- models


def test_model_that_does_not_exist(valid, tmp_path, out_dir):
    missing = tmp_path / "nope.onnx"
    assert_bad_input(calibrate(missing, valid[1], out_dir), missing, "no such file", out_dir=out_dir)


def test_model_that_is_not_onnx(valid, tmp_path, out_dir):
    path = tmp_path / "junk.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    assert_bad_input(calibrate(path, valid[1], out_dir), path, "not", "ONNX", out_dir=out_dir)


def test_truncated_protobuf(valid, tmp_path, out_dir):
    data = valid[0].read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[:len(data) // 2])
    assert_bad_input(calibrate(path, valid[1], out_dir), path, "ONNX", out_dir=out_dir)


def test_unsupported_ops_are_all_listed(valid, tiny_proto, tmp_path, out_dir):
    g = tiny_proto.graph
    flatten = next(i for i, n in enumerate(g.node) if n.op_type == "Flatten")
    g.node[flatten].input[0] = "e3"
    new = [helper.make_node("Shrink", ["g"], ["e1"], name="shrink_a"),
           helper.make_node("Shrink", ["e1"], ["e2"], name="shrink_b"),
           helper.make_node("Einsum", ["e2"], ["e3"], name="einsum_c", equation="ncij->ncij")]
    for k, node in enumerate(new):
        g.node.insert(flatten + k, node)
    path = save(tiny_proto, tmp_path / "shrink.onnx")
    line = assert_bad_input(calibrate(path, valid[1], out_dir), path, "Shrink", "shrink_a", "shrink_b", "Einsum",
                            "einsum_c", out_dir=out_dir)
    assert "unsupported ops" in line


def test_several_graph_inputs(valid, tiny_proto, tmp_path, out_dir):
    tiny_proto.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1]))
    path = save(tiny_proto, tmp_path / "two_inputs.onnx")
    assert_bad_input(calibrate(path, valid[1], out_dir), path, "one image input", "mask", out_dir=out_dir)


def test_output_that_is_not_batch_by_classes(valid, tiny_proto, tmp_path, out_dir):
    g = tiny_proto.graph
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("r3", TensorProto.FLOAT, None))  # (N, 16, 6, 6)
    path = save(tiny_proto, tmp_path / "features.onnx")
    assert_bad_input(calibrate(path, valid[1], out_dir), path, "(batch, classes)", out_dir=out_dir)


def test_model_input_shape_the_data_does_not_fit(valid, tmp_path, out_dir):
    calib = write_dataset(tmp_path / "small.h5", np.zeros((4, 1, 10, 10), np.float32))
    assert_bad_input(calibrate(valid[0], calib, out_dir), calib, "1x10x10", "1x12x12", out_dir=out_dir)


# ---------------------------------------------------------------- data (calibrate, evaluate and check)


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return path


def _images(n=6):
    return np.random.default_rng(0).normal(0, 1, (n,) + SHAPE).astype(np.float32)


def _nan_images():
    x = _images()
    x[3, 0, 5, 5] = np.nan
    return x


def _inf_images():
    x = _images()
    x[1, 0, 0, 0] = np.inf
    return x


BAD_DATA = {
    "no_images": (lambda: {"pixels": _images()}, ["no 'images' dataset"]),
    "wrong_rank": (lambda: {"images": _images()[:, 0]}, ["rank 4"]),
    "wrong_dtype": (lambda: {"images": _images().astype(np.int32)}, ["dtype int32"]),
    "empty": (lambda: {"images": np.zeros((0,) + SHAPE, np.float32)}, ["empty"]),
    "nan": (lambda: {"images": _nan_images()}, ["NaN", "image 3"]),
    "inf": (lambda: {"images": _inf_images()}, ["Inf", "image 1"]),
    "label_out_of_range": (lambda: {"images": _images(), "labels": np.array([0, 1, 2, CLASSES, 3, 4])},
                           ["'labels'", f"[0, {CLASSES})"]),
    "negative_label": (lambda: {"images": _images(), "labels": np.array([0, 1, -1, 2, 3, 4])}, ["'labels'", ">= 0"]),
    "labels_wrong_length": (lambda: {"images": _images(), "labels": np.arange(5)}, ["'labels' has 5 entries", "6"]),
}


@pytest.mark.parametrize("command", ["calibrate", "evaluate", "check"])
@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data(valid, tmp_path, out_dir, case, command):
    build, needles = BAD_DATA[case]
    path = _h5(tmp_path / f"{case}.h5", **build())
    if command == "calibrate":
        result = calibrate(valid[0], path, out_dir)
    elif command == "evaluate":
        result = invoke("evaluate", valid[0], "--data", path)
    else:
        result = invoke("check", valid[0], "--reference", valid[0], "--data", path, "--junit", out_dir / "r.xml")
    # check's JUnit report is written on bad input too: an <error> case the CI report step can show
    line = assert_bad_input(result, path, *needles, out_dir=out_dir, before=["r.xml"] if command == "check" else [])
    if command == "check":
        error = ET.parse(out_dir / "r.xml").getroot().find("testcase/error")
        assert error.get("message") == line[len("error: "):]


def test_data_that_does_not_exist(valid, tmp_path, out_dir):
    missing = tmp_path / "nope.h5"
    assert_bad_input(calibrate(valid[0], missing, out_dir), missing, "not found", out_dir=out_dir)


def test_data_that_is_not_hdf5(valid, tmp_path, out_dir):
    path = tmp_path / "junk.h5"
    path.write_bytes(b"\x00not hdf5" * 100)
    assert_bad_input(calibrate(valid[0], path, out_dir), path, "not an HDF5 file", out_dir=out_dir)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("option, value, needle", [
    ("--bits", "1", "--bits must be between 2 and 8, got 1"),
    ("--bits", "9", "--bits must be between 2 and 8, got 9"),
    ("--act-bits", "1", "--act-bits must be between 2 and 8, got 1"),
    ("--act-bits", "16", "--act-bits must be between 2 and 8, got 16"),
    ("--epochs", "-1", "--epochs must be 0 or more, got -1"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--lr", "0", "--lr must be positive"),
    ("--holdout", "1", "--holdout must be in [0, 1)"),
    ("--format", "int4", "--format must be one of"),
])
def test_bad_option(valid, out_dir, option, value, needle):
    result = invoke("calibrate", valid[0], "--calib", valid[1], "-o", out_dir / "q.onnx", option, value)
    assert_bad_input(result, needle, out_dir=out_dir)


def test_act_bwa_without_act_bits(valid, out_dir):
    assert_bad_input(calibrate(valid[0], valid[1], out_dir, "--act-bwa"), "--act-bwa needs --act-bits",
                     out_dir=out_dir)


# ---------------------------------------------------------------- outputs


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_output_equal_to_the_input(valid, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(valid[0].read_bytes())
    before = _digest(model)
    result = invoke("calibrate", model, "--calib", valid[1], "-o", model, "--force", "-q")
    assert_bad_input(result, model, "would overwrite the input", out_dir=tmp_path, before=["m.onnx"])
    assert _digest(model) == before


def test_missing_output_directory(valid, out_dir):
    target = out_dir / "missing" / "q.onnx"
    result = invoke("calibrate", valid[0], "--calib", valid[1], "-o", target, "-q")
    assert_bad_input(result, target, "does not exist", out_dir=out_dir)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories (os.access says writable), so nothing to test")
def test_read_only_output_directory(valid, out_dir):
    out_dir.chmod(0o555)
    try:
        assert not os.access(out_dir, os.W_OK)
        assert_bad_input(calibrate(valid[0], valid[1], out_dir), out_dir / "q.onnx", "not writable", out_dir=out_dir)
    finally:
        out_dir.chmod(0o755)


def test_existing_output_without_force(valid, out_dir):
    target = out_dir / "q.onnx"
    target.write_bytes(b"previous result")
    assert_bad_input(calibrate(valid[0], valid[1], out_dir), target, "--force", out_dir=out_dir, before=["q.onnx"])
    assert target.read_bytes() == b"previous result"


def test_existing_report_without_force(valid, out_dir):
    report = out_dir / "r.json"
    report.write_text("{}")
    result = calibrate(valid[0], valid[1], out_dir, "--report", report)
    assert_bad_input(result, report, "--force", out_dir=out_dir, before=["r.json"])


def test_a_valid_run_leaves_only_its_output(valid, out_dir):
    result = calibrate(valid[0], valid[1], out_dir, "--report", out_dir / "r.json")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out_dir)) == ["q.onnx", "r.json"]


def test_verbose_shows_the_traceback(valid, tmp_path, out_dir):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x08\x07garbage")
    result = calibrate(path, valid[1], out_dir, "--verbose")
    assert result.exit_code == 2
    assert "Traceback" in result.output and f"error: {path}" in result.output
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "interrupted"])
def test_a_failed_report_write_removes_the_model_too(valid, out_dir, monkeypatch, failure):
    import bwacal.files

    real = bwacal.files.write_bytes_atomically
    calls = []

    def fail_second(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise failure
        real(path, data)

    monkeypatch.setattr(bwacal.files, "write_bytes_atomically", fail_second)
    result = calibrate(valid[0], valid[1], out_dir, "--report", out_dir / "r.json")
    assert calls == [out_dir / "q.onnx", out_dir / "r.json"]
    if isinstance(failure, OSError):
        assert_bad_input(result, out_dir / "r.json", "No space left on device", out_dir=out_dir)
    else:
        assert result.exit_code == 130 and "interrupted: no output written" in result.output
        assert os.listdir(out_dir) == []


def test_outputs_get_the_usual_file_mode(valid, out_dir):
    umask = os.umask(0o022)
    try:
        result = calibrate(valid[0], valid[1], out_dir, "--report", out_dir / "r.json")
    finally:
        os.umask(umask)
    assert result.exit_code == 0, result.output
    for name in ("q.onnx", "r.json"):
        assert (out_dir / name).stat().st_mode & 0o777 == 0o644, name
