"""Peak memory and wall time of ``bwacal calibrate`` on a 224x224 classifier (random weights).

    python benchmarks/scale.py [--model resnet18|resnet50|efficientnet_b0] [--images 1024] [--epochs 1]
                               [--batch-size 64] [--workdir /tmp/bwacal_scale] [--append benchmarks/RESULTS.md]

Builds the model (``tests/torch_models.resnet18``, or the full-size ResNet-50 / EfficientNet-B0
layouts of ``tests/corpus_models``, 1000 classes, exported with its BatchNormalization) and a
random uint8 calibration file of N x 3 x 224 x 224 written in chunks of 64 images, labelled with the
FP model's own predictions (torch, also in chunks). Then runs ``python -m cli.main calibrate`` as a
subprocess and reports its peak RSS (``ru_maxrss`` of the child) and wall time. The calibration
images (N x 3 x 224 x 224 float32 = 616 MB for N = 1024) exceed ``calibrate.IN_MEMORY_LIMIT``, so
they are streamed from the file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 64


def build_model(path: Path, name: str = "resnet18"):
    import torch

    from tests import corpus_models as cm
    from tests.torch_models import export, resnet18

    if name == "resnet18":
        torch_model = resnet18(in_ch=3, classes=1000, seed=0).eval()
    elif name == "resnet50":
        torch.manual_seed(0)
        torch_model = cm._finish(cm.ResNet((3, 4, 6, 3), (64, 128, 256, 512), stem=64, classes=1000), 0)
    elif name == "efficientnet_b0":
        torch.manual_seed(0)
        torch_model = cm._finish(cm.EfficientNet(width_mult=1.0, depths=(1, 2, 2, 3, 3, 4, 1), classes=1000), 0)
    else:
        raise SystemExit(f"unknown model {name!r}")
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "efficientnet_b0"])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bwacal_scale"))
    ap.add_argument("--append", type=Path, help="append a '## Scale' section to this RESULTS.md")
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

    cmd = [sys.executable, "-m", "cli.main", "calibrate", str(model_path), "--calib", str(data_path),
           "--bits", str(args.bits), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "-o", str(out_path), "--force"]
    threads = os.environ.get("NUMBA_NUM_THREADS", str(os.cpu_count()))
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mb = usage.ru_maxrss / 1024  # Linux: KiB
    cpu = usage.ru_utime + usage.ru_stime
    print(proc.stdout)
    print(f"exit {proc.returncode}; wall {wall:.0f} s; CPU {cpu:.0f} s; peak RSS {peak_mb:.0f} MB", flush=True)

    if args.append and proc.returncode == 0:
        load = os.getloadavg()[0]
        lines = [
            "", "## Scale", "",
            f"`python benchmarks/scale.py --images {args.images} --epochs {args.epochs} "
            f"--batch-size {args.batch_size} --bits {args.bits} --append benchmarks/RESULTS.md`", "",
            f"- what: `{' '.join(['bwacal'] + cmd[3:])}` on a {args.model} (3x224x224, 1000 classes, random "
            f"weights, BatchNormalization kept in the file), {args.images} random uint8 images labelled with "
            f"the FP model's predictions; --epochs {args.epochs}",
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"threads {threads}; Python {platform.python_version()}; 1-minute load average {load:.1f} at the end",
            f"- date: {datetime.date.today().isoformat()}",
            f"- peak RSS (ru_maxrss of the calibrate process): {peak_mb:.0f} MB; wall time: {wall:.0f} s; "
            f"CPU time {cpu:.0f} s",
            "", "```", *[ln for ln in proc.stdout.splitlines() if ln.strip()][-8:], "```",
        ]
        with open(args.append, "a") as f:
            f.write("\n".join(lines) + "\n")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
