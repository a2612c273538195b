"""2-D convolution on channel-major (CNHW) activations.

Dense and grouped convs are im2col + one BLAS GEMM per group, ``W (O, C*kh*kw) @ cols``, whose
result is already the CNHW output; depthwise convs use a direct numba kernel.
"""

from __future__ import annotations

import numpy as np

from bwacal.ops import _kernels as K
from bwacal.ops.base import Op, register
from bwacal.ops.window import check_2d, window


# A layer's patch matrix is kept from forward for dL/dW up to this size and rebuilt above it, and
# patches are built for at most CHUNK_BYTES of images at a time: ResNet-18's stem at batch 64 would
# otherwise hold 472 MB per pass (measured 9 GB peak for a calibration that keeps them all).
KEEP_PATCHES_BYTES = 64 << 20
CHUNK_BYTES = 128 << 20


def _pointwise(shape, g):
    """A 1x1, stride-1, unpadded conv on an input of ``shape``: its patches are the input itself."""
    return g.kh == 1 and g.kw == 1 and (g.ho, g.wo) == tuple(shape[2:]) and g.ph == 0 and g.pw == 0


def _cols(x, g):
    """(C*kh*kw, N*Ho*Wo) patches of the CNHW array ``x``; a free view for pointwise convs."""
    c, n, h, w = x.shape
    if _pointwise(x.shape, g):
        return np.ascontiguousarray(x).reshape(c, n * h * w)
    cols = np.empty((c * g.kh * g.kw, n * g.ho * g.wo), dtype=x.dtype)
    K.im2col(x, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, g.ho, g.wo, cols)
    return cols


def _batch_chunks(x, g):
    """Batch ranges whose patch matrices stay within ``CHUNK_BYTES`` (one range for pointwise convs)."""
    n = x.shape[1]
    if _pointwise(x.shape, g):
        return [(0, n)]
    per_image = x.shape[0] * g.kh * g.kw * g.ho * g.wo * x.itemsize
    step = max(1, CHUNK_BYTES // per_image)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


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

    def _matmul(self, w2, cols):
        """Per group, ``W_g @ cols_g``: (O, columns)."""
        if self.group == 1:
            return w2 @ cols
        k, og = w2.shape[1], w2.shape[0] // self.group
        y = np.empty((w2.shape[0], cols.shape[1]), dtype=cols.dtype)
        for i in range(self.group):
            np.matmul(w2[i * og:(i + 1) * og], cols[i * k:(i + 1) * k], out=y[i * og:(i + 1) * og])
        return y

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
            w2 = w.reshape(o, -1)
            chunks = _batch_chunks(x, g)
            if len(chunks) == 1:
                cols = _cols(x, g)
                y = self._matmul(w2, cols)
                if cols.nbytes <= KEEP_PATCHES_BYTES or _pointwise(x.shape, g):
                    keep = cols  # what dL/dW needs: kept rather than rebuilt in backward
            else:
                y = np.empty((o, n, g.ho * g.wo), dtype=x.dtype)
                for lo, hi in chunks:
                    y[:, lo:hi] = self._matmul(w2, _cols(x[:, lo:hi], g)).reshape(o, hi - lo, -1)
                y = y.reshape(o, -1)
        if b is not None:
            y += b.reshape(o, 1).astype(y.dtype, copy=False)
        return y.reshape(o, n, g.ho, g.wo), (keep, x.shape, w, g, b is not None)

    def backward(self, ctx, dy, need):
        kept, xshape, w, g, has_b = ctx
        o = dy.shape[0]
        dy = np.ascontiguousarray(dy)
        dx = dw = db = None
        if has_b and need[2]:
            db = dy.reshape(o, -1).sum(axis=1)
        if self.group > 1 and self.group == xshape[0] and w.shape[1] == 1:
            x = kept
            w3 = np.ascontiguousarray(w[:, 0])
            if need[0]:
                dx = np.zeros_like(x)
                K.depthwise_backward_input(dy, w3, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, dx)
            if need[1]:
                dw = np.empty(w3.shape, dtype=np.float64)
                K.depthwise_backward_weight(x, dy, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, dw)
                dw = dw.astype(w.dtype).reshape(w.shape)
            return dx, dw, db
        w2 = w.reshape(o, -1)
        pointwise = _pointwise(xshape, g)  # one chunk; dL/dx is the patch gradient itself
        if kept.ndim == 2:  # the patches of the whole batch, kept from forward
            chunks = [(0, xshape[1], kept)]
        else:  # the input: rebuild the patches chunk by chunk
            chunks = [(lo, hi, None) for lo, hi in _batch_chunks(kept, g)]
        if need[1]:
            dw = np.zeros_like(w2)
        if need[0] and not pointwise:
            dx = np.zeros(xshape, dtype=dy.dtype)
        for lo, hi, cols in chunks:
            dyc = dy[:, lo:hi].reshape(o, -1) if (lo, hi) != (0, xshape[1]) else dy.reshape(o, -1)
            if need[1]:
                cols = cols if cols is not None else _cols(kept[:, lo:hi], g)
                dw += self._weight_grad(cols, dyc)
            if need[0]:
                dcols = self._input_grad(w2, dyc)
                if pointwise:
                    dx = dcols.reshape(xshape)
                else:
                    K.col2im(dcols, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, g.ho, g.wo, dx[:, lo:hi])
        return dx, (dw.reshape(w.shape) if dw is not None else None), db

    def _weight_grad(self, cols, dy2):
        k, og = cols.shape[0] // self.group, dy2.shape[0] // self.group
        dw = np.empty((dy2.shape[0], k), dtype=dy2.dtype)
        for i in range(self.group):
            # NOTE: written as (cols @ dy.T).T: OpenBLAS takes ~100x longer on dy @ cols.T, whose
            # reduction dimension (N*Ho*Wo) is huge and whose output is tiny
            dw[i * og:(i + 1) * og] = (cols[i * k:(i + 1) * k] @ dy2[i * og:(i + 1) * og].T).T
        return dw

    def _input_grad(self, w2, dy2):
        k, og = w2.shape[1], w2.shape[0] // self.group
        dcols = np.empty((k * self.group, dy2.shape[1]), dtype=dy2.dtype)
        for i in range(self.group):
            np.matmul(w2[i * og:(i + 1) * og].T, dy2[i * og:(i + 1) * og], out=dcols[i * k:(i + 1) * k])
        return dcols
