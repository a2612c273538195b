"""``bwacal.jitcache``: a cold numba cache is seen before any work, and compiles are reported as they happen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from bwacal.jitcache import cache_state, watch_compiles
before = cache_state()
seen = []
with watch_compiles(lambda name: seen.append(("start", name)), lambda name, s: seen.append(("end", name))):
    if sys.argv[1] == "compile":  # a small cached kernel, found by name wherever the kernels live
        from bwacal.jitcache import _dispatchers
        next(d for d in _dispatchers() if d.__name__ == "_sigmoid1")(0.5)
print(json.dumps({"kernels": before.kernels, "cold": before.cold, "where": before.where, "seen": seen}))
"""


def _probe(cache, action):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, action], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_cold_cache_is_seen_and_a_compile_is_reported(tmp_path):
    cache = tmp_path / "numba"
    first = _probe(cache, "compile")
    assert first["kernels"] > 10 and first["cold"] == first["kernels"]  # nothing cached: a first run
    assert first["where"].startswith(str(cache))
    assert first["seen"] == [["start", "_sigmoid1"], ["end", "_sigmoid1"]]
    second = _probe(cache, "compile")
    assert second["cold"] == first["kernels"] - 1  # that kernel is cached now
    assert second["seen"] == []  # loaded from the cache: no compile to report


def test_calibrate_says_first_run_when_nothing_is_cached(tmp_path):
    """The note comes before any work, from the cache's state (not a guess from timing)."""
    import numpy as np

    from bwacal.data import write_dataset
    from tests.calibration.conftest import tiny_cnn

    model = tiny_cnn(tmp_path / "tiny.onnx")
    calib = write_dataset(tmp_path / "c.h5", np.random.default_rng(0).normal(0, 1, (8, 1, 12, 12)).astype(np.float32))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PYTHONPATH": str(ROOT)}
    # a fresh NUMBA_CACHE_DIR is a first run; --epochs 0 keeps what it compiles small
    args = [sys.executable, "-m", "cli.main", "calibrate", str(model), "--calib", str(calib), "--epochs", "0",
            "--holdout", "0", "-o", str(tmp_path / "q.onnx")]
    cold = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert cold.returncode == 0, cold.stderr
    first = cold.stderr.splitlines()[0]
    assert first.startswith("first run: numba compiles bwacal's kernels") and str(tmp_path / "numba") in first
    assert "compiled " in cold.stderr and "numba kernels in" in cold.stderr
    warm = subprocess.run(args[:-1] + [str(tmp_path / "r.onnx")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert warm.returncode == 0 and "first run" not in warm.stderr, warm.stderr
