"""The live display under a real pseudo-terminal: notes above the bar, never the bar inside a line.

The command runs in a child process whose stdout and stderr are a pty; what it wrote is replayed
on a terminal emulator (pyte), and the screen and the scrollback are read back as a person sees them.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bwacal.data import write_dataset
from tests.calibration.conftest import tiny_cnn

pyte = pytest.importorskip("pyte", reason="the terminal emulator pyte (test extra) is not installed")

ROOT = Path(__file__).resolve().parent.parent
BAR = "━"


def run_in_terminal(args, cwd, columns=80, timeout=300, env=None):
    """(exit code, the lines a terminal of ``columns`` shows, scrollback included) for ``bwacal ARGS``."""
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    environment = {**os.environ, "COLUMNS": str(columns), "LINES": "50", "TERM": "xterm-256color",
                   "PYTHONPATH": str(ROOT), **(env or {})}
    environment.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *map(str, args)], cwd=cwd, stdin=slave,
                            stdout=slave, stderr=slave, env=environment, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    code = proc.wait(timeout=30)
    os.close(master)
    screen = pyte.HistoryScreen(columns, 50, history=10_000)
    stream = pyte.ByteStream(screen)
    stream.feed(b"".join(chunks))
    history = ["".join(char.data for char in line.values()) for line in screen.history.top]
    lines = [line.rstrip() for line in history + screen.display]
    return code, [line for line in lines if line]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("terminal")
    model = tiny_cnn(d / "tiny.onnx")
    rng = np.random.default_rng(0)
    calib = write_dataset(d / "calib.h5", rng.normal(0, 1, (400, 1, 12, 12)).astype(np.float32),
                          rng.integers(0, 10, 400))
    return model, calib


@pytest.mark.parametrize("columns", [80, 160])
def test_notes_print_above_the_bar_never_into_it(inputs, tmp_path, columns):
    model, calib = inputs
    # short relative paths, so that no line is long enough for the terminal to wrap it
    code, lines = run_in_terminal(["calibrate", model.name, "--calib", calib.name, "--epochs", 3, "--batch-size", 8,
                                   "-o", tmp_path / "q.onnx"], model.parent, columns)
    assert code == 0, "\n".join(lines)
    # every note and every line of the summary stands alone: no bar, no spinner, no phase text in it
    assert not [line for line in lines if BAR in line], "\n".join(lines)
    notes = [line for line in lines if line.startswith(("model ", "epoch ", "start: ", "top-1 before"))]
    assert [line.split(":")[0] for line in notes if line.startswith("epoch ")] == [
        "epoch 0/3", "epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert lines[-1].startswith("wrote ") or lines[-2].startswith("wrote "), "\n".join(lines)
    assert any(line.startswith("bits W3") for line in lines)
    assert not [line for line in lines if "fitting: epoch" in line or "eta" in line.split()]


def test_no_display_off_a_terminal_or_with_quiet(inputs, tmp_path):
    model, calib = inputs
    plain = subprocess.run([sys.executable, "-m", "cli.main", "calibrate", str(model), "--calib", str(calib),
                            "--epochs", "1", "-o", str(tmp_path / "a.onnx")], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert BAR not in plain.stderr and "\x1b[" not in plain.stderr and "epoch 1/1" in plain.stderr
    code, lines = run_in_terminal(["calibrate", model, "--calib", calib, "--epochs", 1, "-q",
                                   "-o", tmp_path / "b.onnx"], ROOT)
    assert code == 0 and not [line for line in lines if BAR in line or line.startswith("epoch")]
    code, lines = run_in_terminal(["calibrate", model, "--calib", calib, "--epochs", 1, "-o", tmp_path / "c.onnx"],
                                  ROOT, env={"TERM": "dumb"})
    assert code == 0 and not [line for line in lines if BAR in line] and any(line.startswith("epoch 1/1") for line in lines)
