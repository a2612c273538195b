"""numba kernels behind grouped convs and the GEMM backward of strided dense convs: im2col and its
adjoint col2im, on CNHW float arrays (channels, batch, height, width).

With activations channel-major, a grouped conv is one GEMM per group,
``W_g (O/g, C/g*kh*kw) @ cols_g (C/g*kh*kw, N*Ho*Wo)``, whose result is already the CNHW output.
Each kernel's parallel loop owns distinct output elements, so threads never write the same place.
"""

from __future__ import annotations

from numba import njit, prange

from bwacal.kernels.flags import JIT_PARALLEL


@njit(**JIT_PARALLEL)
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


@njit(**JIT_PARALLEL)
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
