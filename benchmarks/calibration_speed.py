"""Wall time and peak memory of one `bwacal calibrate` run with default settings.

Runs the CLI in a fresh subprocess (so numba compilation from the on-disk cache and imports are
included, as a user would see them) and reports its wall time and peak RSS.

    python -m benchmarks.calibration_speed [--model data/zoo/resnet20.onnx] [--bits 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "data/zoo/resnet20.onnx"))
    ap.add_argument("--calib", default=str(ROOT / "data/fmnist_calib.h5"))
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more calibrate options, after --")
    args = ap.parse_args()
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):  # BLAS: bwacal's default, one thread
        env[var] = str(args.threads)
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "cli.main", "calibrate", args.model, "--calib", args.calib,
               "--bits", str(args.bits), "-o", str(Path(d) / "out.onnx"), "-q", *args.extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    load = os.getloadavg()[0]
    print(f"bwacal calibrate {Path(args.model).name} --bits {args.bits} {' '.join(args.extra)}: "
          f"{wall:.1f} s wall, peak RSS {peak:.0f} MiB, threads {args.threads}, "
          f"load average at the end {load:.1f}, {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
