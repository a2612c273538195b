"""The command line through ``CliRunner``: evaluate, check and inspect, every exit code, and the README's examples."""

from __future__ import annotations

import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bwacal.data import write_dataset
from cli.main import app
from tests.tiny_models import damaged, labelled_data, save, tiny_classifier

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()  # click >= 8.2 keeps result.stdout and result.stderr apart (result.output has both)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_bad_input(result, *fragments):
    """Exit 2 with exactly one line on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    fp = save(tiny_classifier(), d / "fp.onnx")
    bad = save(damaged(tiny_classifier()), d / "bad.onnx")
    meta = {"bwacal_version": "0.1.0", "bwacal_format": "fake", "bwacal_bits": "3", "bwacal_act_bits": "none",
            "bwacal_act_bwa": "false", "bwacal_protocol": "first-last-8bit", "bwacal_calib_sha256": "ab" * 32,
            "bwacal_accuracy": json.dumps({"fp": 0.916, "uniform_minmax": 0.5, "uniform_mse": 0.8, "bwa": 0.9125}),
            "bwacal_layers": json.dumps([{"layer": "conv2", "weight": "c2.w", "bits": 3, "channels": 8,
                                          "alpha": [[1.0, 2.2, 3.8]] * 8, "gamma": [-4.0] * 8}]),
            "author": "someone"}
    return {
        "dir": d, "fp": fp, "bad": bad,
        "meta": save(tiny_classifier(metadata=meta), d / "meta.onnx"),
        "unsupported": save(tiny_classifier(extra_nodes=[("Foo", "foo1"), ("Erfinv", "bar1")]), d / "unsup.onnx"),
        "val": labelled_data(d / "val.h5", fp, n=48, flip=2),
        "nolabels": labelled_data(d / "nolab.h5", fp, n=48, labels=False),
        "garbage": _write(d / "garbage.onnx", b"this is not a protobuf" * 10),
    }


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# ---- help --------------------------------------------------------------------------------------


COMMANDS = ["inspect", "make-calib", "evaluate", "check", "calibrate", "batch", "plot"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example_and_the_shared_flags(command):
    result = run(command, "-h")  # -h as well as --help
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.stdout)
    assert "Example: bwacal " + command in text
    assert "--verbose" in text and "-v" in text
    if command != "plot":  # plot writes a picture and reports nothing
        assert "--json" in text
    if command not in ("plot", "make-calib"):
        assert "--quiet" in text and "-q" in text
    # an on/off flag shows no value type ("--force <bool>" reads as if it took a value)
    assert "<bool>" not in text
    assert run(command, "--help").stdout == result.stdout


def test_version():
    from bwacal import __version__

    for flag in ("--version", "-V"):
        result = run(flag)
        assert result.exit_code == 0 and result.stdout == f"bwacal {__version__}\n"


@pytest.mark.parametrize("args, fragment", [
    (["calibrate", "m.onnx", "--calib", "c.h5", "--bitz", "3"], "No such option: --bitz; did you mean --bits?"),
    (["evaluate", "m.onnx", "--dta", "d.h5"], "did you mean --data?"),
    (["calibrat", "m.onnx"], "No such command 'calibrat'"),
    (["check", "m.onnx", "--data", "d.h5"], "Missing option '--reference'"),
    (["calibrate", "m.onnx", "--calib", "c.h5", "--bits", "three"], "Invalid value for '--bits'"),
])
def test_a_usage_error_is_one_line(args, fragment):
    result = run(*args)
    assert_bad_input(result, fragment, "-h'")
    assert result.stdout == "" and "Usage:" not in result.stderr


def test_every_json_has_the_schema_and_fractions(files):
    out = json.loads(run("evaluate", files["fp"], "--data", files["val"], "--json").stdout)
    assert out["schema"] == 1 and 0 <= out["top1"] <= 1
    assert json.loads(run("inspect", files["fp"], "--json").stdout)["schema"] == 1


# ---- evaluate ----------------------------------------------------------------------------------


def test_evaluate_text(files):
    result = run("evaluate", files["fp"], "--data", files["val"])
    assert result.exit_code == 0, result.output
    assert "top-1: 95.83% (46/48)" in result.stdout and "top-5: " in result.stdout
    assert "per class:" in result.stdout and "agreement" not in result.stdout
    assert result.stderr == ""  # no progress bar off a terminal


def test_evaluate_json_with_reference(files):
    result = run("evaluate", files["bad"], "--data", files["val"], "--reference", files["fp"], "--json",
                 "--batch-size", 7)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["n"] == 48 and out["reference_top1"] == pytest.approx(46 / 48)
    assert 0 <= out["agreement"] < 0.5 and out["top1"] < 0.5
    assert len(out["per_class"]) == 10 and sum(out["class_counts"]) == 48


def test_evaluate_runtimes_agree(files):
    pytest.importorskip("onnxruntime")
    a = json.loads(run("evaluate", files["fp"], "--data", files["val"], "--json").stdout)
    b = json.loads(run("evaluate", files["fp"], "--data", files["val"], "--json", "--runtime", "onnxruntime").stdout)
    assert (a["top1"], a["per_class"]) == (b["top1"], b["per_class"]) and b["runtime"] == "onnxruntime"


def test_evaluate_without_labels(files):
    result = run("evaluate", files["fp"], "--data", files["nolabels"], "--reference", files["fp"])
    assert result.exit_code == 0
    assert "top-1: n/a (the data has no labels)" in result.stdout and "agreement with" in result.stdout


def test_evaluate_bad_inputs(files, tmp_path):
    d = tmp_path
    write_dataset(d / "wrong_shape.h5", np.zeros((4, 1, 9, 9), np.float32), np.zeros(4, np.int64))
    write_dataset(d / "wrong_labels.h5", np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 2, 12]))
    cases = [
        (("evaluate", d / "missing.onnx", "--data", files["val"]), "missing.onnx"),
        (("evaluate", files["garbage"], "--data", files["val"]), "not a readable ONNX model"),
        (("evaluate", files["fp"], "--data", d / "missing.h5"), "missing.h5: file not found"),
        (("evaluate", files["fp"], "--data", d / "wrong_shape.h5"), "1x9x9"),
        (("evaluate", files["fp"], "--data", d / "wrong_labels.h5"), "wrong_labels.h5"),
        (("evaluate", files["fp"], "--data", files["val"], "--batch-size", 0), "batch size"),
        (("evaluate", files["fp"], "--data", files["val"], "--runtime", "tensorflow"), "--runtime"),
        (("evaluate", files["unsupported"], "--data", files["val"]), "Foo (node 'foo1')"),
        (("evaluate", files["fp"], "--data", files["val"], "--reference", files["garbage"]), "garbage.onnx"),
    ]
    for args, fragment in cases:
        assert_bad_input(run(*args), fragment)


def test_verbose_shows_the_traceback(files, tmp_path):
    result = run("evaluate", tmp_path / "missing.onnx", "--data", files["val"], "-v")
    assert result.exit_code == 2 and "Traceback" in result.stderr and "error: " in result.stderr


def test_usage_error_exits_2(files):
    assert run("evaluate", files["fp"]).exit_code == 2  # --data missing
    assert run("check", files["fp"], "--data", files["val"]).exit_code == 2  # --reference missing


# ---- check -------------------------------------------------------------------------------------


def test_check_passes_against_itself(files, tmp_path):
    junit = tmp_path / "ok.xml"
    result = run("check", files["fp"], "--reference", files["fp"], "--data", files["val"], "--max-drop", 0,
                 "--junit", junit)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"PASS {files['fp']}: top-1 95.83% vs 95.83% (drop 0.00 <= 0.00 points, 48 images)"
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "0" and len(suite.findall("testcase")) == 1
    assert suite.find("testcase/failure") is None
    assert [p.name for p in tmp_path.iterdir()] == ["ok.xml"]  # no temporary file left


def test_check_fails_on_a_damaged_model(files, tmp_path):
    junit = tmp_path / "fail.xml"
    result = run("check", files["bad"], "--reference", files["fp"], "--data", files["val"], "--max-drop", 1.0,
                 "--junit", junit)
    assert result.exit_code == 1, result.output
    line = result.stdout.strip()
    assert "\n" not in line and line.startswith(f"FAIL {files['bad']}: top-1 ") and "> 1.00 points" in line
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "1" and suite.find("testcase/failure").get("message") == line


def test_check_json(files):
    result = run("check", files["bad"], "--reference", files["fp"], "--data", files["val"], "--json",
                 "--metric", "agreement", "--max-drop", 100)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # JSON holds fractions, as every JSON bwacal writes (--max-drop 100 points is 1.0)
    assert out["schema"] == 1 and out["passed"] and out["metric"] == "agreement" and out["max_drop"] == 1.0
    assert out["drop"] == pytest.approx(1 - out["value"]) and 0 <= out["value"] <= 1
    assert out["summary"].startswith("PASS") and out["warnings"] == []


def test_check_writes_junit_when_it_cannot_run(files, tmp_path):
    """Exit 2 still leaves a JUnit file, with an <error> case naming the problem, for the CI report step."""
    junit = tmp_path / "bad.xml"
    result = run("check", files["fp"], "--reference", files["fp"], "--data", tmp_path / "missing.h5", "--junit", junit)
    assert_bad_input(result, "missing.h5")
    suite = ET.parse(junit).getroot()
    assert suite.get("errors") == "1" and suite.get("failures") == "0"
    error = suite.find("testcase/error")
    assert error is not None and "missing.h5" in error.get("message")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.xml"]


def test_check_warns_about_a_reference_the_model_was_not_made_from(files, tmp_path):
    import onnx

    proto = onnx.load(files["fp"])
    proto.metadata_props.add(key="bwacal_version", value="0.1.0")
    proto.metadata_props.add(key="bwacal_source_sha256", value="0" * 64)
    quantized = tmp_path / "q.onnx"
    onnx.save(proto, str(quantized))
    base = ("check", quantized, "--reference", files["fp"], "--data", files["val"], "--max-drop", 100)
    loose = run(*base)
    assert loose.exit_code == 0 and "warning: " in loose.stderr and "is not the model" in loose.stderr
    junit = tmp_path / "strict.xml"
    strict = run(*base, "--strict", "--junit", junit)
    assert strict.exit_code == 1 and strict.stdout.startswith("FAIL") and "--strict" in strict.stdout
    assert ET.parse(junit).getroot().find("testcase/failure").get("type") == "WrongReference"
    # the model's true source passes, strict or not
    from bwacal.files import file_sha256

    proto.metadata_props[-1].value = file_sha256(files["fp"])
    onnx.save(proto, str(quantized))
    ok = run(*base, "--strict")
    assert ok.exit_code == 0 and "warning" not in ok.stderr


def test_check_defaults_to_agreement_without_labels(files):
    ok = run("check", files["fp"], "--reference", files["fp"], "--data", files["nolabels"])
    assert ok.exit_code == 0 and "agreement 100.00% with" in ok.stdout
    fail = run("check", files["bad"], "--reference", files["fp"], "--data", files["nolabels"], "--max-drop", 5)
    assert fail.exit_code == 1 and fail.stdout.startswith("FAIL") and "agreement" in fail.stdout


def test_check_quiet_keeps_the_verdict(files):
    result = run("check", files["fp"], "--reference", files["fp"], "--data", files["val"], "-q")
    assert result.exit_code == 0 and result.stdout.startswith("PASS") and result.stderr == ""


def test_check_bad_inputs(files, tmp_path):
    base = ("check", files["fp"], "--reference", files["fp"], "--data")
    ro = tmp_path / "ro"
    ro.mkdir()
    cases = [
        ((*base, files["nolabels"], "--metric", "top1"), "--metric agreement"),
        ((*base, files["val"], "--metric", "top5"), "unknown metric"),
        ((*base, files["val"], "--max-drop", -1), "--max-drop"),
        ((*base, files["val"], "--junit", tmp_path / "no" / "such" / "dir.xml"), "does not exist"),
        ((*base, files["val"], "--junit", files["fp"]), "would overwrite the input"),
        ((*base, files["val"], "--junit", tmp_path), "is a directory"),
        (("check", files["fp"], "--reference", tmp_path / "nofp.onnx", "--data", files["val"]), "nofp.onnx"),
    ]
    for args, fragment in cases:
        assert_bad_input(run(*args), fragment)
    assert not (tmp_path / "no").exists() and Path(files["fp"]).stat().st_size > 0


def test_check_reference_must_match_the_model(files, tmp_path):
    other = save(tiny_classifier(classes=7), tmp_path / "seven.onnx")
    assert_bad_input(run("check", files["fp"], "--reference", other, "--data", files["val"]),
                     "a reference must match the model")


# ---- inspect -----------------------------------------------------------------------------------


def test_inspect_text(files):
    result = run("inspect", files["fp"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "input: input float32 [N, 1, 8, 8]" in out and "output: logits float32 [N, 10]" in out
    assert "classes: 10" in out and "Conv x2" in out and "parameters: 426" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  conv") or
            line.startswith("  fc")}
    assert rows["conv1"][-2:] == ["8", "3"] and rows["conv2"][-2:] == ["3", "3"] and rows["fc"][-2:] == ["8", "3"]
    assert "bwacal calibration" not in out


def test_inspect_json_and_bits(files):
    out = json.loads(run("inspect", files["fp"], "--json", "--bits", 4).stdout)
    assert out["bits"] == 4 and out["num_classes"] == 10 and out["error"] is None
    assert [r["bits"]["first-last-8bit"] for r in out["layers"]] == [8, 4, 8]
    assert [r["bits"]["all-layers"] for r in out["layers"]] == [4, 4, 4]
    assert [r["params"] for r in out["layers"]] == [40, 296, 90]


def test_inspect_lists_every_unsupported_op_and_still_reports(files):
    result = run("inspect", files["unsupported"])
    assert result.exit_code == 2
    assert "Foo (node 'foo1')" in result.stdout and "Erfinv (node 'bar1')" in result.stdout
    assert "conv2" in result.stdout and "ops: " in result.stdout  # the rest is still there
    assert_bad_input(result, "Foo (node 'foo1')", "Erfinv (node 'bar1')")
    out = json.loads(run("inspect", files["unsupported"], "--json").stdout)
    assert [u["node"] for u in out["unsupported"]] == ["foo1", "bar1"] and out["error"]


def test_inspect_shows_the_calibration_record(files):
    result = run("inspect", files["meta"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "weights 3 bits, activations none" in out and "protocol first-last-8bit" in out
    assert "top-1: fp 91.60%, uniform_minmax 50.00%, uniform_mse 80.00%, bwa 91.25%" in out
    assert re.search(r"conv2\s+3\s+8\s+1\.000 1\.100 0\.950\s+0\.950\.\.1\.100\s+-4", out)
    assert "metadata: author = someone" in out
    meta = json.loads(run("inspect", files["meta"], "--json").stdout)["bwacal"]
    assert meta["layers"][0]["alpha"]["rel_max"] == 1.1


def test_inspect_bad_inputs(files, tmp_path):
    assert_bad_input(run("inspect", files["garbage"]), "garbage.onnx")
    assert_bad_input(run("inspect", tmp_path / "none.onnx"), "none.onnx")
    assert_bad_input(run("inspect", files["fp"], "--bits", 9), "--bits")
    truncated = Path(files["fp"]).read_bytes()[:200]
    assert_bad_input(run("inspect", _write(tmp_path / "cut.onnx", truncated)), "cut.onnx")


# ---- progress bars -----------------------------------------------------------------------------


def test_progress_bar_only_on_a_terminal(monkeypatch):
    import sys

    from cli.progress import progress_bar

    with progress_bar("x", 10) as p:
        assert p is None  # pytest's stderr is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with progress_bar("x", 10, quiet=True) as p:
        assert p is None
    with progress_bar("x", 10) as p:
        assert callable(p)
        p(5, 10)


def test_no_color(monkeypatch):
    import sys

    from cli.common import use_color

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color()
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color()


# ---- the README runs as written ----------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """``bwacal evaluate/inspect/check`` lines from README's bash blocks that need no calibrate output.

    A line is skipped only when it names a file a ``bwacal calibrate`` line of the README writes (its ``-o``).
    """
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = []
    for block in blocks:
        lines += [" ".join(part.strip() for part in cmd.split("\\\n"))
                  for cmd in re.split(r"(?<!\\)\n", block) if cmd.strip()]
    produced = set()
    for line in lines:
        words = shlex.split(line, comments=True)
        if words[:2] == ["bwacal", "calibrate"]:
            produced |= {out for flag, out in zip(words, words[1:]) if flag in ("-o", "--output")}
    runnable = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if words[:2] in (["bwacal", "evaluate"], ["bwacal", "inspect"], ["bwacal", "check"]) \
                and not produced & set(words):
            runnable.append(words[1:])
    return runnable


def test_readme_examples_run_as_written(monkeypatch):
    commands = readme_commands()
    assert {c[0] for c in commands} == {"evaluate", "inspect", "check"}
    if not (ROOT / "data" / "zoo").is_dir():
        pytest.skip("data/zoo is not built yet")
    monkeypatch.chdir(ROOT)
    for args in commands:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
