"""Pictures of a calibration (weights, grids, learned levels, fitting curves) and of a batch summary.

matplotlib is an optional extra (``pip install 'bwacal[plot]'``); it is imported only here. Figures
are built on ``matplotlib.figure.Figure`` (no pyplot state), so batch workers can draw them too.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from bwacal.errors import BwacalError

LABELS = {"fp": "full precision", "uniform_minmax": "uniform min-max", "uniform_mse": "uniform MSE",
          "uniform_output": "uniform output", "bwa": "BWA", "adaround": "AdaRound", "bwa-codes": "BWA, learned codes",
          "adaround-bwa": "AdaRound + BWA"}


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BwacalError("plotting needs matplotlib: pip install 'bwacal[plot]'") from None
    return Figure(**kwargs)


def most_changed_layers(report: dict, count: int = 3) -> list[str]:
    """Layer names whose bit weights moved furthest (relative to 2**k) from the uniform grid."""
    moved = []
    for layer in report["layers"]:
        rel = np.asarray(layer["alpha"]) / 2.0 ** np.arange(layer["bits"])
        moved.append((float(np.abs(rel - 1).max()), layer["layer"]))
    return [name for _, name in sorted(moved, reverse=True)[:count]]


def calibration_title(report: dict) -> str:
    """``resnet20 W3 (first-last-8bit, BWA): top-1 FP 91.85%, uniform minmax (start) 87.80%, BWA 91.55%``;
    agreement with full precision instead of top-1 when the data had no labels."""
    opts = report.get("options", {})
    width = f"W{opts.get('bits')}" + (f"A{opts['act_bits']}" if opts.get("act_bits") else "")
    method = report.get("method", "bwa")
    head = f"{Path(str(report.get('model', 'model'))).stem} {width} ({opts.get('protocol')}, {LABELS.get(method, method)})"
    acc, agreement = report.get("accuracy") or {}, report.get("agreement") or {}
    start = f"uniform_{report['start']}" if report.get("start") else None
    keys = ["fp", start, method] if start in acc else ["fp", method]
    if any(acc.get(k) is not None for k in keys):
        parts = [f"{LABELS.get(k, k)}{' (start)' if k == start else ''} {100 * acc[k]:.2f}%"
                 for k in keys if acc.get(k) is not None]
        return f"{head}: top-1 " + ", ".join(parts)
    parts = [f"{LABELS.get(k, k)}{' (start)' if k == start else ''} {100 * agreement[k]:.2f}%"
             for k in keys[1:] if agreement.get(k) is not None]
    return f"{head}: agreement with FP " + ", ".join(parts) if parts else head


def plot_calibration(report: dict, weights: dict, layers: list[str] | None = None) -> bytes:
    """PNG bytes of ``calibration_figure``."""
    return _png(calibration_figure(report, weights, layers))


def calibration_figure(report: dict, weights: dict, layers: list[str] | None = None):
    """A figure: per chosen layer, the FP weight histogram of its most changed channel with the
    uniform grid and the learned levels over it; then held-out loss and top-1 per epoch. The title
    names the model, the width, the protocol, the method and the accuracies.

    ``weights`` maps weight names to the (BatchNorm-folded) full-precision arrays.
    """
    by_name = {layer["layer"]: layer for layer in report["layers"]}
    names = layers or most_changed_layers(report)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise BwacalError(f"no layer named {', '.join(unknown)} in the report; layers: {', '.join(by_name)}")
    fig = _figure(figsize=(8, 2.8 * (len(names) + 1)), layout="constrained")
    axes = fig.subplots(len(names) + 1, 1, squeeze=False)[:, 0]
    learned_label = LABELS.get(report.get("method", "bwa"), "learned") + " levels"
    for ax, name in zip(axes, names):
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
        ax.hist(w2d[c], bins=80, color="0.75", label="full-precision weights")
        for i, v in enumerate(uniform):
            ax.axvline(v, color="tab:blue", linestyle=":", linewidth=1, label="uniform grid" if i == 0 else None)
        for i, v in enumerate(learned):
            ax.axvline(v, color="tab:red", linewidth=1.2, label=learned_label if i == 0 else None)
        ax.set_title(f"{name}: output channel {c}, {layer['bits']} bits", fontsize=9)
        ax.set_xlabel("weight value (BatchNorm folded)")
        ax.set_ylabel("weights")
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    hist = report.get("history", [])
    epochs = [h["epoch"] for h in hist]
    handles = ax.plot(epochs, [h["heldout_loss"] for h in hist], "o-", color="tab:red", label="held-out loss")
    if any(h.get("train_loss") is not None for h in hist):
        points = [(h["epoch"], h["train_loss"]) for h in hist if h.get("train_loss") is not None]
        handles += ax.plot(*zip(*points), "^:", color="tab:orange", label="training loss")
    ax.set_xlabel("epoch (0: the uniform start)")
    ax.set_xticks(epochs)
    ax.set_ylabel(f"loss ({report.get('loss', 'kl')})")
    if any(h.get("heldout_top1") is not None for h in hist):
        ax2 = ax.twinx()
        handles += ax2.plot(epochs, [100 * (h["heldout_top1"] or 0) for h in hist], "s--", color="tab:blue",
                            label="held-out top-1")
        ax2.set_ylabel("top-1 (%)")
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_title(f"fitting (best epoch {report.get('best_epoch')})", fontsize=9)
    fig.suptitle(calibration_title(report), fontsize=9)
    return fig


def plot_summary(rows: list[dict]) -> bytes | None:
    """PNG bytes of ``summary_figure``; None when no row has an accuracy."""
    fig = summary_figure(rows)
    return None if fig is None else _png(fig)


def summary_figure(rows: list[dict]):
    """A figure: calibrated and uniform (start grid) top-1 against weight bits per model, each model's
    full-precision top-1 dotted; None when no row has an accuracy. Rows hold fractions, as summary.json."""
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("bwa") is not None:
            label = str(r["model"]) + (f" A{r['act_bits']}" if r.get("act_bits") else "")
            series.setdefault(label, []).append(r)
    if not series:
        return None
    fig = _figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (label, points) in enumerate(sorted(series.items())):
        points.sort(key=lambda r: r["width"])
        color = f"C{i % 10}"
        widths = [r["width"] for r in points]
        method = LABELS.get(points[0].get("method", "bwa"), "calibrated")
        ax.plot(widths, [100 * r["bwa"] for r in points], "o-", color=color, label=f"{label} {method}")
        uniform = [(r["width"], 100 * r["uniform"]) for r in points if r.get("uniform") is not None]
        if uniform:
            ax.plot(*zip(*uniform), "s--", color=color, alpha=0.6, label=f"{label} uniform (start grid)")
        if points[0].get("fp") is not None:
            ax.axhline(100 * points[0]["fp"], color=color, linestyle=":", linewidth=1, label=f"{label} full precision")
    ax.set_title("top-1 against weight width", fontsize="medium")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("top-1 (%)")
    ax.set_xticks(sorted({r["width"] for pts in series.values() for r in pts}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
