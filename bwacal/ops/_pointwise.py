"""numba kernels for the element-wise activations whose NumPy form takes several passes over the
tensor (Erf, Gelu, Softplus, Mish, Elu), forward and backward, one pass each.

Every kernel walks its flattened arrays in jobs of ``ELEMENTS`` elements, one job per thread at a
time, and computes each element in float64 with libm's ``erf``/``exp``/``log1p``/``tanh``, rounding
once to the output's type (float32 or float64). The backward kernels take the op's input ``x``, not
its output. Slow NumPy versions of each live in ``tests/naive.py``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from bwacal.kernels import JIT, JIT_PARALLEL
from bwacal.ops._frames import ELEMENTS

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715  # the tanh approximation's x**3 coefficient (ONNX Gelu, Hendrycks & Gimpel)


@njit(**JIT)
def _softplus1(v):
    """log(1 + exp(v)) without overflow."""
    if v > 0:
        return v + math.log1p(math.exp(-v))
    return math.log1p(math.exp(v))


@njit(**JIT)
def _sigmoid1(v):
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


@njit(**JIT_PARALLEL)
def _erf(x, out):
    """``out = erf(x)``; x and out contiguous, same shape."""
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        for i in range(blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)):
            r[i] = math.erf(np.float64(a[i]))


@njit(**JIT_PARALLEL)
def _erf_grad(x, dy, out):
    """``out = dy * 2/sqrt(pi) * exp(-x**2)``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        for i in range(blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)):
            v = np.float64(a[i])
            r[i] = g[i] * (_TWO_OVER_SQRT_PI * math.exp(-v * v))


@njit(**JIT_PARALLEL)
def _gelu(x, tanh_approx, out):
    """``out = x * Phi(x)`` (Phi the standard normal CDF), or with ``tanh_approx``
    ``0.5 x (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x**3)``.

    NOTE: written as ``Phi(x) = erfc(-x / sqrt(2)) / 2`` and ``(1 + tanh(u)) / 2 = sigmoid(2u)``:
    ``1 + erf`` and ``1 + tanh`` cancel for negative x and lose all digits by x = -6.
    """
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        for i in range(blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)):
            v = np.float64(a[i])
            if tanh_approx:
                r[i] = v * _sigmoid1(2.0 * _SQRT_2_OVER_PI * (v + _GELU_CUBIC * v * v * v))
            else:
                r[i] = 0.5 * v * math.erfc(-v * _INV_SQRT2)


@njit(**JIT_PARALLEL)
def _gelu_grad(x, dy, tanh_approx, out):
    """``out = dy * d gelu/dx``: ``Phi(x) + x phi(x)``, or for the tanh form, with
    ``s = sigmoid(2u)``, ``s + 2 x s (1 - s) du/dx``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        for i in range(blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)):
            v = np.float64(a[i])
            if tanh_approx:
                s = _sigmoid1(2.0 * _SQRT_2_OVER_PI * (v + _GELU_CUBIC * v * v * v))
                d = s + 2.0 * v * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * v * v)
            else:
                d = 0.5 * math.erfc(-v * _INV_SQRT2) + v * _INV_SQRT_2PI * math.exp(-0.5 * v * v)
            r[i] = g[i] * d


@njit(**JIT_PARALLEL)
def _softplus(x, out):
    """``out = log(1 + exp(x))``."""
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        for i in range(blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)):
            r[i] = _softplus1(np.float64(a[i]))


@njit(**JIT_PARALLEL)
def _softplus_grad(x, dy, out):
    """``out = dy * sigmoid(x)``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        for i in range(blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)):
            r[i] = g[i] * _sigmoid1(np.float64(a[i]))


@njit(**JIT_PARALLEL)
def _mish(x, out):
    """``out = x * tanh(softplus(x))``."""
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        for i in range(blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)):
            v = np.float64(a[i])
            r[i] = v * math.tanh(_softplus1(v))


@njit(**JIT_PARALLEL)
def _mish_grad(x, dy, out):
    """``out = dy * (t + x (1 - t**2) sigmoid(x))`` with ``t = tanh(softplus(x))``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        for i in range(blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)):
            v = np.float64(a[i])
            t = math.tanh(_softplus1(v))
            r[i] = g[i] * (t + v * (1.0 - t * t) * _sigmoid1(v))


@njit(**JIT_PARALLEL)
def _elu(x, alpha, out):
    """``out = x`` where ``x >= 0``, else ``alpha (exp(x) - 1)``."""
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        for i in range(blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)):
            v = np.float64(a[i])
            r[i] = v if v >= 0 else alpha * math.expm1(v)


@njit(**JIT_PARALLEL)
def _elu_grad(x, dy, alpha, out):
    """``out = dy`` where ``x >= 0``, else ``dy alpha exp(x)``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        for i in range(blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)):
            v = np.float64(a[i])
            r[i] = g[i] if v >= 0 else g[i] * (alpha * math.exp(v))


def _prepare(x, dy=None):
    """Contiguous float32/float64 operands (float16 is computed in float32) and the output array;
    ``dy`` is brought to ``x``'s shape and type."""
    x = np.asarray(x)
    work = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    xs = np.ascontiguousarray(x, dtype=work)
    out = np.empty(xs.shape, dtype=work)
    if dy is None:
        return xs, out
    return xs, np.ascontiguousarray(np.broadcast_to(dy, x.shape), dtype=work), out


def _result(out, like):
    return out if out.dtype == like.dtype else out.astype(like.dtype)


def erf(x):
    """erf of a float array (same dtype)."""
    xs, out = _prepare(x)
    _erf(xs, out)
    return _result(out, x)


def erf_grad(x, dy):
    """dL/dx of ``erf(x)`` given dL/dy."""
    xs, g, out = _prepare(x, dy)
    _erf_grad(xs, g, out)
    return _result(out, x)


def gelu(x, tanh_approx):
    """GELU of a float array: ``x Phi(x)``, or its tanh approximation."""
    xs, out = _prepare(x)
    _gelu(xs, bool(tanh_approx), out)
    return _result(out, x)


def gelu_grad(x, dy, tanh_approx):
    """dL/dx of ``gelu(x, tanh_approx)`` given dL/dy."""
    xs, g, out = _prepare(x, dy)
    _gelu_grad(xs, g, bool(tanh_approx), out)
    return _result(out, x)


def softplus(x):
    """``log(1 + exp(x))`` of a float array."""
    xs, out = _prepare(x)
    _softplus(xs, out)
    return _result(out, x)


def softplus_grad(x, dy):
    """dL/dx of ``softplus(x)`` given dL/dy: ``dy * sigmoid(x)``."""
    xs, g, out = _prepare(x, dy)
    _softplus_grad(xs, g, out)
    return _result(out, x)


def mish(x):
    """``x tanh(softplus(x))`` of a float array."""
    xs, out = _prepare(x)
    _mish(xs, out)
    return _result(out, x)


def mish_grad(x, dy):
    """dL/dx of ``mish(x)`` given dL/dy."""
    xs, g, out = _prepare(x, dy)
    _mish_grad(xs, g, out)
    return _result(out, x)


def elu(x, alpha):
    """ELU of a float array: ``x`` where ``x >= 0``, else ``alpha (exp(x) - 1)``."""
    xs, out = _prepare(x)
    _elu(xs, float(alpha), out)
    return _result(out, x)


def elu_grad(x, dy, alpha):
    """dL/dx of ``elu(x, alpha)`` given dL/dy."""
    xs, g, out = _prepare(x, dy)
    _elu_grad(xs, g, float(alpha), out)
    return _result(out, x)
