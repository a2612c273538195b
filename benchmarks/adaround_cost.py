"""Seconds per AdaRound iteration of the moments solver on one layer's shape, in each precision and
BLAS thread count, taking turns in the same run (``bwacal.quant.rounding.learn_rounding`` on
random moments of the shape; the work does not depend on the values).

    python -m benchmarks.adaround_cost [--shapes 512x4608,256x2304,64x576] [--iterations 20]

The default takes every core where one product is at least rounding.PARALLEL_MACS multiply-adds.
A shape CxK is C output channels of K-long input rows: a 3x3 conv of 512 input channels has
K = 4608 (the last stage of a ResNet-50 at 224x224), one of 64 channels K = 576.
"""

from __future__ import annotations

import argparse
import platform
import time

import numba
import numpy as np

from bwacal.quant.rounding import learn_rounding


def _seconds(c, k, iterations, product, threads) -> float:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2 * k, k)).astype(np.float32)
    gram = (np.matmul(x.transpose(0, 2, 1), x) / (2 * k)).astype(np.float64)
    lo = rng.normal(size=(1, c, k))
    span = np.full_like(lo, 0.1)
    pull = np.matmul(lo, gram)
    v = rng.normal(size=lo.shape)
    learn_rounding(v.copy(), lo, span, gram, pull, 2, 1e-3, 0.01, product=product, threads=threads)  # warm-up
    started = time.perf_counter()
    learn_rounding(v, lo, span, gram, pull, iterations, 1e-3, 0.01, product=product, threads=threads)
    return (time.perf_counter() - started) / iterations


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="512x4608,256x2304,64x576")
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args()
    cores = numba.get_num_threads()
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    print(f"{platform.processor() or platform.machine()}, numba threads {cores}, load {' '.join(load)}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| C x K | float64, 1 BLAS thread (s/iter) | float32, 1 thread | float32, "
          f"{cores} threads | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        c, k = (int(n) for n in shape.split("x"))
        old = _seconds(c, k, args.iterations, np.float64, 1)
        f32 = _seconds(c, k, args.iterations, np.float32, 1)
        new = _seconds(c, k, args.iterations, np.float32, cores)
        print(f"| {c} x {k} | {old:.4f} | {f32:.4f} | {new:.4f} | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
