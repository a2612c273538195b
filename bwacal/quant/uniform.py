"""Pure functions for uniform quantization on an integer grid: range, quantize, dequantize."""

from __future__ import annotations

import numpy as np

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits) -> int:
    """``bits`` as an int, or ValueError if outside 2..8."""
    b = int(bits)
    if b != bits or not MIN_BITS <= b <= MAX_BITS:
        raise ValueError(f"bit width must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return b


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range: ``(-2**(b-1), 2**(b-1) - 1)`` if signed, else ``(0, 2**b - 1)``."""
    b = check_bits(bits)
    if signed:
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return 0, 2**b - 1


def quantize(x, step, qmin: int, qmax: int) -> np.ndarray:
    """Integer codes ``clip(round(x / step), qmin, qmax)`` as int32 (round half to even, float64 division).

    ``step`` broadcasts against ``x`` (a scalar, or e.g. shape (C, 1) for per-channel steps).
    """
    q = np.round(np.asarray(x, dtype=np.float64) / np.asarray(step, dtype=np.float64))
    return np.clip(q, qmin, qmax).astype(np.int32)


def dequantize(q, step) -> np.ndarray:
    """Float32 values ``step * q`` (one float32 rounding of the exact product)."""
    return (np.asarray(step, dtype=np.float64) * np.asarray(q, dtype=np.float64)).astype(np.float32)
