"""QuantizeLinear and DequantizeLinear (inference only), so bwacal can read the models it writes."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, Unsupported, register

_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def _per_axis(a, x, axis):
    a = np.asarray(a)
    if a.ndim == 0 or a.size == 1:
        return a.reshape(())
    shape = [1] * x.ndim
    shape[axis] = -1
    return a.reshape(shape)


@register("QuantizeLinear")
class QuantizeLinear(Op):
    differentiable = False

    def __init__(self, axis=1, saturate=1, block_size=0, output_dtype=0, precision=0):
        if block_size:
            raise Unsupported("blocked quantization (block_size > 0)")
        self.axis = axis

    def forward(self, x, scale, zero_point=None):
        dtype = np.dtype(np.uint8) if zero_point is None else np.asarray(zero_point).dtype
        if dtype not in _RANGES:
            raise ValueError(f"QuantizeLinear to {dtype} is not supported (uint8 and int8 are)")
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        s = _per_axis(scale, x, axis).astype(np.float32)
        zp = 0 if zero_point is None else _per_axis(zero_point, x, axis).astype(np.float32)
        lo, hi = _RANGES[dtype]
        return np.clip(np.round(x.astype(np.float32) / s) + zp, lo, hi).astype(dtype), None


@register("DequantizeLinear")
class DequantizeLinear(Op):
    differentiable = False

    def __init__(self, axis=1, block_size=0, output_dtype=0):
        if block_size:
            raise Unsupported("blocked quantization (block_size > 0)")
        self.axis = axis

    def forward(self, x, scale, zero_point=None):
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        s = _per_axis(scale, x, axis).astype(np.float32)
        zp = 0 if zero_point is None else _per_axis(zero_point, x, axis).astype(np.int32)
        return ((x.astype(np.int32) - zp).astype(np.float32) * s).astype(np.float32), None
