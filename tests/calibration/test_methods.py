"""Every calibration method end to end on the small model: the written model runs in ONNX Runtime with
bwacal's outputs, has at most 2**b values per output channel, learned codes are floor or ceil of
W / step, and the same seed gives the same bytes."""

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from bwacal.calibrate import METHODS, CalibrationOptions, calibrate
from bwacal.data import open_dataset
from bwacal.export import write_quantized
from bwacal.quant import qrange
from bwacal.quant.weights import channels_first


def _options(method, **kw):
    return CalibrationOptions(bits=2, protocol="all-layers", epochs=2, lr=2e-2, method=method,
                              adaround_iterations=40, adaround_images=64, **kw)


@pytest.fixture(scope="module", params=METHODS)
def calibrated(request, tiny):
    return request.param, calibrate(tiny[0], tiny[1], _options(request.param))


@pytest.mark.parametrize("fmt", ["fake", "packed"])
def test_written_model_runs_in_onnxruntime_with_bwacal_outputs(calibrated, tiny, tmp_path, fmt):
    method, cal = calibrated
    out = tmp_path / f"{method}.onnx"
    write_quantized(cal.net, cal.report, out, fmt)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta.get("bwacal_method", "bwa") == method
    with open_dataset(tiny[1]) as d:
        x, _ = d.read(np.arange(64))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    want = cal.net.forward(x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert cal.report["method"] == method and cal.report["accuracy"][method] is not None


def test_at_most_2_pow_b_values_per_channel_in_the_written_model(calibrated, tmp_path):
    method, cal = calibrated
    out = tmp_path / "q.onnx"
    write_quantized(cal.net, cal.report, out, "fake")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for qw in cal.net.weights:
        rows = channels_first(inits[qw.name], qw.axis)
        assert rows.shape == (qw.channels, qw.codes.shape[1])
        assert max(len(np.unique(row)) for row in rows) <= 2**qw.bits


def test_codes_are_floor_or_ceil_and_learned_ones_move(calibrated):
    method, cal = calibrated
    moved = 0
    for qw in cal.net.weights:
        assert qw.rounding is None
        w = cal.net.model.graph.initializers[qw.name]
        t = channels_first(w, qw.axis).astype(np.float64) / qw.step.astype(np.float64)[:, None]
        qmin, qmax = qrange(qw.bits, True)
        q = qw.codes.astype(np.int64) - qw.offset
        assert np.all((q == np.clip(np.floor(t), qmin, qmax)) | (q == np.clip(np.floor(t) + 1, qmin, qmax)))
        moved += np.count_nonzero(q != np.clip(np.round(t), qmin, qmax))
    if method == "bwa":
        assert moved == 0
    elif method in ("adaround", "adaround-bwa"):
        assert moved > 0
    if method == "adaround":  # uniform levels: AdaRound learns codes only
        for qw in cal.net.weights:
            np.testing.assert_array_equal(qw.alpha, np.tile(2.0 ** np.arange(qw.bits), (qw.channels, 1)))


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_bytes(tiny, tmp_path, method):
    digests = []
    for run in range(2):
        cal = calibrate(tiny[0], tiny[1], _options(method, seed=3))
        write_quantized(cal.net, cal.report, tmp_path / f"r{run}.onnx", "packed")
        digests.append(hashlib.sha256((tmp_path / f"r{run}.onnx").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
