"""Softmax and LogSoftmax (opset < 13 flattens to 2-D at ``axis``; 13+ works on one axis)."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, register


class _SoftmaxBase(Op):
    def __init__(self, axis=None, opset=13):
        self.legacy = opset < 13
        self.axis = axis if axis is not None else (1 if self.legacy else -1)

    def _view(self, x):
        if not self.legacy:
            return x, self.axis
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        rows = int(np.prod(x.shape[:axis], dtype=np.int64))
        return x.reshape(rows, -1), 1


@register("Softmax")
class Softmax(_SoftmaxBase):
    def forward(self, x):
        v, axis = self._view(x)
        e = np.exp(v - v.max(axis=axis, keepdims=True))
        y = e / e.sum(axis=axis, keepdims=True)
        return y.reshape(x.shape), y.reshape(x.shape)

    def backward(self, ctx, dy, need):
        y, axis = self._view(ctx)
        g, _ = self._view(dy)
        dx = y * (g - (g * y).sum(axis=axis, keepdims=True))
        return (dx.reshape(ctx.shape),)


@register("LogSoftmax")
class LogSoftmax(_SoftmaxBase):
    def forward(self, x):
        v, axis = self._view(x)
        s = v - v.max(axis=axis, keepdims=True)
        y = s - np.log(np.exp(s).sum(axis=axis, keepdims=True))
        return y.reshape(x.shape), y.reshape(x.shape)

    def backward(self, ctx, dy, need):
        y, axis = self._view(ctx)
        g, _ = self._view(dy)
        dx = g - np.exp(y) * g.sum(axis=axis, keepdims=True)
        return (dx.reshape(ctx.shape),)
