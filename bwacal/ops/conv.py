"""2-D convolution on channel-major (CNHW) activations.

Dense and grouped convs are im2col + one BLAS GEMM per group, ``W (O, C*kh*kw) @ cols``, whose
result is already the CNHW output; depthwise convs use a direct numba kernel.
"""

from __future__ import annotations

import numpy as np

from bwacal.ops import _kernels as K
from bwacal.ops.base import Op, register
from bwacal.ops.window import check_2d, window


def _pointwise(x, g):
    """A 1x1, stride-1, unpadded conv: its patches are the input itself."""
    return g.kh == 1 and g.kw == 1 and g.ho == x.shape[2] and g.wo == x.shape[3] and g.ph == 0 and g.pw == 0


def _cols(x, g):
    """(C*kh*kw, N*Ho*Wo) patches of the CNHW array ``x``; a free view for pointwise convs."""
    c, n, h, w = x.shape
    if _pointwise(x, g):
        return x.reshape(c, n * h * w)
    cols = np.empty((c * g.kh * g.kw, n * g.ho * g.wo), dtype=x.dtype)
    K.im2col(x, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, g.ho, g.wo, cols)
    return cols


@register("Conv")
class Conv(Op):
    layout = "cnhw"

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
        return self.group > 1 and self.group == x.shape[0] and w.shape[1] == 1

    def forward(self, x, w, b=None):
        if x.ndim != 4 or w.ndim != 4:
            raise ValueError("only 2-D convolution on 4-D input is supported")
        if x.shape[0] != w.shape[1] * self.group:
            raise ValueError(f"input has {x.shape[0]} channels, weight expects {w.shape[1] * self.group}")
        x = np.ascontiguousarray(x)
        g = self._geometry(x, w)
        o, n = w.shape[0], x.shape[1]
        keep = x
        if self._depthwise(x, w):
            y = np.empty((o, n, g.ho, g.wo), dtype=x.dtype)
            K.depthwise_forward(x, np.ascontiguousarray(w[:, 0]), g.sh, g.sw, g.dh, g.dw, g.ph, g.pw,
                                g.ho, g.wo, y)
            y = y.reshape(o, -1)
        else:
            cols = _cols(x, g)
            keep = cols  # the patches are what dL/dW needs: kept rather than rebuilt in backward
            w2 = w.reshape(o, -1)
            if self.group == 1:
                y = w2 @ cols
            else:
                k, og = w2.shape[1], o // self.group
                y = np.empty((o, cols.shape[1]), dtype=x.dtype)
                for i in range(self.group):
                    np.matmul(w2[i * og:(i + 1) * og], cols[i * k:(i + 1) * k], out=y[i * og:(i + 1) * og])
        if b is not None:
            y += b.reshape(o, 1).astype(y.dtype, copy=False)
        return y.reshape(o, n, g.ho, g.wo), (keep, x.shape, w, g, b is not None)

    def backward(self, ctx, dy, need):
        kept, xshape, w, g, has_b = ctx
        o = dy.shape[0]
        dy2 = np.ascontiguousarray(dy).reshape(o, -1)
        dx = dw = db = None
        if has_b and need[2]:
            db = dy2.sum(axis=1)
        if self.group > 1 and self.group == xshape[0] and w.shape[1] == 1:
            x = kept
            w3 = np.ascontiguousarray(w[:, 0])
            dy4 = dy2.reshape(dy.shape)
            if need[0]:
                dx = np.zeros_like(x)
                K.depthwise_backward_input(dy4, w3, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, dx)
            if need[1]:
                dw = np.empty(w3.shape, dtype=np.float64)
                K.depthwise_backward_weight(x, dy4, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, dw)
                dw = dw.astype(w.dtype).reshape(w.shape)
            return dx, dw, db
        w2 = w.reshape(o, -1)
        k, og = w2.shape[1], o // self.group
        if need[1]:
            cols = kept
            dw = np.empty_like(w2)
            for i in range(self.group):
                # NOTE: written as (cols @ dy.T).T: OpenBLAS takes ~100x longer on dy @ cols.T, whose
                # reduction dimension (N*Ho*Wo) is huge and whose output is tiny
                dw[i * og:(i + 1) * og] = (cols[i * k:(i + 1) * k] @ dy2[i * og:(i + 1) * og].T).T
            dw = dw.reshape(w.shape)
        if need[0]:
            dcols = np.empty((k * self.group, dy2.shape[1]), dtype=dy2.dtype)
            for i in range(self.group):
                np.matmul(w2[i * og:(i + 1) * og].T, dy2[i * og:(i + 1) * og], out=dcols[i * k:(i + 1) * k])
            if g.kh == g.kw == 1 and g.ph == g.pw == 0 and (g.ho, g.wo) == xshape[2:]:
                dx = dcols.reshape(xshape)
            else:
                dx = np.zeros(xshape, dtype=dy.dtype)
                K.col2im(dcols, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, g.ho, g.wo, dx)
        return dx, dw, db
