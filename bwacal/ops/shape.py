"""Ops that move data without arithmetic: reshapes, transposes, concatenation, padding, indexing."""

from __future__ import annotations

import numpy as np

from bwacal.ops.base import Op, Unsupported, register


def _axes(value):
    return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]


@register("Reshape")
class Reshape(Op):
    def __init__(self, allowzero=0):
        self.allowzero = allowzero

    def forward(self, x, shape):
        target = [int(s) for s in np.asarray(shape).reshape(-1)]
        if not self.allowzero:
            target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
        return x.reshape(target), x.shape

    def backward(self, ctx, dy, need):
        return dy.reshape(ctx), None


@register("Flatten")
class Flatten(Op):
    def __init__(self, axis=1):
        self.axis = axis

    def forward(self, x):
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        rows = int(np.prod(x.shape[:axis], dtype=np.int64))
        return x.reshape(rows, -1) if x.size else x.reshape(rows, int(np.prod(x.shape[axis:]))), x.shape

    def backward(self, ctx, dy, need):
        return (dy.reshape(ctx),)


@register("Transpose")
class Transpose(Op):
    def __init__(self, perm=None):
        self.perm = perm

    def forward(self, x):
        perm = self.perm if self.perm is not None else list(range(x.ndim))[::-1]
        return np.transpose(x, perm), perm

    def backward(self, ctx, dy, need):
        return (np.transpose(dy, np.argsort(ctx)),)


@register("Squeeze")
class Squeeze(Op):
    """Squeeze; axes are an attribute before opset 13 and an optional input from 13 on."""

    def __init__(self, axes=None):
        self.axes_attr = axes

    def forward(self, x, axes=None):
        axes = _axes(axes) if axes is not None else self.axes_attr
        if axes is None:
            y = np.squeeze(x)
        else:
            y = np.squeeze(x, axis=tuple(a + x.ndim if a < 0 else a for a in axes))
        return y, x.shape

    def backward(self, ctx, dy, need):
        return dy.reshape(ctx), None


@register("Unsqueeze")
class Unsqueeze(Op):
    """Unsqueeze; axes are an attribute before opset 13 and an input from 13 on."""

    def __init__(self, axes=None):
        self.axes_attr = axes

    def forward(self, x, axes=None):
        axes = _axes(axes) if axes is not None else self.axes_attr
        rank = x.ndim + len(axes)
        shape = list(x.shape)
        for a in sorted(a + rank if a < 0 else a for a in axes):
            shape.insert(a, 1)
        return np.reshape(x, shape), np.shape(x)

    def backward(self, ctx, dy, need):
        return dy.reshape(ctx), None


@register("Concat")
class Concat(Op):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        return np.concatenate(xs, axis=self.axis), [x.shape[self.axis] for x in xs]

    def backward(self, ctx, dy, need):
        cuts = np.cumsum(ctx)[:-1]
        return tuple(np.split(dy, cuts, axis=self.axis))


@register("Pad")
class Pad(Op):
    """Constant padding; pads are an attribute before opset 11 and an input from 11 on.

    Negative pads crop, as the spec allows.
    """

    def __init__(self, mode="constant", pads=None, value=0.0):
        if mode != "constant":
            raise Unsupported(f"mode '{mode}' (only 'constant' is supported)")
        self.pads_attr, self.value_attr = pads, value

    def forward(self, x, pads=None, constant_value=None, axes=None):
        pads = _axes(pads) if pads is not None else list(self.pads_attr)
        value = self.value_attr if constant_value is None else np.asarray(constant_value).reshape(-1)[0]
        axes = _axes(axes) if axes is not None else list(range(x.ndim))
        axes = [a + x.ndim if a < 0 else a for a in axes]
        k = len(axes)
        before, after = [0] * x.ndim, [0] * x.ndim
        for j, a in enumerate(axes):
            before[a], after[a] = pads[j], pads[j + k]
        widths = [(max(b, 0), max(e, 0)) for b, e in zip(before, after)]
        y = np.pad(x, widths, mode="constant", constant_values=value)
        crop = tuple(slice(max(-b, 0), y.shape[i] - max(-e, 0)) for i, (b, e) in enumerate(zip(before, after)))
        y = y[crop]
        return y, (x.shape, before, after)

    def backward(self, ctx, dy, need):
        shape, before, after = ctx
        # pad the gradient by the negated pads: crops what was padded, zero-fills what was cropped
        widths = [(max(-b, 0), max(-e, 0)) for b, e in zip(before, after)]
        g = np.pad(dy, widths)
        crop = tuple(slice(max(b, 0), max(b, 0) + n) for b, n in zip(before, shape))
        return g[crop], None, None, None


@register("Constant")
class Constant(Op):
    differentiable = False

    def __init__(self, value=None, value_float=None, value_floats=None, value_int=None, value_ints=None,
                 sparse_value=None, value_string=None, value_strings=None):
        if value is not None:
            self.value = np.asarray(value)
        elif value_float is not None:
            self.value = np.array(value_float, dtype=np.float32)
        elif value_floats is not None:
            self.value = np.array(value_floats, dtype=np.float32)
        elif value_int is not None:
            self.value = np.array(value_int, dtype=np.int64)
        elif value_ints is not None:
            self.value = np.array(value_ints, dtype=np.int64)
        else:
            raise Unsupported("only numeric dense constants are supported")

    def forward(self):
        return self.value, None


@register("Shape")
class Shape(Op):
    differentiable = False

    def __init__(self, start=0, end=None):
        self.start, self.end = start, end

    def forward(self, x):
        return np.array(np.shape(x)[self.start:self.end], dtype=np.int64), None


@register("Gather")
class Gather(Op):
    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, data, indices):
        indices = np.asarray(indices)
        axis = self.axis + data.ndim if self.axis < 0 else self.axis
        idx = np.where(indices < 0, indices + data.shape[axis], indices)
        return np.take(data, idx, axis=axis), (data.shape, idx, axis)

    def backward(self, ctx, dy, need):
        shape, idx, axis = ctx
        if not need[0]:
            return None, None
        dx = np.zeros(shape, dtype=dy.dtype)
        moved = np.moveaxis(dx, axis, 0)
        g = np.moveaxis(dy.reshape(shape[:axis] + idx.shape + shape[axis + 1:]), list(range(axis, axis + idx.ndim)),
                        list(range(idx.ndim)))
        np.add.at(moved, idx, g)
        return dx, None


@register("GatherElements")
class GatherElements(Op):
    differentiable = False

    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, data, indices):
        axis = self.axis + data.ndim if self.axis < 0 else self.axis
        idx = np.where(indices < 0, indices + data.shape[axis], indices)
        return np.take_along_axis(data, idx, axis=axis), None


@register("ScatterND")
class ScatterND(Op):
    """``out = data`` with ``out[indices[j]] (op)= updates[j]`` for each index tuple ``j`` (the last axis
    of ``indices``). torch writes ``mask[h0:h1, w0:w1] = v`` (Swin's shifted-window mask) this way.
    Gradients for reduction "none" and "add"."""

    _REDUCE = {"none": None, "add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}

    def __init__(self, reduction="none"):
        if reduction not in self._REDUCE:
            raise Unsupported(f"reduction '{reduction}' (none, add, mul, max, min are supported)")
        self.reduction = reduction

    def forward(self, data, indices, updates):
        idx = np.asarray(indices, dtype=np.int64)
        k = idx.shape[-1]
        if k > data.ndim:
            raise ValueError(f"ScatterND index tuples of {k} entries for rank-{data.ndim} data")
        flat = idx.reshape(-1, k)
        flat = np.where(flat < 0, flat + np.asarray(data.shape[:k]), flat)
        where = tuple(flat.T)
        values = np.asarray(updates).reshape((flat.shape[0],) + data.shape[k:])
        out = np.array(data, copy=True)
        reduce = self._REDUCE[self.reduction]
        if reduce is None:
            out[where] = values  # later duplicates win, as the spec leaves open and ONNX Runtime does
        else:
            reduce.at(out, where, values)
        return out, (where, np.shape(updates))

    def backward(self, ctx, dy, need):
        if self.reduction not in ("none", "add"):
            raise NotImplementedError(f"ScatterND with reduction '{self.reduction}' has no backward")
        where, updates_shape = ctx
        ddata = dupdates = None
        if need[0]:
            ddata = np.array(dy, copy=True)
            if self.reduction == "none":
                ddata[where] = 0
        if need[2]:
            dupdates = dy[where].reshape(updates_shape)
        return ddata, None, dupdates


def _slice_of(start, end, step, dim):
    """One axis of ONNX Slice as a Python slice: negative indices count from the end, then start is
    clamped to [0, dim] ([0, dim-1] stepping back) and end to [0, dim] ([-1, dim-1] stepping back),
    so INT64_MAX/MIN mean "to the end"/"to the start". (Python's own clamping differs stepping back:
    x[-20::-1] is empty where ONNX starts at 0.)"""
    if step == 0:
        raise ValueError("Slice step 0")
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)


@register("Slice")
class Slice(Op):
    """Slice; starts, ends and axes are attributes before opset 10 and inputs (plus steps) from 10 on."""

    def __init__(self, starts=None, ends=None, axes=None):
        self.starts_attr, self.ends_attr, self.axes_attr = starts, ends, axes

    def forward(self, x, starts=None, ends=None, axes=None, steps=None):
        starts = _axes(starts) if starts is not None else self.starts_attr
        ends = _axes(ends) if ends is not None else self.ends_attr
        if starts is None or ends is None:
            raise ValueError("Slice needs starts and ends")
        axes = _axes(axes) if axes is not None else self.axes_attr
        if axes is None:
            axes = list(range(len(starts)))
        steps = _axes(steps) if steps is not None else [1] * len(starts)
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise ValueError(f"Slice starts {starts}, ends {ends}, axes {axes} and steps {steps} differ in length")
        index = [slice(None)] * x.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = axis + x.ndim if axis < 0 else axis
            index[axis] = _slice_of(start, end, step, x.shape[axis])
        index = tuple(index)
        return x[index], (x.shape, index)

    def backward(self, ctx, dy, need):
        shape, index = ctx
        dx = np.zeros(shape, dtype=dy.dtype)
        dx[index] = dy
        return dx, None, None, None, None


@register("Split")
class Split(Op):
    """Split along ``axis``: sizes from the ``split`` attribute (before opset 13) or input (13 on),
    else ``num_outputs`` chunks of ceil(dim / num_outputs), the last smaller (opset 18 on), else as
    many equal parts as the node has outputs."""

    max_outputs = 1 << 30
    grads_all_outputs = True

    def __init__(self, axis=0, split=None, num_outputs=None, n_outputs=1):
        self.axis, self.split_attr, self.num_outputs, self.n_outputs = axis, split, num_outputs, n_outputs

    def _sizes(self, dim, split):
        sizes = _axes(split) if split is not None else self.split_attr
        if sizes is not None:
            sizes = list(sizes)
            if sum(sizes) != dim or len(sizes) != self.n_outputs:
                raise ValueError(f"Split sizes {sizes} do not cut a dim of {dim} into {self.n_outputs} outputs")
            return sizes
        if self.num_outputs is not None:
            chunk = -(-dim // self.num_outputs)
            sizes = [chunk] * (self.num_outputs - 1) + [dim - chunk * (self.num_outputs - 1)]
            if sizes[-1] < 0:
                raise ValueError(f"Split cannot cut a dim of {dim} into {self.num_outputs} chunks of {chunk}")
            return sizes
        if dim % self.n_outputs:
            raise ValueError(f"Split cannot cut a dim of {dim} into {self.n_outputs} equal parts")
        return [dim // self.n_outputs] * self.n_outputs

    def forward(self, x, split=None):
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        sizes = self._sizes(x.shape[axis], split)
        return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis)), (x.shape, axis, sizes)

    def backward(self, ctx, dys, need):
        shape, axis, sizes = ctx
        dtype = next(g for g in dys if g is not None).dtype
        parts = []
        for g, n in zip(dys, sizes):
            if g is None:
                g = np.zeros(shape[:axis] + (n,) + shape[axis + 1:], dtype=dtype)
            parts.append(g)
        return np.concatenate(parts, axis=axis), None


@register("Expand")
class Expand(Op):
    """Broadcast ``x`` against ``shape`` (NumPy rules: either side may hold the 1)."""

    def forward(self, x, shape):
        target = np.broadcast_shapes(x.shape, tuple(int(s) for s in np.asarray(shape).reshape(-1)))
        # a copy: consumers may take the output as a writable array of its own
        return np.array(np.broadcast_to(x, target)), None

    def backward(self, ctx, dy, need):
        return dy, None  # the engine sums the broadcast axes away


@register("Tile")
class Tile(Op):
    def forward(self, x, repeats):
        reps = _axes(repeats)
        if len(reps) != x.ndim:
            raise ValueError(f"Tile repeats {reps} do not match a rank-{x.ndim} input")
        return np.tile(x, reps), (x.shape, reps)

    def backward(self, ctx, dy, need):
        shape, reps = ctx
        # the output viewed as (r0, d0, r1, d1, ...): sum over every repeat axis
        split = [n for pair in zip(reps, shape) for n in pair]
        return dy.reshape(split).sum(axis=tuple(range(0, 2 * len(shape), 2))), None
