"""Same seed, same bytes: through the CLI, and whether the images are kept in memory or streamed."""

import hashlib

import pytest

import bwacal.calibrate
from tests.reliability.conftest import invoke


def _run(valid, out, *extra):
    result = invoke("calibrate", valid[0], "--calib", valid[1], "-o", out, "--epochs", "2", "--act-bits", "4",
                    "--seed", "3", "-q", *extra)
    assert result.exit_code == 0, result.output
    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["fake", "packed"])
def test_same_seed_same_bytes_in_memory_and_streamed(valid, tmp_path, monkeypatch, fmt):
    first = _run(valid, tmp_path / "a.onnx", "--format", fmt)
    assert _run(valid, tmp_path / "b.onnx", "--format", fmt) == first
    monkeypatch.setattr(bwacal.calibrate, "IN_MEMORY_LIMIT", 0)  # read every batch from the file
    assert _run(valid, tmp_path / "c.onnx", "--format", fmt) == first
