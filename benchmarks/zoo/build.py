"""Train the Fashion-MNIST model zoo, export it to ONNX and write a JSON card per model.

    python -m benchmarks.zoo.build --out data/zoo

trains every model in ``RECIPES`` on the 60,000 training images (seeded), exports
``<out>/<name>.onnx`` (opset 17, input ``input`` (batch, 1, 28, 28), output ``logits``
(batch, 10), BatchNorm kept, dynamic batch) and writes ``<out>/<name>.json``: the architecture,
parameter count, the recipe, training time and the top-1 accuracy that ONNX Runtime measures on the
exported file, on the full 10,000-image test split and on ``data/fmnist_val.h5``.

``--cards-only`` re-measures existing ONNX files and rewrites their cards, keeping the training
fields. Needs the ``zoo`` extra (torch, onnxruntime, onnxscript); ``bwacal`` itself never imports torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bwacal.makecalib import read_idx

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
OPSET = 17
VAL_FILE = Path("data/fmnist_val.h5")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass(frozen=True)
class Recipe:
    """How one model is trained: SGD with Nesterov momentum under a OneCycle learning rate."""

    epochs: int
    batch_size: int = 128
    max_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    pad_crop: int = 2  # random crop of the image zero-padded by this many pixels
    hflip: bool = True
    seed: int = 0


RECIPES = {
    "resnet20": Recipe(epochs=4),
    "mobilenetv2": Recipe(epochs=4, weight_decay=4e-5),
    "vgg_small": Recipe(epochs=3, max_lr=0.05),
}

ARCH_TEXT = {
    "resnet20": "ResNet-20 (CIFAR-style): 3x3 conv stem (16), three stages of 3 BasicBlocks at 16/32/64 "
    "channels (stride 2 at the start of stages 2 and 3, strided 1x1 Conv-BN shortcut), residual Adds, "
    "global average pool, Linear(64, 10)",
    "mobilenetv2": "MobileNetV2-style: 3x3 conv stem (16), inverted residual blocks (t, c, n, s) = "
    "(1,16,1,1) (4,24,2,2) (4,32,3,2) (4,64,2,1) with 1x1 expansion, depthwise 3x3, linear 1x1 projection, "
    "ReLU6, residual Adds where shapes match; 1x1 conv to 256, global average pool, Linear(256, 10)",
    "vgg_small": "VGG-small: Conv-BN-ReLU x2 (32) MaxPool, x2 (64) MaxPool, x1 (128) MaxPool, Flatten, "
    "Linear(1152, 256), ReLU, Linear(256, 10)",
}


def load_split(split: str, data_dir: Path = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of the ``train`` or ``t10k`` split."""
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def normalise(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> model-ready float32 (N, 1, 28, 28)."""
    return ((images_u8.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD))[:, None]


def onnx_top1(model_path: Path, batches) -> tuple[int, int]:
    """(correct, total) of ONNX Runtime's argmax over ``batches`` of (x float32 NCHW, y int)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    correct = total = 0
    for x, y in batches:
        logits = sess.run(["logits"], {"input": x})[0]
        correct += int((logits.argmax(axis=1) == y).sum())
        total += len(y)
    return correct, total


def measure(model_path: Path, val_file: Path = VAL_FILE) -> dict:
    """Top-1 of the exported file on the full test split and on the validation file."""
    images, labels = load_split("t10k")
    x = normalise(images)
    test_correct, test_total = onnx_top1(model_path, ((x[i:i + 500], labels[i:i + 500]) for i in range(0, len(x), 500)))
    result = {
        "test_split": "Fashion-MNIST t10k (all 10,000 images)",
        "test_correct": test_correct,
        "test_count": test_total,
        "test_top1": round(100.0 * test_correct / test_total, 2),
    }
    if val_file.exists():
        from bwacal.data import open_dataset

        with open_dataset(val_file, input_shape=(1, 28, 28), num_classes=10) as ds:
            val_correct, val_total = onnx_top1(model_path, ds.batches(500))
            digest = ds.sha256()
        result.update({
            "val_file": str(val_file),
            "val_sha256": digest,
            "val_correct": val_correct,
            "val_count": val_total,
            "val_top1": round(100.0 * val_correct / val_total, 2),
        })
    return result


def augment(xb, gen, pad: int, hflip: bool):
    """Random crop of the zero-padded raw image plus random horizontal flip, vectorised over the batch."""
    import torch

    n, size = xb.shape[0], xb.shape[-1]
    if pad:
        padded = torch.nn.functional.pad(xb, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        ar = torch.arange(size)
        rows = (oy[:, None] + ar)[:, :, None]
        cols = (ox[:, None] + ar)[:, None, :]
        xb = padded[torch.arange(n)[:, None, None], rows, cols]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None], xb.flip(-1), xb)
    return xb


def train(name: str, recipe: Recipe, log=print):
    """Train one architecture on the full training split; returns (model in eval mode, seconds)."""
    import torch

    from benchmarks.zoo.models import ARCHITECTURES

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    images, labels = load_split("train")
    raw = torch.from_numpy(images.astype(np.float32) / 255.0)
    targets = torch.from_numpy(labels)

    model = ARCHITECTURES[name]().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.max_lr, momentum=recipe.momentum,
                          nesterov=True, weight_decay=recipe.weight_decay)
    steps_per_epoch = (len(raw) + recipe.batch_size - 1) // recipe.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.max_lr, epochs=recipe.epochs,
                                                steps_per_epoch=steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(raw), generator=gen)
        seen = loss_sum = correct = 0
        for i in range(0, len(raw), recipe.batch_size):
            idx = order[i:i + recipe.batch_size]
            xb = augment(raw[idx], gen, recipe.pad_crop, recipe.hflip)
            xb = ((xb - MEAN) / STD)[:, None].contiguous(memory_format=torch.channels_last)
            yb = targets[idx]
            out = model(xb)
            loss = torch.nn.functional.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(yb)
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((out.argmax(1) == yb).sum())
        log(f"{name}: epoch {epoch + 1}/{recipe.epochs} loss {loss_sum / seen:.4f} "
            f"train top-1 {100 * correct / seen:.2f}% ({time.perf_counter() - start:.0f}s)")
    seconds = time.perf_counter() - start
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, seconds


def export(model, path: Path) -> None:
    """Export in eval mode, BatchNorm kept as its own node (TrainingMode.PRESERVE skips BN folding)."""
    import warnings

    import torch

    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings():
        # the constant-folding warning is about models exported in training mode; ours is in eval mode
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            model, (dummy,), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
        )
    untie_initializers(tmp)
    tmp.replace(path)


def untie_initializers(path: Path) -> None:
    """Give every layer its own copy of its parameters.

    The TorchScript exporter de-duplicates initializers with equal values and re-creates the
    duplicates through ``Identity`` nodes; this rewrites each such Identity as an initializer of its own.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0])
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def check_export(model, path: Path) -> float:
    """Largest |torch - ONNX Runtime| logit difference on a few test images (a sanity check)."""
    import onnxruntime as ort
    import torch

    x = normalise(load_split("t10k")[0][:64])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    return float(np.abs(ref - got).max())


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_one(name: str, out: Path, log=print) -> dict:
    import torch

    recipe = RECIPES[name]
    model, seconds = train(name, recipe, log)
    onnx_path = out / f"{name}.onnx"
    export(model, onnx_path)
    diff = check_export(model, onnx_path)
    if diff > 1e-3:
        raise RuntimeError(f"{onnx_path}: ONNX Runtime differs from torch by {diff:g}")
    card = {
        "name": name,
        "file": onnx_path.name,
        "architecture": ARCH_TEXT[name],
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "input": {"name": "input", "shape": ["batch", 1, 28, 28], "mean": [MEAN], "std": [STD],
                  "preprocessing": "x = (pixel / 255 - mean) / std"},
        "output": {"name": "logits", "shape": ["batch", 10], "classes": list(CLASSES)},
        "opset": OPSET,
        "batchnorm": "kept as BatchNormalization nodes (not folded)",
        "training": {
            "data": "Fashion-MNIST train split (60,000 images)",
            "recipe": asdict(recipe) | {"optimizer": "SGD (Nesterov)", "schedule": "OneCycleLR",
                                         "loss": "cross-entropy"},
            "seconds": round(seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
        "seed": recipe.seed,
        "torch_version": torch.__version__,
        "export_max_abs_diff_vs_torch": diff,
    }
    # the training fields are saved first, so ``--cards-only`` can finish the card if measuring fails
    onnx_path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return write_card(card, onnx_path, log)


def write_card(card: dict, onnx_path: Path, log=print) -> dict:
    """Measure ``onnx_path`` with ONNX Runtime and write ``<name>.json`` beside it."""
    import onnxruntime as ort

    card = dict(card)
    card.update(measure(onnx_path))
    card["onnxruntime_version"] = ort.__version__
    card["onnx_sha256"] = sha256_of(onnx_path)
    card_path = onnx_path.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    log(f"{onnx_path}: test top-1 {card['test_top1']}%, val top-1 {card.get('val_top1')}%, "
        f"{card['parameters']} parameters, trained in {card['training']['seconds']}s")
    return card


def markdown_table(out: Path) -> str:
    """The README's zoo table, from the cards in ``out``."""
    rows = ["| model | parameters | test top-1 (10,000) | val top-1 (fmnist_val.h5, 2,000) | epochs | training time |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in RECIPES:
        card_path = out / f"{name}.json"
        if not card_path.exists():
            continue
        card = json.loads(card_path.read_text())
        rows.append(f"| `{name}` | {card['parameters']:,} | {card['test_top1']:.2f}% | {card['val_top1']:.2f}% "
                    f"({card['val_correct']}/{card['val_count']}) | {card['training']['recipe']['epochs']} "
                    f"| {card['training']['seconds']:.0f} s |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/zoo"), help="output folder (default data/zoo)")
    parser.add_argument("--models", default=",".join(RECIPES), help="comma-separated subset of " + ", ".join(RECIPES))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--cards-only", action="store_true",
                        help="re-measure existing ONNX files and rewrite their cards; no training")
    parser.add_argument("--table", action="store_true", help="print the cards as a Markdown table and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(args.out))
        return
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    for name in names:
        if args.cards_only:
            onnx_path = args.out / f"{name}.onnx"
            card = json.loads(onnx_path.with_suffix(".json").read_text())
            write_card(card, onnx_path)
        else:
            import torch

            torch.set_num_threads(args.threads)
            build_one(name, args.out, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
