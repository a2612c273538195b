"""Engine throughput: bwacal forward vs ONNX Runtime, bwacal forward+backward vs PyTorch.

Same model, batch and thread count in one run, the four timings taking turns in each round; prints
a Markdown table of images/s (best round) and ratios.
Forward+backward computes dL/dx and dL/dW for every Conv/Gemm/MatMul weight for L = sum(r * logits),
on the BatchNorm-folded graph in bwacal (what calibration runs) and with eval-mode BN in PyTorch.

    python -m benchmarks.engine [--threads 2] [--repeat 5] [--models resnet20,resnet18,mobilenetv2]
    python -m benchmarks.engine --models resnet50,efficientnet_b0,convnext_tiny,vit_b_16 --memory ''
    python -m benchmarks.engine --memory resnet18   # peak RSS of one bwacal forward+backward (subprocess)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _torch_model(name: str):
    from tests import torch_models

    if name == "resnet20":
        return torch_models.resnet_cifar(depth=20, in_ch=3, width=16, classes=10)
    if name == "mobilenetv2":
        return torch_models.mobilenetv2_small(in_ch=3, classes=10, width_mult=1.0)
    from benchmarks.imagenet import BUILDERS

    return BUILDERS[name]()


MODELS = {
    # name: (input shape, batch); the 224x224 models are benchmarks/imagenet.py's full-size layouts
    "resnet20": ((3, 32, 32), 128),
    "resnet18": ((3, 224, 224), 8),
    "mobilenetv2": ((3, 32, 32), 128),
    "resnet50": ((3, 224, 224), 8),
    "efficientnet_b0": ((3, 224, 224), 8),
    "convnext_tiny": ((3, 224, 224), 8),
    "vit_b_16": ((3, 224, 224), 8),
}
DEFAULT_MODELS = ("resnet20", "resnet18", "mobilenetv2")


def _set_threads(n: int):
    # OPENBLAS_NUM_THREADS is left unset: bwacal runs NumPy's BLAS on one thread by default (see
    # bwacal/runtime.py), and setting it would switch that off. bwacal's kernels are numba's.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)


def _export(name: str, workdir: Path) -> Path:
    import torch

    from tests import torch_models

    shape, _ = MODELS[name]
    model = _torch_model(name).eval()
    path = workdir / f"{name}.onnx"
    torch_models.export(model, path, torch.randn(2, *shape))
    return path, model


# seconds between timed calls: ONNX Runtime's, PyTorch's and numba's worker threads spin for a while
# after a parallel region, taking cores from whatever runs next
PAUSE = 0.3


def _best(fns: dict, repeat: int) -> dict:
    """Best time of each function over ``repeat`` rounds, the functions taking turns within a round,
    so that a slower or faster spell of the machine falls on all of them rather than on whichever
    ran then (one warm-up call each first: JIT compilation, allocator)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            time.sleep(PAUSE)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def bench(name: str, threads: int, repeat: int, workdir: Path) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    import bwacal
    from bwacal.quantize import select_layers

    torch.set_num_threads(threads)
    path, tmodel = _export(name, workdir)
    shape, batch = MODELS[name]
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    model = bwacal.load_model(path)
    weights = [layer.weight for layer in select_layers(model.graph, 8)]  # every Conv/Gemm/MatMul weight
    r = np.random.default_rng(1).standard_normal((batch, model.num_classes)).astype(np.float32)

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name

    def bw_fwd():
        model.forward(x)

    def ort_fwd():
        sess.run(None, {iname: x})

    def bw_fwd_bwd():
        logits, tape = model.forward(x, record=True, wrt=weights + [model.input_name])
        model.backward(tape, r, wrt=weights + [model.input_name])

    xt = torch.from_numpy(x)
    rt = torch.from_numpy(r)

    def torch_fwd_bwd():
        xi = xt.clone().requires_grad_(True)
        tmodel.zero_grad(set_to_none=True)
        (tmodel(xi) * rt).sum().backward()

    t = _best({"bwacal_fwd": bw_fwd, "ort_fwd": ort_fwd, "bwacal_fwdbwd": bw_fwd_bwd, "torch_fwdbwd": torch_fwd_bwd},
              repeat)
    return {"model": name, "shape": "x".join(map(str, shape)), "batch": batch,
            **{k: batch / v for k, v in t.items()}}


def peak_memory(name: str, threads: int, workdir: Path) -> tuple[float, float]:
    """Peak RSS (MiB) of a fresh process (no torch in it) loading the model, then doing two bwacal
    forward+backward passes; returns (after loading, peak). Read from /proc/self/status (VmHWM):
    ``ru_maxrss`` carries the parent's peak across fork and exec, so in this benchmark's child it
    reported the parent's (torch, ONNX Runtime and three models loaded) instead."""
    path, _ = _export(name, workdir)
    code = f"""
import sys, numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from benchmarks.engine import MODELS
import bwacal
def hwm():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024
path = {str(path)!r}
shape, batch = MODELS[{name!r}]
model = bwacal.load_model(path)
x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
from bwacal.quantize import select_layers
w = [layer.weight for layer in select_layers(model.graph, 8)] + [model.input_name]
base = hwm()
for _ in range(2):
    logits, tape = model.forward(x, record=True, wrt=w)
    g = model.backward(tape, np.ones_like(logits), wrt=w)
    del tape, g
print(base, hwm())
"""
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    base, peak = (float(v) for v in out.stdout.split()[-2:])
    return base, peak


def _rate(images_per_second: float) -> str:
    """Three significant figures (a ViT-B/16 runs at a few images per second, ResNet-20 at thousands)."""
    return f"{images_per_second:.0f}" if images_per_second >= 100 else f"{images_per_second:.3g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"of {', '.join(MODELS)}")
    ap.add_argument("--memory", default="resnet18", help="model for the peak-memory run ('' to skip)")
    args = ap.parse_args()
    _set_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            rows.append(bench(name, args.threads, args.repeat, Path(d)))
            print(rows[-1], file=sys.stderr)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    import numba

    from bwacal.runtime import openblas_threads

    print(f"machine: {cpu}, {os.cpu_count()} cores; threads: {args.threads} (numba layer "
          f"{numba.threading_layer()}, NumPy BLAS threads "
          f"{[n for p, n in openblas_threads().items() if 'numpy' in p]}); repeat: best of {args.repeat} "
          f"interleaved rounds; "
          f"date: {time.strftime('%Y-%m-%d')}")
    print()
    print("| model | input | batch | bwacal fwd img/s | ORT fwd img/s | fwd ratio | bwacal fwd+bwd img/s | "
          "PyTorch fwd+bwd img/s | fwd+bwd ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['shape']} | {r['batch']} | {_rate(r['bwacal_fwd'])} | {_rate(r['ort_fwd'])} | "
              f"{r['bwacal_fwd'] / r['ort_fwd']:.2f}x | {_rate(r['bwacal_fwdbwd'])} | {_rate(r['torch_fwdbwd'])} | "
              f"{r['bwacal_fwdbwd'] / r['torch_fwdbwd']:.2f}x |")
    if args.memory:
        with tempfile.TemporaryDirectory() as d:
            base, peak = peak_memory(args.memory, args.threads, Path(d))
        print()
        print(f"peak RSS of bwacal forward+backward, {args.memory} batch {MODELS[args.memory][1]}: "
              f"{peak:.0f} MiB (process after loading the model: {base:.0f} MiB)")


if __name__ == "__main__":
    main()
