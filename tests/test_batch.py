"""``bwacal batch``: directory and manifest sources, resume after a kill, failures, the gate, Dask."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bwacal.batch import (THREAD_VARIABLES, finished_report, local_layout, local_pool, plan_jobs,
                          run_job)
from bwacal.calibrate import CalibrationOptions
from bwacal.errors import BwacalError
from cli.main import app
from tests.tiny_models import labelled_data, save, tiny_classifier

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["batch", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three tiny models in ``zoo/``, calibration and evaluation files beside it."""
    d = tmp_path_factory.mktemp("batch")
    (d / "zoo").mkdir()
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        save(tiny_classifier(seed=seed), d / "zoo" / f"{name}.onnx")
    labelled_data(d / "calib.h5", d / "zoo" / "alpha.onnx", n=48, seed=1)
    labelled_data(d / "val.h5", d / "zoo" / "alpha.onnx", n=32, seed=2)
    return d


def rows(outdir):
    return json.loads((outdir / "summary.json").read_text())["jobs"]


def test_directory_source_and_the_max_drop_gate(zoo, tmp_path):
    out = tmp_path / "out"
    result = run(zoo / "zoo", "--calib", zoo / "calib.h5", "--eval", zoo / "val.h5", "--bits", "2,3",
                 "--epochs", "1", "--workers", "2", "-o", out)
    assert result.exit_code == 0, result.output
    got = rows(out)
    assert [(r["model"], r["width"], r["status"]) for r in got] == [
        (m, b, "ok") for m in ("alpha", "beta", "gamma") for b in (2, 3)]
    for r in got:
        report = json.loads((out / f"{r['model']}.w{r['width']}.json").read_text())
        assert report["output"] == str(out / f"{r['model']}.w{r['width']}.onnx")
        assert report["eval_images"] == 32 and report["options"]["epochs"] == 1
        assert r["drop"] == pytest.approx(r["fp"] - r["bwa"], abs=1e-5)
        # fractions, as in every JSON bwacal writes; "uniform" is the grid fitting started from
        assert r["bwa"] == pytest.approx(report["accuracy"][report["method"]], abs=1e-5)
        assert r["start"] == report["start"]
        assert r["uniform"] == pytest.approx(report["accuracy"][f"uniform_{report['start']}"], abs=1e-5)
    assert json.loads((out / "summary.json").read_text())["schema"] == 1
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["status"] for t in table] == ["ok"] * 6 and float(table[0]["fp"]) == got[0]["fp"]
    assert (out / "summary.md").read_text().count("| ok |") == 6
    assert "| alpha | W2 |" in result.stdout

    # the same batch again: nothing is redone, and the gate reads the recorded drops
    drops = [r["drop"] for r in got]
    over = run(zoo / "zoo", "--calib", zoo / "calib.h5", "--eval", zoo / "val.h5", "--bits", "2,3",
               "--epochs", "1", "-o", out, "--max-drop", 100 * min(drops) - 1)
    assert over.exit_code == 1, over.output
    assert {r["status"] for r in rows(out)} == {"skipped"}
    assert "FAIL: drop over --max-drop" in over.stderr
    within = run(zoo / "zoo", "--calib", zoo / "calib.h5", "--eval", zoo / "val.h5", "--bits", "2,3",
                 "--epochs", "1", "-o", out, "--max-drop", 100 * max(drops), "-q")
    assert within.exit_code == 0, within.output
    assert within.stderr == ""


MANIFEST = """
[defaults]
calib = "data/calib.h5"
epochs = 1

[[model]]
path = "zoo/alpha.onnx"
bits = [2, 4]

[[model]]
path = "zoo/beta.onnx"
name = "beta-packed"
eval = "data/val.h5"
bits = 3
act_bits = 8
all_layers = true
format = "packed"
method = "adaround"
adaround_iterations = 20
"""


def test_manifest_source_resolves_paths_against_the_manifest(zoo, tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("calib.h5", "val.h5"):
        (tmp_path / "data" / name).write_bytes((zoo / name).read_bytes())
    (tmp_path / "zoo").symlink_to(zoo / "zoo")
    manifest = tmp_path / "zoo.toml"
    manifest.write_text(MANIFEST)
    out = tmp_path / "out"

    jobs = plan_jobs(manifest, [3], out, options=CalibrationOptions(epochs=5))
    assert [(j.name, j.options.bits, j.output.name, j.fmt) for j in jobs] == [
        ("alpha", 2, "alpha.w2.onnx", "fake"), ("alpha", 4, "alpha.w4.onnx", "fake"),
        ("beta-packed", 3, "beta-packed.w3a8.onnx", "packed")]
    assert jobs[0].calib == tmp_path / "data" / "calib.h5" and jobs[0].eval is None
    assert jobs[2].eval == tmp_path / "data" / "val.h5"
    assert jobs[2].options.protocol == "all-layers" and jobs[0].options.protocol == "first-last-8bit"
    assert {j.options.epochs for j in jobs} == {1}

    # run from another directory: the manifest's relative paths must not depend on the cwd
    result = run(manifest, "-o", out, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in rows(out)] == ["ok"] * 3
    report = json.loads((out / "beta-packed.w3a8.json").read_text())
    assert report["format"] == "packed" and report["options"]["act_bits"] == 8
    assert report["eval_images"] == 32
    assert report["method"] == "adaround" and jobs[2].options.adaround_iterations == 20
    beta = next(r for r in rows(out) if r["model"] == "beta-packed")
    assert beta["method"] == "adaround" and beta["bwa"] == round(report["accuracy"]["adaround"], 6)


def test_job_key_follows_input_bytes_and_options(zoo, tmp_path):
    calib = tmp_path / "calib.h5"
    calib.write_bytes((zoo / "calib.h5").read_bytes())
    key = plan_jobs(zoo / "zoo", [3], tmp_path, calib=calib)[0].key
    assert plan_jobs(zoo / "zoo", [3], tmp_path, calib=calib)[0].key == key
    assert plan_jobs(zoo / "zoo", [3], tmp_path, calib=calib, options=CalibrationOptions(epochs=2))[0].key != key
    assert plan_jobs(zoo / "zoo", [3], tmp_path, calib=calib, fmt="packed")[0].key != key
    calib.write_bytes((zoo / "val.h5").read_bytes())
    assert plan_jobs(zoo / "zoo", [3], tmp_path, calib=calib)[0].key != key


def test_a_stale_report_does_not_vouch_for_a_replaced_output(zoo, tmp_path):
    job = plan_jobs(zoo / "zoo", [2], tmp_path, calib=zoo / "calib.h5",
                    options=CalibrationOptions(epochs=0))[0]
    assert run_job(job)["status"] == "ok" and finished_report(job) is not None
    job.output.write_bytes(job.output.read_bytes() + b"\0")
    assert finished_report(job) is None
    assert run_job(job)["status"] == "ok"


@pytest.mark.parametrize("text, fragment", [
    ("[[model]\npath = 'x.onnx'", "not valid TOML"),
    ("[[model]]\npath = 'zoo/alpha.onnx'\nepochz = 2\n", "unknown key 'epochz'"),
    ("[[model]]\npath = 'zoo/missing.onnx'\ncalib = 'calib.h5'\n", "missing.onnx does not exist"),
    ("[[model]]\npath = 'zoo/alpha.onnx'\n", "no calibration file"),
    ("[[model]]\npath = 'zoo/alpha.onnx'\ncalib = 'calib.h5'\nepochs = 'many'\n", "'epochs' has the wrong type"),
    ("[[model]]\npath = 'zoo/alpha.onnx'\ncalib = 'calib.h5'\nbits = [9]\n", "--bits must be between 2 and 8"),
    ("title = 'zoo'\n", "unknown top-level key 'title'"),
])
def test_a_bad_manifest_is_one_line_naming_the_file(zoo, tmp_path, text, fragment):
    manifest = zoo / f"bad{abs(hash(text))}.toml"
    manifest.write_text(text)
    result = run(manifest, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {manifest}") and fragment in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_bad_sources_exit_2(zoo, tmp_path):
    assert run(tmp_path / "nowhere", "--calib", zoo / "calib.h5", "-o", tmp_path / "o").exit_code == 2
    assert "needs --calib" in run(zoo / "zoo", "-o", tmp_path / "o").stderr
    assert "no *.onnx" in run(tmp_path, "--calib", zoo / "calib.h5", "-o", tmp_path / "o").stderr
    assert "--bits" in run(zoo / "zoo", "--calib", zoo / "calib.h5", "--bits", "2,x", "-o", tmp_path / "o").stderr


def test_a_broken_model_fails_alone(zoo, tmp_path):
    src = tmp_path / "zoo"
    src.mkdir()
    for name in ("alpha", "beta"):
        (src / f"{name}.onnx").symlink_to(zoo / "zoo" / f"{name}.onnx")
    (src / "broken.onnx").write_bytes(b"this is not a protobuf")
    out = tmp_path / "out"
    result = run(src, "--calib", zoo / "calib.h5", "--bits", "2", "--epochs", "1", "--workers", "2", "-o", out)
    assert result.exit_code == 1, result.output
    got = {r["model"]: r for r in rows(out)}
    assert got["alpha"]["status"] == got["beta"]["status"] == "ok"
    assert got["broken"]["status"] == "failed" and "\n" not in got["broken"]["error"]
    assert "broken.onnx" in got["broken"]["error"]
    assert f"broken W2: failed: {got['broken']['error']}" in result.stderr
    assert "FAIL: 1 of 3 jobs failed" in result.stderr
    assert not (out / "broken.w2.onnx").exists() and not (out / "broken.w2.json").exists()


def test_resume_after_the_batch_is_killed(zoo, tmp_path):
    out = tmp_path / "out"
    args = [zoo / "zoo", "--calib", zoo / "calib.h5", "--bits", "2,3,4", "--epochs", "1", "--workers", "1",
            "-o", out]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "batch", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not list(out.glob("*.w*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = {p.with_suffix(".onnx"): (p.stat().st_mtime_ns, p.with_suffix(".onnx").stat().st_mtime_ns)
            for p in out.glob("*.w*.json")}
    assert 1 <= len(done) < 9 and not (out / "summary.json").exists()

    result = run(*args)
    assert result.exit_code == 0, result.output
    status = {r["output"]: r["status"] for r in rows(out)}
    assert len(status) == 9
    for output, (report_mtime, output_mtime) in done.items():
        assert status[str(output)] == "skipped"
        assert output.with_suffix(".json").stat().st_mtime_ns == report_mtime
        assert output.stat().st_mtime_ns == output_mtime
    assert sorted(status.values()) == sorted(["skipped"] * len(done) + ["ok"] * (9 - len(done)))


def _thread_settings():
    import numba
    return {name: os.environ.get(name) for name in THREAD_VARIABLES}, numba.get_num_threads()


def test_pool_workers_times_threads_fit_the_cores():
    cores = os.cpu_count()
    for jobs in (1, 2, 9, 100):
        for requested in (None, 1, 2, 3, 64):
            workers, threads = local_layout(jobs, requested)
            assert workers <= jobs and workers * threads <= max(cores, workers)
    before = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    with local_pool(2, 1) as pool:
        env, numba_threads = pool.submit(_thread_settings).result()
    assert set(env.values()) == {"1"} and numba_threads == 1
    assert {name: os.environ.get(name) for name in THREAD_VARIABLES} == before


def test_dask_local_cluster_runs_the_batch(zoo, tmp_path):
    distributed = pytest.importorskip("distributed", reason="the 'cluster' extra (distributed) is not installed")
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        result = run(zoo / "zoo", "--calib", zoo / "calib.h5", "--bits", "2,3", "--epochs", "1",
                     "--scheduler", cluster.scheduler_address, "-o", out)
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in rows(out)] == ["ok"] * 6
    assert json.loads((out / "summary.json").read_text())["scheduler"].startswith("tcp://127.0.0.1:")
    assert "on the Dask cluster at tcp://127.0.0.1" in result.stderr


def test_summary_plot_when_matplotlib_is_installed(zoo, tmp_path):
    pytest.importorskip("matplotlib", reason="the 'plot' extra (matplotlib) is not installed")
    out = tmp_path / "out"
    result = run(zoo / "zoo", "--calib", zoo / "calib.h5", "--bits", "2,3", "--epochs", "0", "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_rejects_writing_into_the_source_directory(zoo):
    with pytest.raises(BwacalError, match="output directory is the source directory"):
        plan_jobs(zoo / "zoo", [3], zoo / "zoo", calib=zoo / "calib.h5")


# ---- what a new user meets (issue 17) ----------------------------------------------------------


def test_a_model_bwacal_wrote_is_not_quantized_again(zoo, tmp_path):
    """calibrate's output left in the zoo folder is skipped, with a note; named alone it is refused."""
    src = tmp_path / "zoo"
    src.mkdir()
    (src / "alpha.onnx").symlink_to(zoo / "zoo" / "alpha.onnx")
    made = runner.invoke(app, ["calibrate", str(src / "alpha.onnx"), "--calib", str(zoo / "calib.h5"), "--bits", "2",
                               "--epochs", "0", "-o", str(src), "-q"])
    assert made.exit_code == 0, made.output
    assert sorted(p.name for p in src.iterdir()) == ["alpha.onnx", "alpha.w2.onnx"]
    out = tmp_path / "out"
    result = run(src, "--calib", zoo / "calib.h5", "--bits", "3", "--epochs", "0", "--workers", "1", "-o", out)
    assert result.exit_code == 0, result.output
    assert [r["model"] for r in rows(out)] == ["alpha"]
    assert f"skipped {src / 'alpha.w2.onnx'}: bwacal wrote it" in result.stderr
    alone = run(src / "alpha.w2.onnx", "--calib", zoo / "calib.h5", "-o", tmp_path / "out2")
    assert alone.exit_code == 2 and "was written by bwacal" in alone.stderr and "Traceback" not in alone.output


def test_one_model_file_is_a_source(zoo, tmp_path):
    out = tmp_path / "out"
    result = run(zoo / "zoo" / "beta.onnx", "--calib", zoo / "calib.h5", "--data", zoo / "val.h5", "--bits", "2,3",
                 "--epochs", "0", "--workers", "1", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == 1 and [(r["model"], r["width"]) for r in doc["jobs"]] == [("beta", 2), ("beta", 3)]
    assert doc["jobs"] == rows(out)


def test_batch_takes_every_calibrate_option(zoo, tmp_path):
    args = ["--lr", "0.002", "--loss", "both", "--seed", "7", "--holdout", "0.25", "--num-images", "40",
            "--weight-method", "minmax", "--batch-size", "16", "--split", "random", "--act-bits", "8",
            "--act-method", "percentile", "--method", "bwa-codes"]
    from typer.main import get_command

    def options(command):
        return {o for p in get_command(app).commands[command].params for o in p.opts if o.startswith("-")}

    # a batch writes one report per job and never overwrites a finished one; its manifest is its config
    assert options("calibrate") - options("batch") == {"--report", "--force", "--config", "--dry-run"}
    out = tmp_path / "out"
    result = run(zoo / "zoo" / "alpha.onnx", "--calib", zoo / "calib.h5", "--epochs", "1", "--workers", "1",
                 "-o", out, *args)
    assert result.exit_code == 0, result.output
    opts = json.loads((out / "alpha.w3a8.json").read_text())["options"]
    assert (opts["lr"], opts["loss"], opts["seed"], opts["holdout"], opts["num_images"], opts["weight_method"],
            opts["batch_size"], opts["split"], opts["act_method"], opts["method"]) == (
        0.002, "both", 7, 0.25, 40, "minmax", 16, "random", "percentile", "bwa-codes")


def test_manifest_data_is_the_new_name_of_eval(zoo, tmp_path):
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'[defaults]\ncalib = "{zoo / "calib.h5"}"\ndata = "{zoo / "val.h5"}"\n'
                        f'[[model]]\npath = "{zoo / "zoo" / "alpha.onnx"}"\n')
    assert plan_jobs(manifest, [3], tmp_path / "o")[0].eval == zoo / "val.h5"
    manifest.write_text(manifest.read_text() + f'eval = "{zoo / "calib.h5"}"\n')  # a model's own overrides
    assert plan_jobs(manifest, [3], tmp_path / "o")[0].eval == zoo / "calib.h5"
    manifest.write_text(manifest.read_text() + f'data = "{zoo / "val.h5"}"\n')  # both names in one table
    with pytest.raises(BwacalError, match="'eval' is the old name of 'data'"):
        plan_jobs(manifest, [3], tmp_path / "o")


def test_ctrl_c_stops_the_workers_promptly_with_one_line(zoo, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: one line, exit 130, no worker traceback,
    no temporary file; the workers are gone."""
    out = tmp_path / "out"
    args = [zoo / "zoo", "--calib", zoo / "calib.h5", "--bits", "2,3,4,5,6,7,8", "--epochs", "200", "--workers", "2",
            "-o", out]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "batch", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=None)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.w*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # wait for the workers to be running jobs: the first (epochs 200) never ends soon
        time.sleep(1.0)
        assert proc.poll() is None, proc.stderr.read()
        children = _children(proc.pid)
        assert children, "no worker processes"
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = proc.stderr.read()
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.startswith("interrupted")] == [
        "interrupted: finished jobs are kept; run the same command again to resume"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], list(out.iterdir())
    assert not [pid for pid in children if _alive(pid)]


def _children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_manifest_entry_takes_per_layer_rules(zoo, tmp_path):
    from bwacal.quantize import select_layers
    import bwacal

    names = [layer.node for layer in select_layers(bwacal.load_model(zoo / "zoo" / "alpha.onnx").graph, 3)]
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'[[model]]\npath = "{zoo / "zoo" / "alpha.onnx"}"\ncalib = "{zoo / "calib.h5"}"\n'
                        f'epochs = 0\nexclude = ["{names[-1]}"]\n[model.layer_bits]\n"{names[1]}" = 5\n')
    out = tmp_path / "out"
    result = run(manifest, "-o", out, "--workers", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "alpha.w3.json").read_text())
    assert report["excluded"] == [names[-1]] and report["layers"][1]["bits"] == 5


def test_stopped_workers_exit_by_themselves_without_taking_the_next_job(zoo, tmp_path):
    """Leaving the pool on an interrupt ends each running worker with SIGTERM: the worker unwinds
    (its atomic writes remove their temporary files) and exits 130, rather than picking up a queued
    job and having to be killed."""
    from bwacal.batch import _run_in_worker

    jobs = plan_jobs(zoo / "zoo", [2, 3, 4], tmp_path / "out", calib=zoo / "calib.h5",
                     options=CalibrationOptions(epochs=100_000, method="bwa"))
    (tmp_path / "out").mkdir()
    processes = []
    with pytest.raises(KeyboardInterrupt):
        with local_pool(2, 1) as pool:
            futures = [pool.submit(_run_in_worker, job) for job in jobs]
            deadline = time.monotonic() + 300
            # past the imports and into the jobs: each worker has spent seconds of CPU (100,000 epochs
            # would keep them fitting for hours)
            while time.monotonic() < deadline:
                processes = list(pool._processes.values())
                if len(processes) == 2 and min(_cpu_seconds(p.pid) for p in processes) > 12:
                    break
                time.sleep(0.5)
            assert len(processes) == 2 and not any(f.done() for f in futures)
            raise KeyboardInterrupt
    assert [p.exitcode for p in processes] == [130, 130]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def _cpu_seconds(pid) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
