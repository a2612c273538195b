"""The deployment formats of ``bwacal.export`` against the fake format and bwacal's own forward, in
ONNX Runtime: bit-packed weights (``packed``)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import bwacal
from bwacal.calibrate import CalibrationOptions, calibrate
from bwacal.data import open_dataset
from bwacal.export import write_quantized
from bwacal.quantize import quantize_network, select_layers
from bwacal.quant.weights import channels_first

from tests.calibration.conftest import tiny_cnn


def _session(path, optimized=None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(path, x):
    return _session(path).run(None, {"input": x})[0]


def _weights_in_onnxruntime(path, names):
    """The values ONNX Runtime computes for ``names`` (the rebuilt weights), as extra graph outputs."""
    proto = onnx.load(str(path))
    proto.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    out = tmp = path.with_suffix(".outputs.onnx")
    onnx.save(proto, str(tmp))
    sess = _session(out)
    x = np.zeros([1] + [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]], np.float32)
    return dict(zip(names, sess.run(list(names), {"input": x})))


@pytest.fixture(scope="module")
def calibrated(tiny):
    """W3A8 (first and last layer at 8 bits), bit weights fitted for an epoch: the paper's method."""
    cal = calibrate(tiny[0], tiny[1], CalibrationOptions(bits=3, act_bits=8, epochs=1, lr=2e-2, method="bwa"))
    with open_dataset(tiny[1]) as d:
        x, _ = d.read(np.arange(64))
    return cal, x


@pytest.fixture(scope="module")
def written(calibrated, tmp_path_factory):
    cal, _ = calibrated
    d = tmp_path_factory.mktemp("formats")
    paths = {}
    for fmt in ("fake", "packed"):
        paths[fmt] = d / f"q_{fmt}.onnx"
        write_quantized(cal.net, cal.report, paths[fmt], fmt)
        onnx.checker.check_model(onnx.load(str(paths[fmt])))
    return paths


def test_packed_gives_the_fake_outputs_in_onnxruntime(calibrated, written):
    cal, x = calibrated
    fake, packed, own = _run(written["fake"], x), _run(written["packed"], x), cal.net.forward(x)
    scale = np.abs(own).max()
    assert np.abs(packed - fake).max() <= 1e-5 * scale
    assert np.abs(packed - own).max() <= 1e-5 * scale
    # and bwacal's engine reads the packed file back to the same logits
    assert np.abs(bwacal.load_model(written["packed"]).forward(x) - own).max() <= 1e-5 * scale


def test_packed_weights_keep_2_pow_b_values_per_channel_after_unpacking(calibrated, written):
    cal, _ = calibrated
    got = _weights_in_onnxruntime(written["packed"], [qw.name for qw in cal.net.weights])
    for qw in cal.net.weights:
        rows, want = channels_first(got[qw.name], qw.axis), channels_first(qw.compose(), qw.axis)
        assert got[qw.name].shape == qw.shape
        assert max(len(np.unique(row)) for row in rows) <= 2**qw.bits
        # float32 step * alpha_k summed in float32 against the fake format's float64 sum: a few ulps
        tol = 4 * np.finfo(np.float32).eps * np.abs(qw.levels()).max(axis=1, keepdims=True)
        assert np.all(np.abs(rows - want) <= tol)
        # the same code gives the same value wherever it sits in the channel
        for c in range(qw.channels):
            for u in np.unique(qw.codes[c]):
                assert len(np.unique(rows[c][qw.codes[c] == u])) == 1


def test_onnxruntime_folds_the_unpacking_at_session_start(written, tmp_path):
    _session(written["packed"], tmp_path / "opt.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert not ops & {"BitShift", "Split", "Sum"}, ops


def test_packed_w3_is_at_least_8x_smaller_when_the_weights_dominate(tmp_path):
    path = tiny_cnn(tmp_path / "wide.onnx", channels=(1, 64, 512))  # a 512x64x3x3 conv: 295k weights
    model = bwacal.load_model(path)
    net = quantize_network(model, select_layers(model.graph, 3, "all-layers"))
    sizes = {fmt: write_quantized(net, {}, tmp_path / f"{fmt}.onnx", fmt) for fmt in ("fake", "packed")}
    assert path.stat().st_size / sizes["packed"] >= 8
    x = np.random.default_rng(0).normal(size=(4, 1, 12, 12)).astype(np.float32)
    want = net.forward(x)
    assert np.abs(_run(tmp_path / "packed.onnx", x) - want).max() <= 1e-5 * np.abs(want).max()
