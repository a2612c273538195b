"""Bit weights: the BWA module ``W_c = s_c * (sum_k alpha[c, k] * beta_k + gamma[c])`` on fixed codes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bwacal.kernels import bit_weight_grads, compose_bitplanes
from bwacal.quant.uniform import check_bits


def code_bits(bits: int) -> np.ndarray:
    """uint8 (2**bits, bits): row ``u`` holds the bits of code ``u``, least significant first."""
    u = np.arange(2**bits, dtype=np.uint16)[:, None]
    return ((u >> np.arange(bits, dtype=np.uint16)[None, :]) & 1).astype(np.uint8)


@dataclass
class BitWeights:
    """Per-channel bit weights: ``alpha`` float64 (C, bits) and offset ``gamma`` float64 (C,)."""

    alpha: np.ndarray
    gamma: np.ndarray

    @classmethod
    def uniform(cls, channels: int, bits: int) -> "BitWeights":
        """``alpha = 2**k``, ``gamma = -2**(bits-1)``: composes to the uniform dequantization exactly."""
        bits = check_bits(bits)
        alpha = np.tile(2.0 ** np.arange(bits), (channels, 1))
        gamma = np.full(channels, -(2.0 ** (bits - 1)))
        return cls(alpha=alpha, gamma=gamma)

    @property
    def bits(self) -> int:
        return self.alpha.shape[1]

    @property
    def channels(self) -> int:
        return self.alpha.shape[0]

    def compose(self, planes, step) -> np.ndarray:
        """Weights float32 (C, K) from bit planes uint8 (bits, C, K) and steps (C,)."""
        return compose_bitplanes(planes, self.alpha, self.gamma, step)

    def grads(self, planes, grad_w, step) -> tuple[np.ndarray, np.ndarray]:
        """``(dL/dalpha (C, bits), dL/dgamma (C,))`` float64 from dL/dW (C, K)."""
        return bit_weight_grads(planes, grad_w, step)

    def levels(self, step) -> np.ndarray:
        """float32 (C, 2**bits): the value each code takes; row c, column u is code u of channel c.

        Computed with the same float64 summation order as the compose kernel, so every composed
        weight equals one of these values exactly.
        """
        table = code_bits(self.bits)  # (2**bits, bits)
        acc = np.zeros((self.channels, 2**self.bits))
        for k in range(self.bits):
            acc += self.alpha[:, k, None] * table[None, :, k]
        acc += self.gamma[:, None]
        return (acc * np.asarray(step, dtype=np.float64).reshape(-1, 1)).astype(np.float32)

    def copy(self) -> "BitWeights":
        return BitWeights(alpha=self.alpha.copy(), gamma=self.gamma.copy())
