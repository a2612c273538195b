"""Quantizer invariants as hypothesis properties: on the grid, signs kept, codes in range, MSE <= min-max."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bwacal.quant import (
    ActivationQuantizer,
    calibrate_activation_step,
    dequantize,
    qrange,
    quantize,
    quantize_weights,
)
from bwacal.quant.weights import MSE_RATIOS

FAST = settings(max_examples=40, deadline=None)

finite = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
weights2d = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24), elements=finite)
bits_st = st.integers(2, 8)


def per_channel_error(w, wq):
    return np.sum((w.astype(np.float64) - wq.astype(np.float64)) ** 2, axis=1)


def test_qrange():
    assert qrange(2, True) == (-2, 1)
    assert qrange(2, False) == (0, 3)
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    for bad in (1, 9, 2.5):
        with pytest.raises(ValueError):
            qrange(bad, True)


def test_quantize_rounds_half_to_even_and_clips():
    q = quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5, 100.0, -100.0]), 1.0, -4, 3)
    np.testing.assert_array_equal(q, [0, 2, 2, 0, -2, 3, -4])
    np.testing.assert_array_equal(dequantize(q, np.float32(0.25)), np.float32(0.25) * q.astype(np.float32))


@FAST
@given(w=weights2d, bits=bits_st, method=st.sampled_from(["mse", "minmax"]))
def test_weight_quantizer_invariants(w, bits, method):
    wq = quantize_weights(w, bits, method=method)
    C = w.shape[0]
    assert wq.codes.dtype == np.uint8 and wq.codes.shape == w.shape
    assert wq.step.dtype == np.float32 and wq.step.shape == (C,)
    assert np.all(wq.step > 0) and np.all(np.isfinite(wq.step))
    assert wq.codes.max() < 2**bits
    values = wq.dequantize()
    assert values.shape == w.shape and np.all(np.isfinite(values))
    # on the grid: every value is step * integer in the signed range
    q = np.round(values.astype(np.float64) / wq.step[:, None])
    np.testing.assert_array_equal(values, wq.step[:, None] * q.astype(np.float32))
    lo, hi = qrange(bits, True)
    assert q.min() >= lo and q.max() <= hi
    # signs kept (zero allowed)
    assert np.all(np.sign(values) * np.sign(w) >= 0)
    # at most 2**bits distinct values per channel
    assert all(len(np.unique(row)) <= 2**bits for row in values)


@FAST
@given(w=weights2d, bits=bits_st)
def test_mse_step_never_worse_than_minmax(w, bits):
    mse = quantize_weights(w, bits, "mse")
    minmax = quantize_weights(w, bits, "minmax")
    e_mse = per_channel_error(w, mse.dequantize())
    e_minmax = per_channel_error(w, minmax.dequantize())
    # the search is in float64 on unrounded products; allow the float32 rounding of the outputs
    assert np.all(e_mse <= e_minmax * (1 + 1e-5) + 1e-12)


def test_mse_step_clearly_better_on_gaussian_weights():
    w = np.random.default_rng(0).normal(size=(16, 576)).astype(np.float32)
    for bits in (2, 3, 4):
        e_mse = per_channel_error(w, quantize_weights(w, bits, "mse").dequantize()).sum()
        e_minmax = per_channel_error(w, quantize_weights(w, bits, "minmax").dequantize()).sum()
        assert e_mse < 0.9 * e_minmax
    assert MSE_RATIOS[-1] == 1.0


def test_zero_channels_and_axis():
    w = np.random.default_rng(1).normal(size=(4, 3, 2, 2)).astype(np.float32)
    w[1] = 0
    for method in ("mse", "minmax"):
        wq = quantize_weights(w, 3, method)
        assert wq.step[1] > 0 and np.all(np.isfinite(wq.dequantize()))
        np.testing.assert_array_equal(wq.dequantize()[1], 0)
    gemm = np.random.default_rng(2).normal(size=(6, 5)).astype(np.float32)  # (K, N), outputs on axis 1
    wq = quantize_weights(gemm, 4, axis=1)
    assert wq.codes.shape == (5, 6) and wq.dequantize().shape == (6, 5)
    np.testing.assert_array_equal(wq.dequantize(), quantize_weights(gemm.T, 4).dequantize().T)
    with pytest.raises(ValueError):
        quantize_weights(w, 3, "max")
    with pytest.raises(ValueError):
        quantize_weights(np.array([[np.nan]], np.float32), 3)


@FAST
@given(w=weights2d, bits=bits_st)
def test_uniform_bit_weights_compose_to_dequantization(w, bits):
    wq = quantize_weights(w, bits)
    np.testing.assert_array_equal(wq.compose(), wq.dequantize())
    np.testing.assert_array_equal(wq.levels()[np.arange(wq.channels)[:, None], wq.codes], wq.dequantize())


@FAST
@given(w=weights2d, bits=bits_st, seed=st.integers(0, 2**32 - 1))
def test_arbitrary_bit_weights_give_at_most_2_pow_b_levels(w, bits, seed):
    rng = np.random.default_rng(seed)
    wq = quantize_weights(w, bits)
    wq.alpha = rng.normal(size=(wq.channels, bits)) * 2.0 ** np.arange(bits)
    wq.gamma = rng.normal(size=wq.channels)
    values = wq.compose()
    levels = wq.levels()
    for c in range(wq.channels):
        assert len(np.unique(values[c])) <= 2**bits
        assert np.isin(values[c], levels[c]).all()
    g = wq.gradients(np.ones_like(values))
    # normalised: dL/d(gamma / 2**(b-1)) = 2**(b-1) * step * K
    np.testing.assert_allclose(g["gamma"], 2.0 ** (bits - 1) * wq.step.astype(np.float64) * w.shape[1], rtol=1e-12)
    assert g["alpha"].shape == (wq.channels, bits)


def test_parameters_round_trip_and_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    wq = quantize_weights(w, 3)
    wq.alpha = wq.alpha * (1 + 0.1 * rng.normal(size=wq.alpha.shape))
    theta = wq.parameters()
    assert set(theta) == {"alpha", "gamma"}
    np.testing.assert_array_equal(theta["alpha"] * 2.0 ** np.arange(3), wq.alpha)
    dy = rng.normal(size=w.shape)
    g = wq.gradients(dy.astype(np.float32))

    def loss(t):
        wq.set_parameters(t)
        return float(np.sum(dy * wq.compose().astype(np.float64)))

    eps = 1e-4
    for key in ("alpha", "gamma"):
        fd = np.zeros_like(theta[key])
        for i in np.ndindex(fd.shape):
            up = {k: v.copy() for k, v in theta.items()}
            down = {k: v.copy() for k, v in theta.items()}
            up[key][i] += eps
            down[key][i] -= eps
            fd[i] = (loss(up) - loss(down)) / (2 * eps)
        np.testing.assert_allclose(g[key], fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())


samples_st = hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-50, 50, width=32, allow_subnormal=False))


@FAST
@given(x=samples_st, bits=bits_st, signed=st.booleans(), method=st.sampled_from(["mse", "percentile"]))
def test_activation_fake_quant_on_grid_with_correct_mask(x, bits, signed, method):
    step = calibrate_activation_step(x, bits, signed, method=method)
    assert step > 0 and np.isfinite(step)
    y, _, mask = ActivationQuantizer(bits, signed, step).quantize(x)
    lo, hi = qrange(bits, signed)
    q = np.round(y.astype(np.float64) / np.float64(step))
    np.testing.assert_array_equal(y, step * q.astype(np.float32))
    assert q.min() >= lo and q.max() <= hi
    # mask: True exactly where the unclipped rounded code (float32 division, as QuantizeLinear) is in range
    r = np.round(x / step)
    np.testing.assert_array_equal(mask, (r >= lo) & (r <= hi))
    # inside the range the quantization error is at most half a step (and a float32 rounding)
    assert np.all(np.abs(y[mask].astype(np.float64) - x[mask]) <= 0.5 * step * (1 + 1e-5))
    if not signed:
        assert y.min() >= 0


@FAST
@given(x=samples_st, bits=bits_st, signed=st.booleans())
def test_activation_bwa_with_uniform_alpha_is_plain_fake_quant(x, bits, signed):
    step = calibrate_activation_step(x, bits, signed)
    y, _, mask = ActivationQuantizer(bits, signed, step).quantize(x)
    aq = ActivationQuantizer(bits, signed, step, alpha=2.0 ** np.arange(bits))
    y_bwa, _, mask_bwa = aq.quantize(x)
    np.testing.assert_array_equal(y_bwa, y)
    np.testing.assert_array_equal(mask_bwa, mask)


def test_activation_bwa_alpha_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 50)).astype(np.float32)
    dy = rng.normal(size=x.shape)
    bits, signed = 3, True
    step = calibrate_activation_step(x, bits, signed)
    alpha = 2.0 ** np.arange(bits) + rng.normal(size=bits) * 0.1
    aq = ActivationQuantizer(bits, signed, step, alpha=alpha)
    _, u, _ = aq.quantize(x)
    grad = aq.alpha_grad(u, dy)
    eps = 1e-3

    def loss(a):
        return np.sum(dy * aq.quantize(x, a)[0].astype(np.float64))

    fd = np.array([(loss(alpha + eps * e) - loss(alpha - eps * e)) / (2 * eps) for e in np.eye(bits)])
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-3)


def test_engine_op_is_the_activation_quantizer():
    from bwacal.ops.quant import ActQuant

    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    alpha = 2.0 ** np.arange(4) * (1 + 0.05 * rng.normal(size=4))
    aq = ActivationQuantizer(4, True, np.float32(0.1), alpha=alpha)
    op = ActQuant(step=0.1, bits=4, signed=1)
    y, ctx = op.forward(x, alpha)
    np.testing.assert_array_equal(y, aq.quantize(x)[0])
    dy = rng.normal(size=x.shape).astype(np.float32)
    dx, dalpha = op.backward(ctx, dy, (True, True))
    np.testing.assert_array_equal(dx, np.where(aq.codes(x)[1], dy, 0))
    np.testing.assert_array_equal(dalpha, aq.alpha_grad(aq.codes(x)[0], dy))


def test_activation_calibration_edges():
    assert calibrate_activation_step(np.zeros(10), 4, False) > 0
    assert calibrate_activation_step(-np.ones(10), 4, False) > 0  # unsigned, all clipped to zero
    x = np.random.default_rng(4).normal(size=20000)
    s_mse = calibrate_activation_step(x, 4, True)
    s_max = np.max(np.abs(x)) / 7
    err = lambda s: np.mean((ActivationQuantizer(4, True, s).quantize(x)[0] - x) ** 2)  # noqa: E731
    assert err(s_mse) < err(s_max)
    s_pct = calibrate_activation_step(x, 4, True, method="percentile", percentile=99.0)
    assert np.isclose(s_pct, np.percentile(np.abs(x), 99.0) / 7, rtol=1e-6)
    with pytest.raises(ValueError):
        calibrate_activation_step(x, 4, True, method="kl")
