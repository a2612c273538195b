"""``--input-shape`` on every command that loads a model, and the data file's image size when it is not given."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import bwacal
from bwacal.data import write_dataset
from cli.main import app
from tests.test_cli import assert_bad_input
from tests.test_loading import dynamic_hw

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model with dynamic H and W, and labelled 3x8x8 images it scores 100% on."""
    d = tmp_path_factory.mktemp("dyn")
    model = d / "dyn.onnx"
    onnx.save(dynamic_hw(), model)
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    y = bwacal.load_model(model, input_shape=(3, 8, 8)).forward(x).argmax(1)
    data = write_dataset(d / "data.h5", x, y)
    return {"dir": d, "model": model, "data": data}


def test_inspect_takes_input_shape_and_without_it_says_to_give_one(files):
    result = run("inspect", files["model"], "--input-shape", "3x8x8")
    assert result.exit_code == 0, result.output
    assert "classes: 5" in result.stdout and "layout: NCHW" in result.stdout
    assert "quantized layers: 2" in result.stdout
    missing = run("inspect", files["model"])
    assert missing.exit_code == 2
    assert "--input-shape CxHxW" in missing.stderr and "Traceback" not in missing.output
    assert_bad_input(run("inspect", files["model"], "--input-shape", "3x8"), "--input-shape must be CxHxW")


@pytest.mark.parametrize("runtime", ["bwacal", "onnxruntime"])
@pytest.mark.parametrize("shape", [["--input-shape", "3x8x8"], []], ids=["given", "from-data"])
def test_evaluate_with_and_without_input_shape(files, runtime, shape):
    result = run("evaluate", files["model"], "--data", files["data"], "--runtime", runtime, "--json", *shape)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] == 1.0


def test_evaluate_with_an_input_shape_the_data_does_not_have(files):
    assert_bad_input(run("evaluate", files["model"], "--data", files["data"], "--input-shape", "3x9x9"),
                     "'images' are 3x8x8", "expects 3x9x9")


@pytest.mark.parametrize("shape", [["--input-shape", "3x8x8"], []], ids=["given", "from-data"])
def test_check_with_and_without_input_shape(files, shape):
    result = run("check", files["model"], "--reference", files["model"], "--data", files["data"], *shape)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout


@pytest.mark.parametrize("shape", [["--input-shape", "3x8x8"], []], ids=["given", "from-data"])
def test_calibrate_with_and_without_input_shape(files, tmp_path, shape):
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    result = run("calibrate", files["model"], "--calib", files["data"], "--bits", 4, "--epochs", 1, "-o", out,
                 "--report", rep, "-q", *shape)
    assert result.exit_code == 0, result.output
    written = bwacal.load_model(out)  # the written model has the fixed dims
    assert written.input_shape == (3, 8, 8)
    report = json.loads(rep.read_text())
    assert report["options"]["input_shape"] == ([3, 8, 8] if shape else None)
    plotted = run("plot", rep, "-o", tmp_path / "q.png")  # loads the model at the size it was calibrated at
    assert plotted.exit_code == 0, plotted.output


def test_calibrate_with_a_bad_input_shape(files, tmp_path):
    assert_bad_input(run("calibrate", files["model"], "--calib", files["data"], "--input-shape", "3x0x8",
                         "-o", tmp_path / "q.onnx"), "--input-shape must be CxHxW")


def test_batch_takes_input_shape_from_the_option_and_the_manifest(files, tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "dyn.onnx").write_bytes(files["model"].read_bytes())
    out = tmp_path / "out"
    result = run("batch", zoo, "--calib", files["data"], "--bits", "4", "--epochs", "0", "--workers", "1",
                 "--input-shape", "3x8x8", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in json.loads((out / "summary.json").read_text())["jobs"]] == ["ok"]

    manifest = tmp_path / "zoo.toml"
    manifest.write_text(f'[[model]]\npath = "zoo/dyn.onnx"\ncalib = "{files["data"]}"\ninput_shape = [3, 8, 8]\n'
                        f'[[model]]\npath = "zoo/dyn.onnx"\nname = "dyn2"\ncalib = "{files["data"]}"\n'
                        'input_shape = "3x8x8"\n')
    out2 = tmp_path / "out2"
    result = run("batch", manifest, "--bits", "4", "--epochs", "0", "--workers", "1", "-o", out2, "-q")
    assert result.exit_code == 0, result.output
    jobs = json.loads((out2 / "summary.json").read_text())["jobs"]
    assert [r["status"] for r in jobs] == ["ok", "ok"]
    report = json.loads((out2 / "dyn.w4.json").read_text())
    assert report["options"]["input_shape"] == [3, 8, 8]

    manifest.write_text(f'[[model]]\npath = "zoo/dyn.onnx"\ncalib = "{files["data"]}"\ninput_shape = "big"\n')
    bad = run("batch", manifest, "--bits", "4", "-o", tmp_path / "out3")
    assert bad.exit_code == 2 and "--input-shape must be CxHxW" in bad.stderr and "Traceback" not in bad.output


def test_calibrate_a_model_with_nk11_logits_writes_it_with_its_own_output(tmp_path):
    """SqueezeNet's head: calibration works on the squeezed logits, the written model keeps (N, K, 1, 1)."""
    from tests.test_loading import head_model

    path = tmp_path / "nk11.onnx"
    onnx.save(head_model("NK11"), path)
    x = np.random.default_rng(5).standard_normal((24, 3, 6, 6)).astype(np.float32)
    data = write_dataset(tmp_path / "d.h5", x, bwacal.load_model(path).forward(x).argmax(1))
    out = tmp_path / "q.onnx"
    result = run("calibrate", path, "--calib", data, "--bits", 4, "--epochs", 1, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out))
    assert [d.dim_value for d in written.graph.output[0].type.tensor_type.shape.dim][1:] == [5, 1, 1]
    evaluated = run("evaluate", out, "--data", data, "--runtime", "onnxruntime", "--json")
    assert evaluated.exit_code == 0, evaluated.output


def test_inspect_lists_the_quantized_layers_and_why_the_others_are_not(tmp_path):
    from tests.test_loading import attention_model

    path = tmp_path / "vit.onnx"
    onnx.save(attention_model(), path)
    result = run("inspect", path, "--bits", 4)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "quantized layers: 4, after BatchNorm folding; weight bits per protocol at --bits 4:" in lines
    row = next(line.split() for line in lines if line.split()[:2] == ["q_proj", "MatMul"])
    assert row == ["q_proj", "MatMul", "8x8", "1", "64", "4", "4"]
    assert "not quantized: 3" in lines
    reasons = {line.split()[0]: " ".join(line.split()[2:]) for line in lines[lines.index("not quantized: 3") + 2:]
               if line.startswith("  ") and len(line.split()) > 2}
    assert reasons["scores"] == reasons["attend"] == "MatMul of two activations"
    assert reasons["head"] == "Gemm with transA"
