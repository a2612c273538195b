"""Mixed precision (bwacal/mixed.py): the Fisher estimate against finite differences, the allocation
against brute force and its budgets, accuracy control, and the commands."""

import itertools
import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import bwacal
from bwacal import mixed
from bwacal.calibrate import CalibrationOptions, calibrate
from bwacal.errors import BwacalError
from bwacal.quantize import select_layers
from cli.main import app
from tests.calibration.conftest import tiny_cnn
from tests.tiny_models import labelled_data, save, tiny_classifier

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, labelled calibration file, labelled evaluation file) of the conv-depthwise-residual CNN."""
    d = tmp_path_factory.mktemp("mixed")
    path = tiny_cnn(d / "tiny.onnx")
    model = bwacal.load_model(path)
    rng = np.random.default_rng(3)
    for name, n in (("calib.h5", 160), ("eval.h5", 96)):
        x = rng.normal(0, 1, (n, 1, 12, 12)).astype(np.float32)
        bwacal.data.write_dataset(d / name, x, model.forward(x).argmax(axis=1))
    return path, d / "calib.h5", d / "eval.h5"


# ---- the Fisher estimate --------------------------------------------------------------------------


def test_fisher_diagonal_matches_finite_differences_of_the_kl(tmp_path):
    """KL(FP || W + eps e_j) = eps^2 / 2 F_jj + O(eps^4) for the symmetric difference: the estimate
    (random signs, one backward per image) against the KL measured in float64 from the engine's logits."""
    path = save(tiny_classifier(seed=2), tmp_path / "m.onnx")
    model = bwacal.load_model(path)
    x = np.random.default_rng(0).normal(0, 1, (1024, 1, 8, 8)).astype(np.float32)
    names = ["conv1.w", "conv2.w", "fc.w"]
    names = [layer.weight for layer in select_layers(model.graph, 8, "all-layers")]
    fisher = mixed.fisher_diagonal(model, names, x, micro_batch=1)
    ref = bwacal.fit.log_softmax(model.forward(x))
    checked = 0
    for name in names:
        w = model.graph.initializers[name]
        for flat in np.argsort(fisher[name].ravel())[-2:]:  # the two most sensitive weights of each layer
            idx = np.unravel_index(flat, w.shape)
            eps = 0.02 * max(abs(float(w[idx])), 0.1)
            kls = []
            for sign in (1, -1):
                moved = w.copy()
                moved[idx] += sign * eps
                kls.append(mixed.kl_to_reference(model.forward(x, params={name: moved}), ref))
            measured = np.mean(kls)
            estimate = 0.5 * fisher[name][idx] * eps ** 2
            assert estimate == pytest.approx(measured, rel=0.15), (name, idx)
            checked += 1
    assert checked == 2 * len(names)


def test_fisher_sensitivity_is_half_the_fisher_weighted_squared_error(tiny):
    model = bwacal.load_model(tiny[0])
    layers = select_layers(model.graph, 3, "all-layers")
    x, _ = bwacal.data.open_dataset(tiny[1]).read(np.arange(64))
    sens = mixed.fisher_sensitivity(model, layers, x, (2, 4))
    fisher = mixed.fisher_diagonal(model, [layer.weight for layer in layers], x)
    for layer in layers:
        w = model.graph.initializers[layer.weight]
        for b in (2, 4):
            qw = bwacal.quant.weights.quantize_weights(w, b, method="mse", axis=layer.axis)
            dw = qw.dequantize().astype(np.float64) - w
            assert sens.fisher[layer.node][b] == pytest.approx(0.5 * (fisher[layer.weight] * dw ** 2).sum(), rel=1e-9)
        assert sens.fisher[layer.node][2] > sens.fisher[layer.node][4] > 0
    assert sens.params == {layer.node: int(model.graph.initializers[layer.weight].size) for layer in layers}


# ---- the allocation -------------------------------------------------------------------------------


def _brute_force(params, loss, budget, widths=mixed.WIDTHS):
    best = None
    keys = list(params)
    for combo in itertools.product(widths, repeat=len(keys)):
        if sum(params[k] * b for k, b in zip(keys, combo)) <= budget:
            value = sum(loss[k][b] for k, b in zip(keys, combo))
            best = value if best is None else min(best, value)
    return best


def _instance(seed, layers=5):
    rng = np.random.default_rng(seed)
    params = {f"l{i}": int(rng.integers(1, 40)) * 8 for i in range(layers)}
    loss = {}
    for k in params:
        scale = rng.lognormal(0, 2)
        loss[k] = {b: scale * 4.0 ** -b * rng.uniform(0.5, 1.5) for b in mixed.WIDTHS}
    return params, loss


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_and_within_the_budget(seed):
    params, loss = _instance(seed)
    total = sum(params.values())
    for avg in (2.0, 2.3, 2.5, 3.0, 3.7, 5.0, 8.0):
        budget = int(avg * total)
        alloc = mixed.allocate(params, loss, budget)
        assert alloc.exact and alloc.weight_bits == sum(params[k] * alloc.bits[k] for k in params) <= budget
        assert set(alloc.bits.values()) <= set(mixed.WIDTHS)
        assert alloc.estimated_loss == pytest.approx(_brute_force(params, loss, budget), rel=1e-12)
        assert alloc.gap == 0


@pytest.mark.parametrize("seed", range(4))
def test_allocation_on_rounded_costs_stays_within_the_budget_and_states_its_gap(seed, monkeypatch):
    monkeypatch.setattr(mixed, "MAX_CELLS", 7)  # far fewer cells than the budget has units
    params, loss = _instance(seed)
    budget = int(2.6 * sum(params.values()))
    alloc = mixed.allocate(params, loss, budget)
    optimum = _brute_force(params, loss, budget)
    assert not alloc.exact and alloc.weight_bits <= budget
    assert alloc.lower_bound <= optimum + 1e-12 <= alloc.estimated_loss + 2e-12
    assert alloc.gap == pytest.approx(alloc.estimated_loss - alloc.lower_bound)


def test_fixed_layers_keep_their_width_and_count_in_the_budget():
    params, loss = _instance(0)
    budget = int(5.0 * sum(params.values()))
    alloc = mixed.allocate(params, loss, budget, fixed={"l0": 8})
    assert alloc.bits["l0"] == 8 and alloc.weight_bits <= budget
    with pytest.raises(BwacalError, match="below the smallest allocation"):
        mixed.allocate(params, loss, 2 * sum(params.values()), fixed={"l0": 8})


def test_a_layer_made_sensitive_gets_more_bits():
    params, loss = _instance(1)
    budget = int(2.5 * sum(params.values()))
    before = mixed.allocate(params, loss, budget).bits
    total = sum(params.values())
    for k in params:
        sensitive = {**loss, k: {b: v * 1e6 for b, v in loss[k].items()}}
        after = mixed.allocate(params, sensitive, budget).bits
        # the widest width that fits with every other layer at 2 bits
        widest = max(b for b in mixed.WIDTHS if params[k] * b + 2 * (total - params[k]) <= budget)
        assert after[k] == widest >= before[k], k
    assert any(mixed.allocate(params, {**loss, k: {b: v * 1e6 for b, v in loss[k].items()}}, budget).bits[k]
               > before[k] for k in params)


def _onnx_layers(path):
    """(weight count, width) per quantized layer of a written model: its metadata and its initializers,
    read with onnx, not bwacal."""
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return [(sizes[r["weight"]], r["bits"]) for r in json.loads(meta["bwacal_layers"])], meta, sizes


def test_calibrate_avg_bits_meets_the_average_over_every_quantized_weight(tiny, tmp_path):
    model, calib, _ = tiny
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = runner.invoke(app, ["calibrate", str(model), "--calib", str(calib), "--method", "bwa", "--epochs", "1",
                            "--avg-bits", "3.4", "-o", str(out), "--report", str(rep), "-q"])
    assert r.exit_code == 0, r.output
    layers, meta, _ = _onnx_layers(out)
    avg = sum(n * b for n, b in layers) / sum(n for n, _ in layers)
    assert avg <= 3.4 and len({b for _, b in layers}) > 1  # mixed, within the budget
    assert layers[0][1] == layers[-1][1] == 8  # first-last-8bit: the edges stay at 8 and count
    report = json.loads(rep.read_text())
    assert report["avg_weight_bits"] == pytest.approx(avg)
    assert report["allocation"]["exact"] and json.loads(meta["bwacal_mixed"])["avg_bits_budget"] == 3.4
    assert "mixed widths (--avg-bits 3.4)" in r.output
    shown = runner.invoke(app, ["inspect", str(out)])
    assert f"mixed ({avg:.3f} bits on average)" in shown.output and "mixed precision (--avg-bits 3.4)" in shown.output


def test_calibrate_size_budget_meets_the_size_as_defined(tiny, tmp_path):
    model, calib, _ = tiny
    fp = bwacal.load_model(model)
    layers = select_layers(fp.graph, 8, "all-layers")
    quantized = {layer.weight for layer in layers}
    rest = sum(a.nbytes for k, a in fp.graph.initializers.items() if k not in quantized)
    counts = sum(fp.graph.initializers[w].size for w in quantized)
    mb = (rest + counts * 2.7 / 8) / 1e6
    cal = calibrate(model, calib, CalibrationOptions(method="bwa", epochs=0, protocol="all-layers", size_budget=mb))
    size = rest + sum(fp.graph.initializers[r["weight"]].size * r["bits"] / 8 for r in cal.report["layers"])
    assert size <= mb * 1e6 and cal.report["quantized_size_bytes"] == pytest.approx(size)
    assert {r["bits"] for r in cal.report["layers"]} != {2}
    with pytest.raises(BwacalError, match="--size-budget"):
        calibrate(model, calib, CalibrationOptions(method="bwa", epochs=0, protocol="all-layers",
                                                   size_budget=(rest + counts * 1.9 / 8) / 1e6))


def test_calibrate_gives_the_artificially_sensitive_layer_more_bits(tiny, monkeypatch):
    model, calib, _ = tiny
    options = CalibrationOptions(method="bwa", epochs=0, protocol="all-layers", avg_bits=2.6)
    report = calibrate(model, calib, options).report
    before = {r["layer"]: r["bits"] for r in report["layers"]}
    params = {r["layer"]: r["params"] for r in report["allocation"]["layers"]}
    target = min((k for k in before if before[k] < 8), key=params.get)  # the cheapest layer to raise
    real = mixed.fisher_sensitivity

    def boosted(*args, **kwargs):
        sens = real(*args, **kwargs)
        sens.fisher[target] = {b: v * 1e6 for b, v in sens.fisher[target].items()}
        return sens

    monkeypatch.setattr(mixed, "fisher_sensitivity", boosted)
    after = {r["layer"]: r["bits"] for r in calibrate(model, calib, options).report["layers"]}
    assert after[target] == 8 > before[target]


# ---- accuracy control -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """(model, calibration, evaluation) of a tiny classifier whose predictions spread over classes,
    so that narrow widths lose top-1 (W2 26 points, W4 13 on 200 images)."""
    d = tmp_path_factory.mktemp("varied")
    path = save(tiny_classifier(seed=0), d / "m.onnx")
    return path, labelled_data(d / "c.h5", path, n=160, seed=1), labelled_data(d / "e.h5", path, n=200, seed=2)


def test_max_drop_stops_at_the_first_step_within_the_drop(varied):
    model, calib, ev = varied
    options = CalibrationOptions(bits=2, method="bwa", epochs=0, protocol="all-layers", max_drop=5.0)
    cal = calibrate(model, calib, options, eval_path=ev)
    control = cal.report["accuracy_control"]
    steps = control["steps"]
    assert control["met"] and len(steps) > 1  # W2 drops on this model; raising layers removes the drop
    assert all(s["drop"] > 5 for s in steps[:-1]) and steps[-1]["drop"] <= 5
    assert all(s["raised"] for s in steps[1:]) and steps[0]["raised"] == {}
    assert [s["avg_bits"] for s in steps] == sorted(s["avg_bits"] for s in steps)
    acc = cal.report["accuracy"]
    assert 100 * (acc["fp"] - acc["bwa"]) == pytest.approx(steps[-1]["drop"])
    widths = {r["layer"]: r["bits"] for r in cal.report["layers"]}
    for s in steps[1:]:
        for node, b in s["raised"].items():
            assert widths[node] >= b
    # a drop met at the requested widths: one step, nothing raised
    loose = calibrate(model, calib, CalibrationOptions(bits=2, method="bwa", epochs=0, protocol="all-layers",
                                                       max_drop=steps[0]["drop"] + 1), eval_path=ev)
    assert len(loose.report["accuracy_control"]["steps"]) == 1


def test_max_drop_that_cannot_be_met_exits_1_and_writes_nothing(varied, tmp_path):
    model, calib, ev = varied
    out = tmp_path / "q.onnx"
    # every layer pinned at 2 bits by a rule: nothing can be raised
    r = runner.invoke(app, ["calibrate", str(model), "--calib", str(calib), "--data", str(ev), "--bits", "2",
                            "--all-layers", "--method", "bwa", "--epochs", "0", "--layer-bits", "*=2",
                            "--max-drop", "0", "-o", str(out), "-q"])
    assert r.exit_code == 1, r.output
    assert "cannot be met" in r.output and not out.exists()


def test_max_drop_needs_labels(tiny, tmp_path):
    model, calib, _ = tiny
    unlabelled = tmp_path / "x.h5"
    bwacal.data.write_dataset(unlabelled, np.zeros((8, 1, 12, 12), np.float32))
    r = runner.invoke(app, ["calibrate", str(model), "--calib", str(calib), "--data", str(unlabelled),
                            "--max-drop", "1", "--method", "bwa", "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 2 and "needs labelled evaluation data" in r.output


def test_layers_to_raise_takes_the_best_gain_per_bit_first():
    params = {"a": 100, "b": 10, "c": 1000}
    loss = {"a": {2: 1.0, 3: 0.5, 4: 0.1, 8: 0.0}, "b": {2: 1.0, 3: 0.1, 4: 0.05, 8: 0.0},
            "c": {2: 0.01, 3: 0.005, 4: 0.001, 8: 0.0}}
    step = mixed.layers_to_raise({"a": 2, "b": 2, "c": 2}, params, loss)
    assert step == {"b": 3, "a": 3}  # b's 0.9 then a's 0.5 remove at least half of the 2.01 left
    assert mixed.layers_to_raise({"a": 8, "b": 8, "c": 8}, params, loss) == {}
    assert mixed.layers_to_raise({"a": 2, "b": 2}, params, loss, pinned={"a", "b"}) == {}


# ---- the sensitivity command and the plots ------------------------------------------------------------


def test_sensitivity_command_table_json_and_plot(tiny, tmp_path):
    model, calib, _ = tiny
    rep, png = tmp_path / "s.json", tmp_path / "s.png"
    r = runner.invoke(app, ["sensitivity", str(model), "--calib", str(calib), "--bits", "2,4", "--images", "32",
                            "--report", str(rep), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    run = json.loads(rep.read_text())
    fp = bwacal.load_model(model)
    layers = select_layers(fp.graph, 8, "all-layers")
    assert [row["layer"] for row in run["layers"]] == [layer.node for layer in layers] and run["images"] == 32
    x, _ = bwacal.data.open_dataset(calib).read(np.arange(160))
    for row in run["layers"]:
        assert set(row["measured"]) == set(row["fisher"]) == {"2", "4"}
        assert row["measured"]["2"] > row["measured"]["4"] > 0
    assert run["fisher_seconds"] > 0 and run["measured_seconds"] > 0
    front = run["frontier"]
    assert [p["width"] for p in front["uniform"]] == [2, 4]
    assert all(p["avg_bits"] <= p["avg_bits_budget"] + 1e-12 for p in front["mixed"])
    assert png.read_bytes()[:4] == b"\x89PNG" and "W2 Fisher" in r.output and "rank correlation" in r.output
    frontier = tmp_path / "f.png"
    assert runner.invoke(app, ["plot", str(rep), "-o", str(frontier), "--frontier"]).exit_code == 0
    assert frontier.read_bytes()[:4] == b"\x89PNG"
    bad = runner.invoke(app, ["sensitivity", str(model), "--calib", str(calib), "--bits", "2,9"])
    assert bad.exit_code == 2 and "from 2 to 8" in bad.output


def test_measured_sensitivity_is_the_kl_with_that_layer_alone_quantized(tiny):
    model = bwacal.load_model(tiny[0])
    layers = select_layers(model.graph, 3, "all-layers")
    x, _ = bwacal.data.open_dataset(tiny[1]).read(np.arange(40))
    got, _ = mixed.measured_sensitivity(model, layers[:2], x, (3,), batch_size=16)
    ref = bwacal.fit.log_softmax(model.forward(x))
    for layer in layers[:2]:
        w = model.graph.initializers[layer.weight]
        wq = bwacal.quant.weights.quantize_weights(w, 3, method="mse", axis=layer.axis).dequantize()
        logits = model.forward(x, params={layer.weight: wq})
        p = np.exp(ref)
        direct = float((p * (ref - bwacal.fit.log_softmax(logits))).sum(1).mean())
        assert got[layer.node][3] == pytest.approx(direct, rel=1e-6)


def test_plot_draws_the_frontier_of_a_batch_summary(tmp_path):
    from bwacal.plot import frontier_figure, summary_frontier_points

    rows = [{"model": "m", "width": 2, "act_bits": None, "fp": 0.9, "bwa": 0.5, "size_bytes": 1000, "avg_bits": 2.0},
            {"model": "m", "width": 3, "act_bits": None, "fp": 0.9, "bwa": 0.8, "size_bytes": 1500, "avg_bits": 3.0},
            {"model": "m", "width": 3, "act_bits": None, "fp": 0.9, "bwa": 0.85, "size_bytes": 1250, "avg_bits": 2.5,
             "avg_bits_budget": 2.5}]
    points, fp = summary_frontier_points(rows)
    assert [p["series"] for p in points] == ["uniform", "uniform", "mixed"] and fp == {"m": 0.9}
    fig = frontier_figure(points, fp)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["uniform", "mixed", "full precision"]
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"jobs": rows}))
    r = runner.invoke(app, ["plot", str(summary), "-o", str(tmp_path / "f.png")])
    assert r.exit_code == 0, r.output


def test_one_budget_at_a_time(tiny):
    with pytest.raises(BwacalError, match="give one of --avg-bits, --max-drop"):
        CalibrationOptions(avg_bits=3, max_drop=1).validate()
    with pytest.raises(BwacalError, match="--avg-bits must be between 2 and 8"):
        CalibrationOptions(avg_bits=1.5).validate()


def test_batch_runs_mixed_jobs_beside_uniform_ones_and_plots_the_frontier(tiny, tmp_path):
    model, calib, ev = tiny
    out = tmp_path / "out"
    r = runner.invoke(app, ["batch", str(model), "--calib", str(calib), "--data", str(ev), "--bits", "2,3",
                            "--avg-bits", "2.6", "--all-layers", "--method", "bwa", "--epochs", "0",
                            "--workers", "1", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "summary.json").read_text())["jobs"]
    assert [(row["width"], row["avg_bits_budget"]) for row in rows] == [(2, None), (3, None), (3, 2.6)]
    assert [row["avg_bits"] for row in rows][:2] == [2.0, 3.0] and rows[2]["avg_bits"] <= 2.6
    assert rows[0]["size_bytes"] < rows[2]["size_bytes"] < rows[1]["size_bytes"]
    assert (out / "tiny.avg2.6.onnx").is_file() and "| avg2.6 |" in (out / "summary.md").read_text()
    png = tmp_path / "frontier.png"
    assert runner.invoke(app, ["plot", str(out / "summary.json"), "-o", str(png)]).exit_code == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
