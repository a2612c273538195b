"""Reductions over axes (ReduceSum, ReduceMean, ReduceMax, ...), ArgMax/ArgMin and the global pools."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bwacal.ops.base import Op, register


class _ReduceCtx(NamedTuple):
    shape: tuple
    axes: tuple | None  # None: noop_with_empty_axes took effect
    x: np.ndarray | None  # None unless the op saves_input
    y: np.ndarray | None  # the result with kept dims, likewise


class _Reduce(Op):
    """A reduction over ``axes``: an attribute before the opset where it became an input (13 for
    ReduceSum, 18 for the rest), an optional input from then on. Empty axes reduce everything unless
    ``noop_with_empty_axes``, when the op is its identity element-wise part (x, x*x, |x|, ...)."""

    saves_input = True  # backward reads x and the kept-dims result (ReduceSum/Mean need neither)

    def __init__(self, axes=None, keepdims=1, noop_with_empty_axes=0):
        self.axes_attr, self.keepdims, self.noop = axes, keepdims, noop_with_empty_axes

    def forward(self, x, axes=None):
        axes = [int(a) for a in np.asarray(axes).reshape(-1)] if axes is not None else self.axes_attr
        if not axes:
            if self.noop:
                return self.noop_value(x), _ReduceCtx(x.shape, None, x, None)
            axes = list(range(x.ndim))
        axes = tuple(sorted(a + x.ndim if a < 0 else a for a in axes))
        y = np.asarray(self.reduce(x, axes)).astype(x.dtype, copy=False)
        ctx = _ReduceCtx(x.shape, axes, x, y) if self.saves_input else _ReduceCtx(x.shape, axes, None, None)
        return (y if self.keepdims else np.squeeze(y, axis=axes)), ctx

    def noop_value(self, x):
        return x

    def backward(self, ctx, dy, need):
        if ctx.axes is None:
            return self.noop_grad(ctx.x, dy), None
        g = dy if self.keepdims else np.expand_dims(dy, ctx.axes)
        return self.grad(ctx, g), None

    def noop_grad(self, x, dy):
        return dy


@register("ReduceSum")
class ReduceSum(_Reduce):
    saves_input = False

    def reduce(self, x, axes):
        return np.sum(x, axis=axes, keepdims=True)

    def grad(self, ctx, g):
        return np.broadcast_to(g, ctx.shape)


@register("ReduceMean")
class ReduceMean(_Reduce):
    saves_input = False

    def reduce(self, x, axes):
        return np.mean(x, axis=axes, keepdims=True)

    def grad(self, ctx, g):
        count = int(np.prod([ctx.shape[a] for a in ctx.axes]))
        return np.broadcast_to(g / g.dtype.type(count), ctx.shape)


@register("ReduceSumSquare")
class ReduceSumSquare(_Reduce):
    def reduce(self, x, axes):
        return np.sum(x * x, axis=axes, keepdims=True)

    def noop_value(self, x):
        return x * x

    def grad(self, ctx, g):
        return 2 * ctx.x * g

    def noop_grad(self, x, dy):
        return 2 * x * dy


@register("ReduceL1")
class ReduceL1(_Reduce):
    def reduce(self, x, axes):
        return np.sum(np.abs(x), axis=axes, keepdims=True)

    def noop_value(self, x):
        return np.abs(x)

    def grad(self, ctx, g):
        return np.sign(ctx.x) * g

    def noop_grad(self, x, dy):
        return np.sign(x) * dy


@register("ReduceL2")
class ReduceL2(_Reduce):
    def reduce(self, x, axes):
        return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))

    def noop_value(self, x):
        return np.abs(x)

    def grad(self, ctx, g):
        # d sqrt(sum x^2) / dx = x / y; 0 where the whole slice is 0 (the subgradient torch takes)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ctx.y == 0, 0, ctx.x / ctx.y) * g

    def noop_grad(self, x, dy):
        return np.sign(x) * dy


@register("ReduceLogSumExp")
class ReduceLogSumExp(_Reduce):
    def reduce(self, x, axes):
        if x.size == 0:
            return np.full([1 if a in axes else n for a, n in enumerate(x.shape)], -np.inf, dtype=x.dtype)
        m = np.max(x, axis=axes, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)  # all -inf (or an inf): no shift, the sum says it
        return m + np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True))

    def grad(self, ctx, g):
        return np.exp(ctx.x - ctx.y) * g  # the softmax of x over the axes


@register("ReduceProd")
class ReduceProd(_Reduce):
    def reduce(self, x, axes):
        return np.prod(x, axis=axes, keepdims=True)

    def grad(self, ctx, g):
        x, axes = ctx.x, ctx.axes
        # the product of every other element of the slice, as exclusive prefix times suffix
        # products (x / x_i would divide by the zeros the slice may hold)
        kept = [a for a in range(x.ndim) if a not in axes]
        moved = np.transpose(x, kept + list(axes))
        flat = moved.reshape(moved.shape[:len(kept)] + (-1,))
        ones = np.ones(flat.shape[:-1] + (1,), dtype=x.dtype)
        before = np.cumprod(np.concatenate([ones, flat[..., :-1]], axis=-1), axis=-1)
        after = np.cumprod(np.concatenate([ones, flat[..., :0:-1]], axis=-1), axis=-1)[..., ::-1]
        others = (before * after)[..., :flat.shape[-1]]  # an empty slice has no factor at all
        others = np.transpose(others.reshape(moved.shape), np.argsort(kept + list(axes)))
        return others * g


class _ReduceExtreme(_Reduce):
    """ReduceMax/ReduceMin. The gradient goes to the winner; where several elements tie for it,
    it is shared equally among them (as torch's amax/amin do): the sum over the slice is dy."""

    pick = None  # np.max or np.min
    empty = None  # the value of an empty slice (-inf for max, inf for min)

    def reduce(self, x, axes):
        if x.size == 0:
            fill = self.empty if x.dtype.kind == "f" else self.empty_int(x.dtype)
            return np.full([1 if a in axes else n for a, n in enumerate(x.shape)], fill, dtype=x.dtype)
        return self.pick(x, axis=axes, keepdims=True)

    def grad(self, ctx, g):
        won = ctx.x == ctx.y
        return won * (g / np.sum(won, axis=ctx.axes, keepdims=True).astype(g.dtype))


@register("ReduceMax")
class ReduceMax(_ReduceExtreme):
    pick, empty = staticmethod(np.max), -np.inf

    @staticmethod
    def empty_int(dtype):
        return False if dtype == np.bool_ else np.iinfo(dtype).min


@register("ReduceMin")
class ReduceMin(_ReduceExtreme):
    pick, empty = staticmethod(np.min), np.inf

    @staticmethod
    def empty_int(dtype):
        return True if dtype == np.bool_ else np.iinfo(dtype).max


class _ArgExtreme(Op):
    differentiable = False
    pick = None  # np.argmax or np.argmin

    def __init__(self, axis=0, keepdims=1, select_last_index=0):
        self.axis, self.keepdims, self.last = axis, keepdims, select_last_index

    def forward(self, x):
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        if self.last:  # NumPy picks the first of a tie: search the reversed axis
            idx = x.shape[axis] - 1 - self.pick(np.flip(x, axis), axis=axis, keepdims=True)
        else:
            idx = self.pick(x, axis=axis, keepdims=True)
        idx = idx.astype(np.int64)
        return (idx if self.keepdims else np.squeeze(idx, axis=axis)), None


@register("ArgMax")
class ArgMax(_ArgExtreme):
    pick = staticmethod(np.argmax)


@register("ArgMin")
class ArgMin(_ArgExtreme):
    pick = staticmethod(np.argmin)


@register("GlobalAveragePool")
class GlobalAveragePool(Op):
    layout = "cnhw"  # reduces the last two axes: the same code serves NCHW and CNHW
    def forward(self, x):
        axes = tuple(range(2, x.ndim))
        return x.mean(axis=axes, keepdims=True, dtype=np.float64 if x.dtype == np.float64 else np.float32).astype(x.dtype), x.shape

    def backward(self, ctx, dy, need):
        count = int(np.prod(ctx[2:]))
        return (np.broadcast_to(dy / dy.dtype.type(count), ctx),)


@register("GlobalMaxPool")
class GlobalMaxPool(Op):
    layout = "cnhw"  # reduces the last two axes: the same code serves NCHW and CNHW
    def forward(self, x):
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        idx = flat.argmax(axis=2)
        y = np.take_along_axis(flat, idx[..., None], axis=2)
        return y.reshape(x.shape[:2] + (1,) * (x.ndim - 2)), (x.shape, idx)

    def backward(self, ctx, dy, need):
        shape, idx = ctx
        dx = np.zeros((shape[0], shape[1], int(np.prod(shape[2:]))), dtype=dy.dtype)
        np.put_along_axis(dx, idx[..., None], dy.reshape(shape[0], shape[1], 1), axis=2)
        return (dx.reshape(shape),)
