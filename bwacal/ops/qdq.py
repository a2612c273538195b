"""QuantizeLinear, DequantizeLinear, ConvInteger and MatMulInteger (inference only), so bwacal can read
the models it writes (``qdq`` and ``bitplanes``)."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, Unsupported, register
from bwacal.ops.conv import Conv

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


def _centred(x, zero_point, axis=None):
    """``x - zero_point`` in float64, where every integer sum of products below 2**53 is exact."""
    x = np.asarray(x).astype(np.float64)
    if zero_point is None:
        return x
    zp = np.asarray(zero_point).astype(np.float64)
    if zp.size > 1 and axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        zp = zp.reshape(shape)
    return x - zp


@register("ConvInteger")
class ConvInteger(Conv):
    """Integer convolution: ``(x - x_zero_point) * (w - w_zero_point)`` summed in int32, padding with the
    zero point (a padded entry contributes nothing), by the float64 GEMM path of Conv (exact)."""

    differentiable = False
    fuses_clip = False

    def forward(self, x, w, x_zero_point=None, w_zero_point=None):
        xf, wf = _centred(x, x_zero_point), _centred(w, w_zero_point, axis=0)
        if xf.ndim != 4 or wf.ndim != 4:
            raise ValueError("only 2-D integer convolution on 4-D input is supported")
        y, _ = self._gemm_forward(np.ascontiguousarray(xf), wf, None, self._geometry(xf, wf))
        return np.rint(y).astype(np.int32), None


@register("MatMulInteger")
class MatMulInteger(Op):
    """``(a - a_zero_point) @ (b - b_zero_point)`` in int32 (b's zero point per column or scalar)."""

    differentiable = False

    def forward(self, a, b, a_zero_point=None, b_zero_point=None):
        af = _centred(a, a_zero_point)
        bf = _centred(b, b_zero_point)
        return np.rint(np.matmul(af, bf)).astype(np.int32), None
