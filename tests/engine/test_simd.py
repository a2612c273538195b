"""The vector intrinsics behind the register-tiled conv kernel, against NumPy."""

import numpy as np
import pytest
from numba import njit
from numba.core.errors import TypingError

from bwacal.kernels.simd import LANES, sclip, smask, vadd, vbcast, vclip, vfma, vload, vmask, vstore, vzero


@njit
def _axpy_tiles(a, x, y, out):
    """out[i] = a * x[i] + y[i] in 16-lane tiles; the tail beyond the last full tile untouched."""
    u = vbcast(a)
    for i in range(0, x.size - x.size % 16, 16):
        vstore(out, i, vfma(u, vload(x, i), vload(y, i)))


@njit
def _sum_tiles(x):
    acc = vzero()
    one = vbcast(1.0)
    for i in range(0, x.size - x.size % 16, 16):
        acc = vfma(one, vload(x, i), acc)
    lanes = np.empty(16, dtype=np.float32)
    vstore(lanes, 0, acc)
    return lanes


def test_fma_tiles_match_numpy_and_leave_the_tail_alone():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 16 * 5 + 7)).astype(np.float32)
    out = np.full_like(x, np.nan)
    _axpy_tiles(np.float32(1.5), x, y, out)
    full = 16 * 5
    # one rounding (fma) against NumPy's two: equal to within an ulp of the result
    np.testing.assert_allclose(out[:full], np.float32(1.5) * x[:full] + y[:full], rtol=2e-7, atol=1e-7)
    assert np.isnan(out[full:]).all()


def test_unaligned_loads_and_lane_sums():
    x = np.arange(1 + 16 * 4, dtype=np.float32)[1:]  # a view starting 4 bytes in
    lanes = _sum_tiles(x)
    np.testing.assert_array_equal(lanes, x.reshape(4, 16).sum(axis=0))
    assert LANES == 16


def test_non_float32_arrays_are_refused_at_compile_time():
    @njit
    def load64(a):
        return vload(a, 0)

    with pytest.raises(TypingError, match="float32"):
        load64(np.zeros(16))


@njit
def _add_clip_tiles(a, b, lo, hi, out):
    for i in range(0, a.size - a.size % 16, 16):
        vstore(out, i, vclip(vadd(vload(a, i), vload(b, i)), lo, hi))


@njit
def _add_clip_scalars(a, b, lo, hi, out):
    for i in range(a.size):
        out[i] = sclip(a[i] + b[i], lo, hi)


@njit
def _mask_scalars(v, m, lo, hi, out):
    for i in range(v.size):
        out[i] = smask(v[i], m[i], lo, hi)


@pytest.mark.parametrize("kernel", [_add_clip_tiles, _add_clip_scalars])
@pytest.mark.parametrize("lo, hi", [(0.0, 6.0), (-0.5, 0.5), (-np.inf, np.inf), (0.0, np.inf)])
def test_add_and_clip_match_numpy_selects_nan_included(lo, hi, kernel):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(64) * 5).astype(np.float32)
    a[[3, 17, 40]] = [np.nan, np.inf, -np.inf]
    b = rng.standard_normal(64).astype(np.float32)
    out = np.empty_like(a)
    kernel(a, b, lo, hi, out)
    s = a + b
    want = np.where(s < np.float32(lo), np.float32(lo), s)
    want = np.where(want > np.float32(hi), np.float32(hi), want)  # NaN fails both tests: passes through
    np.testing.assert_array_equal(out, want)
    assert np.isnan(out[3])


@njit
def _mask_tiles(v, m, lo, hi, out):
    for i in range(0, v.size - v.size % 16, 16):
        vstore(out, i, vmask(vload(v, i), vload(m, i), lo, hi))


@pytest.mark.parametrize("kernel", [_mask_tiles, _mask_scalars])
@pytest.mark.parametrize("lo, hi", [(0.0, 6.0), (0.0, np.inf), (-np.inf, np.inf)])
def test_mask_keeps_values_strictly_inside_the_bounds_and_zeroes_nan(lo, hi, kernel):
    rng = np.random.default_rng(2)
    v = rng.standard_normal(64).astype(np.float32)
    v[5] = np.nan  # a NaN value where the mask keeps it stays NaN
    m = (rng.standard_normal(64) * 4).astype(np.float32)
    m[[0, 1, 2, 3, 5]] = [np.nan, 0.0, 6.0, np.inf, 1.0]
    out = np.full_like(v, 7.0)
    kernel(v, m, lo, hi, out)
    want = np.where((m > np.float32(lo)) & (m < np.float32(hi)), v, np.float32(0))
    np.testing.assert_array_equal(out, want)
    assert out[0] == 0 and np.isnan(out[5])
