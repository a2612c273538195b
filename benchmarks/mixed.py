"""Mixed precision against uniform widths on the Fashion-MNIST zoo (issue 19).

For every zoo model: top-1 on the 10,000 Fashion-MNIST test images (bwacal's forward of the fitted
network) of uniform widths (every layer at W bits, ``all-layers``) and of mixed allocations at
average widths B (``calibrate(avg_bits=B)``, ``all-layers``: every layer's width chosen from
{2, 3, 4, 8}, first and last included), both calibrated by the same method on the same 1,024 images
(data/fmnist_calib.h5). The average 2.0 has one allocation (every layer at 2 bits): it is uniform
W2, not run twice. Each row keeps the calibration's wall seconds and, for mixed rows, the seconds
of the allocation (Fisher sensitivities + the knapsack) inside them. With ``--sensitivity`` each
model's ``bwacal sensitivity`` run (measured and Fisher, with times) is kept too.

    python -m benchmarks.mixed [--models resnet20,mobilenetv2,vgg_small] [--uniform 2,3,4]
        [--budgets 2.5,3,4] [--method bwa] [option=value ...] [--sensitivity]
        [--jsonl benchmarks/results/mixed.jsonl] [--plot benchmarks/results/mixed.png]
    python -m benchmarks.mixed --table benchmarks/results/mixed.jsonl [--plot out.png]

option=value sets any ``CalibrationOptions`` field (``adaround_iterations=500``, ``epochs=3``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


from benchmarks.accuracy import load_test_set
from benchmarks.methods import _value

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "data/fmnist_calib.h5"


def test_top1(forward, x, y, batch=1000) -> float:
    return sum(int((forward(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum()) for s in range(0, len(x), batch)) / len(x)


def run_model(name, uniform, budgets, method, extra, x, y, out, sensitivity):
    from bwacal.calibrate import CalibrationOptions, calibrate
    from bwacal.model import load_model

    path = ROOT / f"data/zoo/{name}.onnx"
    model = load_model(path)
    fp = test_top1(model.forward, x, y)
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": _threads()}
    _emit(out, {"model": name, "kind": "fp", "top1": fp, **stamp})
    if sensitivity:
        from bwacal.mixed import sensitivity_run

        run = sensitivity_run(path, CALIB, (2, 3, 4, 8), CalibrationOptions(seed=0))
        _emit(out, {"model": name, "kind": "sensitivity", "fisher_seconds": run["fisher_seconds"],
                    "measured_seconds": run["measured_seconds"], "rank_correlation": run["rank_correlation"],
                    "layers": len(run["layers"]), "frontier": run.get("frontier"), "load": _load(), **stamp})
    settings = [("uniform", b) for b in uniform] + [("mixed", b) for b in budgets]
    for kind, b in settings:
        if kind == "mixed" and b == 2.0:
            continue  # one allocation: every layer at 2 bits, uniform W2
        options = CalibrationOptions(bits=int(b) if kind == "uniform" else 3, protocol="all-layers", method=method,
                                     avg_bits=float(b) if kind == "mixed" else None, **extra)
        wall, cpu = time.perf_counter(), time.process_time()
        cal = calibrate(path, CALIB, options)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        params = cal.net.params()
        top1 = test_top1(lambda xb: cal.net.forward(xb, params), x, y)
        alloc = cal.report.get("allocation")
        row = {"model": name, "kind": kind, "setting": b, "method": method, "options": extra, "top1": top1, "fp": fp,
               "avg_bits": cal.report["avg_weight_bits"], "size_bytes": cal.report["quantized_size_bytes"],
               "widths": {r["layer"]: r["bits"] for r in cal.report["layers"]},
               "calibration_seconds": cal.report["seconds"], "wall_s": wall, "cpu_s": cpu,
               "allocation_seconds": alloc["seconds"] if alloc else None,
               "allocation_share": alloc["seconds"] / cal.report["seconds"] if alloc else None,
               "estimated_loss": alloc["estimated_loss"] if alloc else None,
               "exact": alloc["exact"] if alloc else None, "load": _load(), **stamp}
        _emit(out, row)


def _threads():
    import numba

    return numba.get_num_threads()


def _load():
    return Path("/proc/loadavg").read_text().split()[:3]


def _emit(out, row):
    print(json.dumps({k: v for k, v in row.items() if k not in ("widths", "frontier")}), flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def table(rows) -> list[str]:
    """The Markdown table: per model, uniform and mixed top-1 at each average width."""
    fp = {r["model"]: r["top1"] for r in rows if r["kind"] == "fp"}
    runs = [r for r in rows if r["kind"] in ("uniform", "mixed")]
    lines = ["| model | FP | avg bits | uniform top-1 | mixed top-1 | mixed widths (layers at 2/3/4/8) | size MB "
             "(uniform / mixed) | allocation s / calibration s | target (issue 19) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for model in dict.fromkeys(r["model"] for r in runs):
        settings = sorted({float(r["setting"]) for r in runs if r["model"] == model})
        for b in settings:
            uni = next((r for r in runs if r["model"] == model and r["kind"] == "uniform" and r["setting"] == b), None)
            mix = next((r for r in runs if r["model"] == model and r["kind"] == "mixed" and r["setting"] == b), None)
            if mix is None and b == 2.0:
                mix = uni  # the only allocation at 2.0
            counts = "/".join(str(sum(1 for w in mix["widths"].values() if w == k)) for k in (2, 3, 4, 8)) if mix else ""
            target = ""
            w3 = next((r for r in runs if r["model"] == model and r["kind"] == "uniform" and r["setting"] == 3), None)
            if b == 2.5 and mix is not None and w3 is not None:
                target = f"mixed >= uniform W3 ({100 * w3['top1']:.2f}): " + ("met" if mix["top1"] >= w3["top1"] else "**not met**")
            if b == 3.0 and model == "mobilenetv2" and mix is not None and model in fp:
                target = "within 1 point of FP: " + ("met" if 100 * (fp[model] - mix["top1"]) <= 1 else "**not met**")
            lines.append(
                f"| {model} | {100 * fp.get(model, float('nan')):.2f} | {b:g} | "
                f"{_pct(uni)} | {_pct(mix)}{' (= uniform)' if mix is uni and mix is not None else ''} | {counts} | "
                f"{_mb(uni)} / {_mb(mix)} | "
                + (f"{mix['allocation_seconds']:.1f} / {mix['calibration_seconds']:.0f} "
                   f"({100 * mix['allocation_share']:.1f}%)" if mix is not None and mix.get("allocation_seconds") else "")
                + f" | {target} |")
    return lines


def _pct(r):
    return "" if r is None else f"{100 * r['top1']:.2f}"


def _mb(r):
    return "" if r is None else f"{r['size_bytes'] / 1e6:.4f}"


def plot(rows, path):
    from bwacal.plot import plot_frontier

    points = [{"model": r["model"], "series": r["kind"], "size_bytes": r["size_bytes"], "top1": r["top1"],
               "avg_bits": r["avg_bits"]} for r in rows if r["kind"] in ("uniform", "mixed")]
    points += [{**p, "series": "mixed"} for p in points if p["series"] == "uniform" and p["avg_bits"] == 2.0]
    fp = {r["model"]: r["top1"] for r in rows if r["kind"] == "fp"}
    png = plot_frontier(points, fp, "Fashion-MNIST zoo, 10,000 test images: size against top-1")
    Path(path).write_bytes(png)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20,mobilenetv2,vgg_small")
    ap.add_argument("--uniform", default="2,3,4")
    ap.add_argument("--budgets", default="2.5,3,4")
    ap.add_argument("--method", default="bwa")
    ap.add_argument("--sensitivity", action="store_true")
    ap.add_argument("--jsonl", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--table", type=Path, nargs="*", default=None)
    args, rest = ap.parse_known_args()
    if args.table is not None:
        rows = [json.loads(line) for f in args.table for line in f.read_text().splitlines() if line.strip()]
        print("\n".join(table(rows)))
        if args.plot:
            plot(rows, args.plot)
        return
    extra = {k: _value(k, v) for k, v in (a.split("=", 1) for a in rest)}
    x, y = load_test_set()
    for name in args.models.split(","):
        run_model(name, [int(b) for b in args.uniform.split(",") if b], [float(b) for b in args.budgets.split(",") if b],
                  args.method, extra, x, y, args.jsonl, args.sensitivity)
    print(f"machine: {os.cpu_count()} cores; load {_load()}")


if __name__ == "__main__":
    main()
