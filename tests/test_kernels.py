"""The numba kernels against their naive twins in tests/naive.py, plus exactness and gradient checks."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bwacal.kernels import quant
from tests import naive

SHAPES = [(1, 1), (1, 9), (3, 1), (4, 8), (5, 17), (2, 64), (7, 33)]
BITS = list(range(2, 9))


def random_case(rng, bits, C, Kdim):
    codes = rng.integers(0, 2**bits, size=(C, Kdim)).astype(np.uint8)
    alpha = rng.normal(size=(C, bits)) * 2.0 ** np.arange(bits)
    gamma = rng.normal(size=C) * 2.0 ** (bits - 1)
    step = rng.uniform(1e-3, 1.0, size=C).astype(np.float32)
    grad_w = rng.normal(size=(C, Kdim)).astype(np.float32)
    return codes, alpha, gamma, step, grad_w


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_naive(bits, shape):
    rng = np.random.default_rng(bits * 100 + shape[0] * 10 + shape[1])
    codes, alpha, gamma, step, grad_w = random_case(rng, bits, *shape)
    planes = quant.decompose_bitplanes(codes, bits)
    np.testing.assert_array_equal(planes, naive.decompose_bitplanes(codes, bits))
    # same float64 summation order as the twin: equal bit for bit
    np.testing.assert_array_equal(
        quant.compose_bitplanes(planes, alpha, gamma, step), naive.compose_bitplanes(planes, alpha, gamma, step)
    )
    ga, gg = quant.bit_weight_grads(planes, grad_w, step)
    na, ng = naive.bit_weight_grads(planes, grad_w, step)
    np.testing.assert_allclose(ga, na, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gg, ng, rtol=1e-12, atol=1e-12)
    packed = quant.pack_bitplanes(planes)
    np.testing.assert_array_equal(packed, naive.pack_bitplanes(planes))
    np.testing.assert_array_equal(quant.unpack_bitplanes(packed, bits, *shape), planes)
    np.testing.assert_array_equal(naive.unpack_bitplanes(packed, bits, *shape), planes)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 64), (2, 300)])
def test_quantization_errors_match_naive(shape):
    rng = np.random.default_rng(shape[1])
    x = rng.normal(size=shape).astype(np.float32)
    steps = rng.uniform(0.01, 2.0, size=(shape[0], 6))
    for qmin, qmax in [(-2, 1), (-4, 3), (0, 15), (-128, 127)]:
        np.testing.assert_allclose(
            quant.quantization_errors(x, steps, qmin, qmax), naive.quantization_errors(x, steps, qmin, qmax), rtol=1e-12
        )


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    C=st.integers(1, 6),
    Kdim=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    log_step=st.floats(-30, 10),
)
def test_uniform_bit_weights_reproduce_dequantization_exactly(bits, C, Kdim, seed, log_step):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, size=(C, Kdim)).astype(np.uint8)
    step = (2.0**log_step * rng.uniform(0.5, 1.0, size=C)).astype(np.float32)
    alpha = np.tile(2.0 ** np.arange(bits), (C, 1)).astype(np.float32)
    gamma = np.full(C, -(2.0 ** (bits - 1)), dtype=np.float32)
    composed = quant.compose_bitplanes(quant.decompose_bitplanes(codes, bits), alpha, gamma, step)
    uniform = step[:, None] * (codes.astype(np.float32) - np.float32(2 ** (bits - 1)))
    assert composed.dtype == np.float32 and uniform.dtype == np.float32
    np.testing.assert_array_equal(composed, uniform)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), C=st.integers(1, 5), Kdim=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_pack_round_trip_and_numpy_twin(bits, C, Kdim, seed):
    planes = np.random.default_rng(seed).integers(0, 2, size=(bits, C, Kdim)).astype(np.uint8)
    packed = quant.pack_bitplanes(planes)
    np.testing.assert_array_equal(packed, np.packbits(planes, axis=-1, bitorder="little"))
    np.testing.assert_array_equal(quant.unpack_bitplanes(packed, bits, C, Kdim), planes)


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_gradients_match_finite_differences(bits):
    """dL/dalpha, dL/dgamma from the kernel against central differences of L = sum(G * W(alpha, gamma))
    plus a quadratic term, in float64 (the loss is evaluated with the float64 twin, not the float32 kernel)."""
    rng = np.random.default_rng(bits)
    C, Kdim = 3, 11
    codes, alpha, gamma, step, _ = random_case(rng, bits, C, Kdim)
    step = step.astype(np.float64)
    planes = quant.decompose_bitplanes(codes, bits).astype(np.float64)
    target = rng.normal(size=(C, Kdim))

    def weights(a, g):
        return step[:, None] * (np.einsum("ck,kcj->cj", a, planes) + g[:, None])

    def loss(a, g):
        return 0.5 * np.sum((weights(a, g) - target) ** 2)

    grad_w = weights(alpha, gamma) - target  # dL/dW
    ga, gg = quant.bit_weight_grads(planes.astype(np.uint8), grad_w, step)
    eps = 1e-6
    fa = np.zeros_like(alpha)
    for c in range(C):
        for k in range(bits):
            d = np.zeros_like(alpha)
            d[c, k] = eps
            fa[c, k] = (loss(alpha + d, gamma) - loss(alpha - d, gamma)) / (2 * eps)
    fg = np.array([(loss(alpha, gamma + eps * e) - loss(alpha, gamma - eps * e)) / (2 * eps) for e in np.eye(C)])
    np.testing.assert_allclose(ga, fa, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gg, fg, rtol=1e-6, atol=1e-6)


def test_wrappers_reject_bad_input():
    with pytest.raises(ValueError):
        quant.decompose_bitplanes(np.full((2, 2), 4, np.uint8), 2)
    with pytest.raises(ValueError):
        quant.decompose_bitplanes(np.zeros(3, np.uint8), 2)
    planes = np.zeros((3, 2, 5), np.uint8)
    with pytest.raises(ValueError):
        quant.compose_bitplanes(planes, np.ones((2, 2)), np.zeros(2), np.ones(2))
    with pytest.raises(ValueError):
        quant.bit_weight_grads(planes, np.ones((2, 4)), np.ones(2))
    with pytest.raises(ValueError):
        quant.unpack_bitplanes(np.zeros(5, np.uint8), 3, 2, 5)
    with pytest.raises(ValueError):
        quant.quantization_errors(np.ones((2, 3)), np.zeros((2, 1)), -2, 1)


def test_wrappers_accept_any_layout():
    rng = np.random.default_rng(0)
    codes = np.asfortranarray(rng.integers(0, 8, size=(6, 10)).astype(np.int64))
    planes = quant.decompose_bitplanes(codes, 3)
    np.testing.assert_array_equal(planes, naive.decompose_bitplanes(codes, 3))
    grad_w = rng.normal(size=(10, 6)).T  # non-contiguous float64
    ga, gg = quant.bit_weight_grads(planes, grad_w, np.ones(6, np.float32))
    np.testing.assert_allclose(gg, grad_w.sum(axis=1), rtol=1e-12)


_PYTHON_BODIES = """
import numpy as np
from bwacal.kernels import quant
from tests import naive
assert not hasattr(quant._compose_bitplanes, "py_func"), "JIT is still on"
rng = np.random.default_rng(1)
for bits, C, Kdim in [(2, 3, 16), (3, 2, 5), (8, 1, 9)]:
    codes = rng.integers(0, 2**bits, size=(C, Kdim)).astype(np.uint8)
    planes = quant.decompose_bitplanes(codes, bits)
    assert (planes == naive.decompose_bitplanes(codes, bits)).all()
    a, g, s = rng.normal(size=(C, bits)), rng.normal(size=C), rng.uniform(0.1, 1, size=C)
    assert (quant.compose_bitplanes(planes, a, g, s) == naive.compose_bitplanes(planes, a, g, s)).all()
    gw = rng.normal(size=(C, Kdim))
    for x, y in zip(quant.bit_weight_grads(planes, gw, s), naive.bit_weight_grads(planes, gw, s)):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)
    packed = quant.pack_bitplanes(planes)
    assert (packed == naive.pack_bitplanes(planes)).all()
    assert (quant.unpack_bitplanes(packed, bits, C, Kdim) == planes).all()
    steps = rng.uniform(0.1, 1, size=(C, 3))
    np.testing.assert_allclose(quant.quantization_errors(gw, steps, -4, 3), naive.quantization_errors(gw, steps, -4, 3))
print("ok")
"""


def test_kernel_python_bodies_without_jit():
    """The kernels' Python bodies (NUMBA_DISABLE_JIT=1) agree with the naive twins: lets coverage see them."""
    root = Path(quant.__file__).resolve().parents[2]
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", _PYTHON_BODIES], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_quantization_errors_round_ties_to_even():
    """Values exactly halfway between levels: the kernel's rounding must match np.round (half to even)."""
    steps = np.array([[0.5, 0.25, 1.0]])
    x = (np.arange(-20, 21) * 0.25 + 0.125).reshape(1, -1)  # k/8 + 1/8: ties for step 0.25
    x = np.concatenate([x, np.arange(-20, 21).reshape(1, -1) * 0.25], axis=1)  # ties for 0.5 and 1.0
    for qmin, qmax in [(-2, 1), (-128, 127), (0, 3)]:
        np.testing.assert_array_equal(quant.quantization_errors(x, steps, qmin, qmax),
                                      naive.quantization_errors(x, steps, qmin, qmax))
