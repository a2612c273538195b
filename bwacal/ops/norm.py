"""BatchNormalization in inference mode (running statistics)."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, Unsupported, register


@register("BatchNormalization")
class BatchNormalization(Op):
    """A 4-D input arrives channel-major (CNHW); other ranks keep channels on axis 1."""

    layout = "cnhw"

    def __init__(self, epsilon=1e-5, momentum=0.9, training_mode=0, spatial=1, is_test=None,
                 consumed_inputs=None):
        if training_mode:
            raise Unsupported("training_mode=1 (only inference-mode BatchNormalization is supported)")
        if not spatial:
            raise Unsupported("spatial=0 is not supported")
        self.epsilon = epsilon

    def forward(self, x, scale, bias, mean, var):
        shape = (-1, 1, 1, 1) if x.ndim == 4 else (1, -1) + (1,) * (x.ndim - 2)
        inv = (1.0 / np.sqrt(var.astype(np.float64) + self.epsilon)).astype(x.dtype)
        a = (scale * inv).reshape(shape)
        y = x * a + (bias - mean * scale * inv).reshape(shape)
        return y.astype(x.dtype, copy=False), (x, a, mean.reshape(shape), inv.reshape(shape))

    def backward(self, ctx, dy, need):
        x, a, mean, inv = ctx
        axes = (1, 2, 3) if dy.ndim == 4 else (0,) + tuple(range(2, dy.ndim))
        dx = dy * a if need[0] else None
        dscale = (dy * ((x - mean) * inv)).sum(axis=axes) if need[1] else None
        dbias = dy.sum(axis=axes) if need[2] else None
        return dx, dscale, dbias, None, None
