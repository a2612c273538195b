"""numba kernels behind grouped convs (im2col, col2im) and the pools, on CNHW float arrays
(channels, batch, height, width); dense and depthwise convs are in ``_frames.py``.

With activations channel-major, a grouped conv is one GEMM per group,
``W_g (O/g, C/g*kh*kw) @ cols_g (C/g*kh*kw, N*Ho*Wo)``, whose result is already the CNHW output.
Each kernel's parallel loop owns distinct output elements, so threads never write the same place.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import get_num_threads, njit, prange

from bwacal.kernels import JIT_PARALLEL as JIT  # numba flags live in one place
from bwacal.runtime import openblas_threads, single_thread_blas


@njit(**JIT)
def im2col(x, kh, kw, sh, sw, dh, dw, ph, pw, ho, wo, cols):
    """Fill ``cols[(c*kh + i)*kw + j, (b*ho + oi)*wo + oj]`` with the pixel that window tap (i, j)
    of output (oi, oj) sees in channel c of image b; zero where the window hangs over the padding."""
    c, n, h, w = x.shape
    for row in prange(c * kh * kw):
        ch = row // (kh * kw)
        ki = (row // kw) % kh
        kj = row % kw
        for b in range(n):
            for oi in range(ho):
                ii = oi * sh + ki * dh - ph
                base = (b * ho + oi) * wo
                if ii < 0 or ii >= h:
                    for oj in range(wo):
                        cols[row, base + oj] = 0
                else:
                    for oj in range(wo):
                        jj = oj * sw + kj * dw - pw
                        if jj >= 0 and jj < w:
                            cols[row, base + oj] = x[ch, b, ii, jj]
                        else:
                            cols[row, base + oj] = 0


@njit(**JIT)
def col2im(cols, kh, kw, sh, sw, dh, dw, ph, pw, ho, wo, dx):
    """The adjoint of ``im2col``: add every column entry back onto the pixel it was read from."""
    c, n, h, w = dx.shape
    for ch in prange(c):
        for ki in range(kh):
            for kj in range(kw):
                row = (ch * kh + ki) * kw + kj
                for b in range(n):
                    for oi in range(ho):
                        ii = oi * sh + ki * dh - ph
                        if ii < 0 or ii >= h:
                            continue
                        base = (b * ho + oi) * wo
                        for oj in range(wo):
                            jj = oj * sw + kj * dw - pw
                            if jj >= 0 and jj < w:
                                dx[ch, b, ii, jj] += cols[row, base + oj]


@njit(**JIT)
def maxpool_forward(x, kh, kw, sh, sw, dh, dw, ph, pw, y, arg):
    """Max over each window (padding never wins; a window wholly in the padding gives -inf): over
    each input row's column windows first, then over the rows of each window. Each comparison is
    ``v > best`` from the window's first real element, so a NaN counts only when it comes first, and
    the winner is the first real element, in row-major order, equal to the max (the first one when
    it is NaN). ``arg`` gets the winner's window index ``ki*kw + kj`` (-1 for a window wholly in
    the padding), which ``maxpool_backward`` routes the gradient by."""
    c, n, h, w = x.shape
    ho, wo = y.shape[2], y.shape[3]
    for t in prange(c * n):
        ch = t // n
        b = t % n
        rows = np.empty((h, wo), dtype=x.dtype)  # per input row, the max of each output's columns
        cols = np.empty((h, wo), dtype=np.int64)  # and the kj it is at (-1: no real column)
        for ii in range(h):
            src = x[ch, b, ii]
            dst = rows[ii]
            at = cols[ii]
            for oj in range(wo):
                best = -np.inf
                where = -1
                for kj in range(kw):
                    jj = oj * sw + kj * dw - pw
                    if 0 <= jj < w:
                        v = src[jj]
                        if where < 0 or v > best:
                            best = v
                            where = kj
                dst[oj] = best
                at[oj] = where
        for oi in range(ho):
            out = y[ch, b, oi]
            won = arg[ch, b, oi]
            out[:] = -np.inf  # kept when every row of the window is padding
            won[:] = -1
            first = True
            for ki in range(kh):
                ii = oi * sh + ki * dh - ph
                if ii < 0 or ii >= h:
                    continue
                r = rows[ii]
                at = cols[ii]
                for oj in range(wo):
                    v = r[oj]
                    take = first or v > out[oj]
                    out[oj] = v if take else out[oj]
                    won[oj] = (ki * kw + at[oj] if at[oj] >= 0 else -1) if take else won[oj]
                first = False


@njit(**JIT)
def maxpool_backward(arg, dy, kw, sh, sw, dh, dw, ph, pw, dx):
    """Route each output gradient to the input element that won its max (``arg`` from
    ``maxpool_forward``); ``dx`` is overwritten (zero where nothing won)."""
    c, n = dx.shape[:2]
    ho, wo = dy.shape[2], dy.shape[3]
    for t in prange(c * n):
        ch = t // n
        b = t % n
        d = dx[ch, b]
        d[:] = 0
        for oi in range(ho):
            won = arg[ch, b, oi]
            g = dy[ch, b, oi]
            for oj in range(wo):
                k = won[oj]
                if k >= 0:
                    d[oi * sh + (k // kw) * dh - ph, oj * sw + (k % kw) * dw - pw] += g[oj]


@njit(**JIT)
def avgpool_forward(x, kh, kw, sh, sw, dh, dw, ph, pw, divisor, y):
    """Window sums divided by ``divisor[oi, oj]`` (the count the spec asks for at that position)."""
    c, n, h, w = x.shape
    ho, wo = y.shape[2], y.shape[3]
    for t in prange(n * c):
        b = t // c
        ch = t % c
        for oi in range(ho):
            for oj in range(wo):
                acc = 0.0
                for ki in range(kh):
                    ii = oi * sh + ki * dh - ph
                    if ii < 0 or ii >= h:
                        continue
                    for kj in range(kw):
                        jj = oj * sw + kj * dw - pw
                        if jj >= 0 and jj < w:
                            acc += x[ch, b, ii, jj]
                y[ch, b, oi, oj] = acc / divisor[oi, oj]


@njit(**JIT)
def avgpool_backward(dy, kh, kw, sh, sw, dh, dw, ph, pw, divisor, dx):
    """Spread each output gradient evenly over the real (non-padding) pixels of its window."""
    c, n, h, w = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    for t in prange(n * c):
        b = t // c
        ch = t % c
        for oi in range(ho):
            for oj in range(wo):
                g = dy[ch, b, oi, oj] / divisor[oi, oj]
                for ki in range(kh):
                    ii = oi * sh + ki * dh - ph
                    if ii < 0 or ii >= h:
                        continue
                    for kj in range(kw):
                        jj = oj * sw + kj * dw - pw
                        if jj >= 0 and jj < w:
                            dx[ch, b, ii, jj] += g


@lru_cache(maxsize=1)
def blas_threads() -> int:
    """The most threads any loaded OpenBLAS runs (1 unless ``OPENBLAS_NUM_THREADS`` was set).

    First loads SciPy's OpenBLAS, the one numba's ``np.dot`` calls, and sets it to one thread as
    importing bwacal set NumPy's (``runtime.single_thread_blas``): here rather than at import,
    where SciPy's linalg took 130-150 ms of the 430-620 ms of ``import bwacal``."""
    import scipy.linalg.cython_blas  # noqa: F401

    single_thread_blas()
    return max(openblas_threads().values(), default=1)


def blas_twins(fn, flags):
    """``fn`` (which calls BLAS through ``np.dot``) jitted twice: over numba's threads with ``flags``,
    each thread making single-threaded BLAS calls, and serial, for when BLAS runs its own threads
    (``blas_threads() > 1``: BLAS inside an OpenMP loop oversubscribes the cores). The serial twin is
    not cached: numba's cache is keyed by the function, not its flags, so either twin could load the
    other's machine code (the serial one loaded the threaded one, and OpenBLAS printed "Detect
    OpenMP Loop")."""
    return njit(**flags)(fn), njit(**dict(flags, parallel=False, cache=False))(fn)


def _rows_dot(a, bt, out, parts):
    """``out = a @ bt.T``, the rows of ``a`` and ``out`` in ``parts`` pieces, one BLAS call each."""
    step = -(-a.shape[0] // parts)
    for i in prange(parts):
        r0 = i * step
        r1 = min(a.shape[0], r0 + step)
        if r0 < r1:
            np.dot(a[r0:r1], bt.T, out[r0:r1])


_ROWS_DOT = blas_twins(_rows_dot, JIT)


def rows_dot(a, bt, out):
    """``out = a @ bt.T`` (2-D, ``a`` and ``out`` C-contiguous) on all of numba's threads."""
    if blas_threads() == 1:
        _ROWS_DOT[0](a, bt, out, get_num_threads())
    else:
        _ROWS_DOT[1](a, bt, out, 1)
