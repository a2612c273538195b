"""Element-wise ops: arithmetic with broadcasting, variadic Sum/Mean/Max/Min, unary math and activations."""

from __future__ import annotations

import numpy as np

from bwacal.graph import ONNX_DTYPES
from bwacal.kernels import pointwise
from bwacal.kernels.pointwise import add_clip, clip_grad
from bwacal.ops.base import Op, Unsupported, register


@register("Add")
class Add(Op):
    layout = "follow"
    fuses_clip = True  # a residual Add followed by Relu: one pass (kernels.pointwise.add_clip)

    def forward(self, a, b, clip=None):
        if clip is None:
            return a + b, None
        if a.shape == b.shape and a.dtype == b.dtype and a.dtype.kind == "f":
            y = np.empty(a.shape, dtype=a.dtype)
            add_clip(np.ascontiguousarray(a), np.ascontiguousarray(b), clip[0], clip[1], y)
        else:
            y = a + b
            y = np.minimum(np.maximum(y, y.dtype.type(clip[0])), y.dtype.type(clip[1]))
        return y, (clip, y)

    def backward(self, ctx, dy, need):
        if ctx is not None:
            clip, y = ctx
            masked = np.empty(y.shape, dtype=y.dtype)
            clip_grad(np.ascontiguousarray(np.broadcast_to(dy, y.shape), dtype=y.dtype), y, clip[0], clip[1], masked)
            dy = masked
        return dy, dy


@register("Sub")
class Sub(Op):
    layout = "follow"

    def forward(self, a, b):
        return a - b, None

    def backward(self, ctx, dy, need):
        return dy, (-dy if need[1] else None)


@register("Mul")
class Mul(Op):
    layout = "follow"

    def forward(self, a, b):
        return a * b, (a, b)

    def backward(self, ctx, dy, need):
        a, b = ctx
        return (dy * b if need[0] else None), (dy * a if need[1] else None)


@register("Div")
class Div(Op):
    layout = "follow"

    def forward(self, a, b):
        if np.issubdtype(np.result_type(a, b), np.integer):
            # ONNX integer division truncates toward zero
            return (np.trunc(np.divide(a, b))).astype(np.result_type(a, b)), None
        return a / b, (a, b)

    def backward(self, ctx, dy, need):
        a, b = ctx
        da = dy / b if need[0] else None
        db = -dy * a / (b * b) if need[1] else None
        return da, db


@register("Relu")
class Relu(Op):
    layout = "follow"

    def as_clip(self, consts):
        return 0.0, np.inf

    def forward(self, x):
        y = np.maximum(x, 0)
        return y, y

    def backward(self, ctx, dy, need):
        return (dy * (ctx > 0),)


@register("LeakyRelu")
class LeakyRelu(Op):
    layout = "follow"

    def __init__(self, alpha=0.01):
        self.alpha = alpha

    def forward(self, x):
        return np.where(x >= 0, x, x * x.dtype.type(self.alpha)), x

    def backward(self, ctx, dy, need):
        return (np.where(ctx >= 0, dy, dy * dy.dtype.type(self.alpha)),)


@register("PRelu")
class PRelu(Op):
    layout = "follow"

    def forward(self, x, slope):
        return np.where(x >= 0, x, x * slope), (x, slope)

    def backward(self, ctx, dy, need):
        x, slope = ctx
        neg = x < 0
        dx = np.where(neg, dy * slope, dy) if need[0] else None
        dslope = np.where(neg, dy * x, 0).astype(dy.dtype) if need[1] else None
        return dx, dslope


@register("Clip")
class Clip(Op):
    """Clip; before opset 11 the bounds are attributes, from 11 on optional inputs."""

    layout = "follow"

    def __init__(self, min=None, max=None, opset=13):
        self.lo_attr, self.hi_attr = min, max

    def as_clip(self, consts):
        bounds = [self.lo_attr, self.hi_attr]
        for k, value in enumerate(consts[:2]):
            if value is not None:
                if np.size(value) != 1:
                    return None
                bounds[k] = float(np.asarray(value).reshape(()))
        return (-np.inf if bounds[0] is None else float(bounds[0]),
                np.inf if bounds[1] is None else float(bounds[1]))

    def forward(self, x, lo=None, hi=None):
        lo = self.lo_attr if lo is None else lo
        hi = self.hi_attr if hi is None else hi
        y = np.clip(x, None if lo is None else np.asarray(lo, dtype=x.dtype),
                    None if hi is None else np.asarray(hi, dtype=x.dtype))
        return y, (x, lo, hi)

    def backward(self, ctx, dy, need):
        x, lo, hi = ctx
        inside = np.ones(x.shape, dtype=bool)
        if lo is not None:
            inside &= x >= lo
        if hi is not None:
            inside &= x <= hi
        return (np.where(inside, dy, 0).astype(dy.dtype, copy=False), None, None)


@register("Sigmoid")
class Sigmoid(Op):
    layout = "follow"

    def forward(self, x):
        y = np.empty_like(x)
        pos = x >= 0
        # NOTE: split by sign so exp never overflows
        y[pos] = 1 / (1 + np.exp(-x[pos]))
        e = np.exp(x[~pos])
        y[~pos] = e / (1 + e)
        return y, y

    def backward(self, ctx, dy, need):
        return (dy * ctx * (1 - ctx),)


@register("Tanh")
class Tanh(Op):
    layout = "follow"

    def forward(self, x):
        y = np.tanh(x)
        return y, y

    def backward(self, ctx, dy, need):
        return (dy * (1 - ctx * ctx),)


@register("HardSigmoid")
class HardSigmoid(Op):
    layout = "follow"

    def __init__(self, alpha=0.2, beta=0.5):
        self.alpha, self.beta = alpha, beta

    def forward(self, x):
        t = x * x.dtype.type(self.alpha) + x.dtype.type(self.beta)
        return np.clip(t, 0, 1), t

    def backward(self, ctx, dy, need):
        return (np.where((ctx > 0) & (ctx < 1), dy * dy.dtype.type(self.alpha), 0).astype(dy.dtype),)


@register("HardSwish")
class HardSwish(Op):
    layout = "follow"

    def forward(self, x):
        return x * np.clip(x / 6 + x.dtype.type(0.5), 0, 1), x

    def backward(self, ctx, dy, need):
        x = ctx
        g = np.where(x < -3, 0, np.where(x > 3, 1, (2 * x + 3) / 6)).astype(dy.dtype)
        return (dy * g,)


@register("Identity")
class Identity(Op):
    layout = "follow"

    def forward(self, x):
        return x, None

    def backward(self, ctx, dy, need):
        return (dy,)


@register("Dropout")
class Dropout(Op):
    """Inference-mode dropout: the identity (ratio and training_mode inputs are ignored unless set)."""

    max_outputs = 2

    def __init__(self, ratio=0.5, seed=None, is_test=None):
        pass

    def check(self, shapes):
        if len(shapes) > 2 and shapes[2] is not None:
            raise Unsupported("the training_mode input (only inference-mode Dropout is supported)")

    def forward(self, x, ratio=None, training_mode=None):
        if training_mode is not None and bool(np.asarray(training_mode)):
            raise ValueError("Dropout in training mode is not supported (bwacal runs inference graphs)")
        mask = np.ones(x.shape, dtype=bool)
        return (x, mask), None

    def backward(self, ctx, dy, need):
        return (dy, None, None)


@register("Cast")
class Cast(Op):
    differentiable = False

    def __init__(self, to, saturate=1):
        if to not in ONNX_DTYPES:
            raise Unsupported(f"cast to element type {to} not supported")
        self.dtype = ONNX_DTYPES[to]

    def forward(self, x):
        return np.asarray(x).astype(self.dtype), None


# variadic, broadcasting


@register("Sum")
class Sum(Op):
    layout = "follow"

    def forward(self, *xs):
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return y, len(xs)

    def backward(self, ctx, dy, need):
        return tuple(dy if wanted else None for wanted in need)


@register("Mean")
class Mean(Op):
    layout = "follow"

    def forward(self, *xs):
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return y / y.dtype.type(len(xs)), len(xs)

    def backward(self, ctx, dy, need):
        g = dy / dy.dtype.type(ctx)
        return tuple(g if wanted else None for wanted in need)


class _Extremum(Op):
    """Max or Min of any number of broadcasting inputs. The gradient goes to the input that holds
    the result; where k inputs tie for it, each gets ``dy / k`` (torch.maximum/minimum split a
    two-way tie the same way, so the gradients sum to ``dy`` either way)."""

    layout = "follow"
    pick = None  # np.maximum or np.minimum

    def forward(self, *xs):
        y = xs[0]
        for x in xs[1:]:
            y = type(self).pick(y, x)
        return y, (xs, y)

    def backward(self, ctx, dy, need):
        xs, y = ctx
        if len(xs) == 1:
            return (dy,)
        won = [x == y for x in xs]
        ties = won[0].astype(dy.dtype)
        for w in won[1:]:
            ties = ties + w
        share = dy / np.maximum(ties, 1)  # 0 winners only where y is NaN
        return tuple(np.where(w, share, 0).astype(dy.dtype, copy=False) if wanted else None
                     for w, wanted in zip(won, need))


@register("Max")
class Max(_Extremum):
    pick = np.maximum


@register("Min")
class Min(_Extremum):
    pick = np.minimum


@register("Mod")
class Mod(Op):
    """``fmod=0``: the remainder takes the divisor's sign (Python's %); ``fmod=1``: the dividend's (C's
    fmod). The gradient is dy for the dividend and ``-dy * q`` for the divisor, q the integer
    quotient the remainder was taken with (floor(a/b) or trunc(a/b))."""

    layout = "follow"

    def __init__(self, fmod=0):
        self.fmod = bool(fmod)

    def forward(self, a, b):
        y = np.fmod(a, b) if self.fmod else np.mod(a, b)
        return y, (a, b)

    def backward(self, ctx, dy, need):
        a, b = ctx
        db = None
        if need[1]:
            q = a / b
            db = -dy * (np.trunc(q) if self.fmod else np.floor(q))
        return dy, db


@register("Pow")
class Pow(Op):
    """``a ** b`` in the base's type (from opset 12 the exponent may have another type). The gradient
    for the exponent is ``dy * y * log(a)`` where ``a > 0`` and 0 elsewhere: a real power of a
    non-positive base has no derivative in the exponent (torch gives NaN for ``a < 0``)."""

    layout = "follow"

    def forward(self, a, b):
        y = np.power(a, b)
        if y.dtype != a.dtype:
            y = y.astype(a.dtype)
        return y, (a, b, y)

    def backward(self, ctx, dy, need):
        a, b, y = ctx
        da = db = None
        if need[0]:
            da = dy * b * np.power(a, b - 1)
        if need[1]:
            pos = a > 0
            db = dy * np.where(pos, y, 0) * np.log(np.where(pos, a, 1))
        return da, db


# unary math


class _Unary(Op):
    layout = "follow"


@register("Neg")
class Neg(_Unary):
    def forward(self, x):
        return np.negative(x), None

    def backward(self, ctx, dy, need):
        return (-dy,)


@register("Abs")
class Abs(_Unary):
    def forward(self, x):
        return np.abs(x), x

    def backward(self, ctx, dy, need):
        return (dy * np.sign(ctx),)


@register("Exp")
class Exp(_Unary):
    def forward(self, x):
        y = np.exp(x)
        return y, y

    def backward(self, ctx, dy, need):
        return (dy * ctx,)


@register("Log")
class Log(_Unary):
    def forward(self, x):
        return np.log(x), x

    def backward(self, ctx, dy, need):
        return (dy / ctx,)


@register("Sqrt")
class Sqrt(_Unary):
    def forward(self, x):
        y = np.sqrt(x)
        return y, y

    def backward(self, ctx, dy, need):
        return (dy / (2 * ctx),)


@register("Reciprocal")
class Reciprocal(_Unary):
    def forward(self, x):
        y = np.reciprocal(x)
        return y, y

    def backward(self, ctx, dy, need):
        return (-dy * ctx * ctx,)


class _Piecewise(_Unary):
    """Sign, Floor, Ceil, Round: piecewise constant, so the gradient is zero (as torch gives)."""

    fn = None

    def forward(self, x):
        return type(self).fn(x), None

    def backward(self, ctx, dy, need):
        return (np.zeros_like(dy),)


@register("Sign")
class Sign(_Piecewise):
    fn = np.sign


@register("Floor")
class Floor(_Piecewise):
    fn = np.floor


@register("Ceil")
class Ceil(_Piecewise):
    fn = np.ceil


@register("Round")
class Round(_Piecewise):
    fn = np.round  # half to even, as ONNX rounds


# activations (the one-pass kernels are in bwacal/kernels/pointwise.py)


@register("Erf")
class Erf(_Unary):
    def forward(self, x):
        return pointwise.erf(x), x

    def backward(self, ctx, dy, need):
        return (pointwise.erf_grad(ctx, dy),)


@register("Gelu")
class Gelu(_Unary):
    def __init__(self, approximate="none"):
        if approximate not in ("none", "tanh"):
            raise Unsupported(f"approximate='{approximate}' (supported: 'none', 'tanh')")
        self.tanh_approx = approximate == "tanh"

    def forward(self, x):
        return pointwise.gelu(x, self.tanh_approx), x

    def backward(self, ctx, dy, need):
        return (pointwise.gelu_grad(ctx, dy, self.tanh_approx),)


@register("Softplus")
class Softplus(_Unary):
    def forward(self, x):
        return pointwise.softplus(x), x

    def backward(self, ctx, dy, need):
        return (pointwise.softplus_grad(ctx, dy),)


@register("Mish")
class Mish(_Unary):
    def forward(self, x):
        return pointwise.mish(x), x

    def backward(self, ctx, dy, need):
        return (pointwise.mish_grad(ctx, dy),)


@register("Elu")
class Elu(_Unary):
    def __init__(self, alpha=1.0):
        self.alpha = alpha

    def forward(self, x):
        return pointwise.elu(x, self.alpha), x

    def backward(self, ctx, dy, need):
        return (pointwise.elu_grad(ctx, dy, self.alpha),)


@register("Selu")
class Selu(_Unary):
    """``gamma * elu(x, alpha)``: the spec's ``x <= 0`` branch and Elu's ``x < 0`` agree at 0."""

    def __init__(self, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
        self.alpha, self.gamma = alpha, gamma

    def forward(self, x):
        return pointwise.elu(x, self.alpha) * x.dtype.type(self.gamma), x

    def backward(self, ctx, dy, need):
        return (pointwise.elu_grad(ctx, dy, self.alpha) * dy.dtype.type(self.gamma),)


@register("Celu")
class Celu(_Unary):
    """``max(0, x) + min(0, alpha (exp(x / alpha) - 1))`` = ``alpha * elu(x / alpha, 1)``."""

    def __init__(self, alpha=1.0):
        self.alpha = alpha

    def forward(self, x):
        a = x.dtype.type(self.alpha)
        return pointwise.elu(x / a, 1.0) * a, x

    def backward(self, ctx, dy, need):
        return (pointwise.elu_grad(ctx / ctx.dtype.type(self.alpha), dy, 1.0),)


@register("Softsign")
class Softsign(_Unary):
    def forward(self, x):
        return x / (1 + np.abs(x)), x

    def backward(self, ctx, dy, need):
        d = 1 + np.abs(ctx)
        return (dy / (d * d),)
