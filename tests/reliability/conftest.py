"""Shared pieces of the reliability tests: a valid tiny model, valid data and a CLI runner."""

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from bwacal.data import write_dataset
from cli.main import app
from tests.calibration.conftest import tiny_cnn

SHAPE = (1, 12, 12)
CLASSES = 10


@pytest.fixture(scope="session")
def valid(tmp_path_factory):
    """(model path, calibration path) of a valid tiny classifier and 40 labelled images."""
    d = tmp_path_factory.mktemp("valid")
    model = tiny_cnn(d / "tiny.onnx")
    rng = np.random.default_rng(0)
    calib = write_dataset(d / "calib.h5", rng.normal(0, 1, (40,) + SHAPE).astype(np.float32),
                          rng.integers(0, CLASSES, 40))
    return model, calib


@pytest.fixture
def tiny_proto(valid):
    return onnx.load(str(valid[0]))


def invoke(*args):
    """Run ``bwacal *args`` in-process; returns the click ``Result`` (stdout and stderr mixed in ``output``)."""
    return CliRunner().invoke(app, [str(a) for a in args])
