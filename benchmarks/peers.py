"""bwacal against the peer quantizers, like for like, on the Fashion-MNIST zoo.

For every model, protocol and setting: top-1 on the 10,000 Fashion-MNIST test images of the model
each method writes (ONNX Runtime at ORT_ENABLE_BASIC on the written file, the same evaluation for
every method) and each
method's wall time, on the same machine in the same run, calibrating on the same 1,024 images
(data/fmnist_calib.h5):

- bwacal: ``python -m cli.main calibrate MODEL --calib CALIB --bits B [--act-bits A] [--all-layers]
  --method M`` for every M of ``--methods`` (default: every method ``calibrate`` offers); wall time of
  the process.
- AIMET AdaRound (aimet-onnx in its own virtual environment, ``--aimet-python``): benchmarks/
  aimet_adaround.py run as a subprocess; its docstring says how AIMET is configured. Wall time from
  the runner's process start to its model written (its test-set evaluation excluded).
- ONNX Runtime ``quantize_static`` (QDQ, per-channel symmetric weights, MinMax calibration on a
  CalibrationDataReader over the same images, after ``quant_pre_process``, which folds BatchNorm):
  only int4 and int8 weights exist there, so W3/W2 rows are n/a. Weights-only W4 keeps activations
  at 16 bits (quantize_static always quantizes activations; 16-bit QDQ is the nearest to float it
  offers); W4A4 uses 4-bit activations (QUInt4).

Times: wall and CPU seconds (user + system, children included) of each method. Every written
model's weights are checked: at most 2^b distinct values per output channel of every
Conv/Gemm quantized at b bits (``levels`` in the JSON).

    python -m benchmarks.peers [--models resnet20,mobilenetv2,vgg_small] [--settings W4,W3,W2,W4A4]
        [--protocols all-layers[,first-last-8bit]] [--methods bwa,...] [--peers aimet,ort]
        [--aimet-python /work/aimet-venv/bin/python] [--aimet-iterations 10000] [--threads 1]
        [--json out.json] [--append benchmarks/RESULTS.md]
    python -m benchmarks.peers --table a.json b.json [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.accuracy import load_test_set, parse_setting

ROOT = Path(__file__).resolve().parents[1]
AIMET_PYTHON = "/work/aimet-venv/bin/python"
LAYERS = ("Conv", "Gemm", "MatMul")


def bwacal_methods() -> tuple[list[str], str]:
    """The methods ``calibrate --method`` accepts and its default (from this checkout's bwacal)."""
    from bwacal.calibrate import METHODS, CalibrationOptions

    return list(METHODS), CalibrationOptions().method


def ort_top1(path, x, y, threads, batch=1000) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    # Above BASIC, ORT fuses DequantizeLinear-Conv-QuantizeLinear into QLinearConv, which has no 4-bit
    # kernel (AIMET's uint4 QDQ models fail to load) and computes in integers rather than simulating
    # the quantization: every model is run as the graph it is.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def weight_levels(path, bits, wide) -> dict:
    """Most distinct weight values in one output channel, over the layers quantized at ``bits``.

    Weights are read where the model keeps them: a float initializer (fake-quantized), or the
    integer initializer of a DequantizeLinear (QDQ). ``wide`` counts the first and last layer apart
    (8 bits under first-last-8bit).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    layers = [n for n in graph.node if n.op_type in LAYERS and len(n.input) > 1]
    worst, worst_wide, counted = 0, 0, 0
    for i, node in enumerate(layers):
        w = node.input[1]
        while w not in inits and w in producer and producer[w].op_type in ("DequantizeLinear", "QuantizeLinear",
                                                                           "Identity", "Transpose"):
            w = producer[w].input[0]
        if w not in inits:
            continue
        arr = numpy_helper.to_array(inits[w])
        transposed = node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute)
        if node.op_type == "MatMul" or transposed:
            arr = arr.T
        per_channel = max(len(np.unique(c)) for c in arr.reshape(arr.shape[0], -1))
        counted += 1
        if wide and i in (0, len(layers) - 1):
            worst_wide = max(worst_wide, per_channel)
        else:
            worst = max(worst, per_channel)
    return {"max_per_channel": worst, "max_per_channel_8bit_layers": worst_wide or None, "layers": counted,
            "within_2^b": bool(worst <= 2 ** bits and worst_wide <= 256)}


def timed(cmd, threads) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``; its wall seconds and CPU seconds (user + system, its children included).

    On a machine shared with other jobs, CPU seconds are the fairer comparison of the methods' work.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=thread_env(threads))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def thread_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
            "NUMBA_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_bwacal(method, model, calib, bits, act_bits, protocol, out, threads) -> dict:
    cmd = [sys.executable, "-m", "cli.main", "calibrate", str(model), "--calib", str(calib), "--bits", str(bits),
           "-o", str(out), "--force", "--quiet", "--report", str(out.with_suffix(".report.json"))]
    if act_bits:
        cmd += ["--act-bits", str(act_bits)]
    if protocol == "all-layers":
        cmd.append("--all-layers")
    cmd += ["--method", method]
    proc, seconds, cpu = timed(cmd, threads)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:], "seconds": seconds,
                "command": shlex.join(cmd)}
    report = json.loads(out.with_suffix(".report.json").read_text())
    return {"seconds": seconds, "cpu_seconds": cpu, "command": shlex.join(cmd),
            "report": {k: report.get(k) for k in ("start", "best_epoch", "method") if k in report}}


def run_aimet(python, model, calib_npy, test, bits, act_bits, protocol, iterations, out, threads) -> dict:
    cmd = [python, str(ROOT / "benchmarks/aimet_adaround.py"), "--model", str(model), "--calib", str(calib_npy),
           "--test-x", str(test[0]), "--test-y", str(test[1]), "--bits", str(bits), "--protocol", protocol,
           "--iterations", str(iterations), "--threads", str(threads), "-o", str(out),
           "--progress", str(out.with_suffix(".progress.jsonl"))]
    if act_bits:
        cmd += ["--act-bits", str(act_bits)]
    proc, total, cpu = timed(cmd, threads)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-3:], "seconds": total, "command": shlex.join(cmd)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = total  # "seconds" (the runner's, to its model written) leaves out its evaluation
    result["process_cpu_seconds"] = cpu
    result["command"] = shlex.join(cmd)
    return result


def run_ort(model, calib_x, bits, act_bits, protocol, out, threads) -> dict:
    """ONNX Runtime quantize_static; None where its types cannot express the setting."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    weight_type = {4: QuantType.QInt4, 8: QuantType.QInt8}.get(bits)
    act_type = {None: QuantType.QUInt16, 4: QuantType.QUInt4, 8: QuantType.QUInt8, 16: QuantType.QUInt16}.get(act_bits)
    if weight_type is None or act_type is None:
        return {"na": f"quantize_static has no {bits}-bit weight type (int4, int8, int16 only)"}

    class Reader(CalibrationDataReader):
        def __init__(self, name):
            self.batches = iter([{name: calib_x[i:i + 32]} for i in range(0, len(calib_x), 32)])

        def get_next(self):
            return next(self.batches, None)

    t0, c0 = time.perf_counter(), time.process_time()
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(model), str(pre))
    proto = onnx.load(str(pre))
    name = proto.graph.input[0].name
    layers = [n for n in proto.graph.node if n.op_type in LAYERS]
    overrides = {}
    if protocol == "first-last-8bit":
        for n in (layers[0], layers[-1]):
            overrides[n.input[1]] = [{"quant_type": QuantType.QInt8}]
            overrides[n.input[0]] = [{"quant_type": QuantType.QUInt8}]
    quantize_static(str(pre), str(out), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=act_type, weight_type=weight_type, calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=list(LAYERS),
                    extra_options={"WeightSymmetric": True, "TensorQuantOverrides": overrides} if overrides
                    else {"WeightSymmetric": True})
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "activations": f"{act_bits}-bit" if act_bits else "16-bit (QUInt16: quantize_static always "
                                                                "quantizes activations)"}


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        ap = argparse.ArgumentParser()
        ap.add_argument("--table", nargs="+", required=True)
        ap.add_argument("--append", default=None)
        args = ap.parse_args()
        runs = [json.loads(Path(f).read_text()) for f in args.table]
        text = table(merge_runs(runs))
        print(text)
        if args.append:
            append(args.append, [r["meta"] for r in runs], text, args.table)
        return

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2,vgg_small")
    ap.add_argument("--settings", default="W4,W3,W2,W4A4")
    ap.add_argument("--protocols", default="all-layers", help="all-layers and/or first-last-8bit")
    ap.add_argument("--methods", default=None, help="bwacal methods (default: those calibrate --help offers)")
    ap.add_argument("--peers", default="aimet,ort", help="aimet and/or ort, or none")
    ap.add_argument("--aimet-python", default=AIMET_PYTHON)
    ap.add_argument("--aimet-iterations", type=int, default=10000)
    ap.add_argument("--calib", default=str(ROOT / "data/fmnist_calib.h5"))
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of every method (numba/BLAS/OMP for bwacal, torch and ORT for AIMET, ORT)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--append", default=None, help="add a dated section with the table to this markdown file")
    ap.add_argument("--keep", default=None, help="directory to keep the written models in")
    args = ap.parse_args()

    from bwacal.data import open_dataset

    detected, default_method = bwacal_methods()
    methods = detected if args.methods is None else [m for m in args.methods.split(",") if m and m != "none"]
    unknown = [m for m in methods if m not in detected]
    if unknown:
        sys.exit(f"unknown bwacal method {unknown[0]!r}; calibrate offers {', '.join(detected)}")
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    notes = []
    if "aimet" in peers and not Path(args.aimet_python).exists():
        notes.append(f"AIMET rows skipped: {args.aimet_python} does not exist")
        peers.remove("aimet")

    x, y = load_test_set()
    with open_dataset(args.calib) as data:
        calib_x, _ = data.read(np.arange(len(data)))
    calib_x = calib_x.astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.keep) if args.keep else Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        calib_npy, test = d / "calib.npy", (d / "test_x.npy", d / "test_y.npy")
        np.save(calib_npy, calib_x), np.save(test[0], x), np.save(test[1], y)
        for model in args.models.split(","):
            path = ROOT / "data/zoo" / f"{model}.onnx"
            fp = ort_top1(path, x, y, args.threads)
            for protocol in args.protocols.split(","):
                for setting in args.settings.split(","):
                    bits, act_bits = parse_setting(setting)
                    row = {"model": model, "protocol": protocol, "setting": setting, "fp": fp, "methods": {}}
                    todo = [("bwacal " + m + (" (default)" if m == default_method else ""), m)
                            for m in methods] + [(p, p) for p in peers]
                    for key, m in todo:
                        out = d / f"{model}.{protocol}.{setting}.{key.replace(' ', '-')}.onnx"
                        if key.startswith("bwacal "):
                            res = run_bwacal(m, path, args.calib, bits, act_bits, protocol, out, args.threads)
                        elif m == "aimet":
                            res = run_aimet(args.aimet_python, path, calib_npy, test, bits, act_bits, protocol,
                                            args.aimet_iterations, out, args.threads)
                        else:
                            res = run_ort(path, calib_x, bits, act_bits, protocol, out, args.threads)
                        if "error" not in res and "na" not in res:
                            try:
                                res["top1"] = ort_top1(out, x, y, args.threads)
                                res["levels"] = weight_levels(out, bits, protocol == "first-last-8bit")
                            except Exception as exc:  # one model ORT cannot load must not end the run
                                res["error"] = [f"evaluating {out.name}: {exc}"]
                        row["methods"][key] = res
                        print(json.dumps({k: row[k] for k in ("model", "protocol", "setting")} | {key: res}),
                              file=sys.stderr, flush=True)
                    rows.append(row)
                    if args.json:  # after every row, so a long run keeps what it measured
                        Path(args.json).write_text(json.dumps({"meta": meta(args, notes), "rows": rows}, indent=1))
    text = table(rows, notes)
    print(text)
    if args.append:
        append(args.append, [meta(args, notes)], text, [args.json] if args.json else [])


def merge_runs(runs) -> list[dict]:
    """One row per (model, protocol, setting) from several runs' JSON, in the order first seen.

    AIMET's column is named by its iterations per layer; for a method measured in several runs the
    later successful measurement is kept (so a warm-cache re-run replaces a first run that compiled).
    """
    merged = {}
    for run in runs:
        iterations = run["meta"].get("aimet_iterations")
        for r in run["rows"]:
            row = merged.setdefault((r["model"], r["protocol"], r["setting"]), {**r, "methods": {}})
            for key, res in r["methods"].items():
                if key == "aimet":
                    key = f"AIMET AdaRound {iterations} it"
                if key not in row["methods"] or "error" not in res:
                    row["methods"][key] = res
    return list(merged.values())


def meta(args, notes) -> dict:
    return {"command": "python -m benchmarks.peers " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "machine": machine(), "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "aimet_iterations": args.aimet_iterations, "notes": notes}


def table(rows, notes=()) -> str:
    keys = []
    for r in rows:
        keys += [k for k in r["methods"] if k not in keys]
    head = "| model | protocol | setting | FP | " + " | ".join(f"{k} top-1 (wall s / CPU s)" for k in keys) + " |"
    lines = [head, "|---|---|---|---:|" + "---:|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            res = r["methods"].get(k)
            if res is None:
                cells.append("")
            elif "na" in res:
                cells.append("n/a")
            elif "stopped" in res:
                cells.append(f"stopped: {res['stopped']}")
            elif "error" in res:
                cells.append("failed")
            else:
                mark = "" if res["levels"]["within_2^b"] else " (levels!)"
                cpu = res.get("cpu_seconds")
                cells.append(f"{100 * res['top1']:.2f} ({res['seconds']:.0f}"
                             + (f" / {cpu:.0f}" if cpu is not None else "") + f"){mark}")
        lines.append(f"| {r['model']} | {r['protocol']} | {r['setting']} | {100 * r['fp']:.2f} | " + " | ".join(cells) + " |")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def append(path, metas, text, json_files):
    """Add a dated section to ``path``: machine, threads, each run's command and raw JSON, the table."""
    first = metas[0]
    runs = "\n".join(f"- `{m['command']}` ({m['date']}, {m['threads']} thread(s), AIMET "
                      f"{m['aimet_iterations']} iterations per layer)" for m in metas)
    with open(path, "a") as f:
        f.write(f"\n## Peers ({time.strftime('%Y-%m-%d', time.gmtime())})\n\nmachine: {first['machine']}; runs:\n\n"
                f"{runs}\n" + (f"\nraw JSON: {', '.join(f'`{j}`' for j in json_files)}\n" if json_files else "")
                + "\n" + text + "\n")


if __name__ == "__main__":
    main()
