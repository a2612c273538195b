"""Comparisons, boolean logic and Where. Comparisons and boolean ops output bool and pass no
gradient; Where passes the gradient to whichever of X and Y it took each element from."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, register


class _Elementwise(Op):
    layout = "follow"
    differentiable = False
    fn = None  # the NumPy ufunc

    def forward(self, *xs):
        return type(self).fn(*xs), None


@register("Equal")
class Equal(_Elementwise):
    fn = np.equal


@register("Greater")
class Greater(_Elementwise):
    fn = np.greater


@register("Less")
class Less(_Elementwise):
    fn = np.less


@register("GreaterOrEqual")
class GreaterOrEqual(_Elementwise):
    fn = np.greater_equal


@register("LessOrEqual")
class LessOrEqual(_Elementwise):
    fn = np.less_equal


@register("Not")
class Not(_Elementwise):
    fn = np.logical_not


@register("And")
class And(_Elementwise):
    fn = np.logical_and


@register("Or")
class Or(_Elementwise):
    fn = np.logical_or


@register("Xor")
class Xor(_Elementwise):
    fn = np.logical_xor


@register("Where")
class Where(Op):
    layout = "follow"

    def forward(self, condition, x, y):
        condition = np.asarray(condition, dtype=bool)
        return np.where(condition, x, y), condition

    def backward(self, ctx, dy, need):
        dx = np.where(ctx, dy, 0).astype(dy.dtype, copy=False) if need[1] else None
        dy_ = np.where(ctx, 0, dy).astype(dy.dtype, copy=False) if need[2] else None
        return None, dx, dy_
