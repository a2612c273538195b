"""bwacal's own op: activation fake-quantization, optionally with bit weights (BWA).

It lives in the ``bwacal`` domain only inside the engine; the exporter replaces it with standard
ops (Clip + QuantizeLinear + a Gather from the level table). The arithmetic is the
``ActivationQuantizer``'s, shared with the fitting loop and the exporter.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bwacal.ops.base import Op, register
from bwacal.quant.activations import ActivationQuantizer


class ActQuantContext(NamedTuple):
    mask: np.ndarray  # straight-through mask for dL/dx
    codes: np.ndarray | None  # unsigned codes, kept only when alpha needs a gradient


@register("bwacal::ActQuant")
class ActQuant(Op):
    """y = levels[u], u = clip(round(x / step), qmin, qmax) - qmin; straight-through gradient for x.

    With an ``alpha`` input the levels are the BWA levels ``step * (sum_k alpha_k * bit_k(u) + qmin)``
    and alpha gets a gradient.
    """

    layout = "follow"
    follow_inputs = 1

    def __init__(self, step, bits, signed):
        self.quantizer = ActivationQuantizer(bits=int(bits), signed=bool(signed), step=np.float32(step))

    def forward(self, x, alpha=None):
        y, u, mask = self.quantizer.quantize(x, alpha)
        return y, ActQuantContext(mask, u if alpha is not None else None)

    def backward(self, ctx, dy, need):
        dx = np.where(ctx.mask, dy, 0).astype(dy.dtype) if need[0] else None
        dalpha = None
        if len(need) > 1 and need[1]:
            dalpha = self.quantizer.alpha_grad(ctx.codes, dy)
        return dx, dalpha
