"""Winograd F(2x2, 3x3): 3x3, stride-1, padding-1 dense convs with at least ``MIN_CHANNELS`` channels.

A 2x2 block of outputs is ``A^T [(G g G^T) * (B^T d B)] A`` for the 4x4 input tile ``d`` under it
(tiles at stride 2) and each 3x3 kernel ``g``: 16 products per block instead of 36, so the multiply
work of the conv becomes 16 GEMMs, one per tile element ``k``, ``M[k] (O, P) = U[k] (O, C) @ V[k]
(C, P)`` over the ``P`` tiles of the batch, 2.25x fewer multiply-adds than the direct conv (less
where an odd image size leaves half-empty tiles). The transforms are additions (and halvings in G);
the GEMMs are BLAS, one per thread in a numba ``prange``.

Backward follows from the same products. dL/dx is the Winograd conv of dL/dy with each kernel
rotated half a turn and transposed: ``G rot(g) G^T`` is ``G g G^T`` with its first and last rows and
columns swapped, so its GEMMs read ``U[SWAP[k]].T``. dL/dW is ``G^T [sum over tiles of
(A dy A^T) * (B^T d B)] G`` (the transpose of the forward's algebra): 16 GEMMs ``(O, P) @ (P, C)``.

float32 only, where measured faster than the direct kernels (ResNet-18's 128-, 256- and 512-channel
layers); the sums are rounded differently from the direct conv, within 1e-6 of a float64 reference on
those layers. A transform adds and subtracts neighbouring pixels, so an infinite pixel would make NaN
where the direct conv gives +-inf: a conv whose input, weights or dL/dy hold a non-finite value runs
the direct kernels instead (the transforms count them as they go).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bwacal.kernels import blas
from bwacal.kernels.flags import FMA, FMA_REDUCE, INLINE
from bwacal.kernels.simd import sclip, smask

# Below this many input or output channels the transforms (memory-bound) cost more than the GEMMs
# save: ResNet-18's 64-channel 56x56 layer's forward+backward took 28.1 ms direct against 35.7 (its
# GEMMs at 53 GMAC/s, against 78-89 for 128 channels and more), ResNet-20's 64-channel 8x8 at
# batch 128 9.8 against 10.2.
MIN_CHANNELS = 128
TILE = 16  # elements of a transformed 4x4 tile
# Each k's matrix starts this many floats after the last one ends: 16 rows at a power-of-two stride
# land in the same cache sets (the output transform of a 512x512 layer on 128 tiles ran 8.0 ms with
# (16, O, P) arrays and 0.3 ms with the gap).
GAP = 64
SPAN = 4096  # tiles per float32 dL/dW GEMM; their partial sums are added in float64
# The forward keeps its input's transform for dL/dW up to this size (recomputed above it): ResNet-18's
# at batch 8 are 4-13 MB each, 7 ms of a forward+backward to recompute.
KEEP_BYTES = 32 << 20
# tile element k = 4a + b of the rotated kernel's transform is element SWAP[k] of the kernel's
SWAP = np.array([4 * (3 - a if a in (0, 3) else a) + (3 - b if b in (0, 3) else b)
                 for a in range(4) for b in range(4)], dtype=np.int64)


def applies(x, w, g, group) -> bool:
    """Whether a Conv on ``x`` (CNHW) with weights ``w`` and window ``g`` runs here."""
    return (x.dtype == np.float32 and w.dtype == np.float32 and group == 1
            and (g.kh, g.kw, g.sh, g.sw, g.dh, g.dw) == (3, 3, 1, 1, 1, 1)
            and (g.ph, g.pw, g.pad_end_h, g.pad_end_w) == (1, 1, 1, 1)
            and min(w.shape[0], w.shape[1]) >= MIN_CHANNELS)


def tiles(n, h, w) -> int:
    return n * ((h + 1) // 2) * ((w + 1) // 2)


def stacked(rows, cols, dtype=np.float32):
    """16 (rows, cols) matrices, each ``GAP`` elements after the last: (flat buffer, stride)."""
    stride = rows * cols + GAP
    return np.empty(TILE * stride, dtype=dtype), stride


def forward(x, w, bias, lo, hi):
    """The conv's output (O, N, H, W) clipped to [lo, hi], and what backward reads (U, and V up to
    ``KEEP_BYTES``); None if ``x`` or ``w`` hold a non-finite value."""
    c, n, h, wd = x.shape
    o = w.shape[0]
    p = tiles(n, h, wd)
    u, us = stacked(o, c)
    if _weights(np.ascontiguousarray(w), u, us):
        return None
    v, vs = stacked(c, p)
    if _input(x, v, vs):
        return None
    m, ms = stacked(o, p)
    _gemm("_products")(u, us, v, vs, m, ms, o, c, p)
    y = np.empty((o, n, h, wd), dtype=np.float32)
    _output(m, ms, bias, lo, hi, y)
    return y, (u, us, v if v.nbytes <= KEEP_BYTES else None, vs)


def backward(x, w, kept, dy, mask, need_dx, need_dw):
    """dL/dx, dL/dW and dL/db (float64 sums) of the conv, from dL/dy through the fused clip ``mask =
    (y, lo, hi)`` (y None: no clip); None if dL/dy holds a non-finite value."""
    c, n, h, wd = x.shape
    o = dy.shape[0]
    p = tiles(n, h, wd)
    y, lo, hi = mask
    vb, bs = stacked(o, p)
    va, as_ = stacked(o, p)
    db = np.empty(o, dtype=np.float64)
    if _grad(dy, dy if y is None else y, y is not None, lo, hi, vb, bs, va, as_, db):
        return None
    dx = dw = None
    u, us, v, vs = kept
    if need_dx:
        m, ms = stacked(c, p)
        _gemm("_input_grad_products")(u, us, vb, bs, m, ms, c, o, p)
        dx = np.empty(x.shape, dtype=np.float32)
        _output(m, ms, np.zeros(c, dtype=np.float32), -np.inf, np.inf, dx)
    if need_dw:
        if v is None:
            v, vs = stacked(c, p)
            _input(x, v, vs)
        if p <= SPAN:
            acc, acs = stacked(o, c)
            _gemm("_weight_grad_products")(va, as_, v, vs, o, c, p, acc, acs)
        else:
            acc, acs = stacked(o, c, np.float64)
            acc[:] = 0
            _gemm("_weight_grad_spans")(va, as_, v, vs, o, c, p, SPAN, acc, acs)
        dw = np.empty(w.shape, dtype=np.float32)
        _weight_grad(acc, acs, dw)
    return dx, dw, db


@njit(**INLINE)
def _g(g0, g1, g2):
    """G (g0, g1, g2): the kernel transform along one axis."""
    return g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2


@njit(**INLINE)
def _bt(d0, d1, d2, d3):
    """B^T (d0..d3): the input transform along one axis."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(**INLINE)
def _at(m0, m1, m2, m3):
    """A^T (m0..m3): two outputs from a transformed tile along one axis."""
    return m0 + m1 + m2, m1 - m2 - m3


@njit(**INLINE)
def _a(d0, d1):
    """A (d0, d1): dL/dy of two outputs into the transformed tile along one axis."""
    return d0, d0 + d1, d0 - d1, -d1


@njit(**INLINE)
def _gt(m0, m1, m2, m3):
    """G^T (m0..m3): a transformed tile's dL/dW along one axis (three taps)."""
    return m0 + 0.5 * (m1 + m2), 0.5 * (m1 - m2), 0.5 * (m1 + m2) + m3


@njit(**FMA)
def _weights(w, u, us):
    """``u[k*us + o*C + c]`` = element k of ``G w[o, c] G^T``; returns how many output channels have a
    non-finite weight."""
    o_, c_ = w.shape[0], w.shape[1]
    bad = 0
    for o in prange(o_):
        nonfinite = np.float32(0.0)  # z - z is NaN for inf and NaN, 0 otherwise: no branch
        for c in range(c_):
            for i in range(3):
                for j in range(3):
                    nonfinite += w[o, c, i, j] - w[o, c, i, j]
            a00, a10, a20, a30 = _g(w[o, c, 0, 0], w[o, c, 1, 0], w[o, c, 2, 0])
            a01, a11, a21, a31 = _g(w[o, c, 0, 1], w[o, c, 1, 1], w[o, c, 2, 1])
            a02, a12, a22, a32 = _g(w[o, c, 0, 2], w[o, c, 1, 2], w[o, c, 2, 2])
            e = o * c_ + c
            u[e], u[us + e], u[2 * us + e], u[3 * us + e] = _g(a00, a01, a02)
            u[4 * us + e], u[5 * us + e], u[6 * us + e], u[7 * us + e] = _g(a10, a11, a12)
            u[8 * us + e], u[9 * us + e], u[10 * us + e], u[11 * us + e] = _g(a20, a21, a22)
            u[12 * us + e], u[13 * us + e], u[14 * us + e], u[15 * us + e] = _g(a30, a31, a32)
        if nonfinite != 0:
            bad += 1
    return bad


@njit(**INLINE)
def _store_bt(buf, r, s, v, vs, e):
    """``v[k*vs + e]`` = element k of ``B^T buf[r:r+4, s:s+4] B``."""
    a00, a10, a20, a30 = _bt(buf[r, s], buf[r + 1, s], buf[r + 2, s], buf[r + 3, s])
    a01, a11, a21, a31 = _bt(buf[r, s + 1], buf[r + 1, s + 1], buf[r + 2, s + 1], buf[r + 3, s + 1])
    a02, a12, a22, a32 = _bt(buf[r, s + 2], buf[r + 1, s + 2], buf[r + 2, s + 2], buf[r + 3, s + 2])
    a03, a13, a23, a33 = _bt(buf[r, s + 3], buf[r + 1, s + 3], buf[r + 2, s + 3], buf[r + 3, s + 3])
    v[e], v[vs + e], v[2 * vs + e], v[3 * vs + e] = _bt(a00, a01, a02, a03)
    v[4 * vs + e], v[5 * vs + e], v[6 * vs + e], v[7 * vs + e] = _bt(a10, a11, a12, a13)
    v[8 * vs + e], v[9 * vs + e], v[10 * vs + e], v[11 * vs + e] = _bt(a20, a21, a22, a23)
    v[12 * vs + e], v[13 * vs + e], v[14 * vs + e], v[15 * vs + e] = _bt(a30, a31, a32, a33)


@njit(**INLINE)
def _store_image_bt(buf, th, tw, v, vs, e):
    """``_store_bt`` of every tile of one image's bordered ``buf``: block t at ``e + t``."""
    for ti in range(th):
        for tj in range(tw):
            _store_bt(buf, 2 * ti, 2 * tj, v, vs, e + ti * tw + tj)


@njit(**FMA)
def _input(x, v, vs):
    """``v[k*vs + c*P + t]`` = element k of ``B^T d B`` for the 4x4 tile d of channel c under the
    output block t (image-major, then block row, then block column) of the zero-padded ``x``;
    returns how many channels hold a non-finite pixel."""
    c_, n_, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    p_ = n_ * th * tw
    bad = 0
    for c in prange(c_):
        # the image with a zero border of 1 (2 at the bottom and right of an odd size)
        buf = np.zeros((2 * th + 2, 2 * tw + 2), dtype=np.float32)
        nonfinite = np.float32(0.0)
        for n in range(n_):
            for i in range(h):
                for j in range(w):
                    z = x[c, n, i, j]
                    nonfinite += z - z
                    buf[i + 1, j + 1] = z
            _store_image_bt(buf, th, tw, v, vs, c * p_ + n * th * tw)
        if nonfinite != 0:
            bad += 1
    return bad


@njit(**FMA)
def _output(m, ms, bias, lo, hi, y):
    """``y[o, n, 2ti:2ti+2, 2tj:2tj+2]`` = ``A^T M A + bias[o]`` clipped to [lo, hi], for the tile
    ``M[k] = m[k*ms + o*P + t]`` of output block t (the part inside the image)."""
    o_, n_, h, w = y.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    p_ = n_ * th * tw
    for o in prange(o_):
        bo = bias[o]
        for n in range(n_):
            for ti in range(th):
                for tj in range(tw):
                    e = o * p_ + (n * th + ti) * tw + tj
                    t00, t10 = _at(m[e], m[4 * ms + e], m[8 * ms + e], m[12 * ms + e])
                    t01, t11 = _at(m[ms + e], m[5 * ms + e], m[9 * ms + e], m[13 * ms + e])
                    t02, t12 = _at(m[2 * ms + e], m[6 * ms + e], m[10 * ms + e], m[14 * ms + e])
                    t03, t13 = _at(m[3 * ms + e], m[7 * ms + e], m[11 * ms + e], m[15 * ms + e])
                    z00, z01 = _at(t00, t01, t02, t03)
                    z10, z11 = _at(t10, t11, t12, t13)
                    i, j = 2 * ti, 2 * tj
                    y[o, n, i, j] = sclip(z00 + bo, lo, hi)
                    if j + 1 < w:
                        y[o, n, i, j + 1] = sclip(z01 + bo, lo, hi)
                    if i + 1 < h:
                        y[o, n, i + 1, j] = sclip(z10 + bo, lo, hi)
                        if j + 1 < w:
                            y[o, n, i + 1, j + 1] = sclip(z11 + bo, lo, hi)


@njit(**FMA_REDUCE)
def _grad(dy, y, masked, lo, hi, vb, bs, va, as_, db):
    """From dL/dy (zero where the fused clip's output ``y`` is outside (lo, hi) or NaN, if ``masked``):
    ``vb`` its input transform (as ``_input``: dL/dx's Winograd conv reads it), ``va`` the ``A dy A^T``
    of each 2x2 output block (dL/dW's), ``db[o]`` its sum; returns how many channels hold a non-finite entry."""
    o_, n_, h, w = dy.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    p_ = n_ * th * tw
    bad = 0
    for o in prange(o_):
        buf = np.zeros((2 * th + 2, 2 * tw + 2), dtype=np.float32)
        total = 0.0
        nonfinite = np.float32(0.0)
        for n in range(n_):
            for i in range(h):
                for j in range(w):
                    z = dy[o, n, i, j]
                    nonfinite += z - z
                    if masked:
                        z = smask(z, y[o, n, i, j], lo, hi)
                    buf[i + 1, j + 1] = z
                    total += z
            _store_image_bt(buf, th, tw, vb, bs, o * p_ + n * th * tw)
            for ti in range(th):
                for tj in range(tw):
                    r, s = 2 * ti, 2 * tj
                    e = o * p_ + (n * th + ti) * tw + tj
                    b00, b10, b20, b30 = _a(buf[r + 1, s + 1], buf[r + 2, s + 1])
                    b01, b11, b21, b31 = _a(buf[r + 1, s + 2], buf[r + 2, s + 2])
                    va[e], va[as_ + e], va[2 * as_ + e], va[3 * as_ + e] = _a(b00, b01)
                    va[4 * as_ + e], va[5 * as_ + e], va[6 * as_ + e], va[7 * as_ + e] = _a(b10, b11)
                    va[8 * as_ + e], va[9 * as_ + e], va[10 * as_ + e], va[11 * as_ + e] = _a(b20, b21)
                    va[12 * as_ + e], va[13 * as_ + e], va[14 * as_ + e], va[15 * as_ + e] = _a(b30, b31)
        db[o] = total
        if nonfinite != 0:
            bad += 1
    return bad


@njit(**FMA)
def _weight_grad(acc, acs, dw):
    """``dw[o, c]`` = ``G^T A G`` for the tile ``A[k] = acc[k*acs + o*C + c]`` (float32 or float64
    sums), rounded to float32."""
    o_, c_ = dw.shape[0], dw.shape[1]
    for o in prange(o_):
        for c in range(c_):
            e = o * c_ + c
            t00, t10, t20 = _gt(acc[e], acc[4 * acs + e], acc[8 * acs + e], acc[12 * acs + e])
            t01, t11, t21 = _gt(acc[acs + e], acc[5 * acs + e], acc[9 * acs + e], acc[13 * acs + e])
            t02, t12, t22 = _gt(acc[2 * acs + e], acc[6 * acs + e], acc[10 * acs + e], acc[14 * acs + e])
            t03, t13, t23 = _gt(acc[3 * acs + e], acc[7 * acs + e], acc[11 * acs + e], acc[15 * acs + e])
            dw[o, c, 0, 0], dw[o, c, 0, 1], dw[o, c, 0, 2] = _gt(t00, t01, t02, t03)
            dw[o, c, 1, 0], dw[o, c, 1, 1], dw[o, c, 1, 2] = _gt(t10, t11, t12, t13)
            dw[o, c, 2, 0], dw[o, c, 2, 1], dw[o, c, 2, 2] = _gt(t20, t21, t22, t23)


# The GEMMs: one tile element per iteration of a prange, each a single-threaded BLAS call, so numba's
# threads share the 16 (their serial twins when BLAS runs its own threads: ``blas.blas_twins``).


def _products(u, us, v, vs, m, ms, o, c, p):
    """``M[k] (o, p) = U[k] (o, c) @ V[k] (c, p)`` for the 16 tile elements."""
    for k in prange(TILE):
        a = u[k * us:k * us + o * c].reshape((o, c))
        b = v[k * vs:k * vs + c * p].reshape((c, p))
        np.dot(a, b, m[k * ms:k * ms + o * p].reshape((o, p)))


def _input_grad_products(u, us, vb, bs, m, ms, c, o, p):
    """``M[k] (c, p) = U[SWAP[k]].T (c, o) @ VB[k] (o, p)``: dL/dx's products with the rotated kernels."""
    for k in prange(TILE):
        r = SWAP[k]
        a = u[r * us:r * us + o * c].reshape((o, c))
        b = vb[k * bs:k * bs + o * p].reshape((o, p))
        np.dot(a.T, b, m[k * ms:k * ms + c * p].reshape((c, p)))


def _weight_grad_products(va, as_, v, vs, o, c, p, acc, acs):
    """``A[k] (o, c) = VA[k] (o, p) @ V[k].T (p, c)``: dL/dW's products, summed over the tiles."""
    for k in prange(TILE):
        a = va[k * as_:k * as_ + o * p].reshape((o, p))
        b = v[k * vs:k * vs + c * p].reshape((c, p))
        np.dot(a, b.T, acc[k * acs:k * acs + o * c].reshape((o, c)))


def _weight_grad_spans(va, as_, v, vs, o, c, p, span, acc, acs):
    """``_weight_grad_products`` in float32 GEMMs over ``span`` tiles at a time, added up in the
    float64 ``acc``."""
    for k in prange(TILE):
        a = va[k * as_:k * as_ + o * p].reshape((o, p))
        b = v[k * vs:k * vs + c * p].reshape((c, p))
        part = np.empty((o, c), dtype=np.float32)
        for t in range(0, p, span):
            e = min(t + span, p)
            np.dot(np.ascontiguousarray(a[:, t:e]), np.ascontiguousarray(b[:, t:e]).T, part)
            acc[k * acs:k * acs + o * c] += part.ravel()


_GEMMS = {fn.__name__: blas.blas_twins(fn, FMA) for fn in (_products, _input_grad_products, _weight_grad_products,
                                                       _weight_grad_spans)}


def _gemm(name):
    threaded, serial = _GEMMS[name]
    return threaded if blas.blas_threads() == 1 else serial
