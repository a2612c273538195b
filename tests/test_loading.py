"""Loading: load-time folding (constants, shape subgraphs, constant-condition If), dynamic and
channels-last inputs, squeezed heads, and which layers are quantized; every model against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bwacal
from bwacal.data import open_dataset, write_dataset
from bwacal.errors import ModelError, UnsupportedOpError
from bwacal.inspection import describe_model

RNG = np.random.default_rng(0)


def const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def weights(*shape, scale=None):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return RNG.normal(0, scale or np.sqrt(2.0 / fan_in), shape).astype(np.float32)


def make(nodes, inits, input_shape, output_shape, opset=17, input_name="x", output="logits"):
    graph = helper.make_graph(nodes, "test", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ort_run(model, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def rel_err(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def assert_matches_ort(model, loaded, batches=(1, 3, 7), seed=1):
    rng = np.random.default_rng(seed)
    for n in batches:
        x = rng.standard_normal((n,) + loaded.input_shape).astype(np.float32)
        want = ort_run(model, x)
        got = loaded.forward(x)
        assert got.shape == (n, loaded.num_classes)
        assert rel_err(got, want.reshape(n, -1)) < 1e-4, n


def conv_stem(x="x", out="r", channels=3, width=4):
    """Conv 3x3 (pad 1) + ReLU: ``(nodes, inits)``."""
    inits = [const("stem.w", weights(width, channels, 3, 3)), const("stem.b", weights(width, scale=0.1))]
    nodes = [helper.make_node("Conv", [x, "stem.w", "stem.b"], ["stem"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["stem"], [out], name="stem_relu")]
    return nodes, inits


# ---- folding -----------------------------------------------------------------------------------


def flatten_by_shape(opset=17):
    """``x.view(x.size(0), -1)`` as torch exports it: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    nodes, inits = conv_stem()
    inits += [const("zero", 0, np.int64), const("minus1", [-1], np.int64), const("fc.w", weights(5, 4 * 6 * 6)),
              const("fc.b", weights(5, scale=0.1)), const("axes0", [0], np.int64)]
    nodes += [helper.make_node("Shape", ["r"], ["shape"], name="shape"),
              helper.make_node("Gather", ["shape", "zero"], ["n"], name="gather", axis=0),
              helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
              helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
              helper.make_node("Reshape", ["r", "target"], ["flat"], name="reshape"),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    return make(nodes, inits, ["N", 3, 6, 6], ["N", 5], opset)


def test_shape_gather_unsqueeze_concat_reshape_folds_and_the_batch_stays_dynamic():
    model = flatten_by_shape()
    loaded = bwacal.load_model(model)
    ops = [n.op_type for n in loaded.graph.nodes]
    assert "Shape" not in ops and "Concat" not in ops and "Gather" not in ops
    reshape = next(n for n in loaded.graph.nodes if n.op_type == "Reshape")
    assert loaded.graph.initializers[reshape.inputs[1]].tolist() == [0, -1]
    assert_matches_ort(model, loaded, batches=(1, 3, 7))


def test_a_batch_dependent_shape_that_is_not_a_reshape_target_runs_at_run_time():
    """Expand's target [N, 4, 6, 6] cannot hold a 0 or -1: the Shape subgraph stays and follows the batch."""
    nodes, inits = conv_stem()
    inits += [const("bias", weights(1, 4, 1, 1)), const("fc.w", weights(5, 4)), const("fc.b", weights(5, scale=0.1))]
    nodes += [helper.make_node("Shape", ["r"], ["shape"], name="shape"),
              helper.make_node("Expand", ["bias", "shape"], ["bias_n"], name="expand"),
              helper.make_node("Add", ["r", "bias_n"], ["s"], name="add"),
              helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    model = make(nodes, inits, ["N", 3, 6, 6], ["N", 5])
    loaded = bwacal.load_model(model)
    assert "Shape" in [n.op_type for n in loaded.graph.nodes]
    assert_matches_ort(model, loaded)


def test_shape_slice_concat_reshape_folds():
    nodes, inits = conv_stem()
    inits += [const(k, v, np.int64) for k, v in (("s0", [0]), ("s1", [1]), ("minus1", [-1]))]
    inits += [const("fc.w", weights(5, 144)), const("fc.b", weights(5, scale=0.1))]
    nodes += [helper.make_node("Shape", ["r"], ["shape"], name="shape"),
              helper.make_node("Slice", ["shape", "s0", "s1"], ["n"], name="slice"),
              helper.make_node("Concat", ["n", "minus1"], ["target"], name="concat", axis=0),
              helper.make_node("Reshape", ["r", "target"], ["flat"], name="reshape"),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    model = make(nodes, inits, ["N", 3, 6, 6], ["N", 5])
    loaded = bwacal.load_model(model)
    assert [n.op_type for n in loaded.graph.nodes] == ["Conv", "Relu", "Reshape", "Gemm"]
    assert_matches_ort(model, loaded)


def test_constantofshape_concat_slice_pad_folds():
    """``F.pad(x, computed pads)`` as torch exports it; the Pad needs only its data input at run time."""
    nodes, inits = conv_stem()
    inits += [const("npads", [4], np.int64), const("given", [1, 2, 0, 1], np.int64),
              const("shape2", [-1, 2], np.int64), const("start", [-1], np.int64), const("end", [-(2**62)], np.int64),
              const("axis0", [0], np.int64), const("step", [-1], np.int64), const("final", [-1], np.int64),
              const("fc.w", weights(5, 4)), const("fc.b", weights(5, scale=0.1))]
    nodes += [helper.make_node("ConstantOfShape", ["npads"], ["zeros"], name="cos",
                               value=numpy_helper.from_array(np.array([0], np.int64))),
              helper.make_node("Concat", ["given", "zeros"], ["pads8"], name="cat", axis=0),
              helper.make_node("Reshape", ["pads8", "shape2"], ["pairs"], name="pairs"),
              helper.make_node("Slice", ["pairs", "start", "end", "axis0", "step"], ["reversed"], name="flip"),
              helper.make_node("Transpose", ["reversed"], ["cols"], name="cols", perm=[1, 0]),
              helper.make_node("Reshape", ["cols", "final"], ["pads"], name="pads"),
              helper.make_node("Cast", ["pads"], ["pads64"], name="cast", to=TensorProto.INT64),
              helper.make_node("Pad", ["r", "pads64"], ["padded"], name="pad"),
              helper.make_node("GlobalAveragePool", ["padded"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    model = make(nodes, inits, ["N", 3, 6, 6], ["N", 5])
    loaded = bwacal.load_model(model)
    assert [n.op_type for n in loaded.graph.nodes] == ["Conv", "Relu", "Pad", "GlobalAveragePool", "Flatten", "Gemm"]
    assert_matches_ort(model, loaded)


def test_any_op_on_constants_folds_even_one_the_engine_cannot_run_on_activations():
    """A Transpose and a Mul of initializers become one initializer: the MatMul's weight, quantized."""
    nodes, inits = conv_stem()
    inits += [const("wt", weights(5, 4)), const("two", 2.0), const("fc.b", weights(5, scale=0.1))]
    nodes += [helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Transpose", ["wt"], ["w"], name="wT", perm=[1, 0]),
              helper.make_node("Mul", ["w", "two"], ["w2"], name="w_scaled"),
              helper.make_node("MatMul", ["f", "w2"], ["mm"], name="fc"),
              helper.make_node("Add", ["mm", "fc.b"], ["logits"], name="fc_bias")]
    model = make(nodes, inits, ["N", 3, 6, 6], ["N", 5])
    loaded = bwacal.load_model(model)
    assert "Transpose" not in [n.op_type for n in loaded.graph.nodes]
    from bwacal.quantize import select_layers

    assert [(q.node, q.op_type, q.axis) for q in select_layers(loaded.graph, 4)] == [("stem", "Conv", 0),
                                                                                      ("fc", "MatMul", 1)]
    assert_matches_ort(model, loaded)


# ---- If ----------------------------------------------------------------------------------------


def if_model(cond: bool, dynamic_cond: bool = False):
    """tf2onnx's batch-norm-in-If: each branch reads the outer activation and outer and own constants."""
    nodes, inits = conv_stem()
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["t_scale"], name="t_const", value=numpy_helper.from_array(
            np.array([[[1.5]], [[0.5]], [[-1.0]], [[2.0]]], np.float32))),
         helper.make_node("Mul", ["r", "t_scale"], ["t_mul"], name="t_mul"),
         helper.make_node("Add", ["t_mul", "shift"], ["t_out"], name="t_add")],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph(
        [helper.make_node("Sub", ["r", "e_bias"], ["e_out"], name="e_sub")],
        "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)],
        [const("e_bias", weights(4, 1, 1, scale=1.0))])
    inits += [const("shift", weights(4, 1, 1, scale=1.0)), const("fc.w", weights(5, 4)),
              const("fc.b", weights(5, scale=0.1))]
    if dynamic_cond:
        nodes += [helper.make_node("ReduceMean", ["x"], ["m"], name="mean", keepdims=0),
                  helper.make_node("Cast", ["m"], ["cond"], name="cond", to=TensorProto.BOOL)]
    else:
        inits.append(const("cond", cond, np.bool_))
    nodes += [helper.make_node("If", ["cond"], ["bn"], name="bn_if", then_branch=then_branch,
                               else_branch=else_branch),
              helper.make_node("Relu", ["bn"], ["a"], name="relu"),
              helper.make_node("GlobalAveragePool", ["a"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    return make(nodes, inits, ["N", 3, 6, 6], ["N", 5])


@pytest.mark.parametrize("cond", [True, False])
def test_an_if_with_a_constant_condition_is_replaced_by_its_taken_branch(cond):
    model = if_model(cond)
    loaded = bwacal.load_model(model)
    ops = [n.op_type for n in loaded.graph.nodes]
    assert "If" not in ops
    assert ("Mul" in ops) == cond and ("Sub" in ops) == (not cond)
    assert_matches_ort(model, loaded)


def test_an_if_inside_a_taken_branch_is_inlined_too():
    """The inner If reads a value the outer branch computes: renamed consistently when both are inlined."""
    nodes, inits = conv_stem()
    inner = helper.make_graph([helper.make_node("Mul", ["o_val", "k"], ["i_out"], name="i_mul")], "inner", [],
                              [helper.make_tensor_value_info("i_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["o_val"], ["n_out"], name="n_neg")], "other", [],
                              [helper.make_tensor_value_info("n_out", TensorProto.FLOAT, None)])
    outer = helper.make_graph(
        [helper.make_node("Add", ["r", "k"], ["o_val"], name="o_add"),
         helper.make_node("If", ["yes"], ["o_out"], name="inner_if", then_branch=inner, else_branch=other)],
        "outer", [], [helper.make_tensor_value_info("o_out", TensorProto.FLOAT, None)])
    skip = helper.make_graph([helper.make_node("Identity", ["r"], ["s_out"], name="s_id")], "skip", [],
                             [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)])
    inits += [const("yes", True, np.bool_), const("k", 0.75), const("fc.w", weights(5, 4)),
              const("fc.b", weights(5, scale=0.1))]
    nodes += [helper.make_node("If", ["yes"], ["y"], name="outer_if", then_branch=outer, else_branch=skip),
              helper.make_node("GlobalAveragePool", ["y"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    model = make(nodes, inits, ["N", 3, 6, 6], ["N", 5])
    loaded = bwacal.load_model(model)
    assert "If" not in [n.op_type for n in loaded.graph.nodes]
    assert_matches_ort(model, loaded)


def test_an_if_with_a_condition_computed_at_run_time_is_an_unsupported_op_naming_the_node():
    with pytest.raises(UnsupportedOpError) as err:
        bwacal.load_model(if_model(True, dynamic_cond=True))
    assert [(op, name) for op, name, _ in err.value.problems] == [("If", "bn_if")]
    assert "condition" in str(err.value) and "\n" not in str(err.value)


# ---- dynamic image dims ------------------------------------------------------------------------


def dynamic_hw(channels=3, classes=5):
    nodes, inits = conv_stem(channels=channels)
    inits += [const("fc.w", weights(classes, 4)), const("fc.b", weights(classes, scale=0.1))]
    nodes += [helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    return make(nodes, inits, ["N", channels, "H", "W"], ["N", classes])


def test_dynamic_height_and_width_are_fixed_by_input_shape():
    model = dynamic_hw()
    loaded = bwacal.load_model(model, input_shape=(3, 10, 7))
    assert loaded.input_shape == (3, 10, 7) and loaded.layout == "nchw"
    assert_matches_ort(model, loaded)


def test_dynamic_dims_come_from_the_data_file_when_input_shape_is_not_given():
    loaded = bwacal.load_model(dynamic_hw(), data_shape=(3, 9, 9))
    assert loaded.input_shape == (3, 9, 9)
    assert bwacal.load_model(dynamic_hw(), input_shape=(3, 5, 5), data_shape=(3, 9, 9)).input_shape == (3, 5, 5)


def test_dynamic_dims_without_a_size_and_a_size_that_does_not_fit_are_one_line_errors():
    with pytest.raises(ModelError, match=r"dynamic dims; give the image size as input_shape=\(C, H, W\)"):
        bwacal.load_model(dynamic_hw())
    with pytest.raises(ModelError, match="input_shape 1x8x8 does not fit input 'x'"):
        bwacal.load_model(dynamic_hw(), input_shape=(1, 8, 8))
    with pytest.raises(bwacal.BwacalError, match="three positive integers"):
        bwacal.load_model(dynamic_hw(), input_shape=(3, 0, 8))


# ---- channels last -----------------------------------------------------------------------------


def nhwc_model(size=6):
    """tf2onnx's channels-last Keras model: (N, H, W, C) input, a Rescaling Mul, a Transpose to NCHW."""
    nodes, inits = conv_stem(x="nchw")
    inits += [const("rescale", 0.5), const("fc.w", weights(5, 4)), const("fc.b", weights(5, scale=0.1))]
    nodes = [helper.make_node("Mul", ["x", "rescale"], ["scaled"], name="rescaling"),
             helper.make_node("Transpose", ["scaled"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2])] + nodes
    nodes += [helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    return make(nodes, inits, ["N", size, "W", 3], ["N", 5])


def test_a_channels_last_model_takes_a_data_file_in_its_own_layout(tmp_path):
    model = nhwc_model()
    loaded = bwacal.load_model(model, input_shape=(3, 6, 8))  # (C, H, W) whatever the layout
    assert loaded.layout == "nhwc" and loaded.input_shape == (6, 8, 3)
    assert_matches_ort(model, loaded)

    raw = np.random.default_rng(2).integers(0, 256, (5, 6, 8, 3), dtype=np.uint8)
    mean, std = [0.2, 0.5, 0.7], [0.3, 0.25, 0.2]
    path = write_dataset(tmp_path / "nhwc.h5", raw, scale=1 / 255, mean=mean, std=std, layout="nhwc")
    with open_dataset(path, input_shape=loaded.input_shape, num_classes=5, layout=loaded.layout) as ds:
        x, _ = ds.read(np.arange(5))
    want_x = ((raw / 255.0 - np.array(mean)) / np.array(std)).astype(np.float32)
    np.testing.assert_allclose(x, want_x, rtol=1e-5, atol=1e-5)
    assert rel_err(loaded.forward(x), ort_run(model, x)) < 1e-4
    from_file = bwacal.load_model(model, data_shape=(6, 8, 3))
    assert from_file.input_shape == (6, 8, 3)


def test_an_nchw_file_for_a_channels_last_model_is_refused_naming_both_layouts(tmp_path):
    path = write_dataset(tmp_path / "nchw.h5", np.zeros((2, 3, 6, 8), np.uint8), mean=[0.5] * 3)
    with pytest.raises(bwacal.DataError, match=r"3x6x8 \(H x W x C, channels last\) but the model expects 6x8x3"):
        open_dataset(path, input_shape=(6, 8, 3), layout="nhwc")


# ---- heads -------------------------------------------------------------------------------------


def head_model(kind):
    """Logits (N, K, 1, 1) from a 1x1 conv + GlobalAveragePool (SqueezeNet), or (N, 1, K) from an Unsqueeze."""
    nodes, inits = conv_stem()
    if kind == "NK11":
        inits += [const("cls.w", weights(5, 4, 1, 1)), const("cls.b", weights(5, scale=0.1))]
        nodes += [helper.make_node("Conv", ["r", "cls.w", "cls.b"], ["c"], name="cls"),
                  helper.make_node("GlobalAveragePool", ["c"], ["logits"], name="pool")]
        return make(nodes, inits, ["N", 3, 6, 6], ["N", 5, 1, 1])
    inits += [const("fc.w", weights(5, 4)), const("fc.b", weights(5, scale=0.1)), const("ax1", [1], np.int64)]
    nodes += [helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], name="fc", transB=1),
              helper.make_node("Unsqueeze", ["g", "ax1"], ["logits"], name="unsqueeze")]
    return make(nodes, inits, ["N", 3, 6, 6], ["N", 1, 5])


@pytest.mark.parametrize("kind", ["NK11", "N1K"])
def test_logits_of_shape_nk11_and_n1k_are_squeezed_to_nk(kind):
    model = head_model(kind)
    loaded = bwacal.load_model(model)
    assert loaded.num_classes == 5
    assert loaded.output_shape == ((5, 1, 1) if kind == "NK11" else (1, 5))
    assert loaded.graph.outputs[0].name == "logits"  # the graph (and so a written model) keeps its output
    assert_matches_ort(model, loaded)

    # backward takes (N, K) dL/dlogits: against central differences on the input
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32)
    r = np.random.default_rng(4).standard_normal((2, 5)).astype(np.float32)
    logits, tape = loaded.forward(x, record=True, wrt=[loaded.input_name])
    dx = loaded.backward(tape, r, [loaded.input_name])[loaded.input_name]
    eps, idx = 1e-2, [(0, 0, 1, 2), (1, 2, 3, 3), (1, 1, 0, 5)]
    for i in idx:
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        fd = float((loaded.forward(xp) * r).sum() - (loaded.forward(xm) * r).sum()) / (2 * eps)
        assert abs(dx[i] - fd) < 2e-2 * max(1.0, abs(fd)), (i, dx[i], fd)


# ---- what gets quantized -----------------------------------------------------------------------


def attention_model(tokens=4, dim=8, classes=5):
    """A ViT-like block: patch conv, tokens (N, L, D), q/k/v linear MatMuls with 2-D weights, an attention
    MatMul of two activations, and a Gemm with transA as the head."""
    inits = [const("patch.w", weights(dim, 3, 2, 2)), const("patch.b", weights(dim, scale=0.1)),
             const("tok_shape", [0, dim, tokens], np.int64)]
    nodes = [helper.make_node("Conv", ["x", "patch.w", "patch.b"], ["pe"], name="patch", strides=[2, 2]),
             helper.make_node("Reshape", ["pe", "tok_shape"], ["t0"], name="tokens"),
             helper.make_node("Transpose", ["t0"], ["t"], name="nld", perm=[0, 2, 1])]
    for name in ("q", "k", "v"):
        inits.append(const(f"{name}.w", weights(dim, dim)))
        nodes.append(helper.make_node("MatMul", ["t", f"{name}.w"], [name], name=f"{name}_proj"))
    inits += [const("kT_scale", 1 / np.sqrt(dim)), const("head.w", weights(dim, classes)),
              const("head.b", weights(classes, scale=0.1))]
    nodes += [helper.make_node("Transpose", ["k"], ["kT"], name="kT", perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kT"], ["s0"], name="scores"),
              helper.make_node("Mul", ["s0", "kT_scale"], ["s"], name="scale"),
              helper.make_node("Softmax", ["s"], ["a"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["a", "v"], ["o"], name="attend"),
              helper.make_node("ReduceMean", ["o"], ["pooled"], name="pool", axes=[1], keepdims=0),
              helper.make_node("Transpose", ["pooled"], ["pooledT"], name="pT", perm=[1, 0]),
              helper.make_node("Gemm", ["pooledT", "head.w", "head.b"], ["logits"], name="head", transA=1)]
    return make(nodes, inits, ["N", 3, 4, 4], ["N", classes], opset=17)


def test_linear_layers_on_tokens_are_quantized_and_attention_and_transa_are_not(tmp_path):
    model = attention_model()
    path = tmp_path / "vit.onnx"
    onnx.save(model, path)
    assert_matches_ort(model, bwacal.load_model(path))
    info = describe_model(path, bits=4)
    quantized = [(r["layer"], r["op"], r["shape"], r["axis"]) for r in info["layers"]]
    assert quantized == [("patch", "Conv", [8, 3, 2, 2], 0), ("q_proj", "MatMul", [8, 8], 1),
                         ("k_proj", "MatMul", [8, 8], 1), ("v_proj", "MatMul", [8, 8], 1)]
    assert [r["bits"]["first-last-8bit"] for r in info["layers"]] == [8, 4, 4, 8]
    skipped = {r["layer"]: r["reason"] for r in info["skipped"]}
    assert skipped == {"scores": "MatMul of two activations", "attend": "MatMul of two activations",
                       "head": "Gemm with transA"}


# ---- If branches as read from untrusted files --------------------------------------------------


def test_if_branches_are_read_as_graphs_and_written_back():
    from bwacal.graph import Graph
    from bwacal.onnx_io import graph_to_proto, read_model

    model = if_model(False)
    graph = read_model(model)
    node = next(n for n in graph.nodes if n.op_type == "If")
    assert isinstance(node.attrs["then_branch"], Graph) and "e_bias" in node.attrs["else_branch"].initializers
    written = graph_to_proto(graph)
    onnx.checker.check_model(written)
    x = np.random.default_rng(6).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(ort_run(written, x), ort_run(model, x), rtol=1e-6)


def test_a_branch_tensor_that_lies_about_its_size_and_too_deep_nesting_are_refused():
    model = if_model(True)
    branch = next(n for n in model.graph.node if n.op_type == "If").attribute
    else_graph = next(a for a in branch if a.name == "else_branch").g
    else_graph.initializer[0].raw_data = else_graph.initializer[0].raw_data[:-4]
    with pytest.raises(ModelError, match="'e_bias' declares 16 bytes but holds 12"):
        bwacal.load_model(model)

    inner = helper.make_graph([helper.make_node("Identity", ["x"], ["y0"])], "b0", [],
                              [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)])
    for depth in range(1, 18):
        inner = helper.make_graph([helper.make_node("If", ["c"], [f"y{depth}"], then_branch=inner, else_branch=inner)],
                                  f"b{depth}", [], [helper.make_tensor_value_info(f"y{depth}", TensorProto.FLOAT, None)])
    deep = helper.make_model(helper.make_graph(
        inner.node, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y17", TensorProto.FLOAT, None)], [const("c", True, np.bool_)]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="nest more than 16 levels"):
        bwacal.load_model(deep)


def test_a_batch_entry_that_is_not_the_inputs_dim_becomes_minus_one():
    """Attention's ``view(N, heads, T, d)`` of an ``(N*heads, T, d)`` tensor: the target's first entry
    is the batch but the input's first dim is batch x heads, so 0 ("copy") would be wrong."""
    inits = [const("split", np.array([-1, 3, 4]), np.int64), const("rest", np.array([2, 12]), np.int64),
             const("zero", np.array([0]), np.int64), const("fc.w", weights(5, 24)), const("fc.b", weights(5, scale=0.1))]
    nodes = [helper.make_node("Reshape", ["x", "split"], ["heads"], name="to_heads"),  # (2N, 3, 4)
             helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch"),
             helper.make_node("Concat", ["n", "rest"], ["target"], name="target", axis=0),
             helper.make_node("Reshape", ["heads", "target"], ["merged"], name="merge"),  # (N, 2, 12)
             helper.make_node("Flatten", ["merged"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    model = make(nodes, inits, ["N", 2, 3, 4], ["N", 5])
    loaded = bwacal.load_model(model)
    assert "Shape" not in [n.op_type for n in loaded.graph.nodes]
    merge = next(n for n in loaded.graph.nodes if n.name == "merge")
    assert loaded.graph.initializers[merge.inputs[1]].tolist() == [-1, 2, 12]
    assert_matches_ort(model, loaded)
