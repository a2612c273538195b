"""The BWA module's arithmetic: ``value(u) = step * (sum_k alpha[k] * bit_k(u) + gamma)``.

The pieces every quantizer shares: the bits of each code, the uniform bit weights ``2**k`` and the
normalisation the optimiser sees, and the level table (the value of each of the ``2**bits`` codes).
"""

from __future__ import annotations

import numpy as np


def code_bits(bits: int) -> np.ndarray:
    """uint8 (2**bits, bits): row ``u`` holds the bits of code ``u``, least significant first."""
    u = np.arange(2**bits, dtype=np.uint16)[:, None]
    return ((u >> np.arange(bits, dtype=np.uint16)[None, :]) & 1).astype(np.uint8)


def bit_scale(bits: int) -> np.ndarray:
    """float64 (bits,): ``2**k``, the uniform bit weights; the optimiser sees ``alpha / 2**k``."""
    return 2.0 ** np.arange(bits)


def code_levels(alpha, gamma, step) -> np.ndarray:
    """float32 (C, 2**bits): the value of code ``u`` of channel ``c``, ``step[c] * (sum_k alpha[c, k] *
    bit_k(u) + gamma[c])``.

    ``alpha`` (C, bits), ``gamma`` and ``step`` (C,). Summed in float64 in the order of the compose
    kernel (k = 0, 1, ..., then gamma, then one product with the step and one float32 rounding), so
    every composed weight equals one of these values exactly.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    channels, bits = alpha.shape
    table = code_bits(bits)
    acc = np.zeros((channels, 2**bits))
    for k in range(bits):
        acc += alpha[:, k, None] * table[None, :, k]
    acc += np.asarray(gamma, dtype=np.float64).reshape(-1, 1)
    return (acc * np.asarray(step, dtype=np.float64).reshape(-1, 1)).astype(np.float32)
