"""A short fuzz run: mutated ONNX and HDF5 files either load or raise BwacalError (see fuzz.py)."""

from hypothesis import HealthCheck, given, settings

from tests.reliability import fuzz

SHORT = settings(max_examples=100, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SHORT
@given(fuzz.onnx_cases())
def test_mutated_onnx_loads_or_raises_bwacal_error(data):
    assert fuzz.onnx_target(data) in ("ok", "error")


@SHORT
@given(fuzz.onnx_cases())
def test_inspect_of_mutated_onnx_exits_0_or_2(data):
    assert fuzz.inspect_target(data) in ("0", "2")


@SHORT
@given(fuzz.hdf5_with_model())
def test_mutated_hdf5_reads_or_raises_bwacal_error(case):
    assert fuzz.run_hdf5(case) in ("ok", "error")


def test_the_seeds_are_valid():
    assert fuzz.onnx_target(fuzz.onnx_seed()) == "ok"
    for seed in fuzz.hdf5_seeds():
        assert fuzz.run_hdf5((seed, fuzz.MODEL_SHAPE, fuzz.NUM_CLASSES)) == "ok"
