"""Output-aware weight steps: the search kernel against its naive twin, H = I against the weight-MSE
search, im2col and grouped H against torch, and a real zoo layer's held-out output error."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bwacal.quant.output_steps import (
    candidate_steps,
    conv_geometry,
    im2col,
    input_covariances,
    layer_rows,
    output_error_steps,
    output_errors,
)
from bwacal.quant.uniform import qrange, quantize
from bwacal.quant.weights import minmax_steps, mse_steps
from tests import naive

ROOT = Path(__file__).resolve().parents[1]


def spd(rng, g, k):
    a = rng.normal(size=(g, k, k + 3))
    return a @ a.transpose(0, 2, 1) / k


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_output_errors_match_naive(groups):
    rng = np.random.default_rng(groups)
    w = rng.laplace(size=(8, 20)).astype(np.float32)
    w[3, :5] = 0
    steps = rng.uniform(0.05, 1.0, size=(8, 7))
    h = spd(rng, groups, 20)
    for bits in (2, 3, 8):
        qmin, qmax = qrange(bits, True)
        np.testing.assert_allclose(output_errors(w, steps, h, qmin, qmax),
                                   naive.output_errors(w, steps, h, qmin, qmax), rtol=1e-11, atol=1e-12)


def test_output_errors_bad_shapes():
    w = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="G dividing 6"):
        output_errors(w, np.ones((6, 2)), np.ones((4, 4, 4)), -2, 1)
    with pytest.raises(ValueError, match="positive"):
        output_errors(w, np.zeros((6, 2)), np.eye(4), -2, 1)


def test_identity_h_reproduces_weight_mse_search():
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.normal(size=(24, 144)), rng.laplace(size=(24, 144)),
                        rng.standard_t(2, size=(16, 144))]).astype(np.float32)
    w[5] = 0
    for bits in range(2, 9):
        np.testing.assert_array_equal(output_error_steps(w, bits, np.eye(144)), mse_steps(w, bits))
    # one H per group of rows works the same way
    np.testing.assert_array_equal(output_error_steps(w, 3, np.broadcast_to(np.eye(144), (8, 144, 144))),
                                  mse_steps(w, 3))


def test_candidates_are_the_mse_grid():
    w = np.random.default_rng(1).normal(size=(4, 30)).astype(np.float32)
    cand = candidate_steps(w, 3)
    np.testing.assert_array_equal(cand[:, -2], minmax_steps(w, 3))  # ratio 1 before the no-clipping step
    np.testing.assert_allclose(cand[:, -1], minmax_steps(w, 3) * 4 / 3, rtol=1e-6)


def test_correlated_inputs_change_the_step():
    # two perfectly correlated inputs with opposite weights: only their sum matters to the output
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4096, 1))
    x = np.concatenate([x, x, rng.normal(size=(4096, 30)) * 0.01], axis=1)
    h = x.T @ x / len(x)
    w = rng.normal(size=(16, 32)).astype(np.float32)
    w[:, 1] = -w[:, 0] + 0.37
    out = output_error_steps(w, 2, h)
    mse = mse_steps(w, 2)
    qmin, qmax = qrange(2, True)

    def total(steps):
        return sum(naive.output_errors(w[c:c + 1], steps[c:c + 1, None], h, qmin, qmax)[0, 0] for c in range(16))

    assert total(out) < 0.9 * total(mse)


@pytest.mark.parametrize("stride,pad,dilation", [(1, 0, 1), (1, 1, 1), (2, 1, 1), (2, 2, 2), (3, 0, 2)])
def test_im2col_matches_torch_unfold(stride, pad, dilation):
    rng = np.random.default_rng(stride * 10 + pad)
    x = rng.normal(size=(2, 3, 11, 9)).astype(np.float32)
    attrs = {"strides": [stride, stride], "pads": [pad] * 4, "dilations": [dilation] * 2, "kernel_shape": [3, 2]}
    g = conv_geometry(attrs, x.shape[2:], (4, 3, 3, 2))
    got = im2col(x, g)
    ref = F.unfold(torch.from_numpy(x), (3, 2), dilation=dilation, padding=pad, stride=stride)  # (N, K, L)
    np.testing.assert_array_equal(got, ref.permute(0, 2, 1).reshape(-1, ref.shape[1]).numpy())
    positions = np.array([[1, 0, 0], [0, g.ho - 1, g.wo - 1], [1, g.ho // 2, 1]])
    full = got.reshape(2, g.ho, g.wo, -1)
    np.testing.assert_array_equal(im2col(x, g, positions), full[positions[:, 0], positions[:, 1], positions[:, 2]])


@pytest.mark.parametrize("groups,auto_pad", [(1, "NOTSET"), (4, "NOTSET"), (8, "NOTSET"), (2, "SAME_UPPER")])
def test_grouped_h_gives_the_conv_output_error(groups, auto_pad):
    """mean over positions of (conv(x, E) channel o)**2 equals e_o^T H_g(o) e_o (torch conv2d as oracle)."""
    rng = np.random.default_rng(groups)
    x = rng.normal(size=(3, 8, 10, 9)).astype(np.float32)
    out_channels = 16
    e = rng.normal(size=(out_channels, 8 // groups, 3, 3)).astype(np.float32)
    attrs = {"group": groups, "strides": [2, 1], "dilations": [1, 2]}
    if auto_pad == "NOTSET":
        attrs["pads"] = [1, 0, 2, 1]
        xt = F.pad(torch.from_numpy(x), (0, 1, 1, 2))  # (left, right, top, bottom)
    else:
        attrs["auto_pad"] = auto_pad
        g = conv_geometry(attrs, x.shape[2:], e.shape)
        xt = F.pad(torch.from_numpy(x), (g.pw, g.pad_end_w, g.ph, g.pad_end_h))
    y = F.conv2d(xt.double(), torch.from_numpy(e).double(), stride=(2, 1), dilation=(1, 2), groups=groups).numpy()
    expected = (y**2).mean(axis=(0, 2, 3))
    rows = layer_rows("Conv", attrs, x, e.shape).astype(np.float64).reshape(-1, groups, 8 // groups * 9)
    h = np.stack([rows[:, i].T @ rows[:, i] / len(rows) for i in range(groups)])
    assert rows.shape[0] == y.shape[0] * y.shape[2] * y.shape[3]
    e2d = e.reshape(out_channels, -1).astype(np.float64)
    per_group = out_channels // groups
    got = [e2d[o] @ h[o // per_group] @ e2d[o] for o in range(out_channels)]
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_sampled_rows_are_patches_of_each_image():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 2, 6, 6)).astype(np.float32)
    attrs = {"pads": [1, 1, 1, 1]}
    full = layer_rows("Conv", attrs, x, (3, 2, 3, 3)).reshape(4, 36, -1)
    part = layer_rows("Conv", attrs, x, (3, 2, 3, 3), per_image=5, rng=np.random.default_rng(0)).reshape(4, 5, -1)
    for i in range(4):
        matches = (part[i][:, None, :] == full[i][None]).all(axis=2)
        assert matches.any(axis=1).all() and len({int(np.argmax(m)) for m in matches}) == 5  # distinct positions
    gemm = rng.normal(size=(5, 7)).astype(np.float32)
    np.testing.assert_array_equal(layer_rows("Gemm", {}, gemm, (3, 7)), gemm)


@pytest.fixture(scope="module")
def resnet20():
    from bwacal.model import load_model

    return load_model(ROOT / "data/zoo/resnet20.onnx")


def test_zoo_layer_output_error_lower_on_heldout_activations(resnet20):
    from bwacal.data import open_dataset

    model = resnet20
    node_name = "/features/features.9/body/body.3/Conv"  # 64 -> 64, 3x3: K = 576
    node = next(n for n in model.graph.nodes if n.name == node_name)
    with open_dataset(ROOT / "data/fmnist_calib.h5") as calib, open_dataset(ROOT / "data/fmnist_val.h5") as val:
        x_calib, _ = calib.read(np.arange(128))
        x_val, _ = val.read(np.arange(128))
    h = input_covariances(model, [node_name], x_calib, rows=8192)[node_name]
    assert h.shape == (1, 576, 576)
    np.testing.assert_array_equal(h, input_covariances(model, [node_name], x_calib, rows=8192)[node_name])
    values, _ = model.engine.run({model.input_name: x_val}, outputs=[node.inputs[0]])
    weight = model.graph.initializers[node.inputs[1]]
    rows = layer_rows("Conv", node.attrs, values[node.inputs[0]], weight.shape).astype(np.float64)
    w2d = weight.reshape(weight.shape[0], -1).astype(np.float64)

    def heldout_error(steps, bits):
        qmin, qmax = qrange(bits, True)
        wq = steps[:, None].astype(np.float64) * quantize(w2d, steps[:, None], qmin, qmax)
        return float(np.mean((rows @ (w2d - wq).T) ** 2))

    for bits in (2, 3, 4):
        out = heldout_error(output_error_steps(w2d, bits, h), bits)
        mse = heldout_error(mse_steps(w2d, bits), bits)
        minmax = heldout_error(minmax_steps(w2d, bits), bits)
        assert out < 0.97 * mse and out < minmax, (bits, out, mse, minmax)


def test_input_covariances_bad_node(resnet20):
    with pytest.raises(ValueError, match="no node named"):
        input_covariances(resnet20, ["nope"], np.zeros((1, 1, 28, 28), np.float32))
    relu = next(n.name for n in resnet20.graph.nodes if n.op_type == "Relu")
    with pytest.raises(ValueError, match="is not a Conv"):
        input_covariances(resnet20, [relu], np.zeros((1, 1, 28, 28), np.float32))


@pytest.mark.parametrize("groups", [1, 4])
def test_low_rank_h_is_searched_through_its_factor(groups):
    rng = np.random.default_rng(10 + groups)
    k = 40
    x = rng.normal(size=(groups, 12, k))  # 12 rows: rank 12 < k / 2
    h = x.transpose(0, 2, 1) @ x / 12
    from bwacal.quant.output_steps import low_rank_factors

    factors = low_rank_factors(h)
    assert factors.shape == (groups, 12, k)
    np.testing.assert_allclose(factors.transpose(0, 2, 1) @ factors, h, atol=1e-12)
    assert low_rank_factors(h + np.eye(k)) is None  # full rank: searched directly
    w = rng.laplace(size=(8, k)).astype(np.float32)
    steps = rng.uniform(0.05, 1.0, size=(8, 9))
    for bits in (2, 4):
        qmin, qmax = qrange(bits, True)
        np.testing.assert_allclose(output_errors(w, steps, h, qmin, qmax),
                                   naive.output_errors(w, steps, h, qmin, qmax), rtol=1e-9)


def test_layers_with_long_rows_keep_the_weight_mse_step(monkeypatch):
    import bwacal
    from bwacal.quant import output_steps
    from bwacal.quant.weights import channels_first, mse_steps
    from bwacal.quantize import select_layers

    model = bwacal.load_model("data/zoo/resnet20.onnx")
    layers = select_layers(model.graph, 3, "all-layers")
    images = np.random.default_rng(0).normal(size=(8,) + model.input_shape).astype(np.float32)
    monkeypatch.setattr(output_steps, "MAX_ROW", 200)  # 16-channel 3x3 convs (K = 144) stay output-aware
    steps = output_steps.output_aware_steps(model, layers, images)
    long_rows = short_differs = 0
    for layer in layers:
        w = model.graph.initializers[layer.weight]
        mse = mse_steps(channels_first(w, layer.axis), layer.bits)
        if int(np.prod(w.shape[1:])) > 200:
            long_rows += 1
            np.testing.assert_array_equal(steps[layer.weight], mse)
        else:
            short_differs += not np.array_equal(steps[layer.weight], mse)
    assert long_rows > 0 and short_differs > 0
