"""MaxPool's kernels against a naive row-major scan of each window, on ties, NaN and infinities:
the forward takes a max and records each window's winner, the backward routes the gradient to it."""

from __future__ import annotations

import numpy as np
import pytest

from bwacal.kernels import pools
from bwacal.ops.window import window


def naive(x, g):
    """(y, dx for dy = 1 + index of the output): each window scanned row-major, the first real
    element taken, then any strictly greater one (NaN counts only when first)."""
    c, n, h, w = x.shape
    y = np.full((c, n, g.ho, g.wo), -np.inf, dtype=x.dtype)
    dy = (1 + np.arange(y.size, dtype=x.dtype)).reshape(y.shape)
    dx = np.zeros_like(x)
    for ch, b, oi, oj in np.ndindex(y.shape):
        best, where = -np.inf, None
        for ki in range(g.kh):
            for kj in range(g.kw):
                ii, jj = oi * g.sh + ki * g.dh - g.ph, oj * g.sw + kj * g.dw - g.pw
                if 0 <= ii < h and 0 <= jj < w and (where is None or x[ch, b, ii, jj] > best):
                    best, where = x[ch, b, ii, jj], (ii, jj)
        y[ch, b, oi, oj] = best
        if where is not None:
            dx[(ch, b) + where] += dy[ch, b, oi, oj]
    return y, dy, dx


CASES = {
    "3x3_s2_pad1": ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False),
    "2x2_s2": ((2, 2), (2, 2), (0, 0, 0, 0), (1, 1), False),
    "3x3_s1_pad1": ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False),
    "ceil_mode_window_in_padding": ((2, 2), (3, 3), (0, 0, 1, 1), (1, 1), True),
    "dilated": ((2, 3), (1, 2), (0, 1, 0, 1), (2, 2), False),
    "window_of_144": ((12, 12), (1, 1), (5, 2, 0, 2), (1, 1), False),  # indices past int8
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_maxpool_matches_a_row_major_scan(name, dtype):
    kernel, strides, pads, dilations, ceil = CASES[name]
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, size=(3, 2, 7, 8)).astype(dtype)  # many ties
    x[0, 0, 0, 0] = np.nan  # first in its windows: wins them
    x[1, 1, 3, 4] = np.nan  # inside windows: ignored unless first
    x[2, 0, 5, 5] = np.inf
    x[2, 1] = -np.inf
    if name == "window_of_144":
        x[:2, :, 6, 7] = 5  # the last pixel wins: window index 11*12 + 9
    g = window(7, 8, kernel, strides, dilations, pads, "NOTSET", ceil)
    want_y, dy, want_dx = naive(x, g)
    y = np.empty_like(want_y)
    arg = np.empty(y.shape, dtype=np.int8 if g.kh * g.kw <= 127 else np.int32)  # as MaxPool chooses
    pools.maxpool_forward(x, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, y, arg)
    np.testing.assert_array_equal(y, want_y)
    dx = np.full_like(x, 99.0)  # every entry is written: zeros where nothing won
    pools.maxpool_backward(arg, dy, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, dx)
    np.testing.assert_array_equal(dx, want_dx)
