"""How much memory a recorded forward keeps for backward, and the micro-batch that bounds it.

Calibration steps at 224x224 keep every layer's saved input for the backward pass: ResNet-50 at a
batch of 64 would hold several GB. The fitting loop splits each batch into micro-batches whose
recorded forward stays under a budget and sums their gradients, which is the same gradient as the
whole batch's (up to float summation order).
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_BUDGET = 768 << 20  # bytes a micro-batch's recorded forward may keep: 768 MiB
PROBE_BATCHES = (2, 4)  # the two recorded probe forwards whose difference gives the bytes per image


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def array_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the distinct NumPy buffers reachable from ``obj`` through tuples, lists, dicts,
    dataclasses and objects' attributes; a view counts its whole base buffer once."""
    seen = set() if seen is None else seen
    stack, total = [obj], 0
    while stack:
        o = stack.pop()
        if o is None or isinstance(o, (int, float, str, bool, bytes, np.generic)):
            continue
        if isinstance(o, np.ndarray):
            root = _root(o)
            if id(root) not in seen:
                seen.add(id(root))
                total += root.nbytes
            continue
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (tuple, list, set, frozenset)):
            stack.extend(o)
        elif dataclasses.is_dataclass(o):
            stack.extend(getattr(o, f.name) for f in dataclasses.fields(o))
        elif hasattr(o, "__dict__"):
            stack.extend(vars(o).values())
    return total


def tape_bytes(tape) -> int:
    """Bytes a recorded forward keeps for backward (every op context on the tape)."""
    return array_bytes([record.ctx for record in tape.entries])


def recording_cost(run_recorded, input_shape, dtype=np.float32) -> tuple[int, int]:
    """``(fixed, per_image)`` bytes a recorded forward keeps: measured on two probe batches of zero
    images (``PROBE_BATCHES``); ``fixed`` is what does not grow with the batch (e.g. transformed
    weights). ``run_recorded(x)`` runs the recorded forward and returns its tape."""
    (n1, n2), sizes = PROBE_BATCHES, []
    for n in PROBE_BATCHES:
        sizes.append(tape_bytes(run_recorded(np.zeros((n,) + tuple(input_shape), dtype=dtype))))
    per_image = max(-(-(sizes[1] - sizes[0]) // (n2 - n1)), 0)
    return max(sizes[0] - n1 * per_image, 0), per_image


def micro_batch_size(batch_size: int, per_image: int, budget: int = DEFAULT_BUDGET, fixed: int = 0) -> int:
    """The largest micro-batch (at most ``batch_size``, at least 1) whose recording,
    ``fixed + micro * per_image`` bytes, fits ``budget``."""
    if per_image <= 0:
        return batch_size
    return int(max(1, min(batch_size, (budget - fixed) // per_image)))


def chunks(n: int, micro: int) -> list[slice]:
    """``n`` items as ``ceil(n / micro)`` contiguous slices of near-equal size (none larger than micro)."""
    parts = max(1, -(-n // max(micro, 1)))
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
