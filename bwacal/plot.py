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



def frontier_figure(points: list[dict], fp: dict | None = None, title: str = "size against top-1"):
    """A figure: top-1 (%) against model size (MB), one line per model and series (``uniform``,
    ``mixed``, ...), each point labelled with its average weight bits; each model's full precision
    dotted. ``points`` hold ``model``, ``series``, ``size_bytes``, ``top1`` (a fraction) and
    ``avg_bits``; ``fp`` maps a model to its full-precision top-1. None when no point has a top-1."""
    points = [p for p in points if p.get("top1") is not None and p.get("size_bytes") is not None]
    if not points:
        return None
    fig = _figure(figsize=(7.5, 4.5), layout="constrained")
    _draw_frontier(fig.subplots(), points, fp or {}, title + " (labels: average weight bits)")
    return fig


def _draw_frontier(ax, points, fp, title):
    models = sorted({p["model"] for p in points})
    series = sorted({p["series"] for p in points}, key=lambda s: (s != "uniform", s))
    styles = ["s--", "o-", "^-", "v-", "D-"]
    for i, model in enumerate(models):
        for j, name in enumerate(series):
            pts = sorted((p for p in points if p["model"] == model and p["series"] == name),
                         key=lambda p: p["size_bytes"])
            if not pts:
                continue
            # one model: a colour per series; several: a colour per model, a marker per series
            color = f"C{(i if len(models) > 1 else j) % 10}"
            xs, ys = [p["size_bytes"] / 1e6 for p in pts], [100 * p["top1"] for p in pts]
            ax.plot(xs, ys, styles[j % len(styles)], color=color, alpha=0.6 if name == "uniform" else 1.0,
                    label=f"{model} {name}" if len(models) > 1 else name)
            for p, xv, yv in zip(pts, xs, ys):
                if p.get("avg_bits") is not None:
                    ax.annotate(f"{p['avg_bits']:.3g}", (xv, yv), textcoords="offset points", xytext=(3, 3),
                                fontsize=6, color=color)
        if fp.get(model) is not None:
            ax.axhline(100 * fp[model], color=f"C{i % 10}" if len(models) > 1 else "0.4", linestyle=":",
                       linewidth=1, label=f"{model} full precision" if len(models) > 1 else "full precision")
    ax.set_xscale("log")
    ax.set_xlabel("model size (MB: quantized weights bit-packed, other parameters as stored)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")


def plot_frontier(points: list[dict], fp: dict | None = None, title: str = "size against top-1") -> bytes | None:
    """PNG bytes of ``frontier_figure``; None when no point has a top-1."""
    fig = frontier_figure(points, fp, title)
    return None if fig is None else _png(fig)


def summary_frontier_points(rows: list[dict]) -> tuple[list[dict], dict]:
    """A batch summary's rows as ``frontier_figure``'s points: uniform widths and mixed allocations
    (rows with ``avg_bits_budget`` or ``size_budget``) as separate series, per model and activation width."""
    points, fp = [], {}
    for r in rows:
        if r.get("bwa") is None or r.get("size_bytes") is None:
            continue
        model = str(r["model"]) + (f" A{r['act_bits']}" if r.get("act_bits") else "")
        mixed = r.get("avg_bits_budget") is not None or r.get("size_budget") is not None
        points.append({"model": model, "series": "mixed" if mixed else "uniform", "size_bytes": r["size_bytes"],
                       "top1": r["bwa"], "avg_bits": r.get("avg_bits")})
        if r.get("fp") is not None:
            fp[model] = r["fp"]
    return points, fp


def sensitivity_frontier_points(run: dict) -> tuple[list[dict], dict]:
    """The frontier of a sensitivity run (``bwacal.mixed.sensitivity_run``) as ``frontier_figure``'s
    points and full-precision top-1; top-1 is agreement with full precision when there were no labels."""
    front = run.get("frontier") or {}
    model = Path(str(run.get("model", "model"))).stem
    key = "top1" if front.get("fp_top1") is not None else "agreement"
    points = [{"model": model, "series": "uniform", "size_bytes": p["size_bytes"], "top1": p[key],
               "avg_bits": p["avg_bits"]} for p in front.get("uniform", [])]
    points += [{"model": model, "series": f"mixed ({p['estimate']})", "size_bytes": p["size_bytes"], "top1": p[key],
                "avg_bits": p["avg_bits"]} for p in front.get("mixed", [])]
    return points, {model: front.get("fp_top1") if key == "top1" else 1.0}


def plot_sensitivity(run: dict) -> bytes:
    """PNG bytes of ``sensitivity_figure``."""
    return _png(sensitivity_figure(run))


def sensitivity_figure(run: dict):
    """A figure of a sensitivity run: per layer, the measured (filled) and Fisher-estimated (hollow)
    loss increase at each width on a log scale; below it, the round-to-nearest frontier of the
    held-out split (when the run has one)."""
    rows = run["layers"]
    points, fp = sensitivity_frontier_points(run)
    panels = 2 if points else 1
    fig = _figure(figsize=(max(8, 0.22 * len(rows) + 3), 3.8 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    ax = axes[0]
    x = np.arange(len(rows))
    for i, b in enumerate(run["widths"]):
        color = f"C{i % 10}"
        if rows[0].get("measured"):
            ax.plot(x, [max(r["measured"][str(b)], 1e-12) for r in rows], "o-", color=color, markersize=3,
                    linewidth=0.8, label=f"W{b} measured")
        ax.plot(x, [max(r["fisher"][str(b)], 1e-12) for r in rows], "o", mfc="none", color=color, markersize=5,
                label=f"W{b} Fisher estimate")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("KL to full precision (nats)")
    ax.set_title(f"{Path(str(run.get('model'))).stem}: loss increase with one layer quantized "
                 f"({run['images']} images)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    if points:
        what = "top-1" if run["frontier"].get("fp_top1") is not None else "agreement with full precision"
        _draw_frontier(axes[1], points, fp, f"round to nearest on {run['frontier']['images']} held-out images: "
                                            f"size against {what} (labels: average weight bits)")
    return fig

