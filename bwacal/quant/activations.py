"""Per-tensor activation quantization: step calibration, fake quantization and BWA on activations.

Unsigned activations (after ReLU-like ops) use codes ``[0, 2**b - 1]``, signed ones
``[-2**(b-1), 2**(b-1) - 1]``. Gradients are straight-through inside the clip range, zero outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bwacal.kernels import quantization_errors
from bwacal.quant.bwa import code_bits
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


def _codes(x, step, bits: int, signed: bool):
    """Signed-or-unsigned integer codes before and after clipping, in float64."""
    qmin, qmax = qrange(bits, signed)
    r = np.round(np.asarray(x, dtype=np.float64) / np.float64(step))
    return r, np.clip(r, qmin, qmax)


def fake_quantize(x, step, bits: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(y, mask)``: ``y = step * clip(round(x / step), qmin, qmax)`` as float32, and the boolean
    straight-through mask (True where ``round(x / step)`` is inside ``[qmin, qmax]``): ``dx = dy * mask``.
    """
    bits = check_bits(bits)
    qmin, qmax = qrange(bits, signed)
    r, q = _codes(x, step, bits, signed)
    y = (np.float64(np.float32(step)) * q).astype(np.float32)
    return y, (r >= qmin) & (r <= qmax)


@dataclass
class ActivationBWA:
    """What the backward pass of :func:`fake_quantize_bwa` needs.

    ``mask``: straight-through mask for dL/dx. ``codes``: unsigned codes uint8 (``u = q + 2**(b-1)``
    if signed, ``u = q`` otherwise), whose bits are the planes ``beta_k``.
    """

    mask: np.ndarray
    codes: np.ndarray
    step: np.float32
    bits: int


def fake_quantize_bwa(x, step, alpha, bits: int, signed: bool) -> tuple[np.ndarray, ActivationBWA]:
    """``(y, ctx)``: ``y = step * (sum_k alpha[k] * beta_k(u) + gamma)`` as float32, with the fixed
    ``gamma = -2**(bits-1)`` if signed, else 0. With ``alpha = 2**k`` it equals :func:`fake_quantize`.

    Gradients: ``dL/dx = dy * ctx.mask`` (straight through), ``dL/dalpha = bwa_alpha_grad(dy, ctx)``.
    """
    bits = check_bits(bits)
    qmin, qmax = qrange(bits, signed)
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    if alpha.shape != (bits,):
        raise ValueError(f"alpha must have {bits} entries, got shape {alpha.shape}")
    r, q = _codes(x, step, bits, signed)
    codes = (q - qmin).astype(np.uint8)
    gamma = float(qmin)
    # the 2**bits levels, summed in the same order as the weight kernel, then one lookup per value
    table = code_bits(bits)
    acc = np.zeros(2**bits)
    for k in range(bits):
        acc += alpha[k] * table[:, k]
    levels = ((acc + gamma) * np.float64(np.float32(step))).astype(np.float32)
    y = levels[codes]
    ctx = ActivationBWA(mask=(r >= qmin) & (r <= qmax), codes=codes, step=np.float32(step), bits=bits)
    return y, ctx


def bwa_alpha_grad(dy, ctx: ActivationBWA) -> np.ndarray:
    """float64 (bits,): ``dL/dalpha_k = step * sum(dy * beta_k(u))`` over the whole tensor."""
    per_code = np.bincount(ctx.codes.reshape(-1), weights=np.asarray(dy, dtype=np.float64).reshape(-1),
                           minlength=2**ctx.bits)
    return np.float64(ctx.step) * (per_code @ code_bits(ctx.bits).astype(np.float64))
