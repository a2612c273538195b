"""Pictures of a calibration (weights, grids, learned levels, fitting curves) and of a batch summary.

matplotlib is an optional extra (``pip install 'bwacal[plot]'``); it is imported only here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from bwacal.errors import BwacalError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BwacalError("plotting needs matplotlib: pip install 'bwacal[plot]'") from None
    return plt


def most_changed_layers(report: dict, count: int = 3) -> list[str]:
    """Layer names whose bit weights moved furthest (relative to 2**k) from the uniform grid."""
    moved = []
    for layer in report["layers"]:
        rel = np.asarray(layer["alpha"]) / 2.0 ** np.arange(layer["bits"])
        moved.append((float(np.abs(rel - 1).max()), layer["layer"]))
    return [name for _, name in sorted(moved, reverse=True)[:count]]


def plot_calibration(report: dict, weights: dict, layers: list[str] | None = None) -> bytes:
    """PNG bytes: per chosen layer, the FP weight histogram of its widest channel with the uniform
    grid and the learned BWA levels over it; then held-out loss and top-1 per epoch.

    ``weights`` maps weight names to the (BatchNorm-folded) full-precision arrays.
    """
    plt = _pyplot()
    by_name = {layer["layer"]: layer for layer in report["layers"]}
    names = layers or most_changed_layers(report)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise BwacalError(f"no layer named {', '.join(unknown)} in the report; layers: {', '.join(by_name)}")
    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(8, 2.6 * (len(names) + 1)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        layer = by_name[name]
        w = np.asarray(weights[layer["weight"]], dtype=np.float64)
        axis = 0 if layer["op_type"] == "Conv" or w.shape[0] == layer["channels"] else 1
        w2d = np.moveaxis(w, axis, 0).reshape(layer["channels"], -1)
        step = np.asarray(layer["step"])
        alpha, gamma = np.asarray(layer["alpha"]), np.asarray(layer["gamma"])
        c = int(np.argmax(np.abs(alpha / 2.0 ** np.arange(layer["bits"]) - 1).max(axis=1)))
        codes = np.arange(2 ** layer["bits"])
        bits = (codes[:, None] >> np.arange(layer["bits"])) & 1
        uniform = step[c] * (codes - 2 ** (layer["bits"] - 1))
        learned = step[c] * (bits @ alpha[c] + gamma[c])
        ax.hist(w2d[c], bins=80, color="0.75")
        for v in uniform:
            ax.axvline(v, color="tab:blue", linestyle=":", linewidth=1)
        for v in learned:
            ax.axvline(v, color="tab:red", linewidth=1.2)
        ax.set_title(f"{name}: channel {c}, {layer['bits']} bits (dotted: uniform grid, red: BWA levels)",
                     fontsize=9)
    ax = axes[-1, 0]
    hist = report.get("history", [])
    epochs = [h["epoch"] for h in hist]
    ax.plot(epochs, [h["heldout_loss"] for h in hist], "o-", color="tab:red", label="held-out loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if any(h.get("heldout_top1") is not None for h in hist):
        ax2 = ax.twinx()
        ax2.plot(epochs, [100 * (h["heldout_top1"] or 0) for h in hist], "s--", color="tab:blue",
                 label="held-out top-1")
        ax2.set_ylabel("top-1 %")
    ax.set_title(f"fitting (best epoch {report.get('best_epoch')})", fontsize=9)
    fig.tight_layout()
    return _png(fig, plt)


def plot_summary(rows: list[dict]) -> bytes:
    """PNG bytes: BWA top-1 against weight bit width per model, with each model's FP line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    models = sorted({r["model"] for r in rows})
    for i, model in enumerate(models):
        mine = sorted((r for r in rows if r["model"] == model and r.get("bwa") is not None),
                      key=lambda r: r["width"])
        if not mine:
            continue
        color = f"C{i}"
        ax.plot([r["width"] for r in mine], [100 * r["bwa"] for r in mine], "o-", color=color, label=f"{model} BWA")
        if mine[0].get("fp") is not None:
            ax.axhline(100 * mine[0]["fp"], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("weight bits")
    ax.set_ylabel("top-1 % (dotted: full precision)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
