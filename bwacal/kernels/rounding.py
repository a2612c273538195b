"""AdaRound's optimisation step on the rounding variables (``bwacal.quant.rounding.learn_rounding``
is its wrapper; ``tests/naive.py`` has the NumPy twin)."""

from __future__ import annotations

import numba
import numpy as np

from bwacal.kernels.flags import JIT

ZETA, ETA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's zeta and gamma)


@numba.njit(**JIT)
def adam_rounding_step(v, m, s, lo, span, gw, pull, beta, reg, lr, b1, b2, c1, c2, eps, w):
    """One AdaRound step on the rounding variables, in place, fused: the gradient, Adam, the next weights.

    With ``h, dh = h(V), dh/dV`` (the rectified sigmoid), the gradient of the reconstruction loss is
    ``2 (gw - pull) span dh`` (``gw = W~ G``, ``pull = X w`` of the moments), plus ``reg`` times the
    regulariser's ``-2 beta |2h - 1|**(beta - 1) sign(2h - 1) dh`` when ``beta > 0``; Adam (moments
    ``m`` and ``s``, bias corrections ``c1``, ``c2``) updates ``v``; then ``w = lo + h(V) span`` for
    the next product. All flat, the same length; ``gw`` and ``w`` in the product's precision
    (float32 or float64), the rest float64.

    Parameters
    ----------
    v, m, s : float64[::1], updated in place; w : float32 or float64[::1], written
    lo, span, pull : float64[::1]; gw : float32 or float64[::1]
    beta : float (<= 0: no regulariser); reg, lr, b1, b2, c1, c2, eps : float
    """
    stretch = ZETA - ETA
    for i in range(v.size):
        sig = 1.0 / (1.0 + np.exp(-v[i]))
        t = sig * stretch + ETA
        if t > 0.0 and t < 1.0:
            h, dh = t, sig * (1.0 - sig) * stretch
        else:
            h, dh = min(max(t, 0.0), 1.0), 0.0
        g = 2.0 * (gw[i] - pull[i]) * span[i] * dh
        if beta > 0.0 and dh != 0.0:
            u = 2.0 * h - 1.0
            if u != 0.0:
                g -= reg * 2.0 * beta * abs(u) ** (beta - 1.0) * (1.0 if u > 0.0 else -1.0) * dh
        m[i] = b1 * m[i] + (1.0 - b1) * g
        s[i] = b2 * s[i] + (1.0 - b2) * g * g
        v[i] -= lr * (m[i] / c1) / (np.sqrt(s[i] / c2) + eps)
        sig = 1.0 / (1.0 + np.exp(-v[i]))
        w[i] = lo[i] + min(max(sig * stretch + ETA, 0.0), 1.0) * span[i]
