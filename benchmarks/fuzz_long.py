"""The long fuzz run: many mutated ONNX and HDF5 files through the targets of ``tests/reliability/fuzz.py``.

    python benchmarks/fuzz_long.py [--onnx 5000] [--hdf5 5000] [--inspect 0] [--seed 0]

Unlike the short run in the test suite, a failure does not stop the run: every exception other than
``BwacalError`` is counted by (type, file, line) and one example message is kept, so one run lists
every distinct crash. Exit status 1 if any was found.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests.reliability import fuzz  # noqa: E402


def run(name, strategy, target, cases, rng_seed):
    outcomes = collections.Counter()
    crashes = collections.Counter()
    examples = {}
    if cases <= 0:
        return 0, outcomes, crashes, 0.0

    @seed(rng_seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def body(case):
        try:
            outcomes[target(case)] += 1
        except Exception as exc:  # anything but BwacalError is a crash to fix
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            key = (type(exc).__name__, Path(frame.filename).name, frame.lineno)
            crashes[key] += 1
            examples.setdefault(key, str(exc)[:200])
            outcomes["crash"] += 1

    start = time.perf_counter()
    body()
    seconds = time.perf_counter() - start
    total = sum(outcomes.values())
    print(f"{name}: {total} cases in {seconds:.0f} s: {dict(outcomes)}", flush=True)
    for key, count in crashes.most_common():
        print(f"  {count} x {key[0]} at {key[1]}:{key[2]}: {examples[key]}", flush=True)
    return total, outcomes, crashes, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=int, default=5000, help="ONNX cases")
    ap.add_argument("--hdf5", type=int, default=5000, help="HDF5 cases")
    ap.add_argument("--inspect", type=int, default=0, help="ONNX cases through `bwacal inspect` (exit 0 or 2)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (same seed, same cases)")
    args = ap.parse_args()
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; seed {args.seed}", flush=True)
    results = [run("onnx", fuzz.onnx_cases(), fuzz.onnx_target, args.onnx, args.seed),
               run("hdf5", fuzz.hdf5_with_model(), fuzz.run_hdf5, args.hdf5, args.seed),
               run("inspect", fuzz.onnx_cases(), fuzz.inspect_target, args.inspect, args.seed)]
    total = sum(r[0] for r in results)
    crashes = sum(sum(r[2].values()) for r in results)
    print(f"total {total} cases, {crashes} crashes, {sum(r[3] for r in results):.0f} s", flush=True)
    sys.exit(1 if crashes else 0)


if __name__ == "__main__":
    main()
