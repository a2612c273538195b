"""Per-tensor activation quantization: step calibration and the activation quantizer (with BWA).

Unsigned activations (after ReLU-like ops) use codes ``[0, 2**b - 1]``, signed ones
``[-2**(b-1), 2**(b-1) - 1]``. Gradients are straight-through inside the clip range, zero outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bwacal.kernels.quant import quantization_errors
from bwacal.quant.bwa import bit_scale, code_bits, code_levels
from bwacal.quant.uniform import check_bits, qrange

# Clipping ratios of max|x| tried by the MSE calibration (geometric, 2.4% apart).
MSE_RATIOS = np.geomspace(0.02, 1.0, 166)
# Step used when every sample is zero: positive, and tiny so the tensor stays zero.
ZERO_STEP = 2.0**-64
# The MSE search looks at no more than this many samples (an evenly strided subset).
MAX_SEARCH_SAMPLES = 1 << 20


def _amax(x, signed: bool) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x))) if signed else float(max(np.max(x), 0.0))


def calibrate_activation_step(samples, bits: int, signed: bool, method: str = "mse",
                              percentile: float = 99.99) -> np.float32:
    """Per-tensor step (float32 > 0) from a sample of activation values.

    ``"mse"``: the step ``r * amax / qmax`` over a grid of ratios ``r`` minimising the squared
    quantization error of the samples (``amax = max|x|``, or ``max(x, 0)`` if unsigned).
    ``"percentile"``: ``percentile(|x|) / qmax`` (of ``max(x, 0)`` if unsigned).
    """
    bits = check_bits(bits)
    qmin, qmax = qrange(bits, signed)
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError("activation samples contain NaN or infinity")
    if method == "percentile":
        mag = np.abs(x) if signed else np.maximum(x, 0)
        top = float(np.percentile(mag, percentile)) if x.size else 0.0
        return np.float32(top / qmax if top > 0 else ZERO_STEP)
    if method != "mse":
        raise ValueError(f"unknown activation calibration method {method!r}; use 'mse' or 'percentile'")
    amax = _amax(x, signed)
    if amax == 0.0:
        return np.float32(ZERO_STEP)
    if x.size > MAX_SEARCH_SAMPLES:
        x = x[:: -(-x.size // MAX_SEARCH_SAMPLES)]
    candidates = (amax / qmax * MSE_RATIOS).astype(np.float32)
    candidates = candidates[candidates > 0]
    errors = quantization_errors(x[None, :], candidates[None, :].astype(np.float64), qmin, qmax)[0]
    return np.float32(candidates[np.argmin(errors)])


@dataclass
class ActivationQuantizer:
    """Per-tensor quantization of one activation ``value`` (the engine's ``bwacal::ActQuant`` node
    ``node``): ``y = levels[u]`` with ``u = clip(round(x / step), qmin, qmax) - qmin``.

    ``alpha`` float64 (bits,): bit weights of the levels ``step * (sum_k alpha_k * bit_k(u) + qmin)``
    (BWA on activations), stored in the graph as the initializer ``alpha_name``; None for the uniform
    levels. The optimiser sees ``alpha / 2**k``.
    """

    bits: int
    signed: bool
    step: np.float32
    value: str | None = None
    node: str | None = None
    alpha: np.ndarray | None = None
    alpha_name: str | None = None

    def __post_init__(self):
        self.bits = check_bits(self.bits)
        self.step = np.float32(self.step)
        self.qmin, self.qmax = qrange(self.bits, self.signed)

    def codes(self, x) -> tuple[np.ndarray, np.ndarray]:
        """``(u, mask)``: unsigned codes uint8 and the straight-through mask (True where
        ``round(x / step)`` is inside ``[qmin, qmax]``: ``dL/dx = dL/dy * mask``).

        ``x / step`` is rounded in float32, half to even, as ONNX QuantizeLinear does, so a written
        model reproduces the codes bit for bit.
        """
        r = np.round(np.asarray(x).astype(np.float32, copy=False) / self.step)
        mask = (r >= self.qmin) & (r <= self.qmax)
        return (np.clip(r, self.qmin, self.qmax) - self.qmin).astype(np.uint8), mask

    def levels(self, alpha=None) -> np.ndarray:
        """float32 (2**bits,): the value of each code under bit weights ``alpha`` (default: this
        quantizer's own; uniform when it has none)."""
        alpha = self.alpha if alpha is None else alpha
        if alpha is None:
            alpha = bit_scale(self.bits)
        alpha = np.asarray(alpha, dtype=np.float64).reshape(1, -1)
        if alpha.shape[1] != self.bits:
            raise ValueError(f"activation bit weights need {self.bits} entries, got {alpha.shape[1]}")
        return code_levels(alpha, [self.qmin], [self.step])[0]

    def quantize(self, x, alpha=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(y, u, mask)``: the quantized values and what the backward needs (see ``codes``)."""
        u, mask = self.codes(x)
        return self.levels(alpha)[u], u, mask

    def alpha_grad(self, u, dy) -> np.ndarray:
        """float64 (bits,): ``dL/dalpha_k = step * sum(dL/dy * bit_k(u))`` over the whole tensor."""
        per_code = np.bincount(u.reshape(-1), weights=np.asarray(dy, dtype=np.float64).reshape(-1),
                               minlength=2**self.bits)
        return np.float64(self.step) * (per_code @ code_bits(self.bits).astype(np.float64))

    def parameters(self) -> dict:
        """The normalised bit weights the optimiser trains (a copy); empty without BWA."""
        return {} if self.alpha is None else {"alpha": self.alpha / bit_scale(self.bits)}

    def set_parameters(self, theta: dict):
        if "alpha" in theta:
            self.alpha = theta["alpha"] * bit_scale(self.bits)

    def gradients(self, grad_alpha) -> dict:
        """The normalised parameters' gradients from dL/dalpha."""
        return {"alpha": np.asarray(grad_alpha, dtype=np.float64) * bit_scale(self.bits)}
