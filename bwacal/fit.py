"""Fitting the quantizers end to end on the classification loss (METHOD.md sections 4 and 7).

All alpha and gamma of all quantized layers (and activation bit weights, with BWA on activations,
and the rounding variables of learned codes) are trained together through one full backward pass
per batch with Adam and a cosine-decaying rate. A held-out part of the calibration set picks the
best epoch (epoch 0 is the start).

Parameters are trained in the normalised form each quantizer hands out (``parameters()``), so one
learning rate suits every bit position and width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bwacal.memory import DEFAULT_BUDGET, chunks, micro_batch_size, recording_cost
from bwacal.quant.rounding import annealed_beta, rounding_regularizer
from bwacal.quantize import QuantizedNetwork


def log_softmax(z):
    z = z.astype(np.float64)
    s = z - z.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def classification_loss(logits, labels=None, teacher_logp=None, mode="ce"):
    """Mean loss over the batch and dL/dlogits.

    ``ce``: cross-entropy with ``labels``; ``kl``: KL(teacher || model) with the FP model's
    log-probabilities ``teacher_logp``; ``both``: their sum.
    """
    logp = log_softmax(logits)
    p = np.exp(logp)
    n = logits.shape[0]
    loss, grad = 0.0, np.zeros_like(p)
    if mode in ("ce", "both"):
        loss += -logp[np.arange(n), labels].mean()
        onehot = np.zeros_like(p)
        onehot[np.arange(n), labels] = 1.0
        grad += (p - onehot) / n
    if mode in ("kl", "both"):
        pt = np.exp(teacher_logp)
        loss += (pt * (teacher_logp - logp)).sum(axis=1).mean()
        grad += (p - pt) / n
    return float(loss), grad.astype(np.float32)


class Adam:
    """Adam on a dict of float64 arrays."""

    def __init__(self, params: dict, lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict, grads: dict, lr: float, lr_of=None):
        """One update; ``lr_of(key)``, if given, is the rate of that key (default ``lr``)."""
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            rate = lr if lr_of is None else lr_of(k)
            params[k] -= rate * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)


@dataclass
class FitOptions:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    loss: str = "kl"  # kl | ce | both
    seed: int = 0
    rounding_lambda: float = 0.01  # weight of the rounding regulariser (mean per tensor) on learned codes
    rounding_lr: float = 0.05  # Adam's rate on the rounding variables (end to end has few steps)
    rounding_warmup: float = 0.2  # fraction of the steps before the regulariser starts
    # images per recorded forward; None: the largest micro-batch whose recording for backward fits
    # ``memory_budget`` bytes (bwacal/memory.py). Gradients are summed over a batch's micro-batches.
    micro_batch: int | None = None
    memory_budget: int = DEFAULT_BUDGET


@dataclass
class FitResult:
    best_epoch: int
    history: list = field(default_factory=list)  # per epoch: train_loss, heldout_loss, heldout_top1
    micro_batch: int | None = None  # images per recorded forward (the batch size when it fitted whole)


def _owners(net: QuantizedNetwork) -> list:
    """(quantizer, key prefix, parameter names) for every quantizer with trainable parameters."""
    owners = [(qw, qw.name, list(qw.parameters())) for qw in net.weights]
    owners += [(aq, aq.node, list(aq.parameters())) for aq in net.acts]
    return [o for o in owners if o[2]]


def _parameters(owners) -> dict:
    return {f"{prefix}.{k}": v for q, prefix, _ in owners for k, v in q.parameters().items()}


def _set_parameters(owners, theta: dict):
    for q, prefix, keys in owners:
        q.set_parameters({k: theta[f"{prefix}.{k}"] for k in keys})


def evaluate_loss(net: QuantizedNetwork, params, batches, mode, micro: int | None = None) -> tuple[float, float | None]:
    """Mean loss and top-1 (None without labels) over ``batches`` of (x, y, teacher_logp); each
    forward takes at most ``micro`` images (None: a whole batch)."""
    total, correct, count, labelled = 0.0, 0, 0, False
    for x, y, t in batches:
        logits = np.concatenate([net.forward(x[part], params) for part in chunks(len(x), micro or len(x))])
        loss, _ = classification_loss(logits, y, t, mode)
        total += loss * len(x)
        count += len(x)
        if y is not None:
            labelled = True
            correct += int((logits.argmax(axis=1) == y).sum())
    return total / max(count, 1), (correct / count if labelled and count else None)


def fit_bit_weights(net: QuantizedNetwork, train_batches, heldout_batches, options: FitOptions,
                    progress=None, keep_best: bool = True) -> FitResult:
    """Train ``net``'s parameters in place; ``*_batches()`` return iterables of (x, y, teacher_logp).

    The parameters are those of every quantizer (``QuantizedWeight.parameters``,
    ``ActivationQuantizer.parameters``): bit weights, and the rounding variables of weights whose
    rounding is being learned, which get AdaRound's regulariser (``options.rounding_lambda`` times
    its mean per tensor, exponent annealed over all steps) and are hardened at the end.

    ``train_batches(epoch)`` yields the shuffled training batches of one epoch; ``progress`` is
    called as ``progress(epoch, step, steps, loss, heldout_top1, heldout)``: after every step with
    the batch loss (``heldout`` False), and after every epoch (epoch 0: the start) with the
    held-out loss and top-1 (``heldout`` True). Without ``keep_best`` (no
    held-out data) the last epoch is kept.
    """
    owners = _owners(net)
    theta = _parameters(owners)
    best = {k: v.copy() for k, v in theta.items()}
    adam = Adam(theta, options.lr)
    rounding = [qw for qw in net.weights if qw.rounding is not None]
    wrt = [qw.name for qw in net.weights if qw.parameters()] + [aq.alpha_name for aq in net.acts if aq.alpha is not None]
    steps_per_epoch = None
    history = []
    micro = options.micro_batch
    if micro is None and options.epochs:
        _set_parameters(owners, theta)
        fixed, per_image = recording_cost(  # NOTE: the composed weights live only as long as the lambda
            lambda x, params=net.params(): net.engine.run({net.model.input_name: x}, params=params, record=True,
                                                          wrt=wrt)[1],
            net.model.input_shape)
        micro = micro_batch_size(options.batch_size, per_image, options.memory_budget, fixed)
    # held out: learned codes as they would harden, the network the fit would hand back. Its forwards
    # take micro-batches too: whole batches, after the steps' smaller blocks, grew the heap by 400 MB
    # (ResNet-50 at 224x224)
    loss0, top0 = evaluate_loss(net, net.params(hard=True), heldout_batches(), options.loss, micro)
    history.append({"epoch": 0, "train_loss": None, "heldout_loss": loss0, "heldout_top1": top0})
    best_loss, best_epoch = loss0, 0
    if progress:
        progress(0, 0, 0, loss0, top0, True)
    total_steps, step_no = None, 0
    for epoch in range(1, options.epochs + 1):
        batches = train_batches(epoch)
        if steps_per_epoch is None and not hasattr(batches, "__len__"):
            batches = list(batches)  # NOTE: holds the whole split; pass a sized iterable to stream
        if steps_per_epoch is None:
            steps_per_epoch = len(batches)
            total_steps = steps_per_epoch * options.epochs
        losses = []
        for i, (x, y, t) in enumerate(batches):
            _set_parameters(owners, theta)
            loss, grads = _batch_gradients(net, net.params(), x, y, t, options.loss, wrt, micro)
            gtheta = {}
            for qw in net.weights:
                if grads.get(qw.name) is not None:
                    gtheta.update({f"{qw.name}.{k}": g for k, g in qw.gradients(grads[qw.name]).items()})
            for aq in net.acts:
                if aq.alpha is not None and grads.get(aq.alpha_name) is not None:
                    gtheta.update({f"{aq.node}.{k}": g for k, g in aq.gradients(grads[aq.alpha_name]).items()})
            beta = annealed_beta(step_no, total_steps, options.rounding_warmup) if rounding else None
            for qw in rounding:
                if beta is not None:
                    _, dv = rounding_regularizer(qw.rounding.v, beta)
                    scale = options.rounding_lambda / qw.rounding.v.size
                    gtheta[f"{qw.name}.v"] = gtheta.get(f"{qw.name}.v", 0.0) + scale * dv
            decay = 0.5 * (1 + np.cos(np.pi * step_no / max(total_steps, 1)))
            lr = options.lr * decay
            adam.step(theta, gtheta, lr,
                      (lambda k: options.rounding_lr * decay if k.endswith(".v") else lr) if rounding else None)
            step_no += 1
            losses.append(loss)
            if progress:
                progress(epoch, i + 1, steps_per_epoch, loss, None, False)
        _set_parameters(owners, theta)
        hl, ht = evaluate_loss(net, net.params(hard=True), heldout_batches(), options.loss, micro)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "heldout_loss": hl, "heldout_top1": ht})
        if progress:
            progress(epoch, steps_per_epoch, steps_per_epoch, hl, ht, True)
        if hl < best_loss or not keep_best:
            best_loss, best_epoch = hl, epoch
            best = {k: v.copy() for k, v in theta.items()}
    _set_parameters(owners, best)
    for qw in rounding:
        qw.harden()
    return FitResult(best_epoch, history, micro)


def _batch_gradients(net: QuantizedNetwork, params, x, y, t, mode, wrt, micro) -> tuple[float, dict]:
    """The batch's mean loss and its gradients for ``wrt``, one recorded forward per micro-batch of
    at most ``micro`` images (each micro-batch's mean-loss gradient weighted by its share of the batch)."""
    parts = chunks(len(x), micro or len(x))
    loss, grads = 0.0, {}
    for part in parts:
        values, tape = net.engine.run({net.model.input_name: x[part]}, params=params, record=True, wrt=wrt)
        part_loss, dlogits = classification_loss(net.model.logits(values), None if y is None else y[part],
                                                 None if t is None else t[part], mode)
        share = (part.stop - part.start) / len(x)
        if len(parts) > 1:
            dlogits = dlogits * np.float32(share)
        g = net.engine.backward(tape, net.model.output_seed(dlogits), wrt=wrt)
        del tape  # NOTE: free this micro-batch's recording before the next one is made
        loss += part_loss * share
        for name, value in g.items():
            if value is not None:
                grads[name] = value if grads.get(name) is None else grads[name] + value
    return (loss if len(parts) > 1 else part_loss), grads
