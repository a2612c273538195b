"""Process settings of ``bwacal.runtime`` that are not about one kernel."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bwacal.runtime import keep_freed_memory


def _mapping_of(address):
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 else ""
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_large_arrays_come_from_the_heap_not_fresh_mappings(monkeypatch):
    """A 64 MB array (above the largest mmap threshold glibc takes) is served from the heap, so
    freeing and allocating it again costs no page faults."""
    monkeypatch.delenv("BWACAL_MALLOC", raising=False)
    assert keep_freed_memory() is True
    a = np.empty(64 << 20, dtype=np.uint8)
    assert _mapping_of(a.ctypes.data) == "[heap]"
