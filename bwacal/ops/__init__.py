"""Op registry: one family of ops per module, each op a small class with forward and backward."""

from bwacal.ops.base import REGISTRY, Op, Unsupported, make_op, register
from bwacal.ops import conv, elementwise, generate, linear, logic, norm, pool, qdq, quant, reduce, shape, softmax  # noqa: F401

__all__ = ["REGISTRY", "Op", "Unsupported", "make_op", "register"]
