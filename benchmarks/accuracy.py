"""Accuracy of BWA against its uniform baselines on the Fashion-MNIST zoo.

For every zoo model, protocol and setting: full precision, uniform min-max, uniform MSE (BWA's
starting point) and BWA top-1 on the full 10,000-image test set, calibrating on data/fmnist_calib.h5
(1,024 images). Each quantized network is written as ONNX (fake format) and evaluated with ONNX
Runtime (the tests show ORT matches bwacal's own forward on written models).

    python -m benchmarks.accuracy [--models resnet20,mobilenetv2,vgg_small] [--settings W4,W3,W2,W4A4,W3A3]
                                  [--protocols first-last-8bit,all-layers] [--epochs 5] [--lr 1e-3]
                                  [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IDX = Path("/usr/share/datasets/fashion-mnist")
TARGETS = {  # (model, setting) -> max drop in points, 8-bit first/last protocol (issue 4)
    ("resnet20", "W4"): 0.3, ("resnet20", "W3"): 0.8, ("resnet20", "W2"): 3.0, ("resnet20", "W4A4"): 1.5,
    ("mobilenetv2", "W4"): 1.0, ("mobilenetv2", "W3"): 2.0, ("mobilenetv2", "W2"): 8.0,
}


def parse_setting(s: str):
    w, _, a = s.upper().partition("A")
    return int(w[1:]), (int(a) if a else None)


def ort_top1(path, x, y, batch=1000):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def table_from(json_files):
    """Print the table of earlier runs: ``python -m benchmarks.accuracy --table a.json b.json``."""
    rows = [r for f in json_files for r in json.loads(Path(f).read_text())]
    print_table(rows)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        return table_from(sys.argv[2:])
    from bwacal.calibrate import CalibrationOptions, calibrate
    from bwacal.export import write_quantized

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2,vgg_small")
    ap.add_argument("--settings", default="W4,W3,W2,W4A4,W3A3")
    ap.add_argument("--protocols", default="first-last-8bit,all-layers")
    ap.add_argument("--epochs", type=int, default=CalibrationOptions.epochs)
    ap.add_argument("--lr", type=float, default=CalibrationOptions.lr)
    ap.add_argument("--calib", default=str(ROOT / "data/fmnist_calib.h5"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    x, y = load_test_set()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for model in args.models.split(","):
            path = ROOT / "data/zoo" / f"{model}.onnx"
            fp = ort_top1(path, x, y)
            for protocol in args.protocols.split(","):
                for setting in args.settings.split(","):
                    bits, act_bits = parse_setting(setting)
                    opts = CalibrationOptions(bits=bits, act_bits=act_bits, protocol=protocol, epochs=args.epochs,
                                              lr=args.lr)
                    t0 = time.perf_counter()
                    cal = calibrate(path, args.calib, opts)
                    seconds = time.perf_counter() - t0
                    acc = {"fp": fp}
                    for key, net in (("uniform_minmax", cal.minmax), ("uniform_mse", cal.mse), ("bwa", cal.net)):
                        out = d / f"{model}.{protocol}.{setting}.{key}.onnx"
                        write_quantized(net, cal.report, out, "fake")
                        acc[key] = ort_top1(out, x, y)
                    row = {"model": model, "protocol": protocol, "setting": setting, **acc,
                           "epochs": args.epochs, "lr": args.lr, "start": cal.report["start"], "best_epoch": cal.report["best_epoch"], "seconds": seconds}
                    target = TARGETS.get((model, setting)) if protocol == "first-last-8bit" else None
                    row["target_drop"] = target
                    row["met"] = None if target is None else bool(100 * (fp - acc["bwa"]) <= target)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print_table(rows)


def load_test_set():
    """Images (normalised like the zoo's training) and labels of the 10,000-image test split."""
    from bwacal.makecalib import read_idx

    images = read_idx(IDX / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(IDX / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    x = ((images.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None]
    return x.astype(np.float32), labels


def print_table(rows):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; date: {time.strftime('%Y-%m-%d')}")
    print()
    print("| model | protocol | setting | FP | uniform min-max | uniform MSE | BWA | BWA drop | target | met | "
          "BWA > MSE | BWA > best uniform | start | calib s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|")
    for r in rows:
        drop = 100 * (r["fp"] - r["bwa"])
        target = "" if r["target_drop"] is None else f"≤ {r['target_drop']}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        def above(ref):
            return "yes" if r["bwa"] > ref else ("equal" if r["bwa"] == ref else "**no**")

        best = max(r["uniform_mse"], r["uniform_minmax"])
        setting = r["setting"] + ("" if r.get("lr", 1e-3) == 1e-3 and r.get("epochs", 5) == 5
                                  else f" (--lr {r['lr']:g} --epochs {r['epochs']})")
        print(f"| {r['model']} | {r['protocol']} | {setting} | {100 * r['fp']:.2f} | "
              f"{100 * r['uniform_minmax']:.2f} | {100 * r['uniform_mse']:.2f} | {100 * r['bwa']:.2f} | "
              f"{drop:.2f} | {target} | {met} | {above(r['uniform_mse'])} | {above(best)} | {r.get('start', '')} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
