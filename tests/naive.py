"""Slow, obvious reference versions of the numba kernels in ``bwacal.kernels`` (bit planes and step
search, the Winograd transforms, the element-wise activations, the output-aware step search).

Written for clarity (Python loops or plain broadcasting, float64), never for speed; the kernel tests
compare against these.
"""

from __future__ import annotations

import numpy as np


def decompose_bitplanes(codes, bits):
    codes = np.asarray(codes, dtype=np.uint8)
    C, K = codes.shape
    planes = np.zeros((bits, C, K), dtype=np.uint8)
    for k in range(bits):
        for c in range(C):
            for j in range(K):
                planes[k, c, j] = (int(codes[c, j]) >> k) & 1
    return planes


def compose_bitplanes(planes, alpha, gamma, step):
    """Same summation order as the kernel: k = 0, 1, ..., then gamma, then times step, in float64."""
    planes = np.asarray(planes)
    alpha = np.asarray(alpha, dtype=np.float64)
    bits, C, K = planes.shape
    acc = np.zeros((C, K), dtype=np.float64)
    for k in range(bits):
        acc += alpha[:, k, None] * planes[k]
    acc += np.asarray(gamma, dtype=np.float64)[:, None]
    return (acc * np.asarray(step, dtype=np.float64)[:, None]).astype(np.float32)


def bit_weight_grads(planes, grad_w, step):
    planes = np.asarray(planes)
    g = np.asarray(grad_w, dtype=np.float64)
    step = np.asarray(step, dtype=np.float64)
    bits, C, K = planes.shape
    grad_alpha = np.zeros((C, bits))
    grad_gamma = np.zeros(C)
    for c in range(C):
        grad_gamma[c] = step[c] * sum(float(v) for v in g[c])
        for k in range(bits):
            grad_alpha[c, k] = step[c] * sum(float(g[c, j]) for j in range(K) if planes[k, c, j])
    return grad_alpha, grad_gamma


def pack_bitplanes(planes):
    planes = np.asarray(planes)
    bits, C, K = planes.shape
    out = np.zeros((bits, C, (K + 7) // 8), dtype=np.uint8)
    for k in range(bits):
        for c in range(C):
            for j in range(K):
                out[k, c, j // 8] |= (int(planes[k, c, j]) & 1) << (j % 8)
    return out


def unpack_bitplanes(packed, bits, C, K):
    packed = np.asarray(packed).reshape(bits, C, -1)
    out = np.zeros((bits, C, K), dtype=np.uint8)
    for k in range(bits):
        for c in range(C):
            for j in range(K):
                out[k, c, j] = (int(packed[k, c, j // 8]) >> (j % 8)) & 1
    return out


def quantization_errors(x, steps, qmin, qmax):
    x = np.asarray(x, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.float64)
    out = np.zeros(steps.shape)
    for c in range(steps.shape[0]):
        for r in range(steps.shape[1]):
            s = steps[c, r]
            q = np.clip(np.round(x[c] / s), qmin, qmax)
            out[c, r] = np.sum((x[c] - s * q) ** 2)
    return out


# Winograd F(2x2, 3x3) (``bwacal/kernels/winograd.py``): the transform matrices of Lavin & Gray (2016),
# applied with einsum; the kernels store 16 (rows, cols) matrices at a stride, these return
# (16, rows, cols) arrays.
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=float)
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=float)


def _winograd_tiles(x):
    """(C, P, 4, 4) input tiles of the CNHW ``x`` padded by 1 (and to even size), under the 2x2 output
    blocks, image-major then block row then block column."""
    c, n, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = np.zeros((c, n, 2 * th + 2, 2 * tw + 2))
    xp[:, :, 1:h + 1, 1:w + 1] = x
    tiles = np.empty((c, n, th, tw, 4, 4))
    for i in range(th):
        for j in range(tw):
            tiles[:, :, i, j] = xp[:, :, 2 * i:2 * i + 4, 2 * j:2 * j + 4]
    return tiles.reshape(c, n * th * tw, 4, 4)


def winograd_weights(w):
    """(16, O, C): G w[o, c] G^T."""
    u = np.einsum("ai,ocij,bj->aboc", WINOGRAD_G, w.astype(np.float64), WINOGRAD_G)
    return u.reshape(16, *w.shape[:2])


def winograd_input(x):
    """(16, C, P): B^T d B for each 4x4 tile d."""
    v = np.einsum("ai,cpij,bj->abcp", WINOGRAD_BT, _winograd_tiles(x.astype(np.float64)), WINOGRAD_BT)
    return v.reshape(16, x.shape[0], -1)


def winograd_output(m, bias, clip, shape):
    """(O, N, H, W): A^T M A + bias over the output blocks, cropped to the image and clipped."""
    o, n, h, w = shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    z = np.einsum("ai,ijop,bj->opab", WINOGRAD_AT, m.astype(np.float64).reshape(4, 4, o, -1), WINOGRAD_AT)
    y = z.reshape(o, n, th, tw, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(o, n, 2 * th, 2 * tw)
    return np.clip(y[:, :, :h, :w] + bias[:, None, None, None], *clip)


def winograd_grad(dy, y, clip):
    """For dL/dy masked by the clip ``y`` went through (y None: no mask): its input transform
    (16, O, P), the (16, O, P) ``A dy A^T`` of each 2x2 output block, and its per-channel sum."""
    dy = dy.astype(np.float64)
    if y is not None:
        dy = np.where((y > clip[0]) & (y < clip[1]), dy, 0.0)
    o, n, h, w = dy.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    blocks = np.zeros((o, n, 2 * th, 2 * tw))
    blocks[:, :, :h, :w] = dy
    blocks = blocks.reshape(o, n, th, 2, tw, 2).transpose(0, 1, 2, 4, 3, 5).reshape(o, -1, 2, 2)
    a = WINOGRAD_AT.T
    va = np.einsum("ai,opij,bj->abop", a, blocks, a).reshape(16, o, -1)
    return winograd_input(dy), va, dy.sum(axis=(1, 2, 3))


def winograd_weight_grad(acc):
    """(O, C, 3, 3): G^T acc G for the (16, O, C) sums ``acc``."""
    o, c = acc.shape[1:]
    return np.einsum("ia,abop,jb->opij", WINOGRAD_G.T, acc.reshape(4, 4, o, c), WINOGRAD_G.T)


# ---------------------------------------------------------------------------------------------
# element-wise activations (bwacal/kernels/pointwise.py): plain NumPy/SciPy in float64, several passes


def _erf64(x):
    from scipy.special import erf

    return erf(np.asarray(x, dtype=np.float64))


def erf(x):
    return _erf64(x)


def erf_grad(x, dy):
    x = np.asarray(x, dtype=np.float64)
    return dy * 2 / np.sqrt(np.pi) * np.exp(-x * x)


def gelu(x, tanh_approx):
    """Phi by scipy's ndtr; 0.5 (1 + tanh(u)) written as sigmoid(2u), which does not cancel."""
    from scipy.special import expit, ndtr

    x = np.asarray(x, dtype=np.float64)
    if tanh_approx:
        return x * expit(2 * np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))
    return x * ndtr(x)


def gelu_grad(x, dy, tanh_approx):
    from scipy.special import expit, ndtr

    x = np.asarray(x, dtype=np.float64)
    if tanh_approx:
        k = np.sqrt(2 / np.pi)
        s = expit(2 * k * (x + 0.044715 * x**3))
        return dy * (s + 2 * x * s * (1 - s) * k * (1 + 3 * 0.044715 * x**2))
    pdf = np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    return dy * (ndtr(x) + x * pdf)


def softplus(x):
    return np.logaddexp(0, np.asarray(x, dtype=np.float64))


def _sigmoid(x):
    return np.exp(-np.logaddexp(0, -x))


def softplus_grad(x, dy):
    return dy * _sigmoid(np.asarray(x, dtype=np.float64))


def mish(x):
    x = np.asarray(x, dtype=np.float64)
    return x * np.tanh(softplus(x))


def mish_grad(x, dy):
    x = np.asarray(x, dtype=np.float64)
    t = np.tanh(softplus(x))
    return dy * (t + x * (1 - t**2) * _sigmoid(x))


def elu(x, alpha):
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1))


def elu_grad(x, dy, alpha):
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, dy, dy * alpha * np.exp(np.minimum(x, 0)))


# ---------------------------------------------------------------------------------------------
# output-aware weight steps (bwacal/quant/output_steps.py)


def output_errors(w, steps, hessians, qmin, qmax):
    """``e^T H e`` per (row, candidate step), H of row c being ``hessians[c // (C // G)]``."""
    w = np.asarray(w, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.float64)
    hessians = np.asarray(hessians, dtype=np.float64).reshape(-1, w.shape[1], w.shape[1])
    per_group = w.shape[0] // hessians.shape[0]
    out = np.zeros(steps.shape)
    for c in range(steps.shape[0]):
        h = hessians[c // per_group]
        for r in range(steps.shape[1]):
            s = steps[c, r]
            e = w[c] - s * np.clip(np.round(w[c] / s), qmin, qmax)
            out[c, r] = e @ h @ e
    return out


def rectified_sigmoid(v, zeta=1.1, eta=-0.1):
    """AdaRound's h(V), one element at a time."""
    out = np.zeros(np.shape(v))
    for i, x in np.ndenumerate(np.asarray(v, dtype=np.float64)):
        out[i] = min(1.0, max(0.0, (zeta - eta) / (1.0 + np.exp(-x)) + eta))
    return out


def rounding_regularizer(v, beta):
    """sum(1 - |2 h(V) - 1|**beta)."""
    return float(sum(1.0 - abs(2.0 * h - 1.0) ** beta for h in rectified_sigmoid(v).reshape(-1)))


def soft_rounded_weights(w2d, step, bits, v, alpha, gamma):
    """Learned codes through bit weights, float64 (C, K): for each weight, the values of its floor and
    ceil codes (each clipped to the signed grid) under alpha, gamma, blended by h(V)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w2d = np.asarray(w2d, dtype=np.float64)
    h = rectified_sigmoid(v)
    out = np.zeros(w2d.shape)

    def level(c, q):
        u = int(q) - qmin
        return float(step[c]) * (sum(float(alpha[c, k]) * ((u >> k) & 1) for k in range(bits)) + float(gamma[c]))

    for c in range(w2d.shape[0]):
        for j in range(w2d.shape[1]):
            f = np.floor(w2d[c, j] / np.float64(step[c]))
            lo, hi = min(max(f, qmin), qmax), min(max(f + 1, qmin), qmax)
            out[c, j] = level(c, lo) + h[c, j] * (level(c, hi) - level(c, lo))
    return out


def moments_rounding_gradient(v, lo, span, gram, pull, beta=None, reg=0.0):
    """d/dV of ``sum(W G W) - 2 sum(W pull)`` (+ ``reg`` times the regulariser at ``beta``) with
    ``W = lo + h(V) span``, by the chain rule written out: ``dL/dW = 2 (W G - pull)``, ``dW/dh = span``,
    ``dh/dV`` of the rectified sigmoid, ``d/dh (1 - |2h - 1|**beta)``."""
    zeta, eta = 1.1, -0.1
    sig = 1.0 / (1.0 + np.exp(-v))
    stretched = sig * (zeta - eta) + eta
    h = np.clip(stretched, 0.0, 1.0)
    dh = np.where((stretched > 0) & (stretched < 1), sig * (1 - sig) * (zeta - eta), 0.0)
    grad = 2.0 * (np.matmul(lo + h * span, gram) - pull) * span * dh
    if beta is not None:
        u = 2.0 * h - 1.0
        grad = grad + reg * (-beta * np.abs(u) ** (beta - 1.0) * np.sign(u) * 2.0) * dh
    return grad


def learn_rounding(v, lo, span, gram, pull, iterations, lr, reg, warmup=0.2, beta_start=20.0, beta_end=2.0):
    """AdaRound on the moments' loss with plain NumPy: :func:`moments_rounding_gradient`, the
    paper's schedule, Adam (betas 0.9, 0.999, eps 1e-8). Returns the new ``v``."""
    v = np.array(v, dtype=np.float64)
    m, s = np.zeros_like(v), np.zeros_like(v)
    first = warmup * iterations
    for it in range(iterations):
        beta = None
        if it >= first:
            beta = beta_end + (beta_start - beta_end) * max(0.0, 1.0 - (it - first) / max(iterations - first, 1))
        grad = moments_rounding_gradient(v, lo, span, gram, pull, beta, reg)
        m = 0.9 * m + 0.1 * grad
        s = 0.999 * s + 0.001 * grad * grad
        v = v - lr * (m / (1 - 0.9 ** (it + 1))) / (np.sqrt(s / (1 - 0.999 ** (it + 1))) + 1e-8)
    return v
