"""Calibration end to end on a small model: exactness at init, fitting, export, determinism."""

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import bwacal
from bwacal.calibrate import CalibrationOptions, calibrate
from bwacal.data import open_dataset
from bwacal.export import write_quantized
from bwacal.fit import classification_loss
from bwacal.quantize import quantize_network, select_layers


def test_uniform_init_reproduces_rounding_exactly(tiny):
    model = bwacal.load_model(tiny[0])
    layers = select_layers(model.graph, 3, "all-layers")
    net = quantize_network(model, layers)
    params = net.params()
    for layer, wq in zip(layers, net.weights):
        assert wq.name == layer.weight and wq.node == layer.node
        np.testing.assert_array_equal(params[layer.weight], wq.dequantize())
        w = model.graph.initializers[layer.weight]
        step = wq.step.reshape((-1,) + (1,) * (w.ndim - 1))
        q = np.clip(np.round(w.astype(np.float64) / step), -4, 3)
        np.testing.assert_array_equal(params[layer.weight], (q * step).astype(np.float32))


def test_protocol_keeps_first_and_last_at_8_bits(tiny):
    model = bwacal.load_model(tiny[0])
    default = select_layers(model.graph, 2)
    assert [layer.bits for layer in default] == [8, 2, 2, 2, 8]
    assert [layer.bits for layer in select_layers(model.graph, 2, "all-layers")] == [2] * 5


def _loss(net, x, y, params=None):
    return classification_loss(net.forward(x, params), y)[0]


def test_fitting_lowers_the_calibration_loss(tiny):
    cal = calibrate(tiny[0], tiny[1], CalibrationOptions(bits=2, protocol="all-layers", epochs=4, holdout=0.0,
                                                          lr=1e-2))
    hist = cal.report["history"]
    assert hist[-1]["train_loss"] < hist[1]["train_loss"]
    with open_dataset(tiny[1]) as d:
        x, y = d.read(np.arange(d.n))
    uniform = quantize_network(cal.net.model, cal.net.layers)
    assert _loss(cal.net, x, y) < _loss(uniform, x, y)


@pytest.mark.parametrize("fmt", ["fake", "packed"])
@pytest.mark.parametrize("act", [None, "uniform", "bwa"])
def test_written_model_matches_bwacal_in_onnxruntime(tiny, tmp_path, fmt, act):
    opts = CalibrationOptions(bits=3, epochs=1, act_bits=None if act is None else 4, act_bwa=act == "bwa",
                              lr=2e-2)
    cal = calibrate(tiny[0], tiny[1], opts)
    out = tmp_path / f"q_{fmt}.onnx"
    write_quantized(cal.net, cal.report, out, fmt)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["bwacal_bits"] == "3" and meta["bwacal_format"] == fmt
    with open_dataset(tiny[1]) as d:
        x, _ = d.read(np.arange(64))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    want = cal.net.forward(x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # and bwacal's engine reads its own output back to the same logits
    np.testing.assert_allclose(bwacal.load_model(out).forward(x), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_fake_weights_have_at_most_2_to_the_b_values_per_channel(tiny, tmp_path):
    cal = calibrate(tiny[0], tiny[1], CalibrationOptions(bits=2, protocol="all-layers", epochs=2, lr=2e-2, holdout=0.0))
    write_quantized(cal.net, cal.report, tmp_path / "q.onnx", "fake")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    moved_any = False
    for layer, wq in zip(cal.net.layers, cal.net.weights):
        w2d = np.moveaxis(inits[layer.weight], layer.axis, 0).reshape(wq.channels, -1)
        for row in w2d:
            assert len(np.unique(row)) <= 4
        uniform = wq.dequantize()
        moved_any |= not np.array_equal(inits[layer.weight], uniform)
    assert moved_any  # the bit weights were actually fitted, not left at the uniform grid


def test_same_seed_same_bytes(tiny, tmp_path):
    digests = []
    for run in range(2):
        cal = calibrate(tiny[0], tiny[1], CalibrationOptions(bits=3, epochs=2, act_bits=4, seed=7))
        write_quantized(cal.net, cal.report, tmp_path / f"r{run}.onnx", "packed")
        digests.append(hashlib.sha256((tmp_path / f"r{run}.onnx").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    cal = calibrate(tiny[0], tiny[1], CalibrationOptions(bits=3, epochs=2, act_bits=4, seed=8))
    write_quantized(cal.net, cal.report, tmp_path / "r2.onnx", "packed")
    assert hashlib.sha256((tmp_path / "r2.onnx").read_bytes()).hexdigest() != digests[0]


def test_label_free_calibration_uses_kl(tiny):
    nolabels = tiny[1].parent / "nolabels.h5"
    cal = calibrate(tiny[0], nolabels, CalibrationOptions(bits=3, epochs=1))
    assert cal.report["loss"] == "kl"
    assert cal.report["accuracy"][cal.report["method"]] is None


def test_report_lists_every_layer_with_its_levels(tiny):
    cal = calibrate(tiny[0], tiny[1], CalibrationOptions(bits=3, epochs=1))
    rep = cal.report
    assert [r["layer"] for r in rep["layers"]] == [layer.node for layer in cal.net.layers]
    assert {"fp", "uniform_minmax", "uniform_mse", rep["method"]} <= set(rep["accuracy"])
    assert rep["accuracy"]["fp"] == 1.0  # labels are the FP model's predictions
    for r in rep["layers"]:
        assert np.asarray(r["alpha"]).shape == (r["channels"], r["bits"])
