"""`bwacal calibrate` and `bwacal plot` through typer's CliRunner."""

import json

import onnx
import pytest
from typer.testing import CliRunner

from cli.main import app

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
    assert set(report["accuracy"]) == {"fp", "uniform_minmax", "uniform_mse", "uniform_output", "bwa"}
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
    sizes = {}
    for fmt in ("fake", "packed"):
        rep = tmp_path / f"{fmt}.json"
        r = run("calibrate", tiny[0], "--calib", tiny[1], "--epochs", 0, "--all-layers", "--format", fmt,
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
