"""The inverted-residual block kernel (``bwacal/kernels/block.py``) and when the engine uses it.

The kernel is checked against torch's float64 convolutions composed node by node; the engine's
forward runs with blocks against the same graph run node by node (a recorded run, or with an inner
value asked for).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

from bwacal.engine import Engine
from bwacal.errors import ModelError
from bwacal.onnx_io import read_model
from bwacal.kernels import block
from bwacal.ops.conv import Conv
from tests.engine.test_gradients import _model

RELU6 = (0.0, 6.0)
TOL = 1e-5  # of max |y|, float32 against float64


class Case(NamedTuple):
    c: int  # block input channels
    hidden: int  # expanded channels (== c without expansion)
    o: int  # output channels
    h: int
    w: int
    n: int = 3
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    residual: bool = False
    out_clip: tuple | None = None


CASES = {
    "mobilenet_stride_1_residual": Case(8, 48, 8, 8, 8, residual=True),
    "mobilenet_stride_2": Case(6, 36, 10, 9, 7, stride=2),
    "odd_channels": Case(3, 13, 11, 5, 5, n=5),
    "kernel_5_dilated": Case(4, 20, 6, 9, 9, kernel=5, dilation=2),
    "one_pixel": Case(4, 8, 8, 1, 1, residual=False, n=9),
    "clipped_output": Case(6, 24, 6, 7, 7, residual=True, out_clip=(-0.2, 0.3)),
    "many_images": Case(8, 16, 8, 4, 4, n=37, residual=True),
}


def weights(case, seed=0):
    rng = np.random.default_rng(seed)
    return {"we": rng.standard_normal((case.hidden, case.c, 1, 1)) / 2,
            "be": rng.standard_normal(case.hidden) / 4,
            "wd": rng.standard_normal((case.hidden, 1, case.kernel, case.kernel)) / 2,
            "bd": rng.standard_normal(case.hidden) / 4,
            "wp": rng.standard_normal((case.o, case.hidden, 1, 1)) / 3,
            "bp": rng.standard_normal(case.o) / 4}


def reference(x, case, p):
    """The block in torch float64, NCHW."""
    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in p.items()}
    x = torch.from_numpy(np.asarray(x, dtype=np.float64))
    h = torch.clamp(F.conv2d(x, t["we"], t["be"]), *RELU6)
    pad = case.dilation * (case.kernel - 1) // 2
    h = torch.clamp(F.conv2d(h, t["wd"], t["bd"], stride=case.stride, padding=pad, dilation=case.dilation,
                             groups=case.hidden), *RELU6)
    y = F.conv2d(h, t["wp"], t["bp"])
    if case.residual:
        y = y + x
    if case.out_clip is not None:
        y = torch.clamp(y, *case.out_clip)
    return y.numpy()


def depthwise_op(case):
    pad = case.dilation * (case.kernel - 1) // 2
    return Conv(kernel_shape=[case.kernel] * 2, pads=[pad] * 4, strides=[case.stride] * 2,
                dilations=[case.dilation] * 2, group=case.hidden)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_torch(name):
    case = CASES[name]
    p = weights(case)
    x = np.random.default_rng(1).standard_normal((case.n, case.c, case.h, case.w)) * 2
    want = reference(x, case, p)
    xc = np.ascontiguousarray(x.transpose(1, 0, 2, 3), dtype=np.float32)
    y = block.run_inverted_residual(xc, (p["we"], p["be"], RELU6), (depthwise_op(case), p["wd"], p["bd"], RELU6), (p["wp"], p["bp"]),
                                    xc if case.residual else None, case.out_clip)
    assert y.dtype == np.float32 and y.shape == (case.o, case.n, *want.shape[2:])
    np.testing.assert_allclose(y.transpose(1, 0, 2, 3), want, rtol=0, atol=TOL * np.abs(want).max())


def test_kernel_gives_the_same_with_one_image_or_many_per_job(monkeypatch):
    case = CASES["many_images"]
    p = weights(case)
    x = np.random.default_rng(2).standard_normal((case.n, case.c, case.h, case.w))
    want = reference(x, case, p)
    xc = np.ascontiguousarray(x.transpose(1, 0, 2, 3), dtype=np.float32)
    args = (xc, (p["we"], p["be"], RELU6), (depthwise_op(case), p["wd"], p["bd"], RELU6), (p["wp"], p["bp"]), xc, None)
    for positions in (1, 1 << 30):  # one image per job; a quarter of the batch per job
        monkeypatch.setattr(block, "PROJECT_POSITIONS", positions)
        y = block.run_inverted_residual(*args)
        np.testing.assert_allclose(y.transpose(1, 0, 2, 3), want, rtol=0, atol=1e-5 * np.abs(want).max())


def block_model(case, dtype=np.float32, expand=True):
    """x -> [Conv 1x1 -> Clip] -> Conv depthwise -> Clip -> Conv 1x1 [-> Add x] as ONNX (opset 13)."""
    nodes, consts = [], {k: v.astype(dtype) for k, v in weights(case).items()}
    consts.update(lo=np.array(0.0, dtype=dtype), hi=np.array(6.0, dtype=dtype))
    h = "x"
    if expand:
        nodes += [helper.make_node("Conv", [h, "we", "be"], ["e"], name="expand", kernel_shape=[1, 1]),
                  helper.make_node("Clip", ["e", "lo", "hi"], ["ea"], name="expand_act")]
        h = "ea"
    else:
        del consts["we"], consts["be"]
    pad = case.dilation * (case.kernel - 1) // 2
    nodes += [helper.make_node("Conv", [h, "wd", "bd"], ["d"], name="depthwise", group=case.hidden,
                               kernel_shape=[case.kernel] * 2, pads=[pad] * 4, strides=[case.stride] * 2,
                               dilations=[case.dilation] * 2),
              helper.make_node("Clip", ["d", "lo", "hi"], ["da"], name="depthwise_act"),
              helper.make_node("Conv", ["da", "wp", "bp"], ["p" if case.residual else "y"], name="project",
                               kernel_shape=[1, 1])]
    if case.residual:
        nodes.append(helper.make_node("Add", ["p", "x"], ["y"], name="add"))
    x = np.random.default_rng(3).standard_normal((case.n, case.c, case.h, case.w)).astype(dtype)
    return _model(nodes, {"x": x}, consts, ["y"], 13), x


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.abs(want).max())


def run_profiled(engine, feeds, **kwargs):
    profile = {}
    values, tape = engine.run(feeds, profile=profile, **kwargs)
    return values, set(profile)


@pytest.mark.parametrize("name", ["mobilenet_stride_1_residual", "mobilenet_stride_2", "odd_channels"])
def test_engine_runs_the_block_in_one_kernel_when_nothing_is_recorded(name):
    case = CASES[name]
    model, x = block_model(case)
    engine = Engine(read_model(model))
    first = 0
    assert list(engine.blocks) == [first]
    want = reference(x, case, weights(case))
    got, ran = run_profiled(engine, {"x": x})
    assert ran == {"expand"}
    close(got["y"], want)
    recorded, ran = run_profiled(engine, {"x": x}, record=True, wrt=["x"])
    assert "project" in ran
    close(recorded["y"], want)


def test_float64_models_run_node_by_node():
    """The kernel is float32 only; a float64 model gets the node-by-node float64 result."""
    case = CASES["mobilenet_stride_1_residual"]
    model, x = block_model(case, np.float64)
    engine = Engine(read_model(model))
    got, ran = run_profiled(engine, {"x": x})
    assert {"expand", "depthwise", "project", "add"} <= ran
    want = reference(x, case, weights(case))
    np.testing.assert_allclose(got["y"], want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_asking_for_an_inner_value_runs_the_nodes_one_by_one():
    case = CASES["mobilenet_stride_1_residual"]
    model, x = block_model(case)
    engine = Engine(read_model(model))
    got, ran = run_profiled(engine, {"x": x}, outputs=["ea", "y"])
    assert {"expand", "depthwise", "project", "add"} <= ran
    close(got["y"], reference(x, case, weights(case)))


def test_overridden_weights_reach_the_block():
    """The fitting loop passes quantized weights as ``params``: the block must read them."""
    case = CASES["mobilenet_stride_2"]
    model, x = block_model(case)
    engine = Engine(read_model(model))
    other = weights(case, seed=9)
    params = {k: other[k].astype(np.float32) for k in ("we", "wd", "bp")}
    got, ran = run_profiled(engine, {"x": x}, params=params)
    assert ran == {"expand"}
    close(got["y"], reference(x, case, {**weights(case), **params}))


def test_overridden_clip_bound_turns_the_block_off():
    case = CASES["mobilenet_stride_2"]
    model, x = block_model(case)
    engine = Engine(read_model(model))
    got, ran = run_profiled(engine, {"x": x}, params={"hi": np.array(0.5, dtype=np.float32)})
    assert "depthwise_act" in ran and "project" in ran
    t = {k: torch.from_numpy(v.astype(np.float32)) for k, v in weights(case).items()}
    e = torch.clamp(F.conv2d(torch.from_numpy(x), t["we"], t["be"]), 0.0, 0.5)
    d = torch.clamp(F.conv2d(e, t["wd"], t["bd"], stride=2, padding=1, groups=case.hidden), 0.0, 0.5)
    close(got["y"], F.conv2d(d, t["wp"], t["bp"]).numpy())


def test_a_block_without_expansion_runs_node_by_node():
    case = Case(6, 6, 4, 5, 5)
    model, x = block_model(case, expand=False)
    engine = Engine(read_model(model))
    assert engine.blocks == {}
    got, ran = run_profiled(engine, {"x": x})
    assert ran == {"depthwise", "project"}
    t = {k: torch.from_numpy(v.astype(np.float32)) for k, v in weights(case).items()}
    d = torch.clamp(F.conv2d(torch.from_numpy(x), t["wd"], t["bd"], padding=1, groups=case.hidden), *RELU6)
    close(got["y"], F.conv2d(d, t["wp"], t["bp"]).numpy())


def test_wrong_channel_count_fails_as_the_node_by_node_run_does():
    case = CASES["mobilenet_stride_2"]
    model, _ = block_model(case)
    engine = Engine(read_model(model))
    x = np.zeros((2, case.c + 1, case.h, case.w))
    with pytest.raises(ModelError, match="expand.*channels"):
        engine.run({"x": x})


def test_blocks_are_found_only_where_values_have_one_reader():
    """The expansion's activation read by a second node: no block; the nodes run one by one."""
    case = CASES["mobilenet_stride_1_residual"]
    model, x = block_model(case)
    model.graph.node.append(helper.make_node("Relu", ["ea"], ["extra"], name="extra"))
    model.graph.output.append(helper.make_tensor_value_info("extra", 0, None))
    engine = Engine(read_model(model))
    assert engine.blocks == {}
    got, ran = run_profiled(engine, {"x": x})
    assert {"expand", "depthwise", "project", "add", "extra"} <= ran
    close(got["y"], reference(x, case, weights(case)))


def test_nan_and_infinity_reach_the_same_outputs_as_node_by_node():
    """A NaN or infinite input pixel spreads through the block exactly as through the nodes run one
    by one (clips are selects: NaN passes them)."""
    case = CASES["mobilenet_stride_1_residual"]
    model, x = block_model(case)
    x[0, 1, 2, 3] = np.nan
    x[1, 0, 4, 4] = np.inf
    x[2, 3, 0, 0] = -np.inf
    engine = Engine(read_model(model))
    got, ran = run_profiled(engine, {"x": x})
    assert ran == {"expand"}
    want, _ = engine.run({"x": x}, record=True, wrt=["x"])
    np.testing.assert_array_equal(np.isnan(got["y"]), np.isnan(want["y"]))
    assert np.isnan(got["y"]).any()
    finite = np.isfinite(want["y"])
    np.testing.assert_array_equal(np.isfinite(got["y"]), finite)
    np.testing.assert_array_equal(got["y"][~finite & ~np.isnan(want["y"])], want["y"][~finite & ~np.isnan(want["y"])])
    close(got["y"][finite], want["y"][finite])
