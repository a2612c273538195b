"""Normalizations: BatchNormalization in inference mode (running statistics), LayerNormalization,
InstanceNormalization, GroupNormalization (statistics of the input itself) and LRN."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, Unsupported, register


def _standardize(x, axes, epsilon):
    """(x - mean) / sqrt(var + epsilon) over ``axes``, computed in float64 for float64 ``x`` and in
    float32 otherwise; returns (xhat, mean, inv_std), the last two with kept dims."""
    xw = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    mean = xw.mean(axis=axes, keepdims=True)
    centered = xw - mean
    var = np.mean(centered * centered, axis=axes, keepdims=True)
    inv = 1.0 / np.sqrt(var + centered.dtype.type(epsilon))
    return centered * inv, mean, inv


def _standardize_grad(dxhat, xhat, inv, axes):
    """dL/dx given dL/dxhat, for ``xhat, _, inv = _standardize(x, axes, epsilon)``."""
    return inv * (dxhat - dxhat.mean(axis=axes, keepdims=True)
                  - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))


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


@register("LayerNormalization")
class LayerNormalization(Op):
    """Normalizes over the axes from ``axis`` on; the optional Mean and InvStdDev outputs are
    float32 (the spec's stash type) and carry no gradient."""

    max_outputs = 3

    def __init__(self, axis=-1, epsilon=1e-5, stash_type=1):
        if stash_type != 1:
            raise Unsupported(f"stash_type={stash_type} (only 1, float32 statistics, is supported)")
        self.axis, self.epsilon = axis, epsilon

    def forward(self, x, scale, bias=None):
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        axes = tuple(range(axis, x.ndim))
        xhat, mean, inv = _standardize(x, axes, self.epsilon)
        y = xhat * scale
        if bias is not None:
            y += bias
        stats = (mean.astype(np.float32, copy=False), inv.astype(np.float32, copy=False))
        return (y.astype(x.dtype, copy=False), *stats), (xhat, inv, scale, axes)

    def backward(self, ctx, dy, need):
        xhat, inv, scale, axes = ctx
        dx = _standardize_grad(dy * scale, xhat, inv, axes).astype(dy.dtype, copy=False) if need[0] else None
        # scale and bias broadcast against the normalized axes: the engine sums the rest away
        dscale = dy * xhat if need[1] else None
        dbias = dy if len(need) > 2 and need[2] else None
        return dx, dscale, dbias


def _channel_view(ndim, channel_major):
    """Where the channels are and how a per-channel vector broadcasts: (channel axis, the other
    axes, the vector's shape)."""
    channel = 0 if channel_major else 1
    shape = [1] * ndim
    shape[channel] = -1
    return channel, tuple(a for a in range(ndim) if a != channel), tuple(shape)


@register("InstanceNormalization")
class InstanceNormalization(Op):
    """Per image and channel over the spatial axes; a 4-D input arrives channel-major (CNHW)."""

    layout = "cnhw"

    def __init__(self, epsilon=1e-5):
        self.epsilon = epsilon

    def forward(self, x, scale, bias):
        _, others, shape = _channel_view(x.ndim, x.ndim == 4)
        spatial = tuple(range(2, x.ndim))  # the last axes in both layouts
        xhat, _, inv = _standardize(x, spatial, self.epsilon)
        y = xhat * scale.reshape(shape) + bias.reshape(shape)
        return y.astype(x.dtype, copy=False), (xhat, inv, scale.reshape(shape), spatial, others)

    def backward(self, ctx, dy, need):
        xhat, inv, scale, spatial, others = ctx
        dx = _standardize_grad(dy * scale, xhat, inv, spatial).astype(dy.dtype, copy=False) if need[0] else None
        dscale = (dy * xhat).sum(axis=others) if need[1] else None
        dbias = dy.sum(axis=others) if need[2] else None
        return dx, dscale, dbias


@register("GroupNormalization")
class GroupNormalization(Op):
    """Statistics per image over each group of C/num_groups channels and the spatial axes. Scale
    and bias hold one value per group before opset 21 and one per channel from 21 on."""

    def __init__(self, num_groups, epsilon=1e-5, stash_type=1, opset=21):
        if stash_type != 1:
            raise Unsupported(f"stash_type={stash_type} (only 1, float32 statistics, is supported)")
        self.groups, self.epsilon, self.per_group = num_groups, epsilon, opset < 21

    def forward(self, x, scale, bias):
        n, c = x.shape[:2]
        if c % self.groups:
            raise ValueError(f"{c} channels do not divide into {self.groups} groups")
        grouped = x.reshape(n, self.groups, c // self.groups, *x.shape[2:])
        axes = tuple(range(2, grouped.ndim))
        xhat, _, inv = _standardize(grouped, axes, self.epsilon)
        xhat = xhat.reshape(x.shape)
        if self.per_group:
            scale, bias = np.repeat(scale, c // self.groups), np.repeat(bias, c // self.groups)
        shape = (1, c) + (1,) * (x.ndim - 2)
        y = xhat * scale.reshape(shape) + bias.reshape(shape)
        return y.astype(x.dtype, copy=False), (xhat, inv, scale.reshape(shape), axes)

    def backward(self, ctx, dy, need):
        xhat, inv, scale, axes = ctx
        n, c = dy.shape[:2]
        dx = None
        if need[0]:
            grouped = (n, self.groups, c // self.groups, *dy.shape[2:])
            dx = _standardize_grad((dy * scale).reshape(grouped), xhat.reshape(grouped), inv, axes)
            dx = dx.reshape(dy.shape).astype(dy.dtype, copy=False)
        others = (0,) + tuple(range(2, dy.ndim))
        dscale = (dy * xhat).sum(axis=others) if need[1] else None
        dbias = dy.sum(axis=others) if need[2] else None
        if self.per_group:  # a group's value served each of its channels
            dscale = None if dscale is None else dscale.reshape(self.groups, -1).sum(axis=1)
            dbias = None if dbias is None else dbias.reshape(self.groups, -1).sum(axis=1)
        return dx, dscale, dbias


def _window_sum(a, axis, before, after):
    """out[c] = sum of a[c - before : c + after + 1] along ``axis``, clipped to the array (one
    shifted add per offset: LRN windows are a few channels, and a running cumsum would lose float32
    precision to cancellation)."""
    out = a.copy()
    n = a.shape[axis]
    for off in range(-before, after + 1):
        if off == 0 or abs(off) >= n:
            continue
        dst = [slice(None)] * a.ndim
        src = [slice(None)] * a.ndim
        dst[axis], src[axis] = slice(max(0, -off), n - max(0, off)), slice(max(0, off), n - max(0, -off))
        out[tuple(dst)] += a[tuple(src)]
    return out


@register("LRN")
class LRN(Op):
    """Local response normalization across channels (caffe2's AlexNet, GoogLeNet):
    y = x / (bias + alpha / size * sum of x^2 over channels c - floor((size-1)/2) .. c + ceil((size-1)/2))^beta.
    A 4-D input arrives channel-major (CNHW)."""

    layout = "cnhw"

    def __init__(self, size, alpha=1e-4, beta=0.75, bias=1.0):
        self.size, self.alpha, self.beta, self.bias = int(size), float(alpha), float(beta), float(bias)
        self.before, self.after = (self.size - 1) // 2, self.size // 2

    def forward(self, x):
        channel = 0 if x.ndim == 4 else 1
        t = x.dtype.type
        s = t(self.bias) + t(self.alpha / self.size) * _window_sum(x * x, channel, self.before, self.after)
        p = s ** t(-self.beta)
        return x * p, (x, s, p, channel)

    def backward(self, ctx, dy, need):
        x, s, p, channel = ctx
        t = dy.dtype.type
        # y_c = x_c p_c reads x_i through every window c that holds i: c in i - after .. i + before
        back = _window_sum(dy * x * p / s, channel, self.after, self.before)
        return (dy * p - t(2 * self.beta * self.alpha / self.size) * x * back,)
