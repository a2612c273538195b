"""One calibration in-process, then top-1 on the 10,000 Fashion-MNIST test images (bwacal's own
forward of the fitted network), with wall and CPU seconds; one JSON line appended to ``--out``.

    python -m benchmarks.methods MODEL BITS PROTOCOL METHOD [option=value ...] [--out FILE]

MODEL is a zoo name (data/zoo/MODEL.onnx), calibration on data/fmnist_calib.h5; option=value sets
any ``CalibrationOptions`` field (``adaround_iterations=10000``, ``act_bits=4``, ``epochs=2``).
Used for the method and iteration choices in benchmarks/RESULTS.md ("Learned rounding"); the
like-for-like table against the peers is benchmarks/peers.py's.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from benchmarks.accuracy import load_test_set
from bwacal.calibrate import CalibrationOptions, calibrate

ROOT = Path(__file__).resolve().parents[1]


def _value(name: str, text: str):
    kind = {f.name: f.type for f in fields(CalibrationOptions)}[name]
    if "bool" in str(kind):
        return text in ("1", "true", "yes")
    if "int" in str(kind):
        return int(text)
    if "float" in str(kind):
        return float(text)
    return text


def main(argv):
    out = Path("benchmarks/results/methods.jsonl")
    if "--out" in argv:
        i = argv.index("--out")
        out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    model, bits, protocol, method = argv[:4]
    extra = {k: _value(k, v) for k, v in (a.split("=", 1) for a in argv[4:])}
    options = CalibrationOptions(bits=int(bits), protocol=protocol, method=method, **extra)
    wall, cpu = time.perf_counter(), time.process_time()
    cal = calibrate(ROOT / f"data/zoo/{model}.onnx", ROOT / "data/fmnist_calib.h5", options)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    x, y = load_test_set()
    params = cal.net.params()
    correct = sum(int((cal.net.forward(x[s:s + 1000], params).argmax(1) == y[s:s + 1000]).sum())
                  for s in range(0, len(x), 1000))
    row = {"model": model, "bits": int(bits), "protocol": protocol, "method": method, "options": extra,
           "top1": correct / len(x) * 100, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "start": cal.report.get("start"), "best_epoch": cal.report.get("best_epoch"),
           "adaround_s": round(sum(s["seconds"] for s in cal.report.get("adaround") or []), 1),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": Path("/proc/loadavg").read_text().split()[:3]}
    print(json.dumps(row))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
