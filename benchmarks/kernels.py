"""Throughput of the numba kernels in bwacal.kernels.quant against their vectorised NumPy twins.

    python benchmarks/kernels.py [--threads 1 2] [--bits 2 3 4] [--append benchmarks/RESULTS.md]

Sizes: a 512x4608 weight (a 3x3 conv with 512 input and output channels). Each row gives the best of
several runs, the speed-up over NumPy, and the kernel's traffic (bytes read + written) per second
beside ``np.copyto`` moving the same traffic.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bwacal.kernels import quant  # noqa: E402

C, KDIM = 512, 4608
SEARCH_STEPS = 16  # candidate steps per channel in the step-search benchmark


def best_time(fn, min_runs=5, min_seconds=0.3):
    fn()  # warm up (and compile)
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def numpy_decompose(codes, bits):
    return (codes[None] >> np.arange(bits, dtype=np.uint8)[:, None, None]) & 1


def numpy_compose(planes, alpha, gamma, step):
    return ((np.einsum("ck,kcj->cj", alpha, planes) + gamma[:, None]) * step[:, None]).astype(np.float32)


def numpy_grads(planes, grad_w, step):
    # faster than einsum('cj,kcj->ck') here; products with 0/1 are exact, sums in float64
    grad_alpha = np.stack([(grad_w * planes[k]).sum(axis=1, dtype=np.float64) for k in range(len(planes))], 1)
    return grad_alpha * step[:, None], grad_w.sum(axis=1, dtype=np.float64) * step


def numpy_errors(x, steps, qmin, qmax):
    x = x.astype(np.float64)
    out = np.empty(steps.shape)
    for r in range(steps.shape[1]):
        s = steps[:, r : r + 1]
        out[:, r] = np.sum((x - s * np.clip(np.round(x / s), qmin, qmax)) ** 2, axis=1)
    return out


def cases(bits, rng):
    codes = rng.integers(0, 2**bits, size=(C, KDIM)).astype(np.uint8)
    planes = quant.decompose_bitplanes(codes, bits)
    packed = quant.pack_bitplanes(planes)
    alpha = rng.normal(size=(C, bits)) * 2.0 ** np.arange(bits)
    gamma = rng.normal(size=C)
    step = rng.uniform(0.01, 0.1, size=C)
    grad_w = rng.normal(size=(C, KDIM)).astype(np.float32)
    w = rng.normal(size=(C, KDIM)).astype(np.float32)
    steps = np.outer(np.abs(w).max(axis=1) / 2 ** (bits - 1), np.linspace(0.3, 1.0, SEARCH_STEPS))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    n = C * KDIM
    # name, numba call, numpy call, bytes read + written, output comparison
    return [
        ("decompose_bitplanes", lambda: quant.decompose_bitplanes(codes, bits), lambda: numpy_decompose(codes, bits),
         n + bits * n, "equal"),
        ("compose_bitplanes", lambda: quant.compose_bitplanes(planes, alpha, gamma, step),
         lambda: numpy_compose(planes, alpha, gamma, step), bits * n + 4 * n, "close"),
        ("bit_weight_grads", lambda: quant.bit_weight_grads(planes, grad_w, step), lambda: numpy_grads(planes, grad_w, step),
         bits * n + 4 * n, "close"),
        ("pack_bitplanes", lambda: quant.pack_bitplanes(planes),
         lambda: np.packbits(planes, axis=-1, bitorder="little"), bits * n + bits * n // 8, "equal"),
        ("unpack_bitplanes", lambda: quant.unpack_bitplanes(packed, bits, C, KDIM),
         lambda: np.unpackbits(packed, axis=-1, count=KDIM, bitorder="little"), bits * n // 8 + bits * n, "equal"),
        (f"quantization_errors ({SEARCH_STEPS} steps)", lambda: quant.quantization_errors(w, steps, qmin, qmax),
         lambda: numpy_errors(w, steps, qmin, qmax), SEARCH_STEPS * 4 * n, "close"),
    ]


def same(a, b, how):
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    if how == "equal":
        return all(np.array_equal(x, y) for x, y in zip(a, b))
    return all(np.allclose(x, y, rtol=1e-9, atol=1e-9) for x, y in zip(a, b))


def run(bits_list, threads_list):
    rng = np.random.default_rng(0)
    rows = []
    for bits in bits_list:
        for name, fast, slow, traffic, how in cases(bits, rng):
            if not same(fast(), slow(), how):
                raise SystemExit(f"{name} at {bits} bits disagrees with its NumPy twin")
            t_numpy = best_time(slow)
            src = np.ones(traffic // 2, dtype=np.uint8)
            dst = np.empty_like(src)
            t_copy = best_time(lambda: np.copyto(dst, src))
            for threads in threads_list:
                numba.set_num_threads(threads)
                t_numba = best_time(fast)
                rows.append((name, bits, threads, t_numba, t_numpy, traffic, t_copy))
    return rows


def table(rows):
    lines = [
        "| kernel | bits | threads | numba ms | NumPy ms | speed-up | numba GB/s | np.copyto GB/s (same traffic) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, bits, threads, t_numba, t_numpy, traffic, t_copy in rows:
        lines.append(
            f"| {name} | {bits} | {threads} | {t_numba * 1e3:.3f} | {t_numpy * 1e3:.3f} | {t_numpy / t_numba:.1f}x"
            f" | {traffic / t_numba / 1e9:.1f} | {traffic / t_copy / 1e9:.1f} |"
        )
    return "\n".join(lines)


def machine():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, numba.config.NUMBA_NUM_THREADS])
    ap.add_argument("--append", type=Path, help="append a '## Kernels' section with the table to this file")
    args = ap.parse_args()
    threads = sorted({t for t in args.threads if 1 <= t <= numba.config.NUMBA_NUM_THREADS})
    load_before = os.getloadavg()
    rows = run(args.bits, threads)
    load_after = os.getloadavg()
    md = table(rows)
    print(md)
    if args.append:
        cmd = "python benchmarks/kernels.py " + " ".join(sys.argv[1:])
        section = "\n".join([
            "## Kernels",
            "",
            f"`NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} {cmd}`",
            "",
            f"- machine: {machine()}, {os.cpu_count()} CPUs, NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}"
            f" (threading layer {numba.threading_layer()}); numba {numba.__version__}, NumPy {np.__version__}",
            f"- date: {datetime.date.today().isoformat()}; 1-minute load average {load_before[0]:.1f} before,"
            f" {load_after[0]:.1f} after (the cores are shared)",
            f"- sizes: a {C}x{KDIM} weight; times are the best of at least 5 runs; traffic = bytes read + written",
            "",
            md,
            "",
        ])
        text = args.append.read_text() if args.append.exists() else "# Benchmark results\n"
        args.append.write_text(text.rstrip("\n") + "\n\n" + section)


if __name__ == "__main__":
    main()
