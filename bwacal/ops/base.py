"""The op registry and the contract every op follows.

An op is a small class. Its ``__init__`` takes the ONNX attributes as keyword arguments with the
spec's defaults (plus ``opset`` when the semantics depend on it), so the signature documents the op.

- ``forward(self, *inputs)`` returns ``(outputs, ctx)``: ``outputs`` is one array or a tuple of
  arrays (one per node output), ``ctx`` is whatever ``backward`` needs and nothing more.
- ``backward(self, ctx, dy, need)`` gets the gradient of the first output and a tuple of booleans,
  one per input, saying which input gradients are wanted; it returns one gradient per input, in input
  order, ``None`` where there is none or it is not needed. Gradients may have the broadcast shape:
  the engine un-broadcasts and accumulates them.
- An op with several differentiable outputs (Split) sets ``grads_all_outputs = True``: its
  ``backward`` then gets a tuple ``dys``, one gradient per node output, ``None`` for an output no
  gradient reached. Every other op keeps the single ``dy`` of its first output.

What else an op may do it declares on its class, overriding the defaults of ``Op``; the engine reads
these and nothing else (see ``bwacal/schedule.py`` and the layout notes in ``bwacal/engine.py``).
"""

from __future__ import annotations

import inspect

REGISTRY: dict[str, type] = {}


class Unsupported(Exception):
    """Raised by an op's ``__init__`` for an attribute value the engine does not implement."""


def register(*op_types):
    """Class decorator adding an op class to the registry under one or more ONNX op types."""

    def wrap(cls):
        for t in op_types:
            REGISTRY[t] = cls
        return cls

    return wrap


class Op:
    """The base of every op: the capabilities an op may declare, with their defaults."""

    differentiable = True  # False: no gradient flows through it (comparisons, shapes, casts)
    max_outputs = 1  # node outputs the op can produce; more is refused at load
    layout = None  # "cnhw", "follow" or None: see the layout notes in bwacal/engine.py
    follow_inputs = 1 << 30  # with layout "follow": how many leading inputs share the data layout
    grads_all_outputs = False  # backward takes a tuple of dys, one per output (see the docstring)
    fuses_clip = False  # forward takes ``clip=(lo, hi)`` and applies a following Relu/Clip to its output

    def check(self, shapes):
        """Raise ``Unsupported`` at load for inputs of these static shapes (None where unknown) that
        the op cannot run; by default every shape is accepted."""

    def as_clip(self, consts):
        """``(lo, hi)`` when this node computes ``clip(input 0, lo, hi)`` given the values of its
        other inputs (``consts``: one constant array per input after the first, None where omitted);
        None (the default) when it is no clip. A clip that reads a conv's or an Add's output alone is
        applied by that op (``fuses_clip``)."""
        return None

    def backward(self, ctx, dy, need):
        raise NotImplementedError(f"{type(self).__name__} has no backward")


def make_op(op_type: str, attrs: dict, opset: int, n_outputs: int = 1):
    """Instantiate the op for one node; raises ``Unsupported`` with a reason on failure."""
    cls = REGISTRY.get(op_type)
    if cls is None:
        raise Unsupported("no implementation for this op type")
    if n_outputs > cls.max_outputs:
        raise Unsupported(f"{n_outputs} outputs requested, only the first {cls.max_outputs} supported")
    params = inspect.signature(cls.__init__).parameters
    unknown = [a for a in attrs if a not in params]
    if unknown:
        raise Unsupported(f"attribute(s) {', '.join(sorted(unknown))} not supported")
    kwargs = dict(attrs)
    if "opset" in params:
        kwargs["opset"] = opset
    if "n_outputs" in params:  # ops whose output count is their semantics (Split without sizes)
        kwargs["n_outputs"] = n_outputs
    return cls(**kwargs)
