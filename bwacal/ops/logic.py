"""Comparisons, boolean logic, bit shifts and Where. Comparisons, boolean and bit ops pass no
gradient; Where passes the gradient to whichever of X and Y it took each element from."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, Unsupported, register


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


@register("BitShift")
class BitShift(Op):
    """Shifts of integers in their own width (a left shift drops the high bits; a right shift of a
    signed integer keeps its sign), as the packed weights of ``bwacal.export`` use it to unpack bit
    planes."""

    differentiable = False

    def __init__(self, direction):
        direction = direction.decode() if isinstance(direction, bytes) else direction
        if direction not in ("LEFT", "RIGHT"):
            raise Unsupported(f"direction {direction!r} (LEFT or RIGHT)")
        self.fn = np.left_shift if direction == "LEFT" else np.right_shift

    def forward(self, x, y):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind not in "iu" or y.dtype != x.dtype:
            raise ValueError(f"BitShift needs integers of one type, got {x.dtype} and {y.dtype}")
        return self.fn(x, y).astype(x.dtype), None


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
