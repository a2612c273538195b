"""numba kernels behind MaxPool and AveragePool, on CNHW float arrays (channels, batch, height,
width). Each kernel's parallel loop owns distinct output elements, so threads never write the same
place.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bwacal.kernels.flags import JIT_PARALLEL


@njit(**JIT_PARALLEL)
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


@njit(**JIT_PARALLEL)
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


@njit(**JIT_PARALLEL)
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


@njit(**JIT_PARALLEL)
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
