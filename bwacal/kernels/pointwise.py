"""numba kernels for element-wise ops, one pass over the tensor each: the activations whose NumPy
form takes several passes (Erf, Gelu, Softplus, Mish, Elu), forward and backward, and a fused
Relu/Clip (``add_clip``: a residual Add and its activation; ``clip_grad``: the gradient through it).

Every kernel walks its flattened arrays in jobs of ``ELEMENTS`` elements, one job per thread at a
time. A job indexes slices of its own (``xs = a[lo:hi]``): indexed from ``blk * ELEMENTS`` into the
whole array, the same exp loop took 79 ms instead of 14 on a 64x256x28x28 tensor. The activations
compute each element in float64 and round once to the output's type; their backward kernels take
the op's input ``x``, not its output. Slow NumPy versions of each live in ``tests/naive.py``.

Two sets of kernels, picked by the input's type:

- float64 (``_erf``, ...): libm's ``erf``/``erfc``/``exp``/``log1p``/``tanh``, accurate to an ulp or
  two of float64, as the float64 central-difference gradient tests need.
- float32 (``_erf_f32``, ...): the same functions as polynomials and one division, so the loop has
  no calls and LLVM vectorises it (libm's scalar calls ran at a tenth of PyTorch's speed): ``_exp``
  (Cody-Waite reduction, a degree-8 polynomial, 2**n built from its bits), ``_erfc`` (Numerical
  Recipes' ``erfcc``, relative error below 1.2e-7), erf below 1 by its Taylor series. Measured
  against SciPy over [-10, 10]: Erf within 0.6 float32 ulp, Gelu within 1.6e-7 relative.

The float32 kernels are compiled with ``flags.FMA`` (``JIT_PARALLEL`` plus "contract" and NumPy's
error model): under Python's error model each division tests for zero and raises, and the loop does
not vectorise. The scalar helpers they call are inlined by numba (``flags.INLINE``).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from bwacal.kernels.flags import FMA, FMA_SCALAR, INLINE, JIT, JIT_PARALLEL
from bwacal.kernels.quant import ROUNDER

ELEMENTS = 1 << 16  # elements per job of the element-wise kernels

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
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            rs[i] = math.erf(np.float64(xs[i]))


@njit(**JIT_PARALLEL)
def _erf_grad(x, dy, out):
    """``out = dy * 2/sqrt(pi) * exp(-x**2)``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            rs[i] = gs[i] * (_TWO_OVER_SQRT_PI * math.exp(-v * v))


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
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            if tanh_approx:
                rs[i] = v * _sigmoid1(2.0 * _SQRT_2_OVER_PI * (v + _GELU_CUBIC * v * v * v))
            else:
                rs[i] = 0.5 * v * math.erfc(-v * _INV_SQRT2)


@njit(**JIT_PARALLEL)
def _gelu_grad(x, dy, tanh_approx, out):
    """``out = dy * d gelu/dx``: ``Phi(x) + x phi(x)``, or for the tanh form, with
    ``s = sigmoid(2u)``, ``s + 2 x s (1 - s) du/dx``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            if tanh_approx:
                s = _sigmoid1(2.0 * _SQRT_2_OVER_PI * (v + _GELU_CUBIC * v * v * v))
                d = s + 2.0 * v * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * v * v)
            else:
                d = 0.5 * math.erfc(-v * _INV_SQRT2) + v * _INV_SQRT_2PI * math.exp(-0.5 * v * v)
            rs[i] = gs[i] * d


@njit(**JIT_PARALLEL)
def _softplus(x, out):
    """``out = log(1 + exp(x))``."""
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            rs[i] = _softplus1(np.float64(xs[i]))


@njit(**JIT_PARALLEL)
def _softplus_grad(x, dy, out):
    """``out = dy * sigmoid(x)``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            rs[i] = gs[i] * _sigmoid1(np.float64(xs[i]))


@njit(**JIT_PARALLEL)
def _mish(x, out):
    """``out = x * tanh(softplus(x))``."""
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            rs[i] = v * math.tanh(_softplus1(v))


@njit(**JIT_PARALLEL)
def _mish_grad(x, dy, out):
    """``out = dy * (t + x (1 - t**2) sigmoid(x))`` with ``t = tanh(softplus(x))``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            t = math.tanh(_softplus1(v))
            rs[i] = gs[i] * (t + v * (1.0 - t * t) * _sigmoid1(v))


@njit(**JIT_PARALLEL)
def _elu(x, alpha, out):
    """``out = x`` where ``x >= 0``, else ``alpha (exp(x) - 1)``."""
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            rs[i] = v if v >= 0 else alpha * math.expm1(v)


@njit(**JIT_PARALLEL)
def _elu_grad(x, dy, alpha, out):
    """``out = dy`` where ``x >= 0``, else ``dy alpha exp(x)``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            rs[i] = gs[i] if v >= 0 else gs[i] * (alpha * math.exp(v))


# ---------------------------------------------------------------------------------------------
# float32 inputs: vectorisable forms, computed in float64


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# erf(x) / x = sum_k _ERF_TAYLOR[k] x**(2k): below |x| = 1 the 12 terms leave 1.1e-9
_ERF_TAYLOR = tuple(_TWO_OVER_SQRT_PI * (-1) ** k / (math.factorial(k) * (2 * k + 1)) for k in range(12))
(_E0, _E1, _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10, _E11) = _ERF_TAYLOR


@intrinsic
def _pow2(typingctx, n):
    """``2.0 ** n`` for an int64 ``n`` in [-1022, 1023], from its bits."""

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        bits = builder.shl(builder.add(args[0], ir.Constant(i64, 1023)), ir.Constant(i64, 52))
        return builder.bitcast(bits, ir.DoubleType())

    return types.float64(types.int64), codegen


@njit(**INLINE, **FMA_SCALAR)
def _exp_parts(v):
    """``(s, q)`` with ``exp(v) = s (1 + q)``, ``s`` a power of two and ``|q| < 0.42``: so
    ``exp(v) = s + s q`` and ``expm1(v) = s q + (s - 1)``, the latter exact near 0 (s = 1).
    ``v`` is clamped to [-708, 709] (float32 overflows and underflows well inside); NaN passes."""
    v = 709.0 if v > 709.0 else v
    v = -708.0 if v < -708.0 else v
    n = (v * _LOG2E + ROUNDER) - ROUNDER  # the nearest integer (kernels.quant.ROUNDER)
    r = v - n * _LN2
    q = r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r * (1 / 5040 + r / 40320)))))))
    return _pow2(np.int64(n)), q


@njit(**INLINE, **FMA_SCALAR)
def _exp(v):
    s, q = _exp_parts(v)
    return s + s * q


@njit(**INLINE, **FMA_SCALAR)
def _erfc(z):
    """erfc(z) for z >= 0, relative error below 1.2e-7 (Numerical Recipes, erfcc)."""
    t = 1.0 / (1.0 + 0.5 * z)
    p = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    return t * _exp(p - z * z)


@njit(**INLINE, **FMA_SCALAR)
def _erf_fast(x):
    s = x * x
    small = x * (_E0 + s * (_E1 + s * (_E2 + s * (_E3 + s * (_E4 + s * (_E5 + s * (_E6 + s * (_E7 + s * (
        _E8 + s * (_E9 + s * (_E10 + s * _E11)))))))))))
    a = abs(x)
    big = 1.0 - _erfc(a)
    big = big if x >= 0 else -big
    return small if a < 1.0 else big


@njit(**INLINE, **FMA_SCALAR)
def _phi_fast(v):
    """Phi(v), the standard normal CDF."""
    h = 0.5 * _erfc(abs(v) * _INV_SQRT2)
    return h if v < 0 else 1.0 - h


@njit(**INLINE, **FMA_SCALAR)
def _sigmoid_2u_fast(v):
    """(1 + tanh(u)) / 2 = sigmoid(2u), u = sqrt(2/pi) (v + 0.044715 v**3): Gelu's tanh form over v."""
    return 1.0 / (1.0 + _exp(-2.0 * _SQRT_2_OVER_PI * (v + _GELU_CUBIC * v * v * v)))


@njit(**INLINE, **FMA_SCALAR)
def _log1p_small(w):
    """log(1 + w) for w in [0, 1], as 2 atanh(w / (2 + w)): f <= 1/3, ten terms leave 1.4e-10."""
    f = w / (2.0 + w)
    s = f * f
    return 2.0 * f * (1.0 + s * (1 / 3 + s * (1 / 5 + s * (1 / 7 + s * (1 / 9 + s * (1 / 11 + s * (
        1 / 13 + s * (1 / 15 + s * (1 / 17 + s / 19)))))))))


@njit(**FMA)
def _erf_f32(x, out):
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            rs[i] = _erf_fast(np.float64(xs[i]))


@njit(**FMA)
def _erf_grad_f32(x, dy, out):
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            rs[i] = gs[i] * (_TWO_OVER_SQRT_PI * _exp(-v * v))


# NOTE: one kernel per Gelu form: with a flag tested inside the loop it did not vectorise


@njit(**FMA)
def _gelu_f32(x, out):
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            rs[i] = v * _phi_fast(v)


@njit(**FMA)
def _gelu_grad_f32(x, dy, out):
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            rs[i] = gs[i] * (_phi_fast(v) + v * _INV_SQRT_2PI * _exp(-0.5 * v * v))


@njit(**FMA)
def _gelu_tanh_f32(x, out):
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            rs[i] = v * _sigmoid_2u_fast(v)


@njit(**FMA)
def _gelu_tanh_grad_f32(x, dy, out):
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            c = _sigmoid_2u_fast(v)
            rs[i] = gs[i] * (c + 2.0 * v * c * (1.0 - c) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * v * v))


@njit(**FMA)
def _softplus_f32(x, out):
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            rs[i] = (v if v > 0 else 0.0) + _log1p_small(_exp(-abs(v)))


@njit(**FMA)
def _softplus_grad_f32(x, dy, out):
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            w = _exp(-abs(v))
            rs[i] = gs[i] * ((1.0 if v >= 0 else w) / (1.0 + w))


@njit(**FMA)
def _mish_f32(x, out):
    """tanh(softplus(v)) = n / (n + 2) with n = w (w + 2), w = exp(v): one exp, no log."""
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            w = _exp(v if v < 40.0 else 40.0)  # past 40, t is 1 in float64
            m = w * (w + 2.0)
            rs[i] = v * (m / (m + 2.0))


@njit(**FMA)
def _mish_grad_f32(x, dy, out):
    """``t + v (1 - t**2) sigmoid(v)`` with ``1 - t**2 = 4 (m + 1) / (m + 2)**2``."""
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            w = _exp(v if v < 40.0 else 40.0)
            m = w * (w + 2.0)
            d = 1.0 / (m + 2.0)
            rs[i] = gs[i] * (m * d + v * (4.0 * (m + 1.0) * d * d) * (w / (1.0 + w)))


@njit(**FMA)
def _elu_f32(x, alpha, out):
    a = x.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            s, q = _exp_parts(v)
            rs[i] = v if v >= 0 else alpha * (s * q + (s - 1.0))


@njit(**FMA)
def _elu_grad_f32(x, dy, alpha, out):
    a = x.reshape(-1)
    g = dy.reshape(-1)
    r = out.reshape(-1)
    n = a.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        lo = blk * ELEMENTS
        hi = min(n, lo + ELEMENTS)
        xs, rs = a[lo:hi], r[lo:hi]
        gs = g[lo:hi]
        for i in range(hi - lo):
            v = np.float64(xs[i])
            rs[i] = gs[i] if v >= 0 else gs[i] * (alpha * _exp(v))


# ---------------------------------------------------------------------------------------------
# a fused Relu/Clip: forward through a residual Add, backward through any op that applied it


@njit(**FMA)
def clip_grad(dy, y, lo_clip, hi_clip, out):
    """``out = dy`` where ``lo < y < hi``, else 0: the gradient through a fused Relu/Clip, one pass."""
    g = dy.reshape(-1)
    v = y.reshape(-1)
    r = out.reshape(-1)
    lo = v.dtype.type(lo_clip)
    hi = v.dtype.type(hi_clip)
    n = v.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        a, b = blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)
        gs, vs, rs = g[a:b], v[a:b], r[a:b]
        for i in range(b - a):
            t = vs[i]
            rs[i] = gs[i] if (t > lo) & (t < hi) else 0


@njit(**FMA)
def add_clip(a, b, lo_clip, hi_clip, out):
    """``out = min(max(a + b, lo), hi)`` for same-shape arrays, one pass: a residual Add and its Relu."""
    x = a.reshape(-1)
    z = b.reshape(-1)
    r = out.reshape(-1)
    lo = r.dtype.type(lo_clip)
    hi = r.dtype.type(hi_clip)
    n = r.size
    for blk in prange((n + ELEMENTS - 1) // ELEMENTS):
        p, q = blk * ELEMENTS, min(n, (blk + 1) * ELEMENTS)
        xs, zs, rs = x[p:q], z[p:q], r[p:q]
        for i in range(q - p):
            v = xs[i] + zs[i]
            v = lo if v < lo else v
            rs[i] = hi if v > hi else v


# ---------------------------------------------------------------------------------------------
# NumPy-facing wrappers: float64 arrays go to the libm kernels, everything else is computed in float32


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


def _unary(kernel, kernel_f32, doc):
    """The wrapper ``f(x)`` of a forward kernel pair: float64 to ``kernel``, the rest to ``kernel_f32``."""

    def forward(x):
        xs, out = _prepare(x)
        (kernel if xs.dtype == np.float64 else kernel_f32)(xs, out)
        return _result(out, x)

    forward.__doc__ = doc
    return forward


def _unary_grad(kernel, kernel_f32, doc):
    """The wrapper ``f_grad(x, dy)`` of a backward kernel pair, as ``_unary``."""

    def backward(x, dy):
        xs, g, out = _prepare(x, dy)
        (kernel if xs.dtype == np.float64 else kernel_f32)(xs, g, out)
        return _result(out, x)

    backward.__doc__ = doc
    return backward


erf = _unary(_erf, _erf_f32, "erf of a float array (same dtype).")
erf_grad = _unary_grad(_erf_grad, _erf_grad_f32, "dL/dx of ``erf(x)`` given dL/dy.")
softplus = _unary(_softplus, _softplus_f32, "``log(1 + exp(x))`` of a float array.")
softplus_grad = _unary_grad(_softplus_grad, _softplus_grad_f32,
                            "dL/dx of ``softplus(x)`` given dL/dy: ``dy * sigmoid(x)``.")
mish = _unary(_mish, _mish_f32, "``x tanh(softplus(x))`` of a float array.")
mish_grad = _unary_grad(_mish_grad, _mish_grad_f32, "dL/dx of ``mish(x)`` given dL/dy.")


def gelu(x, tanh_approx):
    """GELU of a float array: ``x Phi(x)``, or its tanh approximation."""
    xs, out = _prepare(x)
    if xs.dtype == np.float64:
        _gelu(xs, bool(tanh_approx), out)
    else:
        (_gelu_tanh_f32 if tanh_approx else _gelu_f32)(xs, out)
    return _result(out, x)


def gelu_grad(x, dy, tanh_approx):
    """dL/dx of ``gelu(x, tanh_approx)`` given dL/dy."""
    xs, g, out = _prepare(x, dy)
    if xs.dtype == np.float64:
        _gelu_grad(xs, g, bool(tanh_approx), out)
    else:
        (_gelu_tanh_grad_f32 if tanh_approx else _gelu_grad_f32)(xs, g, out)
    return _result(out, x)


def elu(x, alpha):
    """ELU of a float array: ``x`` where ``x >= 0``, else ``alpha (exp(x) - 1)``."""
    xs, out = _prepare(x)
    (_elu if xs.dtype == np.float64 else _elu_f32)(xs, float(alpha), out)
    return _result(out, x)


def elu_grad(x, dy, alpha):
    """dL/dx of ``elu(x, alpha)`` given dL/dy."""
    xs, g, out = _prepare(x, dy)
    (_elu_grad if xs.dtype == np.float64 else _elu_grad_f32)(xs, g, float(alpha), out)
    return _result(out, x)
