"""Process-level settings bwacal makes when it is imported, each measured and each switchable off.

bwacal's heavy work is numba kernels on all cores, with NumPy allocating every op's output. Three
defaults of the libraries underneath cost time there (figures: ResNet-20 batch 128 and ResNet-18
batch 8 on 2 cores, see benchmarks/RESULTS.md):

- **numba threading layer: OpenMP first.** The workqueue layer wakes its workers for every kernel:
  ResNet-20 forward 115-158 ms, against 98-105 ms with OpenMP. GNU OpenMP is not fork-safe; bwacal's
  own worker processes are spawned, never forked. ``NUMBA_THREADING_LAYER`` overrides this.
- **Freed memory kept for reuse** (glibc): malloc hands blocks of a few MB back to the OS when they
  are freed, so every pass page-faults on all of its activations again; on ResNet-20 that was a
  quarter of forward+backward (626-666 ms against 450-500 ms). Blocks above 32 MB (the largest mmap
  threshold glibc takes) are still mapped and unmapped on every call unless mmap is off: the
  MobileNetV2-style forward at batch 128 (50 MB expanded activations) ran 52-133 ms (medians
  53-60) with them mapped, 47-55 ms (medians 48-50) without. Resident memory stays near the peak
  between passes. ``BWACAL_MALLOC=default`` leaves malloc alone.
- **BLAS on one thread** (OpenBLAS: NumPy's at import, SciPy's when a kernel first needs it): convolutions are numba kernels, so BLAS only
  sees small GEMMs (classifier heads) and the GEMMs of Winograd convs and of wide strided convs'
  backward, which numba's threads call, one BLAS call per thread; OpenBLAS's own threads keep
  spinning after each call, taking the cores from the numba kernel that follows: ResNet-18 forward
  270 ms, 222 ms with one BLAS thread. Setting ``OPENBLAS_NUM_THREADS`` (any value) leaves BLAS
  alone (those GEMMs then run one after another, each on BLAS's threads). Where one large GEMM is
  the whole of the work (AdaRound's moments, ``blas_on_all_cores``) BLAS gets every core for it.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30


def prefer_openmp() -> bool:
    """Put numba's OpenMP threading layer first (unless ``NUMBA_THREADING_LAYER`` is set)."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        return False
    import numba

    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    return True


def keep_freed_memory() -> bool:
    """Serve every block from glibc's heap (no mmap) and trim it only above 1 GB free. A no-op off
    glibc or with ``BWACAL_MALLOC=default``; returns whether it was applied."""
    if os.environ.get("BWACAL_MALLOC", "") == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _openblas_libraries():
    """(path, ctypes handle) of every OpenBLAS the process has loaded (Linux; none elsewhere)."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split(None, 5)[5].strip() for line in fh if len(line.split(None, 5)) == 6}
    except OSError:  # not Linux
        return
    for path in sorted(p for p in paths if "openblas" in os.path.basename(p).lower()):
        try:
            yield path, ctypes.CDLL(path)
        except OSError:
            continue


def _symbol(lib, verb):
    """The library's ``openblas_<verb>_num_threads`` under any of its export names, or None."""
    for name in (f"scipy_openblas_{verb}_num_threads64_", f"scipy_openblas_{verb}_num_threads",
                 f"openblas_{verb}_num_threads64_", f"openblas_{verb}_num_threads"):
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn
    return None


def single_thread_blas() -> int:
    """Set every loaded OpenBLAS to one thread (unless ``OPENBLAS_NUM_THREADS`` is set); returns how
    many libraries were set."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return 0
    import numpy  # noqa: F401  (loads NumPy's OpenBLAS; SciPy's is loaded and set when first needed,
    #                             kernels/blas.blas_threads)

    count = 0
    for _, lib in _openblas_libraries():
        if _symbol(lib, "set") is not None:
            _set_blas(lib, 1)
            count += 1
    return count


def openblas_threads() -> dict[str, int]:
    """Thread count of each loaded OpenBLAS library, by path (for tests and benchmark headers).
    Libraries loaded after bwacal (SciPy's, say) keep their own setting."""
    counts = {}
    for path, lib in _openblas_libraries():
        getter = _symbol(lib, "get")
        if getter is not None:
            getter.restype = ctypes.c_int
            counts[path] = getter()
    return counts


def _set_blas(lib, threads: int):
    setter = _symbol(lib, "set")
    if setter is not None:
        setter.argtypes = [ctypes.c_int]
        setter.restype = None
        setter(threads)


@contextmanager
def blas_on_all_cores(threads: int | None = None):
    """NumPy's (and every loaded) OpenBLAS on ``threads`` (default: numba's thread count) inside the
    block, then back to what each had: for work that is one large GEMM after another, with no numba
    kernel running beside it. A no-op when ``OPENBLAS_NUM_THREADS`` is set."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        yield
        return
    if threads is None:
        import numba

        threads = numba.get_num_threads()
    before = openblas_threads()
    libraries = list(_openblas_libraries())
    for _, lib in libraries:
        _set_blas(lib, threads)
    try:
        yield
    finally:
        for path, lib in libraries:
            if path in before:
                _set_blas(lib, before[path])


def apply() -> dict:
    """All three settings; returns what was applied."""
    return {"openmp": prefer_openmp(), "malloc": keep_freed_memory(), "blas_one_thread": single_thread_blas()}
