"""BLAS called from numba kernels (``np.dot`` inside a ``prange``): which BLAS runs how many threads,
the threaded and serial twins of such a kernel, and a row-split GEMM over numba's threads."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import get_num_threads, njit, prange

from bwacal.kernels.flags import JIT_PARALLEL, serial_uncached
from bwacal.runtime import openblas_threads, single_thread_blas


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
    each thread making single-threaded BLAS calls, and serial (``flags.serial_uncached``), for when
    BLAS runs its own threads (``blas_threads() > 1``: BLAS inside an OpenMP loop oversubscribes the
    cores)."""
    return njit(**flags)(fn), njit(**serial_uncached(flags))(fn)


def _rows_dot(a, bt, out, parts):
    """``out = a @ bt.T``, the rows of ``a`` and ``out`` in ``parts`` pieces, one BLAS call each."""
    step = -(-a.shape[0] // parts)
    for i in prange(parts):
        r0 = i * step
        r1 = min(a.shape[0], r0 + step)
        if r0 < r1:
            np.dot(a[r0:r1], bt.T, out[r0:r1])


_ROWS_DOT = blas_twins(_rows_dot, JIT_PARALLEL)


def rows_dot(a, bt, out):
    """``out = a @ bt.T`` (2-D, ``a`` and ``out`` C-contiguous) on all of numba's threads."""
    if blas_threads() == 1:
        _ROWS_DOT[0](a, bt, out, get_num_threads())
    else:
        _ROWS_DOT[1](a, bt, out, 1)
