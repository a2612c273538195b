"""`bwacal calibrate` and `bwacal plot` through typer's CliRunner."""

import json
import re

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.calibration.conftest import tiny_cnn

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_calibrate_writes_model_and_report(tiny, tmp_path):
    model, calib = tiny
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = run("calibrate", model, "--calib", calib, "--bits", 3, "--epochs", 1, "-o", out, "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    assert "BWA" in r.output and "wrote" in r.output
    onnx.checker.check_model(onnx.load(str(out)))
    report = json.loads(rep.read_text())
    assert report["output"] == str(out) and report["format"] == "fake"
    assert report["method"] == "adaround-bwa"  # the default
    assert set(report["accuracy"]) == {"fp", "uniform_minmax", "uniform_mse", "uniform_output", "adaround-bwa"}
    assert [h["epoch"] for h in report["history"]] == [0, 1]


def test_default_output_goes_to_the_current_folder(tiny, tmp_path, monkeypatch):
    models, work = tmp_path / "models", tmp_path / "work"
    models.mkdir()
    work.mkdir()
    model = models / "m.onnx"
    model.write_bytes(tiny[0].read_bytes())
    monkeypatch.chdir(work)
    r = run("calibrate", model, "--calib", tiny[1], "--bits", 2, "--act-bits", 4, "--epochs", 0, "-q")
    assert r.exit_code == 0, r.output
    # never beside the input, where the next 'bwacal batch models/' would find it
    assert (work / "m.w2a4.onnx").exists() and sorted(p.name for p in models.iterdir()) == ["m.onnx"]
    # a second run refuses to overwrite without --force, and leaves the file alone
    before = (work / "m.w2a4.onnx").read_bytes()
    r = run("calibrate", model, "--calib", tiny[1], "--bits", 2, "--act-bits", 4, "--epochs", 0, "-q")
    assert r.exit_code == 2 and "--force" in r.output
    assert (work / "m.w2a4.onnx").read_bytes() == before


def test_output_naming_a_folder_writes_into_it(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--bits", 2, "--epochs", 0, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["tiny.w2.onnx"]
    assert f"wrote {out / 'tiny.w2.onnx'}" in r.stdout
    # the name in the folder is checked before any work, like any output
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--bits", 2, "--epochs", 0, "-o", out)
    assert r.exit_code == 2 and "already exists; pass --force" in r.output and "top-1" not in r.output


def test_packed_is_smaller_than_fake(tiny, tmp_path):
    # wide enough that the weights, not the unpacking nodes, make up the file
    wide = tiny_cnn(tmp_path / "wide.onnx", channels=(1, 16, 64))
    sizes = {}
    for fmt in ("fake", "packed"):
        rep = tmp_path / f"{fmt}.json"
        r = run("calibrate", wide, "--calib", tiny[1], "--epochs", 0, "--method", "bwa", "--all-layers", "--format", fmt,
                "-o", tmp_path / f"{fmt}.onnx", "--report", rep, "-q")
        assert r.exit_code == 0, r.output
        sizes[fmt] = json.loads(rep.read_text())["size_bytes"]
    assert sizes["packed"] < sizes["fake"]


@pytest.mark.parametrize("args, message", [
    (["--bits", "9"], "--bits must be between 2 and 8"),
    (["--act-bwa"], "--act-bwa needs --act-bits"),
    (["--format", "zip"], "--format must be one of"),
    (["--loss", "mse"], "--loss must be"),
    (["--method", "gptq"], "--method must be one of bwa, adaround, bwa-codes, adaround-bwa"),
    (["--method", "adaround", "--adaround-iterations", "0"], "--adaround-iterations must be at least 1"),
])
def test_bad_options_exit_2(tiny, tmp_path, args, message):
    r = run("calibrate", tiny[0], "--calib", tiny[1], "-o", tmp_path / "q.onnx", *args)
    assert r.exit_code == 2
    assert message in r.output
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_plot_from_a_report(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    rep = tmp_path / "q.json"
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--bits", 2, "--all-layers", "--epochs", 2, "--lr", 0.02,
            "-o", tmp_path / "q.onnx", "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    png = tmp_path / "q.png"
    r = run("plot", rep, "-o", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run("plot", rep, "-o", tmp_path / "x.png", "--layers", "no_such_layer")
    assert r.exit_code == 2 and "no_such_layer" in r.output


def test_plot_from_a_batch_summary(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"model": "a", "width": w, "fp": 0.9, "bwa": 0.8 + 0.02 * w} for w in (2, 3, 4)]
    (tmp_path / "summary.json").write_text(json.dumps(rows))
    r = run("plot", tmp_path / "summary.json", "-o", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_calibrate_with_adaround_names_the_method(tiny, tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--bits", 2, "--method", "adaround", "--adaround-iterations", 20,
            "-o", out, "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    assert "AdaRound" in r.output
    report = json.loads(rep.read_text())
    assert report["method"] == "adaround" and set(report["accuracy"]) == {"fp", "uniform_minmax", "uniform_mse", "uniform_output", "adaround"}
    assert [s["node"] for s in report["adaround"]] == [layer["layer"] for layer in report["layers"]]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["bwacal_method"] == "adaround"


# ---- what a new user meets (issue 17) ----------------------------------------------------------


def test_calibrate_json_is_the_report(tiny, tmp_path):
    out = tmp_path / "q.onnx"
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--epochs", 1, "--method", "bwa", "-o", out, "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # stdout holds the JSON and nothing else
    assert doc["schema"] == 1 and doc["output"] == str(out) and doc["method"] == "bwa"
    assert all(v is None or 0 <= v <= 1 for v in doc["accuracy"].values())
    assert set(doc["agreement"]) == {"uniform_minmax", "uniform_mse", "uniform_output", "bwa"}
    assert len(doc["model_sha256"]) == 64
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["bwacal_source_sha256"] == doc["model_sha256"]


def test_data_is_the_evaluation_file_and_eval_its_old_name(tiny, tmp_path):
    base = ("calibrate", tiny[0], "--calib", tiny[1], "--epochs", 0, "--report")
    new = run(*base, tmp_path / "new.json", "-o", tmp_path / "new.onnx", "--data", tiny[1], "-q")
    old = run(*base, tmp_path / "old.json", "-o", tmp_path / "old.onnx", "--eval", tiny[1], "-q")
    assert new.exit_code == old.exit_code == 0, new.output + old.output
    for name in ("new", "old"):
        rep = json.loads((tmp_path / f"{name}.json").read_text())
        assert rep["eval"] == str(tiny[1]) and rep["eval_images"] == 160
    both = run(*base, tmp_path / "both.json", "-o", tmp_path / "both.onnx", "--data", tiny[1], "--eval", tiny[1])
    assert both.exit_code == 2 and "--eval is the old name of --data" in both.output
    assert not (tmp_path / "both.onnx").exists()


def test_without_labels_the_summary_gives_agreement_not_na(tiny, tmp_path):
    nolabels = tiny[1].parent / "nolabels.h5"
    rep = tmp_path / "q.json"
    r = run("calibrate", tiny[0], "--calib", nolabels, "--epochs", 1, "--method", "bwa", "-o", tmp_path / "q.onnx",
            "--report", rep)
    assert r.exit_code == 0, r.output
    assert "n/a" not in r.output and "no labels" in r.stdout
    bwa_row = next(line for line in r.stdout.splitlines() if line.strip().startswith("BWA"))
    assert "%" in bwa_row  # the agreement with full precision
    report = json.loads(rep.read_text())
    assert all(v is None for v in report["accuracy"].values())
    assert 0 <= report["agreement"]["bwa"] <= 1 and report["kl"]["bwa"] >= 0
    assert "top-1 agreement with full precision before fitting (no labels)" in r.stderr


def test_agreement_and_kl_are_measured_against_full_precision(tiny, tmp_path):
    """The report's agreement and KL for the written model, recomputed from its outputs."""
    import bwacal
    from bwacal.data import open_dataset
    from bwacal.fit import log_softmax

    rep, out = tmp_path / "q.json", tmp_path / "q.onnx"
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--bits", 2, "--epochs", 1, "--holdout", 0.25, "--method", "bwa",
            "--data", tiny[1], "-o", out, "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    with open_dataset(tiny[1]) as d:
        x, _ = d.read(range(d.n))
    fp = log_softmax(bwacal.load_model(tiny[0]).forward(x))
    q = log_softmax(bwacal.load_model(out).forward(x))
    assert report["agreement"]["bwa"] == pytest.approx((fp.argmax(1) == q.argmax(1)).mean(), abs=1e-9)
    assert report["kl"]["bwa"] == pytest.approx((np.exp(fp) * (fp - q)).sum(1).mean(), rel=1e-4, abs=1e-6)


def test_num_images_calibrates_on_a_seeded_subset(tiny, tmp_path):
    reports = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        rep = tmp_path / f"{name}.json"
        r = run("calibrate", tiny[0], "--calib", tiny[1], "--num-images", 40, "--epochs", 0, "--seed", seed,
                "-o", tmp_path / f"{name}.onnx", "--report", rep)
        assert r.exit_code == 0, r.output
        assert "calibration 40 of its 160 images (32 fit, 8 held out)" in r.stderr
        reports.append(json.loads(rep.read_text()))
    assert [rp["used_images"] for rp in reports] == [40, 40, 40] and reports[0]["calib_images"] == 160
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--num-images", 161, "-o", tmp_path / "d.onnx")
    assert r.exit_code == 2 and "--num-images 161 but the file holds 160 images" in r.output
    assert not (tmp_path / "d.onnx").exists()


def test_calibration_subset_reads_only_what_it_keeps():
    from bwacal.calibrate import calibration_subset

    pool = calibration_subset(10_000_000, 1000, seed=3)
    assert len(pool) == 1000 and len(np.unique(pool)) == 1000 and np.all(np.diff(pool) > 0)
    assert np.array_equal(pool, calibration_subset(10_000_000, 1000, seed=3))
    assert np.array_equal(calibration_subset(5, None, 0), np.arange(5))


def test_a_one_image_file_gets_honest_messages(tiny, tmp_path):
    from bwacal.data import open_dataset, write_dataset

    with open_dataset(tiny[1]) as d:
        x, y = d.read([0])
    one = write_dataset(tmp_path / "one.h5", x, y)
    r = run("calibrate", tiny[0], "--calib", one, "--epochs", 1, "--method", "bwa", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 0, r.output
    assert "no held-out split: 1 image is too few for --holdout 0.2" in r.stderr
    assert "--holdout 0)" not in r.output and "held-out loss" not in r.output and "n/a (no labels)" not in r.output
    assert "not measured (no held-out images" in r.stdout


def test_size_is_said_as_smaller_or_larger(tiny, tmp_path):
    from bwacal.export import size_change

    assert size_change(3.03) == "3.03x smaller" and size_change(1 / 1.09) == "1.09x larger"
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--epochs", 0, "-o", tmp_path / "f.onnx", "-q")
    assert r.exit_code == 0, r.output
    # the tiny model is smaller than the metadata every written model carries
    assert re.search(r"wrote .*f\.onnx \(fake, [\d.]+ kB, \d\.\d\dx larger than the input's [\d.]+ kB\)", r.stdout), r.stdout


def test_plot_refuses_a_model_clearly(tiny, tmp_path):
    r = run("plot", tiny[0], "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "not a JSON report" in r.output and "bwacal inspect" in r.output
    assert "codec" not in r.output and not (tmp_path / "x.png").exists()


def test_plots_have_labels_legends_and_a_title(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    import bwacal
    from bwacal.plot import calibration_figure, summary_figure

    rep = tmp_path / "q.json"
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--bits", 2, "--epochs", 1, "--method", "bwa",
            "-o", tmp_path / "q.onnx", "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    fig = calibration_figure(report, bwacal.load_model(tiny[0]).graph.initializers)
    title = fig._suptitle.get_text()
    assert title.startswith("tiny W2 (first-last-8bit, BWA): top-1 full precision") and "BWA" in title
    for ax in fig.axes:
        if ax.get_xlabel():  # the twin axis of the fitting panel shares its x label
            assert ax.get_ylabel() and ax.get_legend() is not None
    assert {ax.get_xlabel() for ax in fig.axes} >= {"weight value (BatchNorm folded)", "epoch (0: the uniform start)"}
    rows = [{"model": "a", "width": w, "act_bits": None, "fp": 0.9, "uniform": 0.5, "bwa": 0.8} for w in (2, 3)]
    ax = summary_figure(rows).axes[0]
    assert ax.get_xlabel() == "weight bits" and ax.get_ylabel() == "top-1 (%)" and ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a BWA", "a uniform (start grid)", "a full precision"]
    assert ax.lines[0].get_ydata().tolist() == [80.0, 80.0]  # rows hold fractions, the plot percent


# ---- per-layer control and the config file -----------------------------------------------------


def _layers(tiny):
    import bwacal
    from bwacal.quantize import select_layers

    return [layer.node for layer in select_layers(bwacal.load_model(tiny[0]).graph, 3)]


def test_exclude_keeps_a_layer_in_float_and_layer_bits_sets_its_width(tiny, tmp_path):
    import bwacal

    names = _layers(tiny)
    assert len(names) >= 3
    keep, four = names[-1], names[1]
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--bits", 2, "--epochs", 1, "--exclude", keep,
            "--layer-bits", f"{four}=4", "-o", out, "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    bits = {layer["layer"]: layer["bits"] for layer in report["layers"]}
    assert keep not in bits and report["excluded"] == [keep]
    assert bits[four] == 4 and bits[names[0]] == 8  # the protocol's first layer stays at 8
    assert all(b == 2 for n, b in bits.items() if n not in (four, names[0]))
    # the excluded layer's weight is written as it was; the 4-bit one has at most 2**4 values a channel
    fp, q = bwacal.load_model(tiny[0]).graph, bwacal.load_model(out).graph
    weight = {layer["layer"]: layer["weight"] for layer in report["layers"]}
    from bwacal.quantize import select_layers

    excluded_weight = next(layer.weight for layer in select_layers(fp, 2) if layer.node == keep)
    np.testing.assert_array_equal(q.initializers[excluded_weight], fp.initializers[excluded_weight])
    w4 = q.initializers[weight[four]].reshape(q.initializers[weight[four]].shape[0], -1)
    assert max(len(np.unique(row)) for row in w4) <= 16


def test_a_rule_that_matches_nothing_is_refused_before_any_work(tiny, tmp_path):
    for args, needle in ((["--exclude", "no_such*"], "--exclude no_such*: no quantized layer matches"),
                         (["--layer-bits", "no_such=4"], "--layer-bits no_such=4: no quantized layer matches"),
                         (["--layer-bits", "conv"], "PATTERN=BITS"),
                         (["--layer-bits", "*=9"], "bits must be an integer from 2 to 8")):
        r = run("calibrate", tiny[0], "--calib", tiny[1], "-o", tmp_path / "q.onnx", *args)
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "q.onnx").exists()


def test_config_file_holds_the_options_and_the_command_line_wins(tiny, tmp_path):
    names = _layers(tiny)
    config = tmp_path / "bwacal.toml"
    config.write_text(f'calib = "{tiny[1]}"\nbits = 2\nepochs = 2\nlr = 0.002\nall_layers = true\n'
                      f'exclude = ["{names[-1]}"]\n[layer_bits]\n"{names[0]}" = 5\n')
    rep = tmp_path / "q.json"
    r = run("calibrate", tiny[0], "--config", config, "--epochs", 1, "-o", tmp_path / "q.onnx", "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    opts = report["options"]
    assert (opts["bits"], opts["epochs"], opts["lr"], opts["protocol"]) == (2, 1, 0.002, "all-layers")
    assert report["excluded"] == [names[-1]] and report["layers"][0]["bits"] == 5
    bad = tmp_path / "bad.toml"
    bad.write_text("bitz = 2\n")
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--config", bad, "-o", tmp_path / "b.onnx")
    assert r.exit_code == 2 and "unknown key 'bitz'" in r.output and str(bad) in r.output


def test_dry_run_shows_the_plan_and_writes_nothing(tiny, tmp_path):
    names = _layers(tiny)
    r = run("calibrate", tiny[0], "--calib", tiny[1], "--bits", 2, "--exclude", names[-1], "--dry-run",
            "-o", tmp_path / "q.onnx", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert [row["layer"] for row in plan["layers"]] == names[:-1] and plan["excluded"] == [names[-1]]
    assert plan["images"] == 160 and plan["fit_images"] == 128 and plan["steps_per_epoch"] == 2
    assert plan["forward_seconds"] > 0 and plan["estimated_size_bytes"] > 0
    assert list(tmp_path.iterdir()) == []
    text = run("calibrate", tiny[0], "--calib", tiny[1], "--dry-run", "-o", tmp_path / "q.onnx")
    assert text.exit_code == 0 and "nothing written" in text.stdout and list(tmp_path.iterdir()) == []


def test_inspect_shows_the_plan_of_the_rules(tiny, tmp_path):
    names = _layers(tiny)
    r = run("inspect", tiny[0], "--exclude", names[-1], "--layer-bits", f"{names[1]}=4", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["layer"]: row["bits"] for row in json.loads(r.stdout)["layers"]}
    assert rows[names[-1]] == {"first-last-8bit": "float", "all-layers": "float"}
    assert rows[names[1]] == {"first-last-8bit": 4, "all-layers": 4}


def test_cli_defaults_are_the_librarys():
    """Every calibrate option that is a CalibrationOptions field defaults to the library's value, so
    `bwacal calibrate` and `bwacal.calibrate()` calibrate alike (the help shows the real default)."""
    import dataclasses

    import typer.main

    from bwacal.calibrate import CalibrationOptions

    library = {f.name: f.default for f in dataclasses.fields(CalibrationOptions)}
    command = typer.main.get_command(app).commands["calibrate"]
    # the per-layer rules are repeatable options (None when not given) and tuples in the library
    shared = [p for p in command.params if p.name in library and p.name not in ("input_shape", "exclude", "layer_bits")]
    assert {"method", "adaround_iterations", "adaround_images", "epochs", "weight_method"} <= {p.name for p in shared}
    for param in shared:
        assert param.default == library[param.name], param.name
