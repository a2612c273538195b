"""The committed model zoo (``data/zoo``): ONNX Runtime reproduces every card's validation accuracy."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bwacal.data import open_dataset

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ZOO = Path(__file__).resolve().parent.parent / "data" / "zoo"
VAL = ZOO.parent / "fmnist_val.h5"
MODELS = ("resnet20", "mobilenetv2", "vgg_small")


def card_of(name: str) -> dict:
    return json.loads((ZOO / f"{name}.json").read_text())


def ort_correct(model_path: Path, val_path: Path) -> tuple[int, int]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    correct = total = 0
    with open_dataset(val_path, input_shape=(1, 28, 28), num_classes=10) as ds:
        for x, y in ds.batches(500):
            correct += int((sess.run(["logits"], {"input": x})[0].argmax(1) == y).sum())
            total += len(y)
    return correct, total


@pytest.mark.parametrize("name", MODELS)
def test_card_val_accuracy_is_reproduced_by_onnxruntime(name):
    card = card_of(name)
    onnx_path = ZOO / card["file"]
    assert card["onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert card["val_sha256"] == hashlib.sha256(VAL.read_bytes()).hexdigest()
    correct, total = ort_correct(onnx_path, VAL)
    assert (correct, total) == (card["val_correct"], card["val_count"])
    assert card["val_top1"] == round(100 * correct / total, 2)


@pytest.mark.parametrize("name", MODELS)
def test_card_fields(name):
    card = card_of(name)
    for key in ("architecture", "parameters", "opset", "test_top1", "test_correct", "val_top1",
                "training", "seed", "torch_version"):
        assert key in card, key
    assert card["opset"] == 17 and card["test_count"] == 10000 and card["val_count"] == 2000
    assert card["test_top1"] == round(100 * card["test_correct"] / 10000, 2)
    assert card["training"]["seconds"] > 0
    assert card["test_top1"] >= {"resnet20": 91.0, "mobilenetv2": 89.0, "vgg_small": 90.0}[name]


@pytest.mark.parametrize("name", MODELS)
def test_exported_graph_shape(name):
    model = onnx.load(str(ZOO / f"{name}.onnx"))
    graph = model.graph
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,), (out,) = graph.input, graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    ops = Counter(n.op_type for n in graph.node)
    assert ops["BatchNormalization"] == ops["Conv"]  # BN kept: the engine folds it itself
    assert "Identity" not in ops
    params = sum(int(np.prod(t.dims)) for t in graph.initializer if t.name not in
                 {i for n in graph.node for i in n.input if "num_batches_tracked" in i})
    assert params >= card_of(name)["parameters"]  # BN running statistics come on top
    if name == "resnet20":
        assert ops["Add"] == 9 and ops["Conv"] == 21 and ops["Gemm"] == 1
    elif name == "mobilenetv2":
        depthwise = [n for n in graph.node if n.op_type == "Conv"
                     and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        assert len(depthwise) >= 8 and ops["Clip"] > 0 and ops["Add"] > 0
    else:
        assert ops["MaxPool"] == 3 and ops["Gemm"] == 2 and ops["Flatten"] == 1


def test_export_keeps_batchnorm_and_matches_torch(tmp_path):
    """The builder's export path, on an untrained network (fast; needs the ``zoo`` extra)."""
    torch = pytest.importorskip("torch")
    from benchmarks.zoo.build import export
    from benchmarks.zoo.models import ARCHITECTURES

    torch.manual_seed(0)
    model = ARCHITECTURES["mobilenetv2"]()
    with torch.no_grad():  # non-trivial BN statistics, so a folded or dropped BN would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    path = tmp_path / "m.onnx"
    export(model, path)
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["BatchNormalization"] == ops["Conv"] == 25 and "Identity" not in ops
