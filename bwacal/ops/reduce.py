"""Reductions: ReduceMean and the global pools."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, register


@register("ReduceMean")
class ReduceMean(Op):
    """ReduceMean; axes are an attribute before opset 18 and an optional input from 18 on."""

    def __init__(self, axes=None, keepdims=1, noop_with_empty_axes=0):
        self.axes_attr, self.keepdims, self.noop = axes, keepdims, noop_with_empty_axes

    def forward(self, x, axes=None):
        axes = [int(a) for a in np.asarray(axes).reshape(-1)] if axes is not None else self.axes_attr
        if not axes:
            if self.noop:
                return x, None
            axes = list(range(x.ndim))
        axes = tuple(sorted(a + x.ndim if a < 0 else a for a in axes))
        y = np.mean(x, axis=axes, keepdims=bool(self.keepdims)).astype(x.dtype, copy=False)
        return y, (x.shape, axes)

    def backward(self, ctx, dy, need):
        if ctx is None:
            return dy, None
        shape, axes = ctx
        count = int(np.prod([shape[a] for a in axes]))
        g = dy if self.keepdims else np.expand_dims(dy, axes)
        return np.broadcast_to(g / dy.dtype.type(count), shape), None


@register("GlobalAveragePool")
class GlobalAveragePool(Op):
    layout = "cnhw"  # reduces the last two axes: the same code serves NCHW and CNHW
    def forward(self, x):
        axes = tuple(range(2, x.ndim))
        return x.mean(axis=axes, keepdims=True, dtype=np.float64 if x.dtype == np.float64 else np.float32).astype(x.dtype), x.shape

    def backward(self, ctx, dy, need):
        count = int(np.prod(ctx[2:]))
        return (np.broadcast_to(dy / dy.dtype.type(count), ctx),)


@register("GlobalMaxPool")
class GlobalMaxPool(Op):
    layout = "cnhw"  # reduces the last two axes: the same code serves NCHW and CNHW
    def forward(self, x):
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        idx = flat.argmax(axis=2)
        y = np.take_along_axis(flat, idx[..., None], axis=2)
        return y.reshape(x.shape[:2] + (1,) * (x.ndim - 2)), (x.shape, idx)

    def backward(self, ctx, dy, need):
        shape, idx = ctx
        dx = np.zeros((shape[0], shape[1], int(np.prod(shape[2:]))), dtype=dy.dtype)
        np.put_along_axis(dx, idx[..., None], dy.reshape(shape[0], shape[1], 1), axis=2)
        return (dx.reshape(shape),)
