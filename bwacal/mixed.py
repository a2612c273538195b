"""Mixed precision: how much each layer's quantization costs, and widths chosen under a budget.

Sensitivity of a layer at a width is the loss increase, KL(full precision || network) averaged
over images, when that layer alone is quantized (round to nearest on the MSE-searched per-channel
grid, ``quantize_weights(method="mse")``; no fitting). Two ways to get it:

- measured: one forward pass of the images per layer and width;
- estimated (``fisher_sensitivity``): KL's gradient is zero at full precision and its Hessian there
  is the Fisher information F, so ``KL(W + dW) ~ 1/2 sum_j F_jj dW_j^2`` with F's diagonal. The
  diagonal comes from backward passes whose output gradient per image is
  ``v = sum_k r_k sqrt(p_k) (e_k - p)`` with random signs ``r_k``: ``E[v v^T] = diag(p) - p p^T``, the
  Fisher of the softmax, so the squared weight gradient of a micro-batch is an unbiased estimate of
  the sum of its images' Fisher diagonals (the images' cross terms have mean zero). One recorded
  forward and backward per micro-batch gives every layer at every width.

Widths are chosen from ``WIDTHS`` to minimise the sum of the layers' estimated losses with the
quantized weights' bits ``sum_l n_l b_l`` (``n_l``: the layer's weight count) at most a budget: a
multiple-choice knapsack solved by dynamic programming over the budget (``allocate``), exact when
the budget fits ``MAX_CELLS`` cells of the weight counts' greatest common divisor, otherwise on
costs rounded up to a coarser unit (still within the budget) with the gap to a Lagrangian lower
bound reported.

Size, as ``--size-budget`` counts it (``model_size_bytes``): the quantized weights bit-packed
(``n_l b_l / 8`` bytes) plus every other initializer at its own bytes (biases and layers kept in
float: 4 bytes a value), of the BatchNorm-folded model; 1 MB = 10^6 bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from bwacal.errors import BwacalError
from bwacal.fit import log_softmax
from bwacal.memory import DEFAULT_BUDGET, chunks, micro_batch_size, recording_cost
from bwacal.quant.weights import quantize_weights

WIDTHS = (2, 3, 4, 8)
SENSITIVITY_IMAGES = 256  # fitting-split images the sensitivities are computed on
FISHER_MICRO_BATCH = 16  # images per backward of the Fisher estimate
MAX_CELLS = 1 << 18  # budget cells of the allocation's dynamic program


def kl_to_reference(logits, ref_logp) -> float:
    """Mean KL(reference || softmax(logits)) over the batch, in nats (``ref_logp``: log-probabilities)."""
    return float((np.exp(ref_logp) * (ref_logp - log_softmax(logits))).sum(axis=1).mean())


def quantization_error(w, layer, bits: int) -> np.ndarray:
    """``Q(W) - W`` (float64, the weight's shape) of round to nearest on the MSE-searched grid."""
    qw = quantize_weights(w, bits, method="mse", axis=layer.axis, node=layer.node, name=layer.weight)
    return qw.dequantize().astype(np.float64) - np.asarray(w, dtype=np.float64)


def fisher_diagonal(model, names, images, micro_batch: int = FISHER_MICRO_BATCH, seed: int = 0) -> dict:
    """Per initializer in ``names``: the estimated diagonal of the Fisher information of the model's
    softmax, averaged over ``images`` (float64, the initializer's shape); see the module docstring."""
    names = list(names)
    rng = np.random.default_rng([seed, 0xF15])
    total = {n: np.zeros(model.graph.initializers[n].shape) for n in names}
    # as fitting does: no recording for backward over DEFAULT_BUDGET bytes (224x224 models)
    fixed, per_image = recording_cost(lambda x: model.forward(x, record=True, wrt=names)[1], model.input_shape)
    micro = micro_batch_size(micro_batch, per_image, DEFAULT_BUDGET, fixed)
    for part in chunks(len(images), micro):
        logits, tape = model.forward(images[part], record=True, wrt=names)
        p = np.exp(log_softmax(logits))
        r = rng.choice((-1.0, 1.0), size=p.shape)
        # v = sum_k r_k sqrt(p_k) (e_k - p) per image
        s = r * np.sqrt(p)
        v = s - p * s.sum(axis=1, keepdims=True)
        grads = model.backward(tape, v.astype(np.float32), wrt=names)
        del tape
        for n in names:
            if grads.get(n) is not None:
                total[n] += grads[n].astype(np.float64) ** 2
    return {n: t / max(len(images), 1) for n, t in total.items()}


@dataclass
class Sensitivity:
    """Per layer (node name): the weight count and the loss increase at each width, estimated
    (Fisher) and, when measured, measured; with the seconds each took."""

    params: dict
    fisher: dict
    measured: dict | None = None
    fisher_seconds: float = 0.0
    measured_seconds: float | None = None
    images: int = 0
    widths: tuple = WIDTHS


def fisher_sensitivity(model, layers, images, widths=WIDTHS, seed: int = 0,
                       micro_batch: int = FISHER_MICRO_BATCH) -> Sensitivity:
    """The Fisher estimate of every layer's loss increase at every width (``Sensitivity.fisher``)."""
    t0 = time.perf_counter()
    inits = model.graph.initializers
    fisher = fisher_diagonal(model, [layer.weight for layer in layers], images, micro_batch, seed)
    est = {}
    for layer in layers:
        w = inits[layer.weight]
        est[layer.node] = {b: 0.5 * float((fisher[layer.weight] * quantization_error(w, layer, b) ** 2).sum())
                           for b in widths}
    params = {layer.node: int(inits[layer.weight].size) for layer in layers}
    return Sensitivity(params, est, fisher_seconds=time.perf_counter() - t0, images=len(images), widths=tuple(widths))


def measured_sensitivity(model, layers, images, widths=WIDTHS, batch_size: int = 256) -> tuple[dict, float]:
    """``({node: {bits: KL}}, seconds)``: the mean KL to full precision over ``images`` with only that
    layer quantized (round to nearest, MSE steps) at each width."""
    t0 = time.perf_counter()
    parts = chunks(len(images), batch_size)
    ref = [log_softmax(model.forward(images[p])) for p in parts]
    inits = model.graph.initializers
    out = {}
    for layer in layers:
        w = inits[layer.weight]
        out[layer.node] = {}
        for b in widths:
            wq = (w + quantization_error(w, layer, b)).astype(np.float32)
            kl = sum(kl_to_reference(model.forward(images[p], params={layer.weight: wq}), r) * (p.stop - p.start)
                     for p, r in zip(parts, ref))
            out[layer.node][b] = kl / len(images)
    return out, time.perf_counter() - t0


# ---- sizes and budgets ------------------------------------------------------------------------------


def average_bits(params: dict, bits: dict) -> float:
    """Weight bits averaged over the quantized weights, weighted by their counts."""
    n = sum(params.values())
    return sum(params[k] * bits[k] for k in params) / n if n else 0.0


def model_size_bytes(graph, layers) -> float:
    """The size ``--size-budget`` counts: each quantized layer's weights at its width, bit-packed,
    and every other initializer at its own bytes (see the module docstring)."""
    quantized = {layer.weight: layer for layer in layers}
    size = 0.0
    for name, a in graph.initializers.items():
        layer = quantized.get(name)
        size += int(a.size) * layer.bits / 8 if layer is not None else int(a.nbytes)
    return size


def budget_bits(graph, layers, avg_bits: float | None = None, size_mb: float | None = None) -> int:
    """The most weight bits ``sum_l n_l b_l`` the quantized layers may take under ``avg_bits`` (over
    all of them) or ``size_mb`` (``model_size_bytes`` at most ``size_mb * 10^6``)."""
    counts = [int(graph.initializers[layer.weight].size) for layer in layers]
    if avg_bits is not None:
        return int(math.floor(avg_bits * sum(counts) + 1e-9))
    quantized = {layer.weight for layer in layers}
    rest = sum(int(a.nbytes) for name, a in graph.initializers.items() if name not in quantized)
    return int(math.floor((size_mb * 1e6 - rest) * 8 + 1e-6))


@dataclass
class Allocation:
    """The chosen width per layer (node name) and what it costs and is estimated to lose."""

    bits: dict
    weight_bits: int  # sum of n_l b_l
    budget_bits: int
    estimated_loss: float
    lower_bound: float  # no allocation within the budget has a lower estimated loss
    exact: bool  # the dynamic program ran on the exact costs (then the allocation is optimal)
    unit: int  # weights per cell of the dynamic program
    seconds: float = 0.0
    fixed: dict = field(default_factory=dict)  # layers whose width was given, not chosen

    @property
    def gap(self) -> float:
        return max(self.estimated_loss - self.lower_bound, 0.0)


def allocate(params: dict, loss: dict, budget: int, widths=WIDTHS, fixed: dict | None = None) -> Allocation:
    """Widths from ``widths`` for every layer of ``params`` (node -> weight count) minimising
    ``sum_l loss[l][b_l]`` with ``sum_l params[l] * b_l <= budget``; layers in ``fixed`` (node ->
    bits) keep their width. Raises ``BwacalError`` when even the narrowest widths exceed the budget."""
    t0 = time.perf_counter()
    fixed = dict(fixed or {})
    widths = sorted(widths)
    free = [k for k in params if k not in fixed]
    spent = sum(params[k] * fixed[k] for k in fixed)
    low = widths[0]
    room = budget - spent - sum(params[k] * low for k in free)
    if room < 0:
        least = spent + sum(params[k] * low for k in free)
        raise BwacalError(f"the budget ({budget} weight bits, {budget / sum(params.values()):.3f} bits a weight) is "
                          f"below the smallest allocation ({least} bits: every free layer at {low} bits)")
    extra = {k: [params[k] * (b - low) for b in widths] for k in free}
    values = {k: [float(loss[k][b]) for b in widths] for k in free}
    unit = math.gcd(*[params[k] for k in free]) if free else 1
    exact = room // unit <= MAX_CELLS
    if not exact:
        unit = -(-room // MAX_CELLS)
    cells = room // unit
    choice = _knapsack([[-(-c // unit) for c in extra[k]] for k in free], [values[k] for k in free], cells)
    bits = dict(fixed)
    bits.update({k: widths[i] for k, i in zip(free, choice)})
    est = sum(float(loss[k][bits[k]]) for k in free)
    bound = _lagrangian_bound([extra[k] for k in free], [values[k] for k in free], room)
    weight_bits = sum(params[k] * bits[k] for k in params)
    # on the exact costs the dynamic program's answer is the optimum
    return Allocation(bits, weight_bits, budget, est, est if exact else min(bound, est), exact, unit,
                      time.perf_counter() - t0, fixed)


def _knapsack(costs, values, cells) -> list[int]:
    """Multiple-choice knapsack by dynamic programming: per item the option index minimising the
    sum of values with the summed (integer) costs at most ``cells``."""
    best = np.zeros(cells + 1)  # best[c]: the least value of the items so far within c cells
    picks = np.zeros((len(costs), cells + 1), np.uint8)
    for i, (cost, value) in enumerate(zip(costs, values)):
        new = np.full(cells + 1, np.inf)
        for j, (c, v) in enumerate(zip(cost, value)):
            if c > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[c:] = best[:cells + 1 - c] + v
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    out, c = [], cells
    for i in range(len(costs) - 1, -1, -1):
        j = int(picks[i, c])
        out.append(j)
        c -= costs[i][j]
    return out[::-1]


def _lagrangian_bound(costs, values, room) -> float:
    """max over lambda >= 0 of sum_i min_j (v_ij + lambda c_ij) - lambda room: a lower bound on the
    knapsack's optimum (concave in lambda; a ternary search finds its maximum)."""
    if not costs:
        return 0.0
    c = np.array(costs, dtype=np.float64)
    v = np.array(values, dtype=np.float64)

    def dual(lam):
        return float((v + lam * c).min(axis=1).sum() - lam * room)

    # beyond the steepest loss decrease per cost unit every item takes its cheapest option
    hi = 2 * max(float(np.max((v[:, :1] - v) / np.where(c > 0, c, np.inf))), 0.0) + 1e-30
    lo = 0.0
    for _ in range(200):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if dual(a) < dual(b):
            lo = a
        else:
            hi = b
    return max(dual(lo), dual(0.0))


# ---- applying an allocation to the calibration's layers ---------------------------------------------


def pinned_layers(layers, protocol: str, layer_bits=()) -> dict:
    """Layers whose width the options fix (node -> bits): the first and last under ``first-last-8bit``
    and every layer a ``--layer-bits`` rule names; the allocation chooses the others."""
    from bwacal.layer_rules import matches

    pinned = {}
    if protocol == "first-last-8bit" and layers:
        for layer in (layers[0], layers[-1]):
            pinned[layer.node] = layer.bits
    for layer in layers:
        if any(matches(layer, pattern) for pattern, _ in layer_bits):
            pinned[layer.node] = layer.bits
    return pinned


def allocation_rules(bits: dict) -> tuple:
    """The allocation as ``--layer-bits`` rules ((exact-name pattern, bits) pairs)."""
    from glob import escape

    return tuple((escape(node), b) for node, b in bits.items())


def allocate_layers(model, layers, images, avg_bits=None, size_mb=None, protocol="all-layers", layer_bits=(),
                    seed=0) -> tuple[list, Allocation, Sensitivity]:
    """``(layers with the chosen widths, allocation, sensitivity)`` under ``avg_bits`` or ``size_mb``,
    from the Fisher sensitivities on ``images``; the widths applied as ``--layer-bits`` rules."""
    from bwacal.layer_rules import apply_layer_rules

    sens = fisher_sensitivity(model, layers, images, WIDTHS, seed)
    pinned = pinned_layers(layers, protocol, layer_bits)
    missing = {layer.node: layer.bits for layer in layers if layer.node in pinned and layer.bits not in WIDTHS}
    loss = {k: dict(v) for k, v in sens.fisher.items()}
    for node, b in missing.items():
        loss[node][b] = 0.0  # a pinned width outside WIDTHS: its loss does not change the choice
    budget = budget_bits(model.graph, layers, avg_bits, size_mb)
    try:
        alloc = allocate(sens.params, loss, budget, WIDTHS, pinned)
    except BwacalError as exc:
        what = f"--avg-bits {avg_bits:g}" if avg_bits is not None else f"--size-budget {size_mb:g} MB"
        raise BwacalError(f"{what}: {exc}") from None
    chosen, _ = apply_layer_rules(layers, (), allocation_rules(alloc.bits))
    return chosen, alloc, sens


def allocation_report(alloc: Allocation, sens: Sensitivity, layers, avg_bits=None, size_mb=None) -> dict:
    """The allocation as the calibration report keeps it."""
    return {"avg_bits_budget": avg_bits, "size_budget_mb": size_mb, "budget_bits": alloc.budget_bits,
            "weight_bits": alloc.weight_bits, "avg_bits": average_bits(sens.params, alloc.bits),
            "estimated_loss": alloc.estimated_loss, "lower_bound": alloc.lower_bound, "gap": alloc.gap,
            "exact": alloc.exact, "unit": alloc.unit, "fixed": sorted(alloc.fixed),
            "images": sens.images, "sensitivity_seconds": sens.fisher_seconds, "solve_seconds": alloc.seconds,
            "layers": [{"layer": layer.node, "params": sens.params[layer.node], "bits": alloc.bits[layer.node],
                        "fisher": {str(b): v for b, v in sens.fisher[layer.node].items()}} for layer in layers],
            "layer_bits": [f"{p}={b}" for p, b in allocation_rules(alloc.bits)]}


# ---- accuracy control ------------------------------------------------------------------------------


def next_width(bits: int, widths=WIDTHS) -> int | None:
    """The next wider width of ``widths`` above ``bits`` (None at the widest)."""
    wider = [b for b in widths if b > bits]
    return min(wider) if wider else None


def layers_to_raise(bits: dict, params: dict, loss: dict, widths=WIDTHS, pinned=()) -> dict:
    """The widths of one step of accuracy control: the layers whose next width removes the most
    estimated loss per added weight bit, taken in that order until they remove at least half of the
    estimated loss left above every layer at its widest (at least one layer). Empty when no layer
    can be raised."""
    top = max(widths)

    def est(node, b):
        return loss[node].get(b, 0.0)

    gains = []
    for node, b in bits.items():
        nb = next_width(b, widths)
        if node in pinned or nb is None:
            continue
        gain = est(node, b) - est(node, nb)
        gains.append((gain / (params[node] * (nb - b)), gain, node, nb))
    if not gains:
        return {}
    left = sum(est(node, b) - est(node, top) for node, b in bits.items() if node not in pinned)
    gains.sort(key=lambda g: (-g[0], g[2]))
    raised, removed = {}, 0.0
    for _, gain, node, nb in gains:
        raised[node] = nb
        removed += gain
        if removed >= 0.5 * left:
            break
    return raised


# ---- a sensitivity run (``bwacal sensitivity``) ------------------------------------------------------

# average widths of the mixed frontier points (those between the narrowest and the widest --bits)
FRONTIER_BUDGETS = (2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0)


def sensitivity_run(model_path, calib_path, widths=WIDTHS, options=None, measure: bool = True,
                    frontier: bool = True, stage=None) -> dict:
    """Every quantizable layer's loss increase at each of ``widths``, Fisher-estimated and (``measure``)
    measured, on the first ``SENSITIVITY_IMAGES`` (or ``options.num_images``) images of the fitting
    split, with the seconds each took; and (``frontier``) the size-accuracy frontier of round-to-nearest
    networks on the held-out split: every layer at each width (uniform), and the Fisher allocation
    (and the measured one, when every width of ``WIDTHS`` was measured) at the average widths of
    ``FRONTIER_BUDGETS`` from the narrowest to the widest of ``widths``.

    ``options`` (``CalibrationOptions``) gives the split, the seed, the batch size, the input shape
    and the ``exclude`` rules. Returns a JSON-ready dict; accuracies as fractions."""
    from bwacal.calibrate import CalibrationOptions, _split_pool, load_for_data, plan_layers
    from bwacal.data import open_dataset

    options = replace(options or CalibrationOptions(), protocol="all-layers", layer_bits=())
    options.validate()
    widths = sorted({int(b) for b in widths})
    for b in widths:
        if not 2 <= b <= 8:
            raise BwacalError(f"--bits: widths must be from 2 to 8, got {b}")
    stage = stage or (lambda name: None)
    model = load_for_data(model_path, calib_path, options.input_shape)
    with open_dataset(calib_path, input_shape=model.input_shape, num_classes=model.num_classes,
                      layout=model.layout) as data:
        pool, train, held = _split_pool(data, replace(options, num_images=None))
        count = min(len(train), options.num_images or SENSITIVITY_IMAGES)
        images, _ = data.read(np.sort(pool[train[:count]]))
        held_x, held_y = data.read(np.sort(pool[held])) if len(held) else (None, None)
    layers, excluded = plan_layers(model.graph, replace(options, bits=max(widths)))
    if not layers:
        raise BwacalError(f"{model_path}: nothing to quantize")
    stage("Fisher sensitivities")
    sens = fisher_sensitivity(model, layers, images, sorted(set(widths) | set(WIDTHS)), options.seed)
    measured, measured_seconds = None, None
    if measure:
        stage("measured sensitivities")
        measured, measured_seconds = measured_sensitivity(model, layers, images, widths, options.batch_size)
    inits = model.graph.initializers
    rows = [{"layer": layer.node, "op_type": layer.op_type, "weight": layer.weight, "params": sens.params[layer.node],
             "shape": list(inits[layer.weight].shape),
             "fisher": {str(b): sens.fisher[layer.node][b] for b in widths},
             "measured": {str(b): measured[layer.node][b] for b in widths} if measured else None}
            for layer in layers]
    out = {"model": str(model_path), "calib": str(calib_path), "images": len(images), "widths": widths,
           "method": "round to nearest, per-channel MSE step search (no fitting), one layer at a time",
           "layers": rows, "excluded": [layer.node for layer in excluded],
           "fisher_seconds": sens.fisher_seconds, "measured_seconds": measured_seconds,
           "rank_correlation": _rank_correlation(sens.fisher, measured, widths) if measured else None}
    if frontier and held_x is not None:
        stage("size-accuracy frontier")
        out["frontier"] = _frontier(model, layers, sens, measured, widths, held_x, held_y, options.batch_size)
    return out


def _rank_correlation(fisher, measured, widths) -> dict:
    """Spearman's rank correlation between the Fisher and the measured losses over the layers, per width."""
    from scipy.stats import spearmanr

    out = {}
    for b in widths:
        a = [fisher[k][b] for k in measured]
        m = [measured[k][b] for k in measured]
        out[str(b)] = float(spearmanr(a, m).statistic) if len(a) > 2 else None
    return out


def _frontier(model, layers, sens, measured, widths, x, y, batch_size) -> dict:
    """Round-to-nearest networks on the held-out images: top-1 (None without labels), agreement
    with full precision and KL, with their average width and ``model_size_bytes``."""
    from bwacal.layer_rules import apply_layer_rules

    parts = chunks(len(x), batch_size)
    ref = [log_softmax(model.forward(x[p])) for p in parts]
    inits = model.graph.initializers
    errors = {}

    def score(bits: dict) -> dict:
        params = {}
        for layer in layers:
            key = (layer.node, bits[layer.node])
            if key not in errors:
                errors[key] = quantization_error(inits[layer.weight], layer, bits[layer.node])
            params[layer.weight] = (inits[layer.weight] + errors[key]).astype(np.float32)
        logits = np.concatenate([model.forward(x[p], params=params) for p in parts])
        logp = np.concatenate(ref)
        chosen, _ = apply_layer_rules(layers, (), allocation_rules(bits))
        return {"avg_bits": average_bits(sens.params, bits), "size_bytes": model_size_bytes(model.graph, chosen),
                "top1": float((logits.argmax(1) == y).mean()) if y is not None else None,
                "agreement": float((logits.argmax(1) == logp.argmax(1)).mean()),
                "kl": kl_to_reference(logits, logp), "bits": bits}

    fp_top1 = float((np.concatenate(ref).argmax(1) == y).mean()) if y is not None else None
    uniform = [{"width": b, **score({layer.node: b for layer in layers})} for b in widths]
    budgets = [b for b in FRONTIER_BUDGETS if widths[0] <= b <= widths[-1]]
    estimates = {"fisher": sens.fisher}
    if measured and set(WIDTHS) <= set(widths):
        estimates["measured"] = measured
    mixed = []
    for name, loss in estimates.items():
        for budget in budgets:
            alloc = allocate(sens.params, loss, budget_bits(model.graph, layers, float(budget)), WIDTHS)
            mixed.append({"estimate": name, "avg_bits_budget": float(budget), "estimated_loss": alloc.estimated_loss,
                          **score(alloc.bits)})
    return {"images": len(x), "fp_top1": fp_top1, "fp_size_bytes": float(sum(a.nbytes for a in inits.values())),
            "uniform": uniform, "mixed": mixed}
