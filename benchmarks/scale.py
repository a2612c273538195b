"""Peak memory and wall time of ``bwacal calibrate`` on a 224x224 classifier (random weights).

    python benchmarks/scale.py [--model resnet18|resnet50|efficientnet_b0|...] [--images 1024] [--epochs 5]
                               [--batch-size 64] [--workdir /tmp/bwacal_scale] [--json out.json]

Builds the model (``benchmarks/imagenet.py``: full-size layouts, 1000 classes, exported with its
BatchNormalization) and a random uint8 calibration file of N x 3 x 224 x 224 written in chunks of
64 images, labelled with the FP model's own predictions (torch, also in chunks). Then runs
``python -m cli.main calibrate`` (calibrate's defaults apart from the options above) as a subprocess
and reports its peak RSS (its own ``VmHWM``, read as it exits: ``ru_maxrss`` would count the parent's
pages at fork), its wall time, and its RSS sampled every 0.2 s, per stage of calibrate's log (the
largest RSS between one log line and the next). The calibration images (N x 3 x 224 x 224 float32 =
616 MB for N = 1024) exceed ``calibrate.IN_MEMORY_LIMIT``, so they are streamed from the file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 64
SAMPLE_SECONDS = 0.2
# runs ``python -m cli.main ARGS`` and prints the process's own peak RSS as it exits
CHILD = """
import atexit, runpy, sys
def _peak():
    kib = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
    print(f'VmHWM {kib} kB', file=sys.stderr, flush=True)
atexit.register(_peak)
sys.argv = ['bwacal'] + sys.argv[1:]
runpy.run_module('cli.main', run_name='__main__', alter_sys=True)
"""


def build_model(path: Path, name: str = "resnet18"):
    import torch

    from benchmarks.imagenet import BUILDERS
    from tests.torch_models import export

    if name not in BUILDERS:
        raise SystemExit(f"unknown model {name!r}; one of {', '.join(BUILDERS)}")
    torch_model = BUILDERS[name](0)
    export(torch_model, path, torch.zeros(2, 3, 224, 224))
    return torch_model


def build_data(path: Path, torch_model, n: int, seed: int = 0):
    """uint8 images with ImageNet mean/std, written and labelled CHUNK images at a time."""
    import h5py
    import torch

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        images = f.create_dataset("images", (n, 3, 224, 224), np.uint8, chunks=(1, 3, 224, 224))
        images.attrs["scale"] = 1.0 / 255.0
        images.attrs["mean"] = mean
        images.attrs["std"] = std
        labels = f.create_dataset("labels", (n,), np.int64)
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            raw = rng.integers(0, 256, (stop - start, 3, 224, 224), dtype=np.uint8)
            images[start:stop] = raw
            x = (raw.astype(np.float32) / 255.0 - mean[:, None, None].astype(np.float32)) / std[:, None, None].astype(np.float32)
            with torch.no_grad():
                labels[start:stop] = torch_model(torch.from_numpy(x)).argmax(1).numpy()
    os.replace(tmp, path)


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def run_sampled(cmd) -> dict:
    """Run ``cmd`` (stderr into stdout); its output lines with their times, its RSS every
    ``SAMPLE_SECONDS``, its VmHWM line (``CHILD``), wall time, exit code, and the range of the
    machine's 1-minute load average while it ran (a shared machine slows every figure)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, loads, done = [], [], threading.Event()

    def sample():
        while not done.is_set():
            kib = _rss_kib(proc.pid)
            if kib is not None:
                samples.append((time.perf_counter() - start, kib))
            if len(samples) % 50 == 1:
                loads.append(os.getloadavg()[0])
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
        print(f"[{lines[-1][0]:7.1f} s] {lines[-1][1]}", flush=True)
    proc.wait()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    peak = next((int(text.split()[1]) for _, text in lines if text.startswith("VmHWM ")), None)
    return {"returncode": proc.returncode, "wall": wall, "lines": lines, "samples": samples, "peak_kib": peak,
            "load": (min(loads), max(loads)) if loads else None}


def stages(lines, samples) -> list[dict]:
    """Per stretch between two output lines: the line that ends it and the largest RSS sampled in it."""
    out, begin = [], 0.0
    for t, text in lines:
        if text.startswith("VmHWM "):
            continue
        inside = [kib for s, kib in samples if begin <= s <= t]
        if inside:  # lines printed together (the closing summary) make no stage of their own
            out.append({"until": text[:90], "start_s": round(begin, 1), "end_s": round(t, 1),
                        "max_rss_mib": round(max(inside) / 1024)})
        begin = t
    return out


def main():
    from benchmarks.imagenet import BUILDERS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", choices=list(BUILDERS))
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--calibrate-args", default="", help="more options for calibrate, e.g. '--weight-method mse'")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bwacal_scale"))
    ap.add_argument("--json", type=Path, help="write the figures, the stages and calibrate's output here")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_path = args.workdir / f"{args.model}.onnx"
    data_path = args.workdir / f"{args.model}.calib{args.images}.h5"
    out_path = args.workdir / f"{args.model}.q.onnx"
    t0 = time.perf_counter()
    if not model_path.exists() or not data_path.exists():
        torch_model = build_model(model_path, args.model)
        build_data(data_path, torch_model, args.images)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s: {model_path}, {data_path} "
          f"({data_path.stat().st_size / 1e6:.0f} MB)", flush=True)

    options = ["calibrate", str(model_path), "--calib", str(data_path), "--bits", str(args.bits),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "-o", str(out_path), "--force",
               *shlex.split(args.calibrate_args)]
    threads = os.environ.get("NUMBA_NUM_THREADS", str(os.cpu_count()))
    print("bwacal " + " ".join(options), flush=True)
    run = run_sampled([sys.executable, "-c", CHILD, *options])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    peak_mib = run["peak_kib"] / 1024 if run["peak_kib"] else float("nan")
    table = stages(run["lines"], run["samples"])
    print()
    print("| until the line | from | to | largest RSS sampled |")
    print("|---|---:|---:|---:|")
    for st in table:
        print(f"| {st['until']} | {st['start_s']} s | {st['end_s']} s | {st['max_rss_mib']} MiB |")
    load = os.getloadavg()
    low, high = run["load"] or (load[0], load[0])
    print(f"exit {run['returncode']}; wall {run['wall']:.0f} s; CPU {cpu:.0f} s; peak RSS (VmHWM) {peak_mib:.0f} MiB; "
          f"1-minute load {low:.1f}-{high:.1f} during the run, {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end",
          flush=True)
    if args.json:
        result = {
            "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
            "calibrate": "bwacal " + " ".join(options),
            "model": args.model, "images": args.images, "epochs": args.epochs, "batch_size": args.batch_size,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "threads": threads, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_average_end": load, "load_1min_during": [low, high], "returncode": run["returncode"],
            "peak_rss_mib": round(peak_mib), "wall_s": round(run["wall"], 1), "cpu_s": round(cpu, 1),
            "stages": table, "output": [text for _, text in run["lines"]],
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(run["returncode"])


if __name__ == "__main__":
    main()
