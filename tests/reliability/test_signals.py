"""Nothing lost: SIGINT or SIGTERM during fitting leaves no output, no temporary file, the inputs untouched."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bwacal.data import write_dataset
from tests.calibration.conftest import tiny_cnn

ROOT = Path(__file__).resolve().parents[2]


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory):
    """A model and enough images that 100 epochs take far longer than the test waits."""
    d = tmp_path_factory.mktemp("signals")
    model = tiny_cnn(d / "tiny.onnx")
    rng = np.random.default_rng(0)
    calib = write_dataset(d / "calib.h5", rng.normal(0, 1, (1000, 1, 12, 12)).astype(np.float32),
                          rng.integers(0, 10, 1000))
    return model, calib


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_fitting_leaves_nothing(slow_inputs, tmp_path, signum):
    model, calib = slow_inputs
    before = {p: _digest(p) for p in (model, calib)}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "cli.main", "calibrate", str(model), "--calib", str(calib), "-o",
           str(out_dir / "q.onnx"), "--report", str(out_dir / "r.json"), "--epochs", "100", "--batch-size", "16"]
    # NOTE: a shell without job control starts background jobs with SIGINT ignored, and Python keeps
    # an inherited SIG_IGN; restore the default so the child behaves as under a terminal's Ctrl-C
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    fitting = threading.Event()
    lines = []

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("epoch 0/"):  # the uniform start is scored: fitting is under way
                fitting.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert fitting.wait(timeout=240), "".join(lines)
        time.sleep(0.3)
        assert proc.poll() is None, "calibration finished before the signal; make it slower"
        proc.send_signal(signum)
        code = proc.wait(timeout=180)  # generous: a loaded CI machine can starve the child
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    stderr = "".join(lines)
    assert code != 0
    assert code == 130, stderr
    assert "interrupted: no output written" in stderr
    assert "Traceback" not in stderr
    assert os.listdir(out_dir) == []
    assert {p: _digest(p) for p in (model, calib)} == before
