"""Learned rounding: the rectified sigmoid, its regulariser and schedule, soft-rounded weights through
bit weights (against tests/naive.py and float64 central differences), hardening, and AdaRound's layer
reconstruction on a real zoo layer."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bwacal.quant import qrange, quantize_weights
from bwacal.quant.rounding import (
    ETA,
    ZETA,
    annealed_beta,
    initial_v,
    rectified_sigmoid,
    rectified_sigmoid_grad,
    rounding_regularizer,
)
from bwacal.quant.weights import channels_first
from tests import naive

FAST = settings(max_examples=40, deadline=None)
ROOT = Path(__file__).resolve().parents[1]

finite = st.floats(-50, 50, width=32, allow_subnormal=False)
weights2d = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12), elements=finite)


def central(f, x, eps):
    """float64 central differences of the scalar ``f`` at every entry of ``x``."""
    out = np.zeros_like(x, dtype=np.float64)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        out[i] = (f(up) - f(down)) / (2 * eps)
    return out


def test_rectified_sigmoid_against_naive_and_central_differences():
    v = np.linspace(-8, 8, 161)
    np.testing.assert_allclose(rectified_sigmoid(v), naive.rectified_sigmoid(v), rtol=1e-14, atol=1e-15)
    assert rectified_sigmoid(np.array([-10.0]))[0] == 0.0 and rectified_sigmoid(np.array([10.0]))[0] == 1.0
    assert rectified_sigmoid(np.array([0.0]))[0] == pytest.approx(0.5, abs=1e-15)
    inside = (naive.rectified_sigmoid(v) > 1e-6) & (naive.rectified_sigmoid(v) < 1 - 1e-6)
    fd = np.array([(naive.rectified_sigmoid([x + 1e-6])[0] - naive.rectified_sigmoid([x - 1e-6])[0]) / 2e-6 for x in v])
    np.testing.assert_allclose(rectified_sigmoid_grad(v)[inside], fd[inside], rtol=1e-6)
    np.testing.assert_array_equal(rectified_sigmoid_grad(v)[~inside & (np.abs(v) > 3)], 0.0)
    assert (ZETA, ETA) == (1.1, -0.1)


@FAST
@given(frac=hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(0, 0.999999)))
def test_initial_v_gives_the_fractional_part(frac):
    np.testing.assert_allclose(rectified_sigmoid(initial_v(frac)), frac, atol=1e-12)


@pytest.mark.parametrize("beta", [2.0, 7.5, 20.0])
def test_regularizer_value_and_gradient(beta):
    v = np.random.default_rng(0).normal(0, 2, size=(3, 7))
    value, grad = rounding_regularizer(v, beta)
    assert value == pytest.approx(naive.rounding_regularizer(v, beta), rel=1e-12)
    fd = central(lambda x: naive.rounding_regularizer(x, beta), v, 1e-6)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)
    # zero at hard choices, largest (1 per weight) at h = 0.5
    assert rounding_regularizer(np.array([-9.0, 9.0]), beta)[0] == 0.0
    assert rounding_regularizer(np.zeros(4), beta)[0] == pytest.approx(4.0)


def test_beta_schedule():
    n = 1000
    assert [annealed_beta(i, n) for i in (0, 100, 199)] == [None] * 3  # warm-up: 20% without regulariser
    assert annealed_beta(200, n) == pytest.approx(20.0)
    assert annealed_beta(600, n) == pytest.approx(11.0)
    assert annealed_beta(999, n) == pytest.approx(2.0 + 18.0 / 800)
    betas = [annealed_beta(i, n) for i in range(200, n)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    assert annealed_beta(0, 10, warmup=0.0) == pytest.approx(20.0)


def _soft_weight(w, bits, seed, moved_bit_weights=True):
    rng = np.random.default_rng(seed)
    qw = quantize_weights(w, bits)
    if moved_bit_weights:
        qw.alpha = qw.alpha * (1 + 0.2 * rng.normal(size=qw.alpha.shape))
        qw.gamma = qw.gamma + 0.3 * rng.normal(size=qw.gamma.shape)
    qw.start_rounding(w)
    qw.rounding.v = qw.rounding.v + rng.normal(0, 1, size=qw.rounding.v.shape)
    return qw


@FAST
@given(w=weights2d, bits=st.integers(2, 8), seed=st.integers(0, 2**32 - 1))
def test_soft_rounded_weights_against_naive(w, bits, seed):
    qw = _soft_weight(w, bits, seed)
    want = naive.soft_rounded_weights(w, qw.step, bits, qw.rounding.v, qw.alpha, qw.gamma)
    got = qw.compose().astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * (np.abs(want).max() + 1e-30))


@FAST
@given(w=weights2d, bits=st.integers(2, 8))
def test_start_is_the_fractional_part_and_hard_codes_are_floor_or_ceil(w, bits):
    qw = quantize_weights(w, bits)
    nearest = qw.codes.copy()
    qw.start_rounding(w)
    t = channels_first(w).astype(np.float64) / qw.step.astype(np.float64)[:, None]
    np.testing.assert_allclose(rectified_sigmoid(qw.rounding.v), t - np.floor(t), atol=1e-9)
    qw.rounding.v = np.random.default_rng(bits).normal(0, 3, size=qw.rounding.v.shape)
    qw.harden()
    qmin, qmax = qrange(bits, True)
    q = qw.codes.astype(np.int64) - 2 ** (bits - 1)
    floor = np.floor(t)
    assert np.all((q == np.clip(floor, qmin, qmax)) | (q == np.clip(floor + 1, qmin, qmax)))
    # so at most one step from round-to-nearest
    assert np.abs(q - (nearest.astype(np.int64) - 2 ** (bits - 1))).max() <= 1
    assert qw.rounding is None and qw.codes.dtype == np.uint8


def test_soft_weights_are_exact_at_hard_choices():
    w = np.random.default_rng(2).normal(size=(4, 30)).astype(np.float32)
    qw = _soft_weight(w, 3, 2)
    qw.rounding.v = np.where(qw.rounding.v >= 0, 20.0, -20.0)  # h exactly 0 or 1
    soft = qw.compose()
    qw.harden()
    np.testing.assert_array_equal(soft, qw.compose())


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_learned_code_gradients_match_central_differences(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(3, 2, 2, 3)).astype(np.float32)
    qw = _soft_weight(w, bits, bits)
    theta = qw.parameters()
    assert set(theta) == {"alpha", "gamma", "v"}
    dy = rng.normal(size=w.shape)
    g = qw.gradients(dy.astype(np.float32))

    def loss(key):
        def f(x):
            qw.set_parameters({**theta, key: x})
            return float(np.sum(dy * naive.soft_rounded_weights(channels_first(w), qw.step, bits, qw.rounding.v,
                                                                qw.alpha, qw.gamma).reshape(qw.restore(w.reshape(3, -1)).shape)))
        return f

    for key in ("alpha", "gamma", "v"):
        fd = central(loss(key), theta[key], 1e-6)
        qw.set_parameters(theta)
        np.testing.assert_allclose(g[key], fd, rtol=1e-4, atol=1e-6 * max(np.abs(fd).max(), 1.0))


def test_adaround_lowers_the_reconstruction_error_of_a_zoo_layer():
    import bwacal
    from bwacal.adaround import AdaRoundOptions, adaround, reconstruction_error
    from bwacal.data import open_dataset
    from bwacal.quantize import quantize_network, select_layers

    model = bwacal.load_model(ROOT / "data/zoo/resnet20.onnx")
    with open_dataset(ROOT / "data/fmnist_calib.h5") as d:
        x, _ = d.read(np.arange(64))
    layers = select_layers(model.graph, 2, "all-layers")[1:2]  # the first 16->16 3x3 conv
    net = quantize_network(model, layers)
    nearest = reconstruction_error(net, 0, x)
    stats = adaround(net, x, AdaRoundOptions(iterations=300, batch_size=16))
    after = reconstruction_error(net, 0, x)
    assert stats[0]["loss_nearest"] == pytest.approx(nearest, rel=1e-5)  # float32 products
    assert stats[0]["loss"] == pytest.approx(after, rel=1e-5)
    assert after < 0.8 * nearest
    assert net.weights[0].rounding is None and stats[0]["codes_moved"] > 0


def test_straight_through_codes_forward_the_hard_choice():
    rng = np.random.default_rng(9)
    w = rng.normal(size=(4, 20)).astype(np.float32)
    soft = _soft_weight(w, 3, 9)
    ste = _soft_weight(w, 3, 9)
    ste.rounding.straight_through = True
    np.testing.assert_array_equal(ste.compose(), soft.compose(hard=True))
    g = rng.normal(size=w.shape).astype(np.float32)
    g_ste, g_soft = ste.gradients(g), soft.gradients(g)
    np.testing.assert_array_equal(g_ste["v"], g_soft["v"])  # the relaxation's gradient
    fixed = quantize_weights(w, 3)
    fixed.codes, fixed.alpha, fixed.gamma = ste.rounding.hard_codes(), ste.alpha, ste.gamma
    for key, value in fixed.gradients(g).items():
        np.testing.assert_allclose(g_ste[key], value, rtol=1e-12)


def _grouped_model(tmp_path):
    """Grouped strided conv, a dilated depthwise conv with 6 outputs per channel, and a Gemm with
    alpha and an untransposed weight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import bwacal

    rng = np.random.default_rng(4)
    inits = {"c1.w": rng.normal(0, 0.4, (8, 2, 3, 3)), "c1.b": rng.normal(0, 0.1, 8),
             "c2.w": rng.normal(0, 0.4, (48, 1, 3, 3)), "fc.w": rng.normal(0, 0.3, (48, 5)),
             "fc.b": rng.normal(0, 0.1, 5)}
    nodes = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["h1"], name="grouped", group=2,
                              strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2.w"], ["h2"], name="depthwise", group=8, dilations=[2, 2],
                              pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", alpha=0.7)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 9, 9])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "g.onnx")
    return bwacal.load_model(tmp_path / "g.onnx"), rng.normal(size=(40, 4, 9, 9)).astype(np.float32)


def test_moments_give_the_engine_ops_reconstruction_loss_and_gradient(tmp_path):
    """The moment form on every image equals the layer's own op run on every image (the oracle), for
    a grouped strided conv, a dilated depthwise conv and a Gemm with alpha, with earlier layers
    quantized (so the quantized inputs differ from the FP ones)."""
    from bwacal import adaround as ar
    from bwacal.quantize import quantize_network, select_layers

    model, x = _grouped_model(tmp_path)
    net = quantize_network(model, select_layers(model.graph, 2, "all-layers"), "minmax")
    assert [layer.node for layer in net.layers] == ["grouped", "depthwise", "fc"]
    for index, qw in enumerate(net.weights):
        direct = ar._problem(net, index, x)
        moments = ar._moment_problem(net, index, x)
        w = qw.compose() * np.float32(1.1)  # not the point the moments were built at
        loss, grad = direct.loss_and_grad(np.arange(direct.images), w)
        m_loss, m_grad = moments.loss_and_grad(None, w)
        assert m_loss == pytest.approx(loss, rel=1e-5)  # float32 products
        np.testing.assert_allclose(m_grad, grad, rtol=1e-5, atol=1e-6 * np.abs(grad).max())
    # the inputs of the second layer come from the quantized first: the cross moments are not the Gram
    problem = ar._moment_problem(net, 1, x)
    assert not np.allclose(problem.pull, np.matmul(problem.w_fp, problem.gram))


def test_the_moments_loop_runs_blas_on_every_core(monkeypatch):
    """learn_rounding's GEMMs get numba's thread count of BLAS threads (bwacal keeps BLAS on one
    thread elsewhere, runtime.py), and BLAS is back on one thread after it."""
    import os

    from bwacal import runtime
    from bwacal.quant import rounding

    if "OPENBLAS_NUM_THREADS" in os.environ or not runtime.openblas_threads():
        pytest.skip("BLAS threads are the user's (OPENBLAS_NUM_THREADS) or not OpenBLAS")
    seen, beta = [], rounding.annealed_beta
    monkeypatch.setattr(rounding, "annealed_beta", lambda *a: seen.append(runtime.openblas_threads()) or beta(*a))
    before = runtime.openblas_threads()
    with runtime.blas_on_all_cores(2):
        assert set(runtime.openblas_threads().values()) == {2}
    assert runtime.openblas_threads() == before
    import numba

    rng = np.random.default_rng(0)
    lo = rng.normal(size=(1, 3, 5))
    monkeypatch.setattr(rounding, "PARALLEL_MACS", 3 * 5 * 5)  # this product is large enough
    rounding.learn_rounding(rng.normal(size=lo.shape), lo, np.ones_like(lo), np.eye(5)[None], lo, 3, 0.01, 0.01)
    assert seen and all(set(counts.values()) == {numba.get_num_threads()} for counts in seen)
    assert runtime.openblas_threads() == before
    seen.clear()
    monkeypatch.setattr(rounding, "PARALLEL_MACS", 3 * 5 * 5 + 1)  # one multiply-add short: one thread
    rounding.learn_rounding(rng.normal(size=lo.shape), lo, np.ones_like(lo), np.eye(5)[None], lo, 3, 0.01, 0.01)
    assert seen and all(set(counts.values()) == {1} for counts in seen)


def test_moments_built_in_small_pieces_are_the_same(tmp_path, monkeypatch):
    """Rows built a few images at a time (``ROWS_BYTES``, which bounds the memory at 224x224) and
    engine passes of a few images give the moments of one pass over everything."""
    from bwacal import adaround as ar
    from bwacal.quantize import quantize_network, select_layers

    model, x = _grouped_model(tmp_path)
    net = quantize_network(model, select_layers(model.graph, 2, "all-layers"), "minmax")
    whole = [ar._moment_problem(net, index, x) for index in range(len(net.weights))]
    monkeypatch.setattr(ar, "ROWS_BYTES", 1)  # one image's rows at a time
    monkeypatch.setattr(ar, "COLLECT_BATCH", 7)  # 40 images: passes of 7, 7, ..., 5
    built, rows = [], ar._rows
    monkeypatch.setattr(ar, "_rows", lambda node, x, shape: built.append(len(x)) or rows(node, x, shape))
    for index, want in enumerate(whole):
        got = ar._moment_problem(net, index, x)
        assert max(built) == 1
        # float32 products per piece, summed in float64
        np.testing.assert_allclose(got.gram, want.gram, rtol=1e-5, atol=1e-6 * np.abs(want.gram).max())
        np.testing.assert_allclose(got.pull, want.pull, rtol=1e-5, atol=1e-6 * np.abs(want.pull).max())
        assert got.target_energy == pytest.approx(want.target_energy, rel=1e-6)


def test_learn_rounding_kernel_against_naive():
    """The fused numba step against tests/naive.py's NumPy loop: grouped moments, through the
    warm-up and the annealing, with weights that clip (h at 0 or 1) along the way."""
    from bwacal.quant.rounding import learn_rounding

    rng = np.random.default_rng(5)
    groups, per, k = 3, 4, 7
    x = rng.normal(size=(groups, 200, k))
    gram = np.matmul(x.transpose(0, 2, 1), x) / 200
    lo = rng.normal(size=(groups, per, k))
    span = np.abs(rng.normal(0.5, 0.2, size=lo.shape))
    pull = np.matmul(lo + 0.5 * span, gram) + 0.1 * rng.normal(size=lo.shape)
    v0 = rng.normal(0, 2, size=lo.shape)
    for iterations, lr in ((1, 0.01), (60, 0.05)):
        want = naive.learn_rounding(v0, lo, span, gram, pull, iterations, lr, 0.01, warmup=0.25)
        got = v0.copy()
        learn_rounding(got, lo, span, gram, pull, iterations, lr, 0.01, warmup=0.25, product=np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        # the default: the product in float32, everything else as above
        fast = v0.copy()
        learn_rounding(fast, lo, span, gram, pull, iterations, lr, 0.01, warmup=0.25)
        np.testing.assert_allclose(fast, want, rtol=1e-4, atol=1e-4)
        assert np.array_equal(fast > 0, want > 0)
    assert np.abs(got - v0).max() > 0.5
    with pytest.raises(ValueError, match="C-contiguous float64"):
        learn_rounding(v0.astype(np.float32), lo, span, gram, pull, 1, 0.01, 0.01)


def test_the_moments_gradient_is_the_papers_gradient_on_every_image(tmp_path):
    """The gradient the kernel follows (naive.moments_rounding_gradient, which the kernel is checked
    against above) agrees with the generic path: the quantized weight's own compose and gradients,
    the regulariser of rounding.py and the layer's op run on every image."""
    from bwacal import adaround as ar
    from bwacal.quantize import quantize_network, select_layers

    model, x = _grouped_model(tmp_path)
    net = quantize_network(model, select_layers(model.graph, 3, "all-layers"), "minmax")
    for index in (0, 1):
        qw = net.weights[index]
        direct = ar._problem(net, index, x)
        problem = ar._moment_problem(net, index, x)
        qw.start_rounding(model.graph.initializers[qw.name])
        qw.rounding.v = qw.rounding.v + np.random.default_rng(index).normal(0, 1.5, qw.rounding.v.shape)
        lo, hi = qw.soft_ends()
        shape = problem.w_fp.shape
        for beta in (None, 20.0, 2.0):
            got = naive.moments_rounding_gradient(qw.rounding.v.reshape(shape), lo.reshape(shape),
                                                  (hi - lo).reshape(shape), problem.gram, problem.pull,
                                                  beta, 0.01).reshape(qw.rounding.v.shape)
            _, dw = direct.loss_and_grad(np.arange(direct.images), qw.compose())
            want = qw.gradients(dw)["v"]
            if beta is not None:
                want = want + 0.01 * rounding_regularizer(qw.rounding.v, beta)[1]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        qw.rounding = None


def test_the_solver_is_chosen_by_cost_and_can_be_forced(tmp_path):
    from bwacal import adaround as ar
    from bwacal.quantize import quantize_network, select_layers

    model, x = _grouped_model(tmp_path)
    net = quantize_network(model, select_layers(model.graph, 2, "all-layers"), "minmax")
    auto = ar.AdaRoundOptions(iterations=100)
    # convs: 25 rows per image of 9-18 inputs: an iteration with the moments costs K / 800 of a
    # 32-image batch; the Gemm sees one row of K = 48 per image, so a batch (32 rows) costs less
    assert [ar._solver_for(net, i, x, auto)[0] for i in range(3)] == ["moments", "moments", "batches"]
    forced = ar.AdaRoundOptions(iterations=100, solver="moments")
    assert ar._solver_for(net, 2, x, forced)[0] == "moments"
    stats = ar.adaround(net, x, ar.AdaRoundOptions(iterations=20, solver="batches"))
    assert [s["solver"] for s in stats] == ["batches"] * 3
    with pytest.raises(ValueError, match="unknown AdaRound solver"):
        ar.adaround(net, x, ar.AdaRoundOptions(solver="exact"))


def test_layers_above_the_budget_run_fewer_iterations(tmp_path):
    """iterations_for: the requested count where it fits the budget, else budget / cost, never below
    min_iterations (nor above the request); adaround runs and reports each layer's count."""
    from bwacal import adaround as ar
    from bwacal.quantize import quantize_network, select_layers

    options = ar.AdaRoundOptions(iterations=10_000, layer_budget=5e12, min_iterations=1000)
    assert ar.iterations_for(5e8, options) == 10_000  # 5e12 exactly: fits
    assert ar.iterations_for(1e9, options) == 5_000
    assert ar.iterations_for(1.087e10, options) == 1_000  # a 512 x 4608 layer: the floor
    assert ar.iterations_for(1e9, ar.AdaRoundOptions(iterations=10_000, layer_budget=0)) == 10_000
    assert ar.iterations_for(1e12, ar.AdaRoundOptions(iterations=300, layer_budget=1)) == 300

    model, x = _grouped_model(tmp_path)
    net = quantize_network(model, select_layers(model.graph, 2, "all-layers"), "minmax")
    costs = [ar._solver_for(net, i, x, ar.AdaRoundOptions())[1] for i in range(3)]
    # a budget that the first layer's 40 iterations fit and the others' do not
    budget = 40 * costs[0]
    assert all(c > costs[0] for c in costs[1:])
    ar_options = ar.AdaRoundOptions(iterations=40, layer_budget=budget, min_iterations=10)
    stats = ar.adaround(net, x, ar_options)
    want = [ar.iterations_for(c, ar_options) for c in costs]
    assert want[0] == 40 and all(10 <= n < 40 for n in want[1:])
    assert [s["iterations"] for s in stats] == want
