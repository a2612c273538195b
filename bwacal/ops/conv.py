"""2-D convolution: im2col + BLAS for dense and grouped convs, a direct numba kernel for depthwise."""

from __future__ import annotations

import numpy as np

from bwacal.ops import _kernels as K
from bwacal.ops.base import Op, register
from bwacal.ops.window import check_2d, window


def _pointwise(x, g):
    """A 1x1, stride-1, unpadded conv: its patches are the input itself."""
    return g.kh == 1 and g.kw == 1 and g.ho == x.shape[2] and g.wo == x.shape[3] and g.ph == 0 and g.pw == 0


def _cols(x, g):
    """(N, C*kh*kw, Ho*Wo) patches of ``x``; a free view for pointwise convs."""
    n, c, h, w = x.shape
    if _pointwise(x, g):
        return x.reshape(n, c, h * w)
    cols = np.empty((n, c * g.kh * g.kw, g.ho * g.wo), dtype=x.dtype)
    K.im2col(x, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, g.ho, g.wo, cols)
    return cols


@register("Conv")
class Conv(Op):
    def __init__(self, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None,
                 strides=None):
        self.auto_pad, self.dilations, self.group = auto_pad, dilations, group
        self.kernel_shape, self.pads, self.strides = kernel_shape, pads, strides

    def check(self, shapes):
        check_2d(self.kernel_shape, shapes[:2], "convolution")

    def _geometry(self, x, w):
        return window(x.shape[2], x.shape[3], w.shape[2:], self.strides, self.dilations, self.pads,
                      self.auto_pad)

    def _depthwise(self, x, w):
        return self.group > 1 and self.group == x.shape[1] and w.shape[1] == 1

    def forward(self, x, w, b=None):
        if x.ndim != 4 or w.ndim != 4:
            raise ValueError("only 2-D convolution on NCHW input is supported")
        x = np.ascontiguousarray(x)
        g = self._geometry(x, w)
        n, o = x.shape[0], w.shape[0]
        if self._depthwise(x, w):
            y = np.empty((n, o, g.ho, g.wo), dtype=x.dtype)
            K.depthwise_forward(x, np.ascontiguousarray(w[:, 0]), g.sh, g.sw, g.dh, g.dw, g.ph, g.pw,
                                g.ho, g.wo, y)
            y = y.reshape(n, o, g.ho * g.wo)
        else:
            cols = _cols(x, g)
            if self.group == 1:
                y = np.matmul(w.reshape(o, -1), cols)
            else:
                k, og = cols.shape[1] // self.group, o // self.group
                y = np.empty((n, o, g.ho * g.wo), dtype=x.dtype)
                for i in range(self.group):
                    y[:, i * og:(i + 1) * og] = np.matmul(w[i * og:(i + 1) * og].reshape(og, -1),
                                                          cols[:, i * k:(i + 1) * k])
        if b is not None:
            y += b.reshape(1, o, 1).astype(y.dtype, copy=False)
        return y.reshape(n, o, g.ho, g.wo), (x, w, g, b is not None)

    def backward(self, ctx, dy, need):
        x, w, g, has_b = ctx
        n, o = dy.shape[:2]
        dy = np.ascontiguousarray(dy)
        dx = dw = db = None
        if has_b and need[2]:
            db = dy.sum(axis=(0, 2, 3))
        if self._depthwise(x, w):
            w3 = np.ascontiguousarray(w[:, 0])
            if need[0]:
                dx = np.zeros_like(x)
                K.depthwise_backward_input(dy, w3, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, dx)
            if need[1]:
                dw = np.empty(w3.shape, dtype=np.float64)
                K.depthwise_backward_weight(x, dy, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, dw)
                dw = dw.astype(w.dtype).reshape(w.shape)
            return dx, dw, db
        dy3 = dy.reshape(n, o, -1)
        groups = self.group
        og = o // groups
        if need[1]:
            cols = _cols(x, g)
            k = cols.shape[1] // groups
            dw = np.empty((o, k), dtype=dy.dtype)
            for i in range(groups):
                part = np.matmul(dy3[:, i * og:(i + 1) * og], cols[:, i * k:(i + 1) * k].transpose(0, 2, 1))
                dw[i * og:(i + 1) * og] = part.sum(axis=0)
            dw = dw.reshape(w.shape)
            del cols
        if need[0]:
            w2 = w.reshape(o, -1)
            k = w2.shape[1]
            dcols = np.empty((n, k * groups, dy3.shape[2]), dtype=dy.dtype)
            for i in range(groups):
                dcols[:, i * k:(i + 1) * k] = np.matmul(w2[i * og:(i + 1) * og].T, dy3[:, i * og:(i + 1) * og])
            if _pointwise(x, g):
                dx = dcols.reshape(x.shape)
            else:
                dx = np.zeros_like(x)
                K.col2im(dcols, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, g.ho, g.wo, dx)
        return dx, dw, db
