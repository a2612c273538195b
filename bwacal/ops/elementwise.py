"""Element-wise ops: arithmetic with broadcasting and activations."""

from __future__ import annotations

import numpy as np

from bwacal.graph import ONNX_DTYPES
from bwacal.ops._frames import add_clip, clip_grad
from bwacal.ops.base import Op, Unsupported, register


@register("Add")
class Add(Op):
    layout = "follow"
    fuses_clip = True  # a residual Add followed by Relu: one pass, see bwacal/engine.py

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
