"""BWA fitted from each start: the current default (``--weight-method auto``: min-max or MSE, by
held-out loss) against output-aware steps, weights only, top-1 on data/fmnist_val.h5.

The output-aware start is patched into ``bwacal.calibrate`` by this script (calibrate asked for
``mse`` gets the output-aware grid), with H from the first 256 calibration images.

    python -m benchmarks.starts_fit [--models resnet20,mobilenetv2] [--settings first-last-8bit:2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import bwacal.calibrate as calibrate_module
from bwacal.calibrate import CalibrationOptions, calibrate
from bwacal.data import open_dataset
from bwacal.model import load_model
from bwacal.quant.output_steps import input_covariances, output_error_steps
from bwacal.quant.weights import channels_first
from bwacal.quantize import select_layers

from benchmarks.starts import set_steps, top1

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2")
    ap.add_argument("--settings", default="first-last-8bit:2")
    args = ap.parse_args()
    calib_path = ROOT / "data/fmnist_calib.h5"
    with open_dataset(calib_path) as calib, open_dataset(ROOT / "data/fmnist_val.h5") as val:
        x_calib, _ = calib.read(np.arange(256))
        x_val, y_val = val.read(np.arange(val.n))
    real = calibrate_module.quantize_network
    print("| model | protocol | W | start | uniform start | BWA | calibration s (H + search s) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        path = ROOT / "data/zoo" / f"{name}.onnx"
        model = load_model(path)
        t0 = time.perf_counter()
        hessians = input_covariances(model, [la.node for la in select_layers(model.graph, 2, "all-layers")], x_calib)
        h_seconds = time.perf_counter() - t0
        for setting in args.settings.split(","):
            protocol, bits = setting.split(":")
            bits = int(bits)
            for start in ("auto", "output"):
                extra = 0.0

                def patched(model_, layers, method, *rest, **kw):
                    nonlocal extra
                    net = real(model_, layers, method, *rest, **kw)
                    if start == "output" and method == "mse":
                        t = time.perf_counter()
                        for layer in layers:
                            w2d = channels_first(model_.graph.initializers[layer.weight], layer.axis)
                            set_steps(net, layer, output_error_steps(w2d, layer.bits, hessians[layer.node]))
                        extra += time.perf_counter() - t
                    return net

                calibrate_module.quantize_network = patched
                try:
                    options = CalibrationOptions(bits=bits, protocol=protocol,
                                                 weight_method="mse" if start == "output" else "auto")
                    t = time.perf_counter()
                    cal = calibrate(path, calib_path, options)
                    seconds = time.perf_counter() - t
                finally:
                    calibrate_module.quantize_network = real
                params = cal.net.params()
                bwa = top1(lambda x: cal.net.forward(x, params), x_val, y_val)
                base = cal.mse if start == "output" else (cal.mse if cal.report["start"] == "mse" else cal.minmax)
                base_params = base.params()
                uniform = top1(lambda x: base.forward(x, base_params), x_val, y_val)
                label = "output-aware" if start == "output" else f"auto ({cal.report['start']})"
                overhead = f" ({h_seconds:.1f} + {extra / 2:.1f})" if start == "output" else ""
                print(f"| {name} | {protocol} | {bits} | {label} | {100 * uniform:.2f} | {100 * bwa:.2f} | "
                      f"{seconds:.1f}{overhead} |", flush=True)


if __name__ == "__main__":
    main()
