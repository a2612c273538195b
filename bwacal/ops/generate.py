"""Ops that make a tensor from a shape or a range rather than from data: ConstantOfShape, Range."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, Unsupported, register


@register("ConstantOfShape")
class ConstantOfShape(Op):
    """A tensor of the shape given by a 1-D int64 input, filled with ``value`` (a one-element
    tensor; float32 0 by default)."""

    differentiable = False

    def __init__(self, value=None):
        if value is None:
            value = np.zeros(1, dtype=np.float32)
        value = np.asarray(value)
        if value.size != 1:
            raise Unsupported(f"value must hold one element, got shape {value.shape}")
        self.value = value.reshape(())

    def forward(self, shape):
        shape = tuple(int(d) for d in np.asarray(shape).reshape(-1))
        if any(d < 0 for d in shape):
            raise ValueError(f"ConstantOfShape: negative dimension in shape {shape}")
        return np.full(shape, self.value, dtype=self.value.dtype), None


@register("Range")
class Range(Op):
    """``start + k * delta`` for k in 0 .. max(ceil((limit - start) / delta), 0) - 1, in start's type."""

    differentiable = False

    def forward(self, start, limit, delta):
        start, limit, delta = (np.asarray(a).reshape(()) for a in (start, limit, delta))
        if delta == 0:
            raise ValueError("Range: delta is 0")
        dtype = start.dtype
        if dtype.kind in "iu":  # exact: -((start - limit) // delta) is ceil((limit - start) / delta)
            n = max(-((int(start) - int(limit)) // int(delta)), 0)
        else:  # in the inputs' own type, as the spec's function body and ONNX Runtime compute it
            n = max(int(np.ceil((limit - start) / delta)), 0)
        y = start + np.arange(n, dtype=dtype) * delta.astype(dtype)
        return y.astype(dtype, copy=False), None
