"""The one-pass activation kernels of ``bwacal/kernels/pointwise.py`` against the NumPy twins in
``tests/naive.py``, in float32 and float64, including the tails where a careless form overflows."""

import numpy as np
import pytest

from bwacal.kernels import pointwise
from tests import naive

# a spread of ordinary values, both tails and the exact points where the forms switch branch
X = np.concatenate([np.random.default_rng(0).standard_normal(3000) * 4,
                    [0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 40.0, -40.0, 88.0, -88.0, 700.0, -700.0]])
TOL = {np.float32: dict(rtol=2e-6, atol=1e-37), np.float64: dict(rtol=1e-13, atol=1e-300)}
# the derivatives of Gelu and Mish are sums of terms of opposite sign for negative x and cross zero
# (Gelu's at -0.75, Mish's at -1.19), so near there only an absolute error means anything: dy is
# about 1, the float32 kernels' Phi is good to 1.2e-7 relative
GRAD_TOL = {np.float32: dict(rtol=2e-6, atol=1e-7), np.float64: dict(rtol=1e-11, atol=1e-300)}

FORWARD = {
    "erf": ((), ()),
    "gelu_none": ((False,), (False,)),
    "gelu_tanh": ((True,), (True,)),
    "softplus": ((), ()),
    "mish": ((), ()),
    "elu": ((1.0,), (1.0,)),
    "elu_alpha": ((0.3,), (0.3,)),
}


def _fn(case, grad=False):
    name = case.split("_")[0] if case.startswith(("gelu", "elu")) else case
    return getattr(pointwise, name + ("_grad" if grad else "")), getattr(naive, name + ("_grad" if grad else ""))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(FORWARD))
def test_forward(case, dtype):
    kernel, twin = _fn(case)
    args, _ = FORWARD[case]
    x = X.astype(dtype).reshape(-1, 4)[:, :3]  # a non-contiguous view: the wrapper copies it
    got = kernel(x, *args)
    assert got.dtype == dtype and got.shape == x.shape
    want = twin(x, *args).astype(dtype)
    np.testing.assert_allclose(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(FORWARD))
def test_backward(case, dtype):
    kernel, twin = _fn(case, grad=True)
    args, _ = FORWARD[case]
    x = X.astype(dtype).reshape(-1, 4)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
    got = kernel(x, dy, *args)
    assert got.dtype == dtype and got.shape == x.shape
    want = twin(x, dy.astype(np.float64), *args).astype(dtype)
    np.testing.assert_allclose(got, want, **GRAD_TOL[dtype])


def test_float16_computed_in_float32():
    x = X[:100].astype(np.float16)
    got = pointwise.gelu(x, False)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, naive.gelu(x.astype(np.float64), False).astype(np.float16), rtol=1e-3)


def test_broadcast_gradient_seed():
    """``dy`` of another (broadcastable) shape is brought to x's shape."""
    x = X[:12].reshape(3, 4)
    np.testing.assert_allclose(pointwise.erf_grad(x, np.float64(2.0)), naive.erf_grad(x, 2.0), rtol=1e-13)


def test_large_tensor_all_jobs():
    """More elements than one job (ELEMENTS), with a ragged last job."""
    x = np.random.default_rng(2).standard_normal((1 << 17) + 5).astype(np.float32)
    np.testing.assert_allclose(pointwise.mish(x), naive.mish(x).astype(np.float32), rtol=2e-6, atol=1e-37)
