"""The deployment formats of ``bwacal.export`` against the fake format and bwacal's own forward, in
ONNX Runtime: bit-packed weights (``packed``), int8 QDQ (``qdq``), integer products per bit plane
(``bitplanes``)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import bwacal
from bwacal.calibrate import CalibrationOptions, calibrate
from bwacal.data import open_dataset
from bwacal.export import int8_levels, qdq_steps, qdq_tensors, snapping_errors, write_quantized
from bwacal.inspection import describe_model
from bwacal.quantize import quantize_network, select_layers
from bwacal.quant.weights import channels_first

from tests.calibration.conftest import tiny_cnn
from typer.testing import CliRunner

from cli.main import app


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
    cal, x = calibrated
    d = tmp_path_factory.mktemp("formats")
    paths = {}
    for fmt in ("fake", "packed", "qdq", "bitplanes"):
        paths[fmt] = d / f"q_{fmt}.onnx"
        write_quantized(cal.net, cal.report, paths[fmt], fmt)
        onnx.checker.check_model(onnx.load(str(paths[fmt])))
    paths["qdq_full"] = d / "q_qdq_full.onnx"
    write_quantized(cal.net, cal.report, paths["qdq_full"], "qdq", qdq_steps(cal.net, [x]))
    onnx.checker.check_model(onnx.load(str(paths["qdq_full"])))
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


def test_compact_formats_keep_the_summaries_inspect_shows(written):
    fake = describe_model(written["fake"])["bwacal"]
    for fmt in ("packed", "qdq", "bitplanes"):
        info = describe_model(written[fmt])["bwacal"]
        assert info["format"] == fmt and info["layers"] == fake["layers"]
        assert all(isinstance(row["alpha"]["rel_mean_per_plane"], list) for row in info["layers"])
    meta = {p.key: p.value for p in onnx.load(str(written["packed"])).metadata_props}
    assert len(meta["bwacal_layers"]) < len({p.key: p.value for p in onnx.load(str(written["fake"])).metadata_props}
                                            ["bwacal_layers"]) / 2


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


def test_qdq_of_uniform_w8a8_computes_the_fake_network(tiny, tmp_path):
    # uniform 8-bit levels sit on the int8 grid as they are: only the runtimes' arithmetic differs
    cal = calibrate(tiny[0], tiny[1], CalibrationOptions(bits=8, act_bits=8, epochs=0, method="bwa"))
    assert all(r["max_rel"] < 1e-6 for r in snapping_errors(cal.net))
    write_quantized(cal.net, cal.report, tmp_path / "q.onnx", "qdq")
    with open_dataset(tiny[1]) as d:
        x, _ = d.read(np.arange(64))
    want = cal.net.forward(x)
    scale = np.abs(want).max()
    assert np.abs(bwacal.load_model(tmp_path / "q.onnx").forward(x) - want).max() <= 1e-5 * scale
    assert np.abs(_run(tmp_path / "q.onnx", x) - want).max() <= 1e-5 * scale


def test_qdq_weights_are_the_bwa_levels_snapped_within_the_bound(calibrated):
    cal, _ = calibrated
    errors = snapping_errors(cal.net)
    for qw, row in zip(cal.net.weights, errors):
        q, scale = int8_levels(qw)
        assert q.dtype == np.int8
        levels = qw.levels().astype(np.float64)
        moved = q * scale[:, None].astype(np.float64) - levels
        amax = np.abs(levels).max(axis=1)
        assert np.all(np.abs(moved) <= scale[:, None] / 2 * (1 + 1e-6))  # round to nearest on the grid
        assert np.all(np.abs(moved).max(axis=1) <= amax / 192 * (1 + 1e-6))  # the scale is amax/m, m >= 96
        assert row["max_rel"] <= 1 / 192
    assert max(r["max_rel"] for r in errors) > 0  # the fitted levels are not on the grid by themselves


def test_qdq_in_onnxruntime_runs_integer_kernels_with_bwacal_outputs(calibrated, written, tmp_path):
    cal, x = calibrated
    want = cal.net.forward(x)
    opt = tmp_path / "opt.onnx"
    got = _session(written["qdq_full"], opt).run(None, {"input": x})[0]
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    # every conv of the tiny model, and its residual Add, as integer kernels
    assert ops.count("QLinearConv") == 4 and ops.count("QLinearAdd") == 1, ops
    # bwacal's engine runs the same QDQ graph in float: the two runtimes agree within a few 8-bit steps
    own = bwacal.load_model(written["qdq_full"]).forward(x)
    assert np.abs(got - own).max() <= 0.03 * np.abs(own).max()
    # and the snapped, 8-bit network predicts as the calibrated one does
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
    # the tensors that needed steps: each Conv output that no activation quantizer reads, the Add's input
    assert set(qdq_tensors(cal.net)) and not set(qdq_tensors(cal.net)) & {v.name for v in cal.net.graph.outputs}


def test_inspect_says_which_nodes_onnxruntime_runs_on_integers(written):
    kernels = describe_model(written["qdq_full"])["kernels"]
    by_node = {r["node"]: r for r in kernels["nodes"]}
    assert sum(r["integer"] for r in kernels["nodes"] if r["op"] == "Conv") == 4
    assert by_node["Gemm_11"]["integer"] is False
    assert describe_model(written["fake"])["kernels"] is None  # no quantize ops: nothing to fuse
    r = CliRunner().invoke(app, ["inspect", str(written["qdq_full"])])
    assert r.exit_code == 0, r.output
    assert "runs as integer ops: 4 of 4 Conv, 1 of 1 Add, 0 of 1 Gemm" in r.output


@pytest.mark.parametrize("fmt", ["qdq", "bitplanes"])
def test_cli_integer_formats_quantize_float_activations_at_8_bits(tiny, tmp_path, fmt):
    runner = CliRunner()
    r = runner.invoke(app, ["calibrate", str(tiny[0]), "--calib", str(tiny[1]), "--bits", "4", "--epochs", "0",
                            "--method", "bwa", "--format", fmt, "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert f"--format {fmt} quantizes activations: calibrating with --act-bits 8" in r.output
    assert ("weights snapped to int8" in r.output) == (fmt == "qdq")
    proto = onnx.load(str(tmp_path / "tiny.w4a8.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["bwacal_format"] == fmt and meta["bwacal_act_bits"] == "8"
    with open_dataset(tiny[1]) as d:
        x, _ = d.read(np.arange(16))
    assert _run(tmp_path / "tiny.w4a8.onnx", x).shape == (16, 10)
    r = runner.invoke(app, ["calibrate", str(tiny[0]), "--calib", str(tiny[1]), "--act-bits", "4", "--act-bwa",
                            "--format", fmt, "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "drop --act-bwa" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("bits, act_bits", [(3, 8), (2, 4)])
def test_bitplanes_equal_fake_within_the_activation_grid(tiny, tmp_path, bits, act_bits):
    cal = calibrate(tiny[0], tiny[1], CalibrationOptions(bits=bits, act_bits=act_bits, epochs=1, lr=2e-2,
                                                          method="bwa", protocol="all-layers"))
    path = tmp_path / "q.onnx"
    write_quantized(cal.net, cal.report, path, "bitplanes")
    onnx.checker.check_model(onnx.load(str(path)))
    opt = tmp_path / "opt.onnx"
    with open_dataset(tiny[1]) as d:
        x, _ = d.read(np.arange(64))
    got = _session(path, opt).run(None, {"input": x})[0]
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    # bits planes + the all-ones product per layer: 4 convs, 1 Gemm, no float Conv or Gemm left
    assert ops.count("ConvInteger") == 4 * (bits + 1) and ops.count("MatMulInteger") == bits + 1
    assert "Conv" not in ops and "Gemm" not in ops
    # the integer sums are exact; only float32 rounding of the scaled sum differs from the float conv,
    # far below one activation step (a step moves the logits by more than 1e-2 of their range here)
    want = cal.net.forward(x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.array_equal(got.argmax(1), want.argmax(1))
    # bwacal's engine runs the integer products in float64 (exact): it reads the file back the same
    assert np.abs(bwacal.load_model(path).forward(x) - got).max() <= 1e-5 * np.abs(want).max()



def _pool_cnn(path):
    """Conv-Relu-MaxPool-Conv-GlobalAveragePool-Flatten-Gemm, random weights."""
    rng = np.random.default_rng(3)
    t = lambda name, a: numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)  # noqa: E731
    inits = [t("w1", rng.normal(0, 0.5, (8, 1, 3, 3))), t("b1", rng.normal(0, 0.1, 8)),
             t("w2", rng.normal(0, 0.3, (16, 8, 3, 3))), t("fc_w", rng.normal(0, 0.5, (10, 16)))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT,
                                                                            ["N", 1, 12, 12])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_qdq_pools_on_the_grid_of_the_quantizer_after_the_maxpool(tmp_path):
    from bwacal.quantize import collect_activation_samples

    model = bwacal.load_model(_pool_cnn(tmp_path / "pool.onnx"))
    layers = select_layers(model.graph, 8, "all-layers", 8)
    x = np.random.default_rng(0).normal(size=(32, 1, 12, 12)).astype(np.float32)
    net = quantize_network(model, layers, act_samples=collect_activation_samples(
        model, [q.data_input for q in layers], [x]))
    steps = qdq_steps(net, [x])
    pooled = next(aq for aq in net.acts if aq.value == "p1")
    assert steps["r1"] == (pooled.step, pooled.signed)  # max of quantized values = quantized max
    path = tmp_path / "q.onnx"
    write_quantized(net, {}, path, "qdq", steps)
    proto = onnx.load(str(path))
    zero_points = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith(".zero_point")
                   and any(n.op_type == "QuantizeLinear" and t.name in n.input for n in proto.graph.node)]
    assert zero_points and all(z.dtype == np.uint8 for z in zero_points)  # signed grids as uint8 with zp 128
    assert any(z == 128 for z in zero_points)  # the input (signed) and the second conv's output
    got = _session(path, tmp_path / "opt.onnx").run(None, {"input": x})[0]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2 and "MaxPool" not in ops, ops  # the pool runs on the uint8 codes
    want = net.forward(x)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9


def test_qdq_keeps_4_bit_activations_on_their_grid(tiny, tmp_path):
    cal = calibrate(tiny[0], tiny[1], CalibrationOptions(bits=4, act_bits=4, epochs=1, lr=2e-2, method="bwa"))
    with open_dataset(tiny[1]) as d:
        x, _ = d.read(np.arange(64))
    path = tmp_path / "q.onnx"
    write_quantized(cal.net, cal.report, path, "qdq", qdq_steps(cal.net, [x]))
    proto = onnx.load(str(path))
    clips = [n for n in proto.graph.node if n.op_type == "Clip" and n.name.endswith(".clip")]
    assert len(clips) == sum(aq.bits < 8 for aq in cal.net.acts) > 0
    got, own = _run(path, x), bwacal.load_model(path).forward(x)
    assert np.abs(got - own).max() <= 0.03 * np.abs(own).max()
    want = cal.net.forward(x)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9
