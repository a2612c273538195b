"""Slow, obvious reference versions of the numba kernels in ``bwacal.kernels``.

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
