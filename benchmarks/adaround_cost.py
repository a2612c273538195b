"""Seconds per AdaRound iteration of the moments solver on one layer's shape, in each precision and
BLAS thread count, taking turns in the same run (``bwacal.quant.rounding.learn_rounding`` on
random moments of the shape; the work does not depend on the values).

    python -m benchmarks.adaround_cost [--shapes 512x4608,256x2304,64x576] [--iterations 20]
    python -m benchmarks.adaround_cost --model resnet50 [--iterations 5]   # every layer, the default only

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


def _seconds(c, k, iterations, product, threads, groups=1) -> float:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(groups, 2 * k, k)).astype(np.float32)
    gram = (np.matmul(x.transpose(0, 2, 1), x) / (2 * k)).astype(np.float64)
    lo = rng.normal(size=(groups, c // groups, k))
    span = np.full_like(lo, 0.1)
    pull = np.matmul(lo, gram)
    v = rng.normal(size=lo.shape)
    learn_rounding(v.copy(), lo, span, gram, pull, 2, 1e-3, 0.01, product=product, threads=threads)  # warm-up
    started = time.perf_counter()
    learn_rounding(v, lo, span, gram, pull, iterations, 1e-3, 0.01, product=product, threads=threads)
    return (time.perf_counter() - started) / iterations


def _model_layers(name):
    """(name, C, K, groups) of every Conv2d and Linear of a benchmarks/imagenet.py model."""
    import torch

    from benchmarks.imagenet import BUILDERS

    out = []
    for mod_name, mod in BUILDERS[name]().named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            groups = getattr(mod, "groups", 1)
            out.append((mod_name, mod.weight.shape[0], mod.weight[0].numel(), groups))
    return out


def _whole_model(name, iterations):
    """The default's seconds per iteration of every layer, summed, and per 1,000 iterations."""
    total, rows = 0.0, {}
    for _, c, k, groups in _model_layers(name):
        key = (c, k, groups)
        if key not in rows:
            rows[key] = [_seconds(c, k, iterations, np.float32, None, groups), 0]
        rows[key][1] += 1
        total += rows[key][0]
    print("| C x K (groups) | layers | s/iteration | s per 1,000 iterations, all such layers |")
    print("|---|---:|---:|---:|")
    for (c, k, groups), (sec, n) in sorted(rows.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
        print(f"| {c} x {k} ({groups}) | {n} | {sec:.4f} | {sec * n * 1000:.0f} |")
    print(f"\n{name}: {total:.3f} s per iteration of every layer; 1,000 iterations {total * 1000 / 60:.1f} min, "
          f"4,000 {total * 4000 / 3600:.2f} h, 10,000 {total * 10000 / 3600:.2f} h")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="512x4608,256x2304,64x576")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--model", default=None, help="time every layer of a benchmarks/imagenet.py model instead")
    args = ap.parse_args()
    cores = numba.get_num_threads()
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    print(f"{platform.processor() or platform.machine()}, numba threads {cores}, load {' '.join(load)}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.model:
        _whole_model(args.model, args.iterations)
        return
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
