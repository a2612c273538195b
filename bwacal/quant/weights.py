"""Quantized weight tensors: per-output-channel signed symmetric grids (min-max or MSE step search),
their codes, bit weights and learned rounding in one object."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bwacal.kernels.quant import bit_weight_grads, compose_bitplanes, decompose_bitplanes, quantization_errors
from bwacal.quant.bwa import bit_scale, code_levels
from bwacal.quant.rounding import initial_v, rectified_sigmoid, rectified_sigmoid_grad
from bwacal.quant.uniform import check_bits, qrange, quantize

# Clipping ratios of the min-max step tried by the MSE search. The grid is geometric (equal relative
# spacing, 2.4%) and reaches down to 0.05: at 2 bits the best step of a heavy-tailed channel with
# K = 4608 is about 0.3-0.5 of the min-max step (median over Laplace rows: 0.39 at 2 bits, 0.49 at
# 3, 0.60 at 4). ``mse_steps`` also tries the no-clipping step ``max|W_c| / (2**(bits-1) - 1)``,
# which wins on some short rows.
MSE_RATIOS = np.geomspace(0.05, 1.0, 128)
# An all-zero channel gets this step: positive (no NaN anywhere) and so small that whatever the bit
# weights do, the channel stays numerically zero.
ZERO_CHANNEL_STEP = np.float32(2.0**-64)


@dataclass
class SoftRounding:
    """Learned rounding of one weight tensor: each weight sits between two neighbouring codes.

    ``lower`` and ``upper`` uint8 (C, K): the unsigned codes of ``floor(W / step)`` and
    ``floor(W / step) + 1``, each clipped to the grid (equal where both clip); ``v`` float64 (C, K):
    the rounding variable, the weight's code is ``lower + h(v) * (upper - lower)``.
    """

    lower: np.ndarray
    upper: np.ndarray
    v: np.ndarray
    # the forward takes the hard codes (the network the fit hands back); the gradient of v is the
    # relaxation's, at the current h (a straight-through estimate)
    straight_through: bool = False

    def __post_init__(self):
        self.bits_lower = self.bits_upper = None  # bit planes, made on first use

    def planes(self, bits: int) -> tuple[np.ndarray, np.ndarray]:
        if self.bits_lower is None:
            self.bits_lower = decompose_bitplanes(self.lower, bits)
            self.bits_upper = decompose_bitplanes(self.upper, bits)
        return self.bits_lower, self.bits_upper

    def hard_codes(self) -> np.ndarray:
        """The codes of the hard choice: ``upper`` where ``h(v) >= 0.5`` (``v >= 0``), else ``lower``."""
        return np.where(self.v >= 0, self.upper, self.lower).astype(np.uint8)


@dataclass
class QuantizedWeight:
    """One quantized weight tensor: its grid, its codes and the bit weights that dequantize them.

    ``codes`` uint8 (C, K): unsigned codes ``u = q + 2**(bits-1)`` (C output channels on ``axis``
    first, K everything else); ``step`` float32 (C,); ``alpha`` float64 (C, bits) and ``gamma``
    float64 (C,): the BWA module ``W_c = step_c * (sum_k alpha[c, k] * bit_k(u) + gamma_c)``, uniform
    at ``alpha = 2**k``, ``gamma = -2**(bits-1)``. With ``rounding`` set the codes are still being
    learned (see ``SoftRounding``) and ``codes`` is the round-to-nearest start.

    The optimiser sees ``parameters()``: ``alpha / 2**k`` and ``gamma / 2**(bits-1)`` (one learning
    rate suits every bit position and width), plus ``v`` while the rounding is learned.
    """

    codes: np.ndarray
    step: np.ndarray
    bits: int
    shape: tuple
    axis: int = 0
    method: str = "mse"
    node: str | None = None
    name: str | None = None
    alpha: np.ndarray | None = None
    gamma: np.ndarray | None = None
    rounding: SoftRounding | None = None
    train_bit_weights: bool = True  # False: only the rounding is learned (AdaRound)

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = np.tile(bit_scale(self.bits), (self.channels, 1))
        if self.gamma is None:
            self.gamma = np.full(self.channels, -float(self.offset))
        self._planes = None

    @property
    def channels(self) -> int:
        return self.codes.shape[0]

    @property
    def offset(self) -> int:
        """``2**(bits-1)``: signed integer = code - offset; also ``-gamma`` of the uniform grid."""
        return 2 ** (self.bits - 1)

    @property
    def planes(self) -> np.ndarray:
        """Bit planes uint8 (bits, C, K) of ``codes``."""
        if self._planes is None:
            self._planes = decompose_bitplanes(self.codes, self.bits)
        return self._planes

    def integers(self) -> np.ndarray:
        """Signed integer codes ``q`` (C, K) as int16."""
        return self.codes.astype(np.int16) - self.offset

    def dequantize(self) -> np.ndarray:
        """Uniform dequantization ``step[c] * q`` of ``codes`` in the original shape, float32."""
        return self.restore((self.step[:, None] * self.integers().astype(np.float32)).astype(np.float32))

    def levels(self) -> np.ndarray:
        """float32 (C, 2**bits): the value each code takes under the current bit weights."""
        return code_levels(self.alpha, self.gamma, self.step)

    def compose2d(self, hard: bool = False) -> np.ndarray:
        """The weights float32 (C, K) under the current bit weights and soft rounding (``hard``: the
        codes the rounding would harden to)."""
        if self.rounding is None:
            return compose_bitplanes(self.planes, self.alpha, self.gamma, self.step)
        if hard or self.rounding.straight_through:
            planes = decompose_bitplanes(self.rounding.hard_codes(), self.bits)
            return compose_bitplanes(planes, self.alpha, self.gamma, self.step)
        lo, hi = self.soft_ends()
        h = rectified_sigmoid(self.rounding.v)
        return (lo + h * (hi - lo)).astype(np.float32)

    def compose(self, hard: bool = False) -> np.ndarray:
        """The weights in the original tensor's shape, float32 (``hard``: see ``compose2d``)."""
        return self.restore(self.compose2d(hard))

    def soft_ends(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 (C, K): the values of the lower and the upper code of every weight."""
        p_lo, p_hi = self.rounding.planes(self.bits)
        lo = compose_bitplanes(p_lo, self.alpha, self.gamma, self.step).astype(np.float64)
        hi = compose_bitplanes(p_hi, self.alpha, self.gamma, self.step).astype(np.float64)
        return lo, hi

    def parameters(self) -> dict:
        """The normalised parameters the optimiser trains (copies): ``alpha``, ``gamma`` (unless only
        the rounding is learned) and ``v`` (while the rounding is learned)."""
        out = {}
        if self.train_bit_weights:
            out["alpha"] = self.alpha / bit_scale(self.bits)
            out["gamma"] = self.gamma / 2.0 ** (self.bits - 1)
        if self.rounding is not None:
            out["v"] = self.rounding.v.copy()
        return out

    def set_parameters(self, theta: dict):
        """Take the normalised parameters back (the inverse of ``parameters``)."""
        if "alpha" in theta:
            self.alpha = theta["alpha"] * bit_scale(self.bits)
            self.gamma = theta["gamma"] * 2.0 ** (self.bits - 1)
        if "v" in theta:
            self.rounding.v = theta["v"].copy()

    def gradients(self, grad_w) -> dict:
        """Gradients of the normalised parameters from dL/dW (original shape), float64."""
        g2d = channels_first(grad_w, self.axis)
        out = {}
        if self.rounding is None:
            if self.train_bit_weights:
                da, dg = bit_weight_grads(self.planes, g2d, self.step)
                out["alpha"], out["gamma"] = da * bit_scale(self.bits), dg * 2.0 ** (self.bits - 1)
            return out
        v = self.rounding.v
        h = rectified_sigmoid(v)
        if self.train_bit_weights and self.rounding.straight_through:
            planes = decompose_bitplanes(self.rounding.hard_codes(), self.bits)
            da, dg = bit_weight_grads(planes, g2d, self.step)
            out["alpha"], out["gamma"] = da * bit_scale(self.bits), dg * 2.0 ** (self.bits - 1)
        elif self.train_bit_weights:
            # W = L(lower) + h (L(upper) - L(lower)): each end's planes weigh dL/dW by (1 - h) and h
            g64 = g2d.astype(np.float64)
            p_lo, p_hi = self.rounding.planes(self.bits)
            da_lo, dg = bit_weight_grads(p_lo, g64 * (1.0 - h), self.step)
            da_hi, dg_hi = bit_weight_grads(p_hi, g64 * h, self.step)
            out["alpha"] = (da_lo + da_hi) * bit_scale(self.bits)
            out["gamma"] = (dg + dg_hi) * 2.0 ** (self.bits - 1)
        lo, hi = self.soft_ends()
        out["v"] = g2d * (hi - lo) * rectified_sigmoid_grad(v)
        return out

    def start_rounding(self, w, straight_through: bool = False):
        """Learn the rounding from here: ``h(v)`` starts at the fractional part of ``W / step``
        (``straight_through``: see ``SoftRounding``)."""
        qmin, qmax = qrange(self.bits, signed=True)
        t = channels_first(w, self.axis).astype(np.float64) / self.step.astype(np.float64)[:, None]
        floor = np.floor(t)
        lower = (np.clip(floor, qmin, qmax) + self.offset).astype(np.uint8)
        upper = (np.clip(floor + 1, qmin, qmax) + self.offset).astype(np.uint8)
        self.rounding = SoftRounding(lower, upper, initial_v(t - floor), straight_through)

    def harden(self):
        """End the learned rounding: every weight takes the code its ``h(v)`` is nearer to."""
        if self.rounding is not None:
            self.codes = self.rounding.hard_codes()
            self._planes = None
            self.rounding = None

    def restore(self, values2d) -> np.ndarray:
        """Reshape a (C, K) array back to the original tensor's shape and axis order."""
        moved = (self.shape[self.axis],) + tuple(d for i, d in enumerate(self.shape) if i != self.axis)
        return np.moveaxis(np.asarray(values2d).reshape(moved), 0, self.axis)


def channels_first(w, axis: int = 0) -> np.ndarray:
    """``w`` as a (C, K) array with the output-channel ``axis`` first and everything else flattened."""
    w = np.asarray(w)
    if w.ndim == 0:
        raise ValueError("cannot quantize a scalar per channel")
    return np.ascontiguousarray(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1))


def minmax_steps(w2d, bits: int) -> np.ndarray:
    """Plain min-max step per row, float32: ``max|W_c| / 2**(bits-1)``, so ``-max|W_c|`` is the lowest
    level and the largest positive weights clip at ``(2**(bits-1) - 1) * step``.

    The other plain rule, ``max|W_c| / (2**(bits-1) - 1)`` (nothing clipped), has a larger error at
    2-4 bits (mean per-channel squared error on 64x4608 Gaussian rows: 3807 vs 1391 at 2 bits, 617 vs
    348 at 3, 113 vs 87 at 4; within 2% of each other at 8), so the weak baseline is not made weaker.
    """
    amax = np.max(np.abs(w2d), axis=1).astype(np.float64) if w2d.shape[1] else np.zeros(w2d.shape[0])
    step = np.maximum((amax / 2 ** (check_bits(bits) - 1)).astype(np.float32),
                      np.finfo(np.float32).smallest_subnormal)
    return np.where(amax > 0, step, ZERO_CHANNEL_STEP).astype(np.float32)


def candidate_steps(w2d, bits: int, ratios=MSE_RATIOS) -> np.ndarray:
    """float32 (C, R + 1): ``ratios`` times the min-max step of each row, then the no-clipping step
    ``max|W_c| / (2**(bits-1) - 1)``: the steps every step search here tries, in this order."""
    qmin, qmax = qrange(bits, signed=True)
    base = minmax_steps(w2d, bits)
    ratios = np.append(np.asarray(ratios, dtype=np.float64), -qmin / qmax)
    candidates = base[:, None].astype(np.float64) * ratios[None, :]
    return np.maximum(candidates.astype(np.float32), np.finfo(np.float32).smallest_subnormal)


def mse_steps(w2d, bits: int, ratios=MSE_RATIOS) -> np.ndarray:
    """Per-row step minimising ``||W_c - step * q(W_c)||^2`` over :func:`candidate_steps`.

    Keep ratio 1 (plain min-max) in ``ratios`` so the result is never worse than min-max. Ties go to
    the first candidate.
    """
    qmin, qmax = qrange(bits, signed=True)
    candidates = candidate_steps(w2d, bits, ratios)
    errors = quantization_errors(w2d, candidates, qmin, qmax)
    best = candidates[np.arange(len(candidates)), np.argmin(errors, axis=1)]
    zero = ~np.any(w2d != 0, axis=1)
    return np.where(zero, ZERO_CHANNEL_STEP, best).astype(np.float32)


def quantize_weights(w, bits: int, method: str = "mse", axis: int = 0, node: str | None = None,
                     name: str | None = None, step=None) -> QuantizedWeight:
    """Quantize ``w`` per output channel (``axis``), signed symmetric, ``bits`` in 2..8, round to nearest,
    with uniform bit weights; ``node`` and ``name`` say which layer and initializer it is.

    ``method``: ``"mse"`` (step searched on a grid of clipping ratios, the default), ``"minmax"``, or
    ``"output"`` with the steps given as ``step`` (float32 (C,), from
    :func:`bwacal.quant.output_steps.output_aware_steps`, which needs the layer's activations).
    """
    bits = check_bits(bits)
    w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"weights must be floating point, got {w.dtype}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights contain NaN or infinity")
    axis = axis % max(w.ndim, 1)
    w2d = channels_first(w, axis)
    if method == "mse":
        step = mse_steps(w2d, bits)
    elif method == "minmax":
        step = minmax_steps(w2d, bits)
    elif method == "output":
        if step is None or np.shape(step) != (w2d.shape[0],):
            raise ValueError(f"method 'output' needs one step per output channel ({w2d.shape[0]}), got "
                             f"{None if step is None else np.shape(step)}")
        step = np.asarray(step, dtype=np.float32)
    else:
        raise ValueError(f"unknown step search method {method!r}; use 'mse', 'minmax' or 'output'")
    qmin, qmax = qrange(bits, signed=True)
    q = quantize(w2d, step[:, None], qmin, qmax)
    codes = (q + 2 ** (bits - 1)).astype(np.uint8)
    return QuantizedWeight(codes=codes, step=step, bits=bits, shape=tuple(w.shape), axis=axis, method=method,
                           node=node, name=name)
