"""Uniform starts compared: min-max, weight-MSE and output-aware steps, top-1 with no BWA fitting.

For every zoo model, width and protocol (weights only), each quantized layer's per-channel step is
chosen by one rule and the codes are round-to-nearest on it; top-1 on data/fmnist_val.h5 (2,000
images) with bwacal's engine. The output-aware steps use ``H = E[x x^T]`` of each layer's input
collected on the first ``--images`` calibration images (data/fmnist_calib.h5); the wall time of
that collection (once per model) and of the step searches (per width, all layers) are given.

    python -m benchmarks.starts [--models resnet20,mobilenetv2,vgg_small] [--bits 4,3,2]
                                [--protocols first-last-8bit,all-layers] [--images 256] [--rows 16384]
                                [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bwacal.data import open_dataset
from bwacal.model import load_model
from bwacal.quant.output_steps import DEFAULT_ROWS, input_covariances, output_error_steps
from bwacal.quant.uniform import qrange, quantize
from bwacal.quant.weights import channels_first, minmax_steps, mse_steps
from bwacal.quantize import quantize_network, select_layers

ROOT = Path(__file__).resolve().parents[1]
STARTS = ("minmax", "mse", "output")


def top1(forward, x, y, batch=250):
    pred = np.concatenate([forward(x[i:i + batch]).argmax(axis=1) for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def set_steps(net, layer, steps):
    """Override one layer's uniform grid: new steps, round-to-nearest codes, planes."""
    wq = net.weights[layer.weight]
    w2d = channels_first(net.model.graph.initializers[layer.weight], layer.axis)
    qmin, qmax = qrange(layer.bits, True)
    wq.step = steps.astype(np.float32)
    wq.codes = (quantize(w2d, wq.step[:, None], qmin, qmax) + wq.offset).astype(np.uint8)
    net.planes[layer.weight] = wq.planes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2,vgg_small")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--protocols", default="first-last-8bit,all-layers")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    with open_dataset(ROOT / "data/fmnist_calib.h5") as calib, open_dataset(ROOT / "data/fmnist_val.h5") as val:
        x_calib, _ = calib.read(np.arange(min(args.images, calib.n)))
        x_val, y_val = val.read(np.arange(val.n))
    rows = []
    for name in args.models.split(","):
        model = load_model(ROOT / "data/zoo" / f"{name}.onnx")
        fp = top1(model.forward, x_val, y_val)
        every = select_layers(model.graph, 2, "all-layers")
        started = time.perf_counter()
        hessians = input_covariances(model, [layer.node for layer in every], x_calib, rows=args.rows)
        h_seconds = time.perf_counter() - started
        print(f"{name}: FP {100 * fp:.2f}%, H of {len(every)} layers on {len(x_calib)} images in {h_seconds:.1f} s",
              flush=True)
        cache, search_seconds = {}, {}

        def steps_for(layer, start):
            key = (layer.weight, layer.bits, start)
            if key not in cache:
                w2d = channels_first(model.graph.initializers[layer.weight], layer.axis)
                t0 = time.perf_counter()
                if start == "minmax":
                    cache[key] = minmax_steps(w2d, layer.bits)
                elif start == "mse":
                    cache[key] = mse_steps(w2d, layer.bits)
                else:
                    cache[key] = output_error_steps(w2d, layer.bits, hessians[layer.node])
                search_seconds[key] = time.perf_counter() - t0
            return cache[key]

        for protocol in args.protocols.split(","):
            for bits in (int(b) for b in args.bits.split(",")):
                layers = select_layers(model.graph, bits, protocol)
                net = quantize_network(model, layers, "mse")
                row = {"model": name, "protocol": protocol, "bits": bits, "fp": fp,
                       "h_seconds": h_seconds, "h_images": len(x_calib), "h_rows": args.rows}
                for start in STARTS:
                    for layer in layers:
                        set_steps(net, layer, steps_for(layer, start))
                    params = net.params()
                    row[start] = top1(lambda x: net.forward(x, params), x_val, y_val)
                    row[f"{start}_search_seconds"] = sum(search_seconds[(la.weight, la.bits, start)] for la in layers)
                rows.append(row)
                print(f"  {protocol} W{bits}: " + ", ".join(
                    f"{s} {100 * row[s]:.2f}% ({row[f'{s}_search_seconds']:.2f} s)" for s in STARTS), flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def print_table(rows):
    print("| model | protocol | W | FP | min-max | weight MSE | output-aware | H s | search s (MSE / output) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['protocol']} | {r['bits']} | {100 * r['fp']:.2f} | {100 * r['minmax']:.2f} | "
              f"{100 * r['mse']:.2f} | {100 * r['output']:.2f} | {r['h_seconds']:.1f} | "
              f"{r['mse_search_seconds']:.2f} / {r['output_search_seconds']:.2f} |")


if __name__ == "__main__":
    main()
