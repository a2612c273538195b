"""numba's options for every kernel in ``bwacal.kernels``, each set once, and the thread policy.

``numba.njit`` is always nopython. fastmath stays off unless a set says otherwise, so results match
the NumPy twins in ``tests/naive.py`` bit for bit; ``cache=True`` keeps compiled code across runs.
"""

from __future__ import annotations

from contextlib import contextmanager

import numba

# one thread: scalar helpers and kernels with no parallel loop
JIT = dict(nogil=True, cache=True, fastmath=False)
# ``prange`` loops over numba's threads; each loop owns distinct outputs, so results do not depend on
# the thread count
JIT_PARALLEL = dict(JIT, parallel=True)
# float sums that only vectorise with "reassoc": deterministic for a given machine and thread count,
# since each output is summed by one thread
JIT_REDUCE = dict(JIT_PARALLEL, fastmath={"reassoc"})
# "contract" lets LLVM fuse multiply-adds; nothing is reassociated, so a forward result does not
# depend on the thread count. NumPy's error model: under Python's, each division tests for zero and
# raises, and the loop does not vectorise
FMA = dict(JIT_PARALLEL, fastmath={"contract"}, error_model="numpy")
# dL/dW-style sums over every position with FMA's options: vectorising them needs reassociation
FMA_REDUCE = dict(JIT_PARALLEL, fastmath={"contract", "reassoc"}, error_model="numpy")
# FMA's options without the parallel pass, for scalar helpers (no loop) inlined into FMA kernels
FMA_SCALAR = dict(FMA, parallel=False)
# inlined by numba itself into the calling kernel, which compiles it with its own options (LLVM's
# inliner left some helpers as calls, and then the caller's loop did not vectorise)
INLINE = dict(inline="always")


def serial_uncached(flags: dict) -> dict:
    """``flags`` for a serial twin of a parallel kernel (``blas.blas_twins``). Not cached: numba's
    cache is keyed by the function, not its options, so either twin could load the other's machine
    code (the serial one loaded the threaded one, and OpenBLAS printed "Detect OpenMP Loop")."""
    return dict(flags, parallel=False, cache=False)


# Below this many element operations a kernel runs on the calling thread only: waking numba's
# thread pool costs microseconds on idle cores but milliseconds when another process holds a core
# (measured on 2 shared cores: compose of a 64x576 weight 0.02 ms on one thread, 7-16 ms on two).
PARALLEL_MIN_WORK = 1 << 22


@contextmanager
def threads_for(work):
    """Run the enclosed kernel call on one thread if ``work`` is below :data:`PARALLEL_MIN_WORK`."""
    if work >= PARALLEL_MIN_WORK:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)
