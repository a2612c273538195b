"""Wall time of one batch (every zoo model at every width) on three executors, same machine, same run.

    python benchmarks/batch.py [--zoo data/zoo] [--bits 2,3,4] [--epochs 5] [--append benchmarks/RESULTS.md]

1. serial: one worker, in this process, BLAS/numba on every core;
2. pool: ``--workers 2`` (a spawn process pool, cores // 2 threads per worker);
3. dask: a ``distributed.LocalCluster`` of 2 worker processes x 1 thread on loopback (start-up timed apart).

Each executor writes into a fresh directory, so nothing is skipped. Wall time includes starting the
pool's workers (they import bwacal and load the numba cache), not the LocalCluster's start-up.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bwacal.batch import local_layout, plan_jobs, run_jobs  # noqa: E402
from bwacal.calibrate import CalibrationOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} CPUs"


def subset(path: Path, n: int, out: Path) -> Path:
    from bwacal.data import open_dataset, write_dataset

    with open_dataset(path) as data:
        x, y = data.read(np.arange(min(n, data.n)))
    return write_dataset(out, x, y)


def command_args(argv: list[str]) -> list[str]:
    """The command line without its ``--note`` bullets (they are printed below it)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg == "--note":
            skip = not skip
            continue
        out.append(arg)
    return out


def threading_layer() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run in this process
        return numba.config.THREADING_LAYER


def timed_batch(args, outdir, workers=None, scheduler=None):
    jobs = plan_jobs(args.zoo, args.bits, outdir, calib=args.calib, eval_path=args.eval,
                     options=CalibrationOptions(epochs=args.epochs))
    started = time.perf_counter()
    rows = {}
    for job, row in run_jobs(jobs, workers, scheduler):
        rows[job.output.name] = row
        print(f"  {job.name} {job.width}: {row['status']} {row['seconds']} s {row['error'] or ''}", file=sys.stderr)
    return time.perf_counter() - started, [rows[j.output.name] for j in jobs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "data" / "zoo")
    parser.add_argument("--calib", type=Path, default=ROOT / "data" / "fmnist_calib.h5")
    parser.add_argument("--eval", default=str(ROOT / "data" / "fmnist_val.h5"),
                        help="Evaluation file, or 'none' for the held-out calibration split.")
    parser.add_argument("--calib-images", type=int, help="Calibrate on only the first N images (a shorter run).")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--epochs", type=int, default=CalibrationOptions().epochs)
    parser.add_argument("--note", action="append", default=[], help="A bullet to add under the section.")
    parser.add_argument("--append", type=Path, help="Append the '## Batch' section to this Markdown file.")
    args = parser.parse_args()
    args.bits = [int(b) for b in args.bits.split(",")]
    args.eval = None if args.eval == "none" else Path(args.eval)

    import distributed
    import numba
    import numpy

    load_before = os.getloadavg()[0]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bwacal-batch-bench-") as tmp:
        tmp = Path(tmp)
        if args.calib_images:
            args.calib = subset(args.calib, args.calib_images, tmp / f"calib{args.calib_images}.h5")
        for name in ("serial", "pool", "dask"):
            (tmp / name).mkdir()
        print("serial (1 worker)", file=sys.stderr)
        runs["serial"] = timed_batch(args, tmp / "serial", workers=1)
        print("pool (2 workers)", file=sys.stderr)
        runs["pool"] = timed_batch(args, tmp / "pool", workers=2)
        print("dask LocalCluster (2 workers x 1 thread)", file=sys.stderr)
        t0 = time.perf_counter()
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                      dashboard_address=None) as cluster:
            cluster_start = time.perf_counter() - t0
            runs["dask"] = timed_batch(args, tmp / "dask", scheduler=cluster.scheduler_address)
    load_after = os.getloadavg()[0]

    cores = os.cpu_count()
    layout = {"serial": f"1 x {local_layout(len(runs['serial'][1]), 1)[1]}",
              "pool": "2 x {}".format(local_layout(len(runs["pool"][1]), 2)[1]),
              "dask": f"2 x 1 (cores // 2 = {max(1, cores // 2)} numba threads per task)"}
    serial_wall = runs["serial"][0]
    n_jobs = len(runs["serial"][1])
    same = all([(r["fp"], r["uniform"], r["bwa"]) for r in runs[k][1]]
               == [(r["fp"], r["uniform"], r["bwa"]) for r in runs["serial"][1]] for k in runs)
    eval_name = args.eval.name if args.eval else "the held-out 20% of the calibration images"
    calib_note = f" (first {args.calib_images} images)" if args.calib_images else ""
    epochs_note = "" if args.epochs == CalibrationOptions().epochs else \
        f" (**reduced from the default {CalibrationOptions().epochs}** to keep the run short)"
    lines = [
        "## Batch", "",
        f"`python benchmarks/batch.py {shlex.join(command_args(sys.argv[1:]))}`", "",
        f"- machine: {machine()}; numba {numba.__version__} (threading layer {threading_layer()}), "
        f"NumPy {numpy.__version__}, distributed {distributed.__version__}",
        f"- date: {datetime.date.today().isoformat()}; 1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after",
        f"- jobs: {n_jobs} ({', '.join(sorted({p.stem for p in Path(args.zoo).glob('*.onnx')}))} at W"
        f"{', W'.join(map(str, args.bits))}); epochs {args.epochs}{epochs_note}; calibration "
        f"{args.calib.name}{calib_note}, evaluation {eval_name}; default protocol (first and last layers at 8 bits)",
        f"- LocalCluster start-up (not in the wall time): {cluster_start:.1f} s",
        *[f"- {note}" for note in args.note], "",
        "| executor | workers x threads | wall s | sum of job s | speed-up vs serial | failed |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, label in (("serial", "serial (1 worker, in process)"), ("pool", "process pool, --workers 2"),
                        ("dask", "Dask LocalCluster, 2 processes")):
        wall, rows = runs[name]
        job_s = sum(r["seconds"] or 0 for r in rows)
        failed = sum(r["status"] == "failed" for r in rows)
        lines.append(f"| {label} | {layout[name]} | {wall:.1f} | {job_s:.1f} | {serial_wall / wall:.2f}x | {failed} |")
    lines += ["", f"Per job (serial run; top-1 in %, on {eval_name}); the three executors gave "
              + ("identical accuracies." if same else "accuracies that differ in places (thread counts differ)."), "",
              "| model | width | FP | uniform | BWA | drop | size ratio | serial s | pool s | dask s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(runs["serial"][1]):
        secs = [runs[k][1][i]["seconds"] for k in ("serial", "pool", "dask")]

        def f(v, d=2):
            return "" if v is None else f"{v:.{d}f}"
        lines.append(f"| {r['model']} | W{r['width']} | {f(r['fp'])} | {f(r['uniform'])} | {f(r['bwa'])} | "
                     f"{f(r['drop'])} | {f(r['size_ratio'])}x | " + " | ".join(f(s, 1) for s in secs) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
