"""A narrow calibration set: does the held-out split see the overfitting?

Builds a calibration file from a few Fashion-MNIST training images (each expanded into augmented
shifts/flips/contrast changes, ``sources`` = the source image), calibrates with bwacal's current
pipeline (``bwacal.calibrate.calibrate``) once with its random held-out split and once with
``bwacal.split.holdout_split(mode="source")`` patched in (here, not in the library), and reports
per epoch the training loss, the held-out loss of the split, and the KL divergence to the FP
model and the top-1 agreement with it on data/fmnist_val.h5 (2,000 other images). A run on the
1,024-image data/fmnist_calib.h5 gives the reference ratios for ``bwacal.split.divergence_note``.

    python -m benchmarks.narrow_set [--model resnet20] [--bits 2] [--sources 8] [--per-source 64]
                                    [--epochs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import bwacal.fit as fit_module
from bwacal.calibrate import CalibrationOptions, calibrate
from bwacal.data import open_dataset, write_dataset
from bwacal.fit import classification_loss, log_softmax
from bwacal.makecalib import read_idx_pair
from bwacal.model import load_model
from bwacal.split import divergence_note, holdout_split

ROOT = Path(__file__).resolve().parents[1]
IDX = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530


def augment(image, count, rng):
    """``count`` uint8 variants of one (28, 28) image: shifts of up to 4 pixels, horizontal flips,
    contrast 0.7-1.3, additive noise (sigma 6)."""
    h, w = image.shape
    padded = np.zeros((h + 8, w + 8), np.float64)
    padded[4:4 + h, 4:4 + w] = image
    out = np.empty((count, 1, h, w), np.uint8)
    for i in range(count):
        dy, dx = rng.integers(0, 9, size=2)
        crop = padded[dy:dy + h, dx:dx + w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = crop * rng.uniform(0.7, 1.3) + rng.normal(0, 6, crop.shape)
        out[i, 0] = np.clip(np.round(crop), 0, 255).astype(np.uint8)
    return out


def narrow_file(path, sources, per_source, seed):
    images, labels = read_idx_pair(IDX / "train-images-idx3-ubyte.gz", IDX / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    # one image of each of `sources` different classes (5,000+ images further into the file than
    # data/fmnist_calib.h5's choice needs is irrelevant: any training images do)
    classes = rng.permutation(10)[:sources]
    picks = [int(rng.choice(np.flatnonzero(labels == c))) for c in classes]
    x = np.concatenate([augment(images[p, 0], per_source, rng) for p in picks])
    y = np.repeat(labels[picks], per_source)
    src = np.repeat(np.arange(sources), per_source)
    write_dataset(path, x, y, mean=[MEAN], std=[STD], sources=src)
    return picks


class _SplitRNG(np.random.Generator):
    """The split generator of calibrate: its first permutation puts ``held`` first."""

    def __init__(self, seed, held, train):
        super().__init__(np.random.PCG64(seed))
        self.order = np.concatenate([held, train])
        self.used = False

    def permutation(self, x, *args, **kwargs):
        if not self.used and np.ndim(x) == 0 and int(x) == len(self.order):
            self.used = True
            return self.order.copy()
        return super().permutation(x, *args, **kwargs)


@contextmanager
def split_by_source(data_path, holdout, seed):
    """Make calibrate's held-out split the by-source one (the first generator it draws is the split's)."""
    with open_dataset(data_path) as ds:
        train, held = holdout_split(ds.n, holdout, seed, ds.sources, mode="source")
    real = np.random.default_rng
    state = {"first": True}

    def default_rng(s=None):
        if state["first"]:
            state["first"] = False
            return _SplitRNG(s, held, train)
        return real(s)

    np.random.default_rng = default_rng
    try:
        yield train, held
    finally:
        np.random.default_rng = real


@contextmanager
def per_epoch_validation(model, x_val, fp_logp, fp_pred, rows):
    """Record, each time fitting scores the held-out split, the same parameters on the validation set."""
    real = fit_module.evaluate_loss

    def evaluate_loss(net, params, batches, mode):
        result = real(net, params, batches, mode)
        logits = np.concatenate([net.forward(x_val[i:i + 500], params) for i in range(0, len(x_val), 500)])
        kl, _ = classification_loss(logits, None, fp_logp, "kl")
        rows.append({"split_loss": result[0], "val_kl": kl, "val_agreement": float((logits.argmax(1) == fp_pred).mean())})
        return result

    fit_module.evaluate_loss = evaluate_loss
    try:
        yield
    finally:
        fit_module.evaluate_loss = real


def run(model_path, data_path, options, split, x_val, y_val, fp_logp, fp_pred):
    model = load_model(model_path)
    val_rows = []
    started = time.perf_counter()
    with per_epoch_validation(model, x_val, fp_logp, fp_pred, val_rows):
        if split == "source":
            with split_by_source(data_path, options.holdout, options.seed):
                cal = calibrate(model_path, data_path, options)
        else:
            cal = calibrate(model_path, data_path, options)
    seconds = time.perf_counter() - started
    history = cal.report["history"]
    # calibrate's start choice scores both uniform grids first; the last len(history) calls are the fit's
    epochs = val_rows[-len(history):]
    for h, v in zip(history, epochs):
        h.update(v)
    params = cal.net.params()
    logits = np.concatenate([cal.net.forward(x_val[i:i + 500], params) for i in range(0, len(x_val), 500)])
    return {
        "split": split, "best_epoch": cal.report["best_epoch"], "history": history,
        "note": divergence_note(history), "seconds": seconds, "start": cal.report["start"],
        "fit_images": cal.report["fit_images"], "heldout_images": cal.report["heldout_images"],
        "final_val_agreement": float((logits.argmax(1) == fp_pred).mean()),
        "final_val_top1": float((logits.argmax(1) == y_val).mean()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--per-source", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=CalibrationOptions.epochs)
    ap.add_argument("--lr", type=float, default=CalibrationOptions.lr)
    ap.add_argument("--holdout", type=float, default=0.25)
    ap.add_argument("--reference", action="store_true", help="also calibrate on data/fmnist_calib.h5")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    model_path = ROOT / "data/zoo" / f"{args.model}.onnx"
    model = load_model(model_path)
    with open_dataset(ROOT / "data/fmnist_val.h5") as val:
        x_val, y_val = val.read(np.arange(val.n))
    fp_logits = np.concatenate([model.forward(x_val[i:i + 500]) for i in range(0, len(x_val), 500)])
    fp_logp, fp_pred = log_softmax(fp_logits), fp_logits.argmax(1)
    options = CalibrationOptions(bits=args.bits, epochs=args.epochs, lr=args.lr, holdout=args.holdout)
    results = []
    with tempfile.TemporaryDirectory() as d:
        narrow = Path(d) / "narrow.h5"
        picks = narrow_file(narrow, args.sources, args.per_source, seed=0)
        print(f"narrow set: {args.sources} source images (train indices {picks}) x {args.per_source} variants",
              flush=True)
        cases = [("narrow", narrow, "random"), ("narrow", narrow, "source")]
        if args.reference:
            cases.append(("fmnist_calib", ROOT / "data/fmnist_calib.h5", "random"))
        for name, path, split in cases:
            r = run(model_path, path, options, split, x_val, y_val, fp_logp, fp_pred)
            r.update(data=name, model=args.model, bits=args.bits)
            results.append(r)
            print(f"{name} / {split} split: best epoch {r['best_epoch']}, {r['seconds']:.1f} s, note: {r['note']}",
                  flush=True)
            for h in r["history"]:
                ratio = h["heldout_loss"] / h["train_loss"] if h["train_loss"] else float("nan")
                print(f"  epoch {h['epoch']}: train {h['train_loss'] if h['train_loss'] is not None else float('nan'):.4f}"
                      f"  held-out {h['heldout_loss']:.4f} (x{ratio:.2f})  val KL {h['val_kl']:.4f}"
                      f"  val agreement {100 * h['val_agreement']:.2f}%", flush=True)
            print(f"  kept: val agreement {100 * r['final_val_agreement']:.2f}%, top-1 {100 * r['final_val_top1']:.2f}%",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
