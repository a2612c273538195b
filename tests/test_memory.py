"""The recorded-forward memory estimate and the micro-batch split that bounds it."""

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, strategies as st

from bwacal.memory import array_bytes, chunks, micro_batch_size, recording_cost, tape_bytes
from bwacal.model import load_model


@dataclass
class _Ctx:
    x: np.ndarray
    extra: tuple


def test_array_bytes_counts_each_buffer_once():
    a = np.zeros((10, 100), np.float32)  # 4,000 bytes
    b = np.ones(7, np.float64)  # 56 bytes
    view = a[2:5]
    assert array_bytes([a, view, a.T, {"k": (view, b)}, _Ctx(b, (a, None, 3))]) == 4000 + 56
    assert array_bytes(view) == 4000  # a view keeps its whole base alive


def test_tape_bytes_grows_with_the_batch():
    model = load_model("data/zoo/resnet20.onnx")
    wrt = [model.input_name]

    def record(x):
        return model.forward(x, record=True, wrt=wrt)[1]

    fixed, per_image = recording_cost(record, model.input_shape)
    # 19 convs keep their inputs: at least one 16x28x28 float32 map per conv and image
    assert per_image > 19 * 16 * 28 * 28 * 4
    for n in (8, 16):  # the linear model bounds batches it was not measured on, from above and closely
        got = tape_bytes(record(np.zeros((n,) + model.input_shape, np.float32)))
        assert got <= fixed + n * per_image <= 1.1 * got


@pytest.mark.parametrize("batch, per_image, budget, fixed, want", [
    (64, 100, 10_000, 0, 64), (64, 1000, 10_000, 0, 10), (64, 1000, 10_000, 3_000, 7), (64, 10**9, 10, 0, 1),
    (64, 0, 10, 0, 64)])
def test_micro_batch_size(batch, per_image, budget, fixed, want):
    assert micro_batch_size(batch, per_image, budget, fixed) == want


@given(st.integers(0, 500), st.integers(1, 80))
def test_chunks_cover_in_order_and_respect_the_size(n, micro):
    parts = chunks(n, micro)
    covered = [i for s in parts for i in range(n)[s]]
    assert covered == list(range(n))
    assert all(0 < s.stop - s.start <= micro for s in parts)
    assert len(parts) == (-(-n // micro) if n else 0)
