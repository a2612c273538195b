"""What the deployment formats gain in ONNX Runtime: file size, latency and top-1 of every format.

Zoo models (data/zoo, Fashion-MNIST 28x28): ``bwacal.calibrate`` with ``method="bwa"`` (the paper's
method: bit weights on round-to-nearest codes), ``--epochs`` epochs, first-last-8bit protocol, on
data/fmnist_calib.h5, at each of ``--settings`` (default W3A8 and W8A8); every format written from the
same calibrated network (qdq with its 8-bit steps from 64 calibration images, as ``bwacal calibrate
--format qdq`` takes them); top-1 on the 10,000 test images in ONNX Runtime with its default
optimizations (so qdq runs its integer kernels).

ResNet-18 and EfficientNet-B0 at 224x224 (benchmarks/imagenet.py, random weights, no test set): the
uniform W8A8 network (``quantize_network`` with activation steps from 32 random-normal images: the bit
weights at their uniform start, which is what bwa fits from; latency does not depend on their
values), written in every format; no top-1.

Peer: ONNX Runtime's ``quantize_static`` W8A8 QDQ (per-channel int8 weights, uint8 activations, MinMax
calibration on the same images, after ``quant_pre_process``).

Latency: ONNX Runtime CPU, ``--threads`` intra-op threads, median of ``--runs`` runs at batch 1 and
32; the models of one row take turns run by run, so a busy spell of a shared machine falls on all of
them. Ratios are against the float model measured in the same rounds.

    python -m benchmarks.deploy [--models resnet20,vgg_small,mobilenetv2,resnet18,efficientnet_b0]
        [--settings W3A8,W8A8] [--epochs 2] [--threads 2] [--runs 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.accuracy import load_test_set, parse_setting

ROOT = Path(__file__).resolve().parents[1]
ZOO = ("resnet20", "vgg_small", "mobilenetv2")
IMAGENET = ("resnet18", "efficientnet_b0")
FORMATS = ("fake", "packed", "qdq", "bitplanes")
TIMED = ("float", "fake", "qdq", "ort_qdq")  # bitplanes: see --bitplanes-latency
BATCHES = (1, 32)


def session(path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def top1(path, x, y, threads, batch=500):
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0].reshape(len(x[i:i + batch]), -1).argmax(1)
                           for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def latencies(paths: dict, images, threads, runs) -> dict:
    """``{name: {batch: median ms}}``, the models taking turns within each round."""
    out = {k: {} for k in paths}
    sessions = {k: session(p, threads) for k, p in paths.items()}
    for batch in BATCHES:
        x = np.ascontiguousarray(np.resize(images, (batch,) + images.shape[1:]), dtype=np.float32)
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
        for k, s in sessions.items():
            s.run(None, feeds[k])
        times = {k: [] for k in paths}
        for _ in range(runs):
            for k, s in sessions.items():
                time.sleep(0.05)
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t0)
        for k in paths:
            out[k][str(batch)] = 1e3 * float(np.median(times[k]))
    return out


def ort_static(model, images, out):
    """quantize_static's W8A8 QDQ model of ``model``, calibrated (MinMax) on ``images``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name):
            self.batches = iter([{name: images[i:i + 16]} for i in range(0, len(images), 16)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(model), str(pre))
    import onnx

    name = onnx.load(str(pre)).graph.input[0].name
    quantize_static(str(pre), str(out), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def export_imagenet(name, workdir):
    import torch

    from benchmarks.imagenet import BUILDERS
    from tests import torch_models

    path = workdir / f"{name}.onnx"
    torch_models.export(BUILDERS[name](), path, torch.randn(2, 3, 224, 224))
    return path


def write_formats(net, report, workdir, stem, steps) -> dict:
    from bwacal.export import write_quantized

    paths = {}
    for fmt in FORMATS:
        paths[fmt] = workdir / f"{stem}.{fmt}.onnx"
        write_quantized(net, report, paths[fmt], fmt, steps if fmt == "qdq" else None)
    return paths


def bench_zoo(model, setting, args, test, workdir) -> dict:
    from bwacal.calibrate import CalibrationOptions, calibrate
    from bwacal.data import open_dataset
    from bwacal.export import qdq_steps_from_file, snapping_errors

    path = ROOT / "data/zoo" / f"{model}.onnx"
    bits, act_bits = parse_setting(setting)
    calib = ROOT / "data/fmnist_calib.h5"
    t0 = time.perf_counter()
    cal = calibrate(path, calib, CalibrationOptions(bits=bits, act_bits=act_bits, epochs=args.epochs, method="bwa"))
    seconds = time.perf_counter() - t0
    steps = qdq_steps_from_file(cal.net, calib)
    paths = write_formats(cal.net, cal.report, workdir, f"{model}.{setting}", steps)
    with open_dataset(calib) as d:
        images, _ = d.read(np.arange(256))
    paths["ort_qdq"] = ort_static(path, images, workdir / f"{model}.ort_qdq.onnx")
    x, y = test
    row = {"model": model, "setting": setting, "calibrate_seconds": seconds, "float_bytes": path.stat().st_size,
           "bytes": {k: p.stat().st_size for k, p in paths.items()},
           # bitplanes at W8 (9 ConvInteger a layer) is the slowest file to score and equals fake (tests):
           # scored at the lower widths only
           "top1": {"float": top1(path, x, y, args.threads),
                    **{k: None if (k == "bitplanes" and bits == 8) else top1(p, x, y, args.threads)
                       for k, p in paths.items()}},
           "bwacal_top1": cal.report["accuracy"].get("bwa"),
           "snapping_max_rel": max(r["max_rel"] for r in snapping_errors(cal.net))}
    timed = {"float": path, **{k: paths[k] for k in TIMED if k != "float"}}
    if args.bitplanes_latency:
        timed["bitplanes"] = paths["bitplanes"]
    row["latency_ms"] = latencies(timed, images[:32], args.threads, args.runs)
    return row


def bench_imagenet(model, args, workdir) -> dict:
    import bwacal
    from bwacal.export import qdq_steps, snapping_errors
    from bwacal.quantize import collect_activation_samples, quantize_network, select_layers

    path = export_imagenet(model, workdir)
    m = bwacal.load_model(path)
    images = np.random.default_rng(0).normal(size=(32, 3, 224, 224)).astype(np.float32)
    layers = select_layers(m.graph, 8, "first-last-8bit", 8)
    batches = [images[i:i + 8] for i in range(0, len(images), 8)]
    net = quantize_network(m, layers, act_samples=collect_activation_samples(m, [q.data_input for q in layers], batches))
    steps = qdq_steps(net, batches)
    paths = write_formats(net, {}, workdir, f"{model}.W8A8", steps)
    paths["ort_qdq"] = ort_static(path, images, workdir / f"{model}.ort_qdq.onnx")
    row = {"model": model, "setting": "W8A8 (uniform start)", "float_bytes": path.stat().st_size,
           "bytes": {k: p.stat().st_size for k, p in paths.items()},
           "snapping_max_rel": max(r["max_rel"] for r in snapping_errors(net))}
    # the W3 packed file (sizes only): the same network at 3 bits
    net3 = quantize_network(m, select_layers(m.graph, 3, "first-last-8bit"))
    from bwacal.export import write_quantized

    row["bytes"]["packed_w3"] = write_quantized(net3, {}, workdir / f"{model}.W3.packed.onnx", "packed")
    row["bytes"]["fake_w3"] = write_quantized(net3, {}, workdir / f"{model}.W3.fake.onnx", "fake")
    timed = {"float": path, **{k: paths[k] for k in TIMED if k != "float"}}
    row["latency_ms"] = latencies(timed, images, args.threads, args.runs)
    return row


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def print_tables(rows, args):
    import onnxruntime

    print(f"machine: {machine()}; onnxruntime {onnxruntime.__version__}, {args.threads} threads; "
          f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print()
    print("| model | setting | float | fake | packed | qdq | bitplanes | ort W8A8 QDQ | packed smaller |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = r["bytes"]
        mb = lambda n: f"{n / 1e6:.3f} MB"  # noqa: E731
        print(f"| {r['model']} | {r['setting']} | {mb(r['float_bytes'])} | " + " | ".join(
            mb(b[k]) for k in FORMATS + ("ort_qdq",)) + f" | {r['float_bytes'] / b['packed']:.2f}x |")
        if "packed_w3" in b:
            print(f"| {r['model']} | W3 | {mb(r['float_bytes'])} | {mb(b['fake_w3'])} | {mb(b['packed_w3'])} | | | | "
                  f"{r['float_bytes'] / b['packed_w3']:.2f}x |")
    print()
    print("| model | setting | batch | float ms | fake ms | qdq ms | ort W8A8 QDQ ms | qdq / float | qdq / ort QDQ |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lat = r["latency_ms"]
        for batch in BATCHES:
            key = str(batch)
            f, q, o = lat["float"][key], lat["qdq"][key], lat["ort_qdq"][key]
            print(f"| {r['model']} | {r['setting']} | {batch} | {f:.2f} | {lat['fake'][key]:.2f} | {q:.2f} | {o:.2f} "
                  f"| {q / f:.2f} | {q / o:.2f} |")
    zoo = [r for r in rows if "top1" in r]
    if zoo:
        print()
        print("| model | setting | float | fake | packed | qdq | bitplanes | ort W8A8 QDQ | qdq - fake | "
              "largest snap |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in zoo:
            t = r["top1"]
            print(f"| {r['model']} | {r['setting']} | " + " | ".join("-" if t[k] is None else f"{100 * t[k]:.2f}"
                                                                    for k in ("float",) + FORMATS + ("ort_qdq",))
                  + f" | {100 * (t['qdq'] - t['fake']):+.2f} | {100 * r['snapping_max_rel']:.2f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ZOO + IMAGENET))
    ap.add_argument("--settings", default="W3A8,W8A8")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--bitplanes-latency", action="store_true", help="also time bitplanes (zoo models)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--table", nargs="*", help="print the tables of earlier --json files and stop")
    args = ap.parse_args()
    if args.table:
        print_tables([r for f in args.table for r in json.loads(Path(f).read_text())], args)
        return
    test = None
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for model in args.models.split(","):
            if model in IMAGENET:
                rows.append(bench_imagenet(model, args, d))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                continue
            test = test or load_test_set()
            for setting in args.settings.split(","):
                rows.append(bench_zoo(model, setting, args, test, d))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print_tables(rows, args)


if __name__ == "__main__":
    main()
