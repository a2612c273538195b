"""Learned rounding (AdaRound, Nagel et al. 2020): each weight chooses between floor and ceil.

``h(V) = clip(sigmoid(V) * (ZETA - ETA) + ETA, 0, 1)`` is the rectified sigmoid: it reaches 0 and 1
exactly for finite ``V`` (so the regulariser can push every weight to a hard choice) and its
gradient does not vanish near them the way a plain sigmoid's does.
"""

from __future__ import annotations

import numpy as np

from bwacal.kernels.rounding import ETA, ZETA, adam_rounding_step  # noqa: F401  (ZETA, ETA: the stretch, the paper's zeta and gamma)
from bwacal.runtime import blas_on_all_cores



def rectified_sigmoid_and_grad(v) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(h(V), dh/dV)`` from one sigmoid: ``dh/dV = sigmoid'(V) * (ZETA - ETA)`` where ``h``
    is not clipped, else 0."""
    s = 1.0 / (1.0 + np.exp(-np.asarray(v, dtype=np.float64)))
    stretched = s * (ZETA - ETA) + ETA
    inside = (stretched > 0.0) & (stretched < 1.0)
    return np.clip(stretched, 0.0, 1.0), np.where(inside, s * (1.0 - s) * (ZETA - ETA), 0.0)


def rectified_sigmoid(v) -> np.ndarray:
    """float64 ``h(V) = clip(sigmoid(V) * (ZETA - ETA) + ETA, 0, 1)``."""
    s = 1.0 / (1.0 + np.exp(-np.asarray(v, dtype=np.float64)))
    return np.clip(s * (ZETA - ETA) + ETA, 0.0, 1.0)


def rectified_sigmoid_grad(v) -> np.ndarray:
    """float64 ``dh/dV``: ``sigmoid'(V) * (ZETA - ETA)`` where ``h`` is not clipped, else 0."""
    return rectified_sigmoid_and_grad(v)[1]


def initial_v(frac) -> np.ndarray:
    """float64 ``V`` with ``h(V) = frac`` (the fractional part of ``W / step``, in [0, 1))."""
    p = (np.asarray(frac, dtype=np.float64) - ETA) / (ZETA - ETA)  # in (0, 1): ETA < 0 < 1 < ZETA
    return np.log(p) - np.log1p(-p)


def rounding_regularizer(v, beta: float) -> tuple[float, np.ndarray]:
    """``(sum(1 - |2h(V) - 1|**beta), d/dV)``: zero when every ``h`` is 0 or 1, largest at 0.5."""
    h, dh_dv = rectified_sigmoid_and_grad(v)
    value = float(np.sum(1.0 - np.abs(2.0 * h - 1.0) ** beta))
    return value, regularizer_grad(h, dh_dv, beta)


def regularizer_grad(h, dh_dv, beta: float) -> np.ndarray:
    """d/dV of ``sum(1 - |2h - 1|**beta)`` given ``h`` and ``dh/dV``."""
    t = 2.0 * h - 1.0
    # d/dh (1 - |t|^beta) = -beta |t|^(beta-1) sign(t) * 2
    return -2.0 * beta * np.abs(t) ** (beta - 1.0) * np.sign(t) * dh_dv


def annealed_beta(iteration: int, iterations: int, warmup: float = 0.2, start: float = 20.0,
                  end: float = 2.0) -> float | None:
    """The regulariser's exponent at ``iteration`` (0-based): None (no regulariser) during the first
    ``warmup`` fraction, then decaying linearly from ``start`` to ``end`` (AdaRound's schedule)."""
    first = warmup * iterations
    if iteration < first:
        return None
    progress = (iteration - first) / max(iterations - first, 1)
    return end + (start - end) * max(0.0, 1.0 - progress)


# Multiply-adds of one W~ G product from which it runs on every core (a 256 x 2304 layer is 1.4e9,
# a 64 x 576 one 2.1e7)
PARALLEL_MACS = 1 << 28


def learn_rounding(v, lo, span, gram, pull, iterations: int, lr: float, reg: float, warmup: float = 0.2,
                   beta_start: float = 20.0, beta_end: float = 2.0, betas=(0.9, 0.999), eps: float = 1e-8,
                   product=np.float32, threads: int | None = None):
    """AdaRound's optimisation of ``v`` in place with the exact gradient of the moments' loss
    ``sum w G w - 2 w X w_fp`` (see ``bwacal.adaround``): Adam at rate ``lr``, the regulariser (weight
    ``reg``) after ``warmup`` with its exponent annealed from ``beta_start`` to ``beta_end``.

    ``v``, ``lo``, ``span`` and ``pull`` float64 (G, C/G, K), ``gram`` float64 (G, K, K) symmetric;
    the weights are ``lo + h(v) span``. Adam runs in float64; the product ``W~ G``, which is nearly
    all of the work, in ``product`` precision (float32: half float64's time, a relative error near
    1e-7 in each gradient entry), on ``threads`` BLAS threads (default: every core numba uses,
    ``runtime.blas_on_all_cores``, when one product is at least ``PARALLEL_MACS`` multiply-adds, else
    one: on smaller products BLAS's threads cost more than they share, benchmarks/adaround_cost.py).
    """
    lo, span, pull = (np.ascontiguousarray(a, dtype=np.float64) for a in (lo, span, pull))
    gram = np.ascontiguousarray(gram, dtype=product)
    if v.dtype != np.float64 or not v.flags.c_contiguous:
        raise ValueError("v must be a C-contiguous float64 array (it is updated in place)")
    m, s = np.zeros_like(v), np.zeros_like(v)
    w = (lo + rectified_sigmoid(v) * span).astype(product)
    gw = np.empty_like(w)
    flat = [a.reshape(-1) for a in (v, m, s, lo, span, gw, pull, w)]
    b1, b2 = betas
    if threads is None and v.size * gram.shape[-1] < PARALLEL_MACS:
        threads = 1
    with blas_on_all_cores(threads):
        for it in range(iterations):
            np.matmul(w, gram, out=gw)
            beta = annealed_beta(it, iterations, warmup, beta_start, beta_end)
            t = it + 1
            adam_rounding_step(flat[0], flat[1], flat[2], flat[3], flat[4], flat[5], flat[6],
                                -1.0 if beta is None else float(beta), float(reg), float(lr), b1, b2,
                                1.0 - b1**t, 1.0 - b2**t, eps, flat[7])
