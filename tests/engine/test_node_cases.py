"""Every ONNX node test case of an op the engine supports runs against its expected outputs."""

import numpy as np
import pytest
from onnx.backend.test.case.node import collect_testcases

from bwacal.engine import Engine
from bwacal.errors import UnsupportedOpError
from bwacal.onnx_io import read_model

# the op list of issue 2: the engine promises these
SUPPORTED = {
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid",
    "HardSigmoid", "HardSwish", "Tanh", "Softmax", "LogSoftmax", "BatchNormalization", "MaxPool",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "Flatten", "Reshape", "Transpose",
    "Squeeze", "Unsqueeze", "Concat", "Pad", "Identity", "Dropout", "Constant", "Shape", "Gather", "Cast",
    "GatherElements", "QuantizeLinear", "DequantizeLinear",
}

# issue 15: element-wise math, logic and tensor-making ops
MATH_OPS = {
    "Erf", "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Exp", "Log", "Sqrt", "Pow", "Neg",
    "Abs", "Reciprocal", "Sign", "Floor", "Ceil", "Round", "Sum", "Mean", "Max", "Min", "Mod", "Equal",
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "Where", "ConstantOfShape",
    "Range",
}

# issue 15: slicing, splitting, reductions, normalizations
SHAPE_NORM_OPS = {
    "Slice", "Split", "Expand", "Tile", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceSumSquare", "ReduceProd",
    "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ArgMax", "ArgMin", "LRN", "LayerNormalization",
    "InstanceNormalization", "GroupNormalization", "ScatterND",
}

# issue 18: what the packed and bitplanes formats write
INTEGER_OPS = {"BitShift", "ConvInteger", "MatMulInteger"}

SUPPORTED |= MATH_OPS | SHAPE_NORM_OPS | INTEGER_OPS

# cases outside what the engine promises, each with the reason
KNOWN_SKIPS = {
    # math, logic and tensor-making ops
    **{f"test_not_{d}d": "the model imports opset 1, below the engine's 7-28" for d in (2, 3, 4)},
    "test_equal_string": "string tensors",
    "test_equal_string_broadcast": "string tensors",
    # inputs given as NumPy scalars, which test_node_case's element-type check refuses: these run in
    # tests/engine/test_ops_math.py::test_node_case_scalar_inputs
    **{f"test_range_{t}_type_{d}_delta": "NumPy-scalar inputs: run in test_ops_math.py"
       for t, d in (("float", "positive"), ("float16", "positive"), ("int32", "negative"))},
    **{f"test_clip_{c}_expanded": "NumPy-scalar inputs: run in test_ops_math.py"
       for c in ("example", "inbounds", "outbounds", "splitbounds", "min_greater_than_max", "default_min",
                 "default_max", "default_int8_min", "default_int8_max")},

    # slicing, splitting, reductions, normalizations

}


def _cases():
    out = []
    for case in collect_testcases():
        ops = {n.op_type for n in case.model.graph.node}
        if ops and ops <= SUPPORTED:
            out.append(pytest.param(case, id=case.name))
    return out


CASES = _cases()


def test_many_cases_collected():
    assert len(CASES) > 300


@pytest.mark.parametrize("case", CASES)
def test_node_case(case):
    if case.name in KNOWN_SKIPS:
        pytest.skip(KNOWN_SKIPS[case.name])
    try:
        engine = Engine(read_model(case.model))
    except UnsupportedOpError as exc:
        pytest.skip(str(exc).split(". Supported ops")[0])
    for inputs, expected in case.data_sets:
        if not all(isinstance(a, np.ndarray) and a.dtype.kind in "biuf" for a in list(inputs) + list(expected)):
            pytest.skip("element types NumPy cannot hold (float8, 4-bit, 2-bit, bfloat16)")
    names = [v.name for v in engine.graph.inputs]
    out_names = [v.name for v in engine.graph.outputs]
    for inputs, expected in case.data_sets:
        feeds = dict(zip(names, [np.asarray(a) for a in inputs]))
        values, _ = engine.run(feeds)
        for name, want in zip(out_names, expected):
            got = values[name]
            want = np.asarray(want)
            assert got.shape == want.shape, name
            if want.dtype.kind in "fc":
                np.testing.assert_allclose(got, want, rtol=case.rtol, atol=case.atol, err_msg=name)
            else:
                np.testing.assert_array_equal(got, want, err_msg=name)
