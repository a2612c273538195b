"""``bwacal.evaluate`` (top-1, top-5, per class, agreement), the gate behind ``check`` and ``bwacal.inspection``."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from bwacal.data import open_dataset, write_dataset
from bwacal.errors import BwacalError, DataError, ModelError
from bwacal.evaluate import EvalResult, evaluate, measure_latency, onnxruntime_forward
from bwacal.gate import check_max_drop, choose_metric, judge
from bwacal.inspection import bwacal_metadata, layer_bits, weight_layers
from tests.tiny_models import SHAPE, labelled_data, save, tiny_classifier


def logits_file(tmp_path, logits, labels=None, name="d.h5"):
    """Images that *are* the logits: with ``identity`` as forward, every score is chosen by hand."""
    logits = np.asarray(logits, np.float32)
    write_dataset(tmp_path / name, logits.reshape(len(logits), 1, 1, -1), labels)
    return open_dataset(tmp_path / name)


def identity(x):
    return x.reshape(len(x), -1)


LOGITS = [  # 7 classes; true label -> rank of the true class
    [9, 1, 2, 3, 4, 5, 6],  # label 0: top-1
    [0, 1, 2, 3, 4, 5, 6],  # label 2: rank 5 (top-5 hit)
    [0, 1, 2, 3, 4, 5, 6],  # label 1: rank 6 (miss)
    [0, 0, 9, 0, 0, 0, 0],  # label 2: top-1
    [1, 9, 0, 0, 0, 0, 0],  # label 0: rank 2
    [0, 0, 0, 0, 0, 0, 9],  # label 6: top-1
]
LABELS = [0, 2, 1, 2, 0, 6]


def test_top1_top5_per_class_by_hand(tmp_path):
    with logits_file(tmp_path, LOGITS, np.array(LABELS)) as ds:
        r = evaluate(identity, ds)
    assert (r.n, r.correct) == (6, 3)
    assert r.top1 == pytest.approx(3 / 6)
    assert r.top5 == pytest.approx(5 / 6)
    assert r.class_counts == [2, 1, 2, 0, 0, 0, 1]
    assert r.per_class == [0.5, 0.0, 0.5, None, None, None, 1.0]
    assert r.agreement is None and r.reference_top1 is None


def test_batch_size_does_not_change_the_result(tmp_path):
    with logits_file(tmp_path, LOGITS, np.array(LABELS)) as ds:
        results = [evaluate(identity, ds, batch_size=b).to_dict() for b in (1, 4, 256)]
    assert results[0] == results[1] == results[2]


def test_agreement_and_reference_top1(tmp_path):
    def reference(x):  # disagrees on rows 0 and 2 by predicting class 3 there
        out = identity(x).copy()
        out[[0, 2] if len(x) == 6 else [], 3] = 100
        return out

    with logits_file(tmp_path, LOGITS, np.array(LABELS)) as ds:
        r = evaluate(identity, ds, reference=reference)
    assert r.agreement == pytest.approx(4 / 6)
    assert (r.reference_correct, r.reference_top1) == (2, pytest.approx(2 / 6))


def test_without_labels_only_agreement(tmp_path):
    with logits_file(tmp_path, LOGITS) as ds:
        r = evaluate(identity, ds, reference=identity)
    assert (r.top1, r.top5, r.per_class, r.correct) == (None, None, None, None)
    assert r.agreement == 1.0


def test_top5_only_with_more_than_five_classes(tmp_path):
    with logits_file(tmp_path, [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]], np.array([0, 0])) as ds:
        r = evaluate(identity, ds)
    assert r.top5 is None and r.top1 == 0.5


def test_progress_is_called_per_batch(tmp_path):
    calls = []
    with logits_file(tmp_path, LOGITS, np.array(LABELS)) as ds:
        evaluate(identity, ds, batch_size=4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 6), (6, 6)]


def test_to_dict_is_json_ready(tmp_path):
    with logits_file(tmp_path, LOGITS, np.array(LABELS)) as ds:
        d = evaluate(identity, ds, reference=identity).to_dict()
    assert json.loads(json.dumps(d)) == d and set(d) >= {"n", "top1", "top5", "per_class", "agreement"}


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_bad_batch_size(tmp_path, bad):
    with logits_file(tmp_path, LOGITS, np.array(LABELS)) as ds, pytest.raises(BwacalError, match="batch size"):
        evaluate(identity, ds, batch_size=bad)


def test_bad_logits_and_labels(tmp_path):
    with logits_file(tmp_path, LOGITS, np.array(LABELS)) as ds:
        with pytest.raises(ModelError, match=r"expected \(batch, classes\)"):
            evaluate(lambda x: x, ds)
        with pytest.raises(ModelError, match="reference model has 3 classes"):
            evaluate(identity, ds, reference=lambda x: identity(x)[:, :3])
        with pytest.raises(DataError, match="out of range"):
            evaluate(lambda x: identity(x)[:, :4], ds)


# ---- ONNX Runtime ------------------------------------------------------------------------------


def test_onnxruntime_forward_matches_the_engine(tmp_path):
    pytest.importorskip("onnxruntime")
    from bwacal import load_model

    path = save(tiny_classifier(), tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(size=(5, *SHAPE)).astype(np.float32)
    f = onnxruntime_forward(path)
    assert (f.input_shape, f.num_classes) == (SHAPE, 10)
    np.testing.assert_allclose(f(x), load_model(path).forward(x), rtol=1e-4, atol=1e-5)
    fixed = onnxruntime_forward(save(tiny_classifier(dynamic_batch=False), tmp_path / "b1.onnx"))
    np.testing.assert_allclose(fixed(x), f(x), rtol=1e-5, atol=1e-6)  # a batch-1 model still takes 5 images


def test_onnxruntime_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BwacalError, match="pip install onnxruntime"):
        onnxruntime_forward(save(tiny_classifier(), tmp_path / "m.onnx"))


def test_evaluate_end_to_end_on_a_tiny_model(tmp_path):
    from bwacal import load_model

    path = save(tiny_classifier(), tmp_path / "m.onnx")
    labelled_data(tmp_path / "v.h5", path, n=40, flip=4)
    model = load_model(path)
    with open_dataset(tmp_path / "v.h5", input_shape=model.input_shape, num_classes=model.num_classes) as ds:
        r = evaluate(model.forward, ds, batch_size=16, reference=model.forward)
    assert (r.correct, r.n, r.agreement, r.reference_correct) == (36, 40, 1.0, 36)


def test_latency_is_the_median_of_the_timed_runs_per_batch_size():
    seen = []
    ticks = iter(np.cumsum([0, 3, 0, 1, 0, 2, 0, 5, 0, 4, 0, 9], dtype=float) / 1024)  # start/stop pairs, exact

    def forward(x):
        seen.append(x.shape)

    rows = measure_latency(forward, np.zeros((3, 1, 2, 2), np.float32), batch_sizes=(2, 5), runs=3,
                           clock=lambda: next(ticks))
    ms = 1e3 / 1024
    assert [(r["batch"], r["median_ms"], r["min_ms"], r["runs"]) for r in rows] == \
        [(2, 2 * ms, 1 * ms, 3), (5, 5 * ms, 4 * ms, 3)]
    assert seen == [(2, 1, 2, 2)] * 4 + [(5, 1, 2, 2)] * 4  # one warm-up each; 3 images fill a batch of 5
    with pytest.raises(BwacalError, match="positive"):
        measure_latency(forward, np.zeros((3, 1, 2, 2), np.float32), batch_sizes=(0,))


def test_evaluate_latency_on_onnxruntime_prints_each_batch_size(tmp_path):
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from cli.main import app

    path = save(tiny_classifier(), tmp_path / "m.onnx")
    labelled_data(tmp_path / "v.h5", path, n=8)
    args = ["evaluate", str(path), "--data", str(tmp_path / "v.h5"), "--runtime", "onnxruntime", "--latency",
            "--latency-batch", "1", "--latency-batch", "16", "--latency-runs", "3", "--threads", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "latency (onnxruntime, 1 threads; median of 3 runs)" in r.output
    assert f"{path}: batch    1" in r.output and f"{path}: batch   16" in r.output
    r = CliRunner().invoke(app, args + ["--json"])
    rows = json.loads(r.stdout)["latency"]["model"]
    assert [row["batch"] for row in rows] == [1, 16] and all(row["median_ms"] > 0 for row in rows)
    r = CliRunner().invoke(app, args[:-1] + ["0"])
    assert r.exit_code == 2 and "--threads must be a positive integer" in r.output


# ---- the gate ----------------------------------------------------------------------------------


def result(correct, ref_correct, agree, n=200):
    return EvalResult(n=n, top1=correct / n, correct=correct, agreement=agree / n,
                      reference_top1=ref_correct / n, reference_correct=ref_correct)


def test_judge_top1_boundary_is_inclusive():
    v = judge(result(182, 184, 190), "top1", 1.0, "q.onnx", "fp.onnx", "v.h5")
    assert v.passed and v.drop == pytest.approx(1.0)
    assert v.summary() == "PASS q.onnx: top-1 91.00% vs 92.00% (drop 1.00 <= 1.00 points, 200 images)"
    v = judge(result(181, 184, 190), "top1", 1.0, "q.onnx", "fp.onnx", "v.h5")
    assert not v.passed and v.summary().startswith("FAIL q.onnx: top-1 90.50% vs 92.00% (drop 1.50 > 1.00")


def test_judge_agreement_and_negative_drop():
    v = judge(result(150, 184, 197), "agreement", 2.0, "q.onnx", "fp.onnx", "v.h5")
    assert v.passed and v.drop == pytest.approx(1.5) and "agreement 98.50% with fp.onnx" in v.summary()
    assert judge(result(190, 184, 190), "top1", 0.0, "q", "fp", "v").passed  # better than FP is fine


def test_choose_metric_and_max_drop():
    assert choose_metric(None, True) == "top1" and choose_metric(None, False) == "agreement"
    assert choose_metric("agreement", True) == "agreement"
    with pytest.raises(BwacalError, match="no 'labels'"):
        choose_metric("top1", False, "v.h5")
    with pytest.raises(BwacalError, match="unknown metric"):
        choose_metric("top3", True)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(BwacalError, match="--max-drop"):
            check_max_drop(bad)


def test_junit_xml():
    import xml.etree.ElementTree as ET

    suite = ET.fromstring(judge(result(100, 184, 190), "top1", 1.0, "q.onnx", "fp.onnx", "v.h5").to_junit(2.5))
    assert suite.tag == "testsuite" and suite.get("tests") == "1" and suite.get("failures") == "1"
    assert len(suite.findall("testcase")) == 1 and suite.find("testcase/failure") is not None
    ok = ET.fromstring(judge(result(184, 184, 200), "top1", 1.0, "q.onnx", "fp.onnx", "v.h5").to_junit())
    assert ok.get("failures") == "0" and ok.find("testcase/failure") is None


# ---- inspection --------------------------------------------------------------------------------


def test_protocols_on_the_tiny_model():
    from bwacal.onnx_io import read_model

    graph = read_model(tiny_classifier())
    layers = weight_layers(graph)
    assert [(l.name, l.op_type, l.params, l.channels) for l in layers] == \
        [("conv1", "Conv", 40, 4), ("conv2", "Conv", 296, 8), ("fc", "Gemm", 90, 10)]
    assert layer_bits(graph, 3, "first-last-8bit") == [8, 3, 8]
    assert layer_bits(graph, 4, "all-layers") == [4, 4, 4]
    with pytest.raises(BwacalError, match="unknown protocol"):
        layer_bits(graph, 3, "some")


def test_metadata_summary():
    alpha = [[1.0, 2.0, 4.4], [1.2, 1.8, 3.6]]  # 2 channels x 3 bit planes
    meta = {"bwacal_version": "0.1.0", "bwacal_bits": "3", "bwacal_accuracy": json.dumps({"fp": 0.9, "bwa": 0.88}),
            "bwacal_layers": json.dumps([{"layer": "c", "weight": "w", "bits": 3, "channels": 2, "alpha": alpha,
                                          "gamma": [0.5, 1.5]}])}
    out, warnings = bwacal_metadata(meta)
    assert warnings == [] and out["bits"] == "3" and out["accuracy"] == {"fp": 0.9, "bwa": 0.88}
    assert out["method"] == "bwa"  # no bwacal_method: the paper's method
    layer = out["layers"][0]
    assert layer["alpha"] == {"rel_mean_per_plane": [1.1, 0.95, 1.0], "rel_min": 0.9, "rel_max": 1.2}
    assert layer["gamma"]["mean"] == 1.0
    assert bwacal_metadata({"other": "x"}) == (None, [])
    _, warnings = bwacal_metadata({"bwacal_layers": "{not json"})
    assert warnings and "bwacal_layers" in warnings[0]
