"""Whole models exported by torch.onnx: forward against ONNX Runtime, backward against torch autograd."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import bwacal
from tests import torch_models as tm

# name -> (builder, image size); widths kept tiny so the whole file runs in seconds
MODELS = {
    "resnet_cifar": (lambda: tm.resnet_cifar(depth=8, width=8), 16),
    "mobilenetv2_small": (lambda: tm.mobilenetv2_small(width_mult=0.5), 16),
    "se_net": (lambda: tm.se_net(width=8), 16),
    "vgg_small": (lambda: tm.vgg_small(width=8, image_size=16), 16),
}
EXPORTERS = ["torchscript", "dynamo"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each (model, exporter) once per module; returns ``get(name, exporter) -> (torch model, path)``."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            build, size = MODELS[name]
            model = build()
            path = root / f"{name}_{exporter}.onnx"
            tm.export(model, path, torch.randn(2, 3, size, size), exporter=exporter)
            cache[name, exporter] = model, path
        return cache[name, exporter]

    return get


def _ort(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _batch(n, size, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _rel_err(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_matches_onnxruntime(exported, name, exporter, fold):
    _, path = exported(name, exporter)
    model = bwacal.load_model(path, fold_batchnorm=fold)
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.nodes)
    assert has_bn != fold or exporter == "dynamo"  # the dynamo exporter fuses BatchNorm itself
    sess = _ort(path)
    size = MODELS[name][1]
    for n in (3, 1):
        x = _batch(n, size, seed=n)
        want = sess.run(None, {"input": x})[0]
        got = model.forward(x)
        assert got.shape == want.shape and got.dtype == np.float32
        assert _rel_err(got, want) <= 1e-4


def _matched_parameters(model, torch_model):
    """Map initializers to the torch parameters they hold: by name when the values agree, else by
    shape and values (the dynamo exporter names a fused conv's bias ``<conv>.weight_bias``)."""
    params = dict(torch_model.named_parameters())
    out = {}
    for name, value in model.graph.initializers.items():
        candidates = [params[name]] if name in params else params.values()
        for p in candidates:
            q = p.detach().numpy()
            if q.shape == value.shape and np.allclose(q, value, rtol=1e-5, atol=1e-6 * np.abs(q).max()):
                out[name] = p
                break
    return out


@pytest.mark.parametrize("exporter,fold", [("torchscript", False), ("torchscript", True), ("dynamo", False)])
@pytest.mark.parametrize("name", list(MODELS))
def test_backward_matches_torch_autograd(exported, name, exporter, fold):
    """Unfolded, initializers are the torch parameters; folded (by bwacal, or by the dynamo exporter's
    optimiser) they are the parameters of the torch model with BatchNorm fused into the convs."""
    torch_model, path = exported(name, exporter)
    if fold or exporter == "dynamo":
        torch_model = tm.fuse_batchnorm(torch_model)
    model = bwacal.load_model(path, fold_batchnorm=fold)
    params = _matched_parameters(model, torch_model)
    weights = {n.inputs[1] for n in model.graph.nodes if n.op_type in ("Conv", "Gemm")}
    assert weights <= set(params), f"{sorted(weights - set(params))} map to no torch parameter"
    x = _batch(2, MODELS[name][1], seed=7)
    r = np.random.default_rng(8).standard_normal((2, model.num_classes)).astype(np.float32)

    wrt = [model.input_name, *params]
    logits, tape = model.forward(x, record=True, wrt=wrt)
    grads = model.backward(tape, r, wrt=wrt)

    xt = torch.tensor(x, requires_grad=True)
    torch_model.zero_grad()
    want_logits = torch_model(xt)
    (torch.tensor(r) * want_logits).sum().backward()

    assert _rel_err(logits, want_logits.detach().numpy()) <= 1e-4
    assert grads[model.input_name].shape == x.shape
    assert _rel_err(grads[model.input_name], xt.grad.numpy()) <= 1e-3, "input"
    for k, p in params.items():
        assert grads[k] is not None and grads[k].shape == tuple(p.shape), k
        assert _rel_err(grads[k], p.grad.numpy()) <= 1e-3, k


def test_resnet18_forward(tmp_path):
    torch_model = tm.resnet18(classes=100)
    path = tmp_path / "resnet18.onnx"
    tm.export(torch_model, path, torch.randn(1, 3, 64, 64))
    model = bwacal.load_model(path)
    x = _batch(1, 64, seed=0)
    want = _ort(path).run(None, {"input": x})[0]
    assert _rel_err(model.forward(x), want) <= 1e-4


@pytest.mark.parametrize("name", ["vgg_small", "se_net"])
def test_shape_subgraphs_folded_with_dynamic_batch(exported, name):
    _, path = exported(name, "torchscript")
    assert any(n.op_type == "Shape" for n in onnx.load(str(path)).graph.node)
    model = bwacal.load_model(path)
    assert not [n.name for n in model.graph.nodes if n.op_type in ("Shape", "Gather", "Unsqueeze", "Concat")]
    sess = _ort(path)
    for n in (1, 2, 5):
        x = _batch(n, MODELS[name][1], seed=n)
        assert _rel_err(model.forward(x), sess.run(None, {"input": x})[0]) <= 1e-4


@pytest.mark.parametrize("name,exporter,opset", [
    *[(name, "torchscript", opset) for name in ("mobilenetv2_small", "se_net", "vgg_small") for opset in (11, 13, 15)],
    ("mobilenetv2_small", "dynamo", 21)])
def test_other_opsets(tmp_path, name, exporter, opset):
    """Clip, Squeeze/Unsqueeze and ReduceMean change form across opsets 11-18."""
    build, size = MODELS[name]
    path = tmp_path / f"{name}_{opset}.onnx"
    tm.export(build(), path, torch.randn(2, 3, size, size), exporter=exporter, opset=opset)
    model = bwacal.load_model(path)
    x = _batch(3, size, seed=opset)
    assert _rel_err(model.forward(x), _ort(path).run(None, {"input": x})[0]) <= 1e-4


def test_batchnorm_after_linear_is_folded(tmp_path):
    torch.manual_seed(0)
    net = tm._randomize_batchnorm(nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                                nn.Linear(16, 5)), seed=1)
    path = tmp_path / "mlp_bn.onnx"
    tm.export(net, path, torch.randn(2, 3, 4, 4))
    sess = _ort(path)
    x = _batch(3, 4, seed=0)
    want = sess.run(None, {"input": x})[0]
    for fold in (True, False):
        model = bwacal.load_model(path, fold_batchnorm=fold)
        assert any(n.op_type == "BatchNormalization" for n in model.graph.nodes) != fold
        assert _rel_err(model.forward(x), want) <= 1e-4
