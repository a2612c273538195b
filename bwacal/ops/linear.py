"""Matrix products: Gemm and MatMul."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, register


@register("Gemm")
class Gemm(Op):
    """Y = alpha * A' @ B' + beta * C, with A' = A.T if transA and B' = B.T if transB."""

    def __init__(self, alpha=1.0, beta=1.0, transA=0, transB=0, broadcast=None):
        self.alpha, self.beta, self.transA, self.transB = alpha, beta, transA, transB

    def forward(self, a, b, c=None):
        at = a.T if self.transA else a
        bt = b.T if self.transB else b
        y = at @ bt
        if self.alpha != 1.0:
            y *= y.dtype.type(self.alpha)
        if c is not None:
            y += c * y.dtype.type(self.beta) if self.beta != 1.0 else c
        return y, (a, b)

    def backward(self, ctx, dy, need):
        a, b = ctx
        at = a.T if self.transA else a
        bt = b.T if self.transB else b
        g = dy * dy.dtype.type(self.alpha) if self.alpha != 1.0 else dy
        da = db = dc = None
        if need[0]:
            dat = g @ bt.T
            da = dat.T if self.transA else dat
        if need[1]:
            dbt = at.T @ g
            db = dbt.T if self.transB else dbt
        if len(need) > 2 and need[2]:
            dc = dy * dy.dtype.type(self.beta) if self.beta != 1.0 else dy
        return da, db, dc


@register("MatMul")
class MatMul(Op):
    """NumPy matmul semantics: 1-D operands are promoted, leading dims broadcast.

    A stack of rows times one matrix ((N, T, D) @ (D, E): a transformer's Linear) is one 2-D GEMM
    on the (N*T, D) view, forward and backward, and dL/dB one GEMM over all rows; np.matmul would
    run N small GEMMs and leave the engine an (N, D, E) gradient to sum.
    """

    def forward(self, a, b):
        if a.ndim > 2 and b.ndim == 2:
            return (a.reshape(-1, a.shape[-1]) @ b).reshape(a.shape[:-1] + b.shape[1:]), (a, b)
        return np.matmul(a, b), (a, b)

    def backward(self, ctx, dy, need):
        a, b = ctx
        if a.ndim > 2 and b.ndim == 2:
            g = np.asarray(dy).reshape(-1, b.shape[1])
            da = (g @ b.T).reshape(a.shape) if need[0] else None
            db = a.reshape(-1, a.shape[-1]).T @ g if need[1] else None
            return da, db
        # NOTE: restore the axes that 1-D operands drop (b first: both 1-D gives a scalar dy);
        # the engine sums the broadcast batch dims away
        g = np.asarray(dy)
        if b.ndim == 1:
            g = g[..., None]
        if a.ndim == 1:
            g = g[..., None, :]
        da = db = None
        if need[0]:
            da = np.matmul(g, np.swapaxes(b[:, None] if b.ndim == 1 else b, -1, -2))
            if a.ndim == 1:
                da = da[..., 0, :]
        if need[1]:
            db = np.matmul(np.swapaxes(a[None, :] if a.ndim == 1 else a, -1, -2), g)
            if b.ndim == 1:
                db = db[..., 0]
        return da, db
