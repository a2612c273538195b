"""Fitting the bit weights end to end on the classification loss (METHOD.md section 4).

All alpha and gamma of all quantized layers (and activation bit weights, with BWA on activations)
are trained together through one full backward pass per batch with Adam and a cosine-decaying rate.
A held-out part of the calibration set picks the best epoch (epoch 0 is the uniform start).

Parameters are trained in a normalised form, ``alpha_k / 2**k`` and ``gamma / 2**(b-1)``, so one
learning rate suits every bit position and width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bwacal.quant.bwa import BitWeights
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

    def step(self, params: dict, grads: dict, lr: float):
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            params[k] -= lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)


@dataclass
class FitOptions:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    loss: str = "kl"  # kl | ce | both
    seed: int = 0


@dataclass
class FitResult:
    best_epoch: int
    history: list = field(default_factory=list)  # per epoch: train_loss, heldout_loss, heldout_top1


def _to_theta(net: QuantizedNetwork) -> dict:
    theta = {}
    for name, bw in net.bit_weights.items():
        b = bw.bits
        theta[f"{name}.alpha"] = bw.alpha / 2.0 ** np.arange(b)
        theta[f"{name}.gamma"] = bw.gamma / 2.0 ** (b - 1)
    for name, a in net.act_alpha.items():
        theta[name] = a / 2.0 ** np.arange(a.size)
    return theta


def _from_theta(net: QuantizedNetwork, theta: dict):
    bws, acts = {}, {}
    for name, bw in net.bit_weights.items():
        b = bw.bits
        bws[name] = BitWeights(theta[f"{name}.alpha"] * 2.0 ** np.arange(b), theta[f"{name}.gamma"] * 2.0 ** (b - 1))
    for name, a in net.act_alpha.items():
        acts[name] = theta[name] * 2.0 ** np.arange(a.size)
    return bws, acts


def evaluate_loss(net: QuantizedNetwork, params, batches, mode) -> tuple[float, float | None]:
    """Mean loss and top-1 (None without labels) over ``batches`` of (x, y, teacher_logp)."""
    total, correct, count, labelled = 0.0, 0, 0, False
    for x, y, t in batches:
        logits = net.forward(x, params)
        loss, _ = classification_loss(logits, y, t, mode)
        total += loss * len(x)
        count += len(x)
        if y is not None:
            labelled = True
            correct += int((logits.argmax(axis=1) == y).sum())
    return total / max(count, 1), (correct / count if labelled and count else None)


def fit_bit_weights(net: QuantizedNetwork, train_batches, heldout_batches, options: FitOptions,
                    progress=None, keep_best: bool = True) -> FitResult:
    """Train ``net``'s bit weights in place; ``*_batches()`` return iterables of (x, y, teacher_logp).

    ``train_batches(epoch)`` yields the shuffled training batches of one epoch; ``progress`` is
    called as ``progress(epoch, step, steps, loss, heldout_top1, heldout)``: after every step with
    the batch loss (``heldout`` False), and after every epoch (epoch 0: the uniform start) with the
    held-out loss and top-1 (``heldout`` True). Without ``keep_best`` (no
    held-out data) the last epoch is kept.
    """
    theta = _to_theta(net)
    best = {k: v.copy() for k, v in theta.items()}
    adam = Adam(theta, options.lr)
    wrt = [layer.weight for layer in net.layers] + list(net.act_alpha)
    steps_per_epoch = None
    history = []
    loss0, top0 = evaluate_loss(net, net.params(), heldout_batches(), options.loss)
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
            bws, acts = _from_theta(net, theta)
            params = net.params(bws, acts)
            values, tape = net.engine.run({net.model.input_name: x}, params=params, record=True, wrt=wrt)
            logits = net.model.logits(values)
            loss, dlogits = classification_loss(logits, y, t, options.loss)
            grads = net.engine.backward(tape, net.model.output_seed(dlogits), wrt=wrt)
            gtheta = {}
            for layer in net.layers:
                wq = net.weights[layer.weight]
                g = grads[layer.weight]
                if g is None:
                    continue
                g2d = np.ascontiguousarray(np.moveaxis(g, layer.axis, 0).reshape(wq.channels, -1))
                da, dg = bws[layer.weight].grads(net.planes[layer.weight], g2d, wq.step)
                b = layer.bits
                gtheta[f"{layer.weight}.alpha"] = da * 2.0 ** np.arange(b)
                gtheta[f"{layer.weight}.gamma"] = dg * 2.0 ** (b - 1)
            for name in net.act_alpha:
                if grads.get(name) is not None:
                    gtheta[name] = np.asarray(grads[name], dtype=np.float64) * 2.0 ** np.arange(theta[name].size)
            lr = options.lr * 0.5 * (1 + np.cos(np.pi * step_no / max(total_steps, 1)))
            adam.step(theta, gtheta, lr)
            step_no += 1
            losses.append(loss)
            if progress:
                progress(epoch, i + 1, steps_per_epoch, loss, None, False)
        bws, acts = _from_theta(net, theta)
        hl, ht = evaluate_loss(net, net.params(bws, acts), heldout_batches(), options.loss)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "heldout_loss": hl, "heldout_top1": ht})
        if progress:
            progress(epoch, steps_per_epoch, steps_per_epoch, hl, ht, True)
        if hl < best_loss or not keep_best:
            best_loss, best_epoch = hl, epoch
            best = {k: v.copy() for k, v in theta.items()}
    net.bit_weights, net.act_alpha = _from_theta(net, best)
    return FitResult(best_epoch, history)
