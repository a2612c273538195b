"""bwacal's own op: activation fake-quantization, optionally with bit weights (BWA).

It lives in the ``bwacal`` domain only inside the engine; writers replace it with standard ops
(Clip + QuantizeLinear + DequantizeLinear, or a Gather from a level table).
"""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, register
from bwacal.quant.bwa import code_bits


def activation_levels(step, bits, signed, alpha=None) -> np.ndarray:
    """float32 (2**bits,): the value of each unsigned code ``u``; uniform when ``alpha`` is None."""
    qmin = -(2 ** (bits - 1)) if signed else 0
    if alpha is None:
        acc = np.arange(2**bits, dtype=np.float64)
    else:
        table = code_bits(bits)
        acc = np.zeros(2**bits)
        for k in range(bits):
            acc += np.float64(alpha[k]) * table[:, k]
    return ((acc + qmin) * np.float64(np.float32(step))).astype(np.float32)


@register("bwacal::ActQuant")
class ActQuant(Op):
    """y = levels[u], u = clip(round(x / step), qmin, qmax) - qmin; straight-through gradient for x.

    Rounding is done on ``x / step`` in float32, half to even, exactly as ONNX QuantizeLinear does,
    so a written model reproduces it bit for bit. With an ``alpha`` input the levels are the BWA
    levels ``step * (sum_k alpha_k * bit_k(u) + qmin)`` and alpha gets a gradient.
    """

    layout = "follow"
    follow_inputs = 1

    def __init__(self, step, bits, signed):
        self.step, self.bits, self.signed = np.float32(step), int(bits), bool(signed)
        self.qmin = -(2 ** (self.bits - 1)) if self.signed else 0
        self.qmax = self.qmin + 2**self.bits - 1
        self.table = code_bits(self.bits).astype(np.float64)

    def forward(self, x, alpha=None):
        r = np.round(x.astype(np.float32, copy=False) / self.step)
        mask = (r >= self.qmin) & (r <= self.qmax)
        u = (np.clip(r, self.qmin, self.qmax) - self.qmin).astype(np.uint8)
        levels = activation_levels(self.step, self.bits, self.signed, alpha)
        return levels[u], (mask, u if alpha is not None else None)

    def backward(self, ctx, dy, need):
        mask, u = ctx
        dx = np.where(mask, dy, 0).astype(dy.dtype) if need[0] else None
        dalpha = None
        if len(need) > 1 and need[1]:
            per_code = np.bincount(u.reshape(-1), weights=dy.reshape(-1).astype(np.float64), minlength=2**self.bits)
            dalpha = np.float64(self.step) * (per_code @ self.table)
        return dx, dalpha
