"""numba's on-disk cache of bwacal's kernels: is it warm, and when does numba compile.

bwacal's kernels are ``@njit(cache=True)``: the first run compiles them (a minute or more of CPU)
and stores the machine code beside the sources (``__pycache__``), or, when that folder is not
writable, in numba's per-user cache (``NUMBA_CACHE_DIR`` sets it). ``cache_state()`` tells, before
any work, how many kernels have no usable cached code; ``watch_compiles(on_start, on_end)`` reports
every compile numba does while it is active, so a front end can say what the wait is.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import sys
import time
from dataclasses import dataclass


# seconds a first run spends compiling on 2 idle cores: the quick start's first run in a fresh
# virtual environment less its second (84 s - 11.4 s, README); told to a user whose cache is cold.
# A loaded machine takes longer (355 s at load 9-10: benchmarks/RESULTS.md, "First run")
FIRST_RUN_SECONDS = 73


@dataclass(frozen=True)
class CacheState:
    """``cold`` of ``kernels`` cached kernels have no cached code for this numba and these sources."""

    kernels: int
    cold: int
    where: str | None  # the cache folder of the first cold kernel (else of the first kernel)

    @property
    def warm(self) -> bool:
        return self.cold == 0


def _dispatchers():
    """Every cached numba dispatcher defined in a bwacal module (importing bwacal's modules)."""
    from numba.core.dispatcher import Dispatcher

    import bwacal

    for info in pkgutil.walk_packages(bwacal.__path__, "bwacal."):
        if info.name not in sys.modules:
            try:
                importlib.import_module(info.name)
            except ImportError:  # an optional extra (matplotlib, distributed) is missing
                continue
    seen = set()
    for name, module in list(sys.modules.items()):
        if not (name == "bwacal" or name.startswith("bwacal.")) or module is None:
            continue
        for value in vars(module).values():
            if isinstance(value, Dispatcher) and id(value) not in seen and value.__module__ == name:
                seen.add(id(value))
                if getattr(value, "_cache", None) is not None and hasattr(value._cache, "_cache_file"):
                    yield value


def cache_state() -> CacheState | None:
    """How many of bwacal's cached kernels have nothing in numba's cache; None if numba's cache
    cannot be read (another numba version's layout)."""
    try:
        kernels = cold = 0
        where = None
        for dispatcher in _dispatchers():
            kernels += 1
            cache = dispatcher._cache
            if where is None:
                where = cache.cache_path
            if not cache._cache_file._load_index():
                if cold == 0:
                    where = cache.cache_path
                cold += 1
        return CacheState(kernels, cold, where)
    except (AttributeError, ImportError, OSError, ValueError, EOFError):
        return None


@contextlib.contextmanager
def watch_compiles(on_start=None, on_end=None):
    """Call ``on_start(name)`` when numba starts compiling a function (not when it loads one from
    its cache) and ``on_end(name, seconds)`` when it is done; nested compiles are reported once."""
    try:
        from numba.core import event
    except ImportError:  # a numba without the event API: nothing to report
        yield
        return
    depth = [0]
    started = [0.0]

    class Listener(event.Listener):
        def on_start(self, ev):
            depth[0] += 1
            if depth[0] == 1:
                started[0] = time.perf_counter()
                if on_start is not None:
                    on_start(_name(ev))

        def on_end(self, ev):
            depth[0] -= 1
            if depth[0] == 0 and on_end is not None:
                on_end(_name(ev), time.perf_counter() - started[0])

    listener = Listener()
    event.register("numba:compile", listener)
    try:
        yield
    finally:
        event.unregister("numba:compile", listener)


def _name(ev) -> str:
    data = ev.data or {}
    dispatcher = data.get("dispatcher")
    return getattr(dispatcher, "__qualname__", None) or getattr(dispatcher, "__name__", None) or "kernel"
