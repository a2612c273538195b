"""numba kernels of weight quantization: bit planes (decomposition, composition, gradients,
packing) and the step search (squared errors of uniform quantization, plain and output-weighted).

Each kernel is a private ``_name`` function compiled with options from ``flags.py``, with a full
docstring, and sits beside a public NumPy-facing wrapper that checks shapes and coerces dtypes and
contiguity; kernels another module wraps are public. Slow reference versions of every kernel live in
``tests/naive.py``.

Layout: a weight tensor is reshaped by the caller to ``(C, K)`` (output channel first, K = everything
else); unsigned codes are ``uint8`` ``(C, K)``; bit planes are ``uint8`` ``(bits, C, K)`` of 0/1 with
``planes[k] = (codes >> k) & 1``.
"""

from __future__ import annotations

import sys

import numba
import numpy as np

from bwacal.kernels.flags import JIT, JIT_PARALLEL, JIT_REDUCE, threads_for

MAX_BITS = 8

# (x * _PACK_MAGIC) >> 56 gathers the low bit of each of the 8 bytes of x into one byte, byte i to
# bit i; no two partial products land on the same bit, so there are no carries.
_PACK_MAGIC = np.uint64(0x0102040810204080)


def _check_bits(bits):
    bits = int(bits)
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    return bits


def _float_array(x, ndim, name):
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    return np.ascontiguousarray(x)


def _planes_array(planes):
    planes = np.ascontiguousarray(planes, dtype=np.uint8)
    if planes.ndim != 3:
        raise ValueError(f"planes must be 3-D (bits, C, K), got shape {planes.shape}")
    _check_bits(planes.shape[0])
    return planes


# ---------------------------------------------------------------------------------------------
# codes -> bit planes


@numba.njit(**JIT_PARALLEL)
def _decompose_bitplanes(codes, bits, planes):
    """Split unsigned codes into bit planes, in place.

    Parameters
    ----------
    codes : uint8[:, ::1], shape (C, K)
        Unsigned codes in ``[0, 2**bits)``.
    bits : int
        Number of planes to write.
    planes : uint8[:, :, ::1], shape (bits, C, K)
        Output: ``planes[k, c, j] = (codes[c, j] >> k) & 1``.
    """
    C, K = codes.shape
    for c in numba.prange(C):
        for k in range(bits):
            for j in range(K):
                planes[k, c, j] = (codes[c, j] >> k) & 1


@numba.njit(**JIT_PARALLEL)
def _decompose_words(words, bits, planes):
    """Split unsigned codes into bit planes eight codes at a time (SWAR), in place.

    Each plane ``k`` of the ``(bits, C, K)`` output, flattened, is the flattened codes shifted right
    by ``k`` and masked to the low bit of every byte, so the kernel works on 64-bit words.

    Parameters
    ----------
    words : uint64[::1], shape (n,)
        The ``(C, K)`` uint8 codes, flattened and viewed as 64-bit words (``C * K = 8 * n``).
    bits : int
    planes : uint64[:, ::1], shape (bits, n)
        The ``(bits, C, K)`` uint8 output viewed the same way.
    """
    low = np.uint64(0x0101010101010101)
    n = words.shape[0]
    for k in range(bits):
        kk = np.uint64(k)
        for i in numba.prange(n):
            planes[k, i] = (words[i] >> kk) & low


def decompose_bitplanes(codes, bits):
    """Bit planes ``uint8 (bits, C, K)`` of unsigned ``uint8 (C, K)`` codes: ``planes[k] = (codes >> k) & 1``."""
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (C, K), got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits} bits")
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    planes = np.empty((bits,) + codes.shape, dtype=np.uint8)
    if codes.size % 8 == 0 and codes.size:
        # byte order does not matter: every byte is shifted and masked on its own
        with threads_for(planes.size):
            _decompose_words(codes.reshape(-1).view(np.uint64), bits, planes.reshape(bits, -1).view(np.uint64))
    else:
        with threads_for(8 * planes.size):
            _decompose_bitplanes(codes, bits, planes)
    return planes


# ---------------------------------------------------------------------------------------------
# bit planes + (alpha, gamma, step) -> values


@numba.njit(**JIT_PARALLEL)
def _compose_bitplanes(planes, alpha, gamma, step, out):
    """Dequantize bit planes with per-channel bit weights, in place.

    ``out[c, j] = float32(step[c] * ((sum_k alpha[c, k] * planes[k, c, j]) + gamma[c]))`` with the sum
    taken in float64 in order k = 0, 1, ..., then gamma added, then one multiplication by the step and
    one rounding to float32. With ``alpha = 2**k``, ``gamma = -2**(bits-1)`` every step before the
    last is exact, so the result equals the float32 product ``step * (u - 2**(bits-1))``.

    Parameters
    ----------
    planes : uint8[:, :, ::1], shape (bits, C, K)
    alpha : float64[:, ::1], shape (C, bits)
    gamma : float64[::1], shape (C,)
    step : float64[::1], shape (C,)
    out : float32[:, ::1], shape (C, K)
    """
    bits, C, K = planes.shape
    for c in numba.prange(C):
        acc = np.zeros(K, dtype=np.float64)
        # two planes a pass (same order of additions), the last plane fused with the output pass
        for k in range(0, bits - 2, 2):
            a0 = alpha[c, k]
            a1 = alpha[c, k + 1]
            for j in range(K):
                acc[j] = (acc[j] + a0 * planes[k, c, j]) + a1 * planes[k + 1, c, j]
        if bits % 2 == 0:
            a = alpha[c, bits - 2]
            for j in range(K):
                acc[j] += a * planes[bits - 2, c, j]
        a = alpha[c, bits - 1]
        g = gamma[c]
        s = step[c]
        for j in range(K):
            out[c, j] = np.float32(((acc[j] + a * planes[bits - 1, c, j]) + g) * s)


def compose_bitplanes(planes, alpha, gamma, step):
    """Values ``float32 (C, K)``: ``step[c] * (sum_k alpha[c, k] * planes[k, c, :] + gamma[c])``.

    ``planes`` uint8 (bits, C, K); ``alpha`` (C, bits); ``gamma`` and ``step`` (C,). Accumulates in
    float64 and rounds once to float32.
    """
    planes = _planes_array(planes)
    bits, C, _ = planes.shape
    alpha = np.ascontiguousarray(alpha, dtype=np.float64)
    gamma = np.ascontiguousarray(gamma, dtype=np.float64).reshape(-1)
    step = np.ascontiguousarray(step, dtype=np.float64).reshape(-1)
    if alpha.shape != (C, bits) or gamma.shape != (C,) or step.shape != (C,):
        raise ValueError(
            f"for planes of shape {planes.shape} need alpha ({C}, {bits}), gamma ({C},), step ({C},);"
            f" got {alpha.shape}, {gamma.shape}, {step.shape}"
        )
    out = np.empty(planes.shape[1:], dtype=np.float32)
    with threads_for(planes.size):
        _compose_bitplanes(planes, alpha, gamma, step, out)
    return out


# ---------------------------------------------------------------------------------------------
# dL/dW -> dL/d(alpha), dL/d(gamma)


@numba.njit(**JIT_REDUCE)
def _bit_weight_grads(planes, grad_w, step, grad_alpha, grad_gamma):
    """Per-channel reductions giving the bit-weight gradients, in place.

    ``grad_alpha[c, k] = step[c] * sum_j grad_w[c, j] * planes[k, c, j]`` and
    ``grad_gamma[c] = step[c] * sum_j grad_w[c, j]``, both summed in float64 (in a
    vectorisation-dependent order: the kernel is compiled with ``reassoc``).

    Parameters
    ----------
    planes : uint8[:, :, ::1], shape (bits, C, K)
    grad_w : float32 or float64 [:, ::1], shape (C, K)
        dL/dW for the composed weights.
    step : float64[::1], shape (C,)
    grad_alpha : float64[:, ::1], shape (C, bits), output
    grad_gamma : float64[::1], shape (C,), output
    """
    bits, C, K = planes.shape
    for c in numba.prange(C):
        s = step[c]
        g = np.empty(K, dtype=np.float64)
        total = 0.0
        for j in range(K):
            g[j] = grad_w[c, j]
            total += g[j]
        grad_gamma[c] = s * total
        for k in range(bits):
            acc = 0.0
            for j in range(K):
                acc += g[j] * planes[k, c, j]
            grad_alpha[c, k] = s * acc


def bit_weight_grads(planes, grad_w, step):
    """``(grad_alpha float64 (C, bits), grad_gamma float64 (C,))`` from dL/dW ``(C, K)``.

    ``grad_alpha[c, k] = step[c] * sum_j grad_w[c, j] * planes[k, c, j]``,
    ``grad_gamma[c] = step[c] * sum_j grad_w[c, j]``; float64 accumulation and result.
    """
    planes = _planes_array(planes)
    bits, C, K = planes.shape
    grad_w = _float_array(grad_w, 2, "grad_w")
    step = np.ascontiguousarray(step, dtype=np.float64).reshape(-1)
    if grad_w.shape != (C, K) or step.shape != (C,):
        raise ValueError(
            f"for planes of shape {planes.shape} need grad_w ({C}, {K}) and step ({C},);"
            f" got {grad_w.shape}, {step.shape}"
        )
    grad_alpha = np.empty((C, bits), dtype=np.float64)
    grad_gamma = np.empty(C, dtype=np.float64)
    with threads_for(planes.size):
        _bit_weight_grads(planes, grad_w, step, grad_alpha, grad_gamma)
    return grad_alpha, grad_gamma


# ---------------------------------------------------------------------------------------------
# packed file format: each plane row packed along K, 8 values a byte, little-endian bit order


@numba.njit(**JIT_PARALLEL)
def _pack_words(words, out):
    """Pack 0/1 bytes eight at a time, in place.

    Parameters
    ----------
    words : uint64[::1], shape (n,)
        The 0/1 byte array viewed as little-endian 64-bit words (8 values each).
    out : uint8[::1], shape (n,)
        ``out[i]`` has bit ``t`` set iff byte ``t`` of ``words[i]`` is 1.
    """
    magic = np.uint64(0x0102040810204080)
    shift = np.uint64(56)
    for i in numba.prange(words.shape[0]):
        out[i] = np.uint8((words[i] * magic) >> shift)


@numba.njit(**JIT_PARALLEL)
def _pack_rows(rows, out):
    """Pack each row of 0/1 bytes along its length, little-endian bit order, in place.

    Parameters
    ----------
    rows : uint8[:, ::1], shape (R, K)
    out : uint8[:, ::1], shape (R, ceil(K / 8))
        ``out[r, i]`` bit ``t`` is ``rows[r, 8 * i + t]``; bits past ``K`` are zero.
    """
    R, K = rows.shape
    for r in numba.prange(R):
        for i in range(out.shape[1]):
            v = 0
            for t in range(min(8, K - 8 * i)):
                v |= (rows[r, 8 * i + t] & 1) << t
            out[r, i] = v


def pack_bitplanes(planes):
    """Pack ``uint8 (bits, C, K)`` planes to ``uint8 (bits, C, ceil(K/8))``.

    Same bytes as ``np.packbits(planes, axis=-1, bitorder="little")``.
    """
    planes = _planes_array(planes)
    bits, C, K = planes.shape
    if K % 8 == 0 and sys.byteorder == "little" and planes.size:
        out = np.empty(planes.size // 8, dtype=np.uint8)
        with threads_for(planes.size):
            _pack_words(planes.reshape(-1).view(np.uint64), out)
        return out.reshape(bits, C, K // 8)
    out = np.empty((bits * C, (K + 7) // 8), dtype=np.uint8)
    with threads_for(8 * planes.size):
        _pack_rows(planes.reshape(bits * C, K), out)
    return out.reshape(bits, C, -1)


@numba.njit(**JIT_PARALLEL)
def _unpack_rows(packed, out):
    """Unpack rows of bytes to 0/1 bytes, little-endian bit order, in place.

    Parameters
    ----------
    packed : uint8[:, ::1], shape (R, >= ceil(K / 8))
    out : uint8[:, ::1], shape (R, K)
        ``out[r, j] = (packed[r, j // 8] >> (j % 8)) & 1``.
    """
    R, K = out.shape
    full = K // 8
    for r in numba.prange(R):
        for i in range(full):
            v = packed[r, i]
            for t in range(8):
                out[r, 8 * i + t] = (v >> t) & 1
        for j in range(8 * full, K):
            out[r, j] = (packed[r, full] >> (j - 8 * full)) & 1


def unpack_bitplanes(packed, bits, C, K):
    """Inverse of :func:`pack_bitplanes`: ``uint8 (bits, C, K)`` planes from packed bytes.

    Same as ``np.unpackbits(packed, axis=-1, count=K, bitorder="little")``.
    """
    bits, C, K = _check_bits(bits), int(C), int(K)
    nbytes = (K + 7) // 8
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.size != bits * C * nbytes:
        raise ValueError(f"packed has {packed.size} bytes, need {bits}*{C}*{nbytes} for K={K}")
    out = np.empty((bits * C, K), dtype=np.uint8)
    with threads_for(out.size):
        _unpack_rows(packed.reshape(bits * C, nbytes), out)
    return out.reshape(bits, C, K)


# ---------------------------------------------------------------------------------------------
# step search: squared error of uniform quantization for candidate steps


# x + 1.5 * 2**52 - 1.5 * 2**52 rounds a float64 |x| < 2**51 to an integer, half to even (the default
# rounding mode), in two vectorisable instructions instead of a call to rint.
ROUNDER = 6755399441055744.0


@numba.njit(**JIT)
def round_clip(t, qmin, qmax):
    """``clip(rint(t), qmin, qmax)`` for integer-valued ``qmin <= qmax`` (exact, half to even).

    Clipping first is the same since rounding is monotone and the bounds are integers; it also keeps
    ``|t| < 2**51`` for the rounding trick. Compiled without fastmath: with ``reassoc`` the two
    additions would fold away, so it must not be written inline in a ``JIT_REDUCE`` kernel.
    """
    t = min(max(t, qmin), qmax)
    return (t + ROUNDER) - ROUNDER


@numba.njit(**JIT_REDUCE)
def _quantization_errors(x, steps, qmin, qmax, out):
    """Squared error of uniform quantization of each row for each candidate step, in place.

    ``out[c, r] = sum_j (x[c, j] - s * clip(rint(x[c, j] / s), qmin, qmax))**2`` with
    ``s = steps[c, r]``, everything in float64 (``rint`` rounds half to even, like ``np.round``; the
    sum's order depends on vectorisation).

    Parameters
    ----------
    x : float32 or float64 [:, ::1], shape (C, K)
    steps : float64[:, ::1], shape (C, R), all > 0
    qmin, qmax : float
        Integer range of the codes.
    out : float64[:, ::1], shape (C, R)
    """
    C, K = x.shape
    R = steps.shape[1]
    for i in numba.prange(C * R):
        c = i // R
        r = i - c * R
        s = steps[c, r]
        err = 0.0
        for j in range(K):
            v = np.float64(x[c, j])
            d = v - s * round_clip(v / s, qmin, qmax)
            err += d * d
        out[c, r] = err


def quantization_errors(x, steps, qmin, qmax):
    """``float64 (C, R)``: squared error of quantizing row c of ``x (C, K)`` with step ``steps[c, r]``.

    Codes are ``clip(round(x / s), qmin, qmax)`` (round half to even), computed in float64.
    """
    x = _float_array(x, 2, "x")
    steps = np.ascontiguousarray(steps, dtype=np.float64)
    if steps.ndim != 2 or steps.shape[0] != x.shape[0]:
        raise ValueError(f"steps must be ({x.shape[0]}, R), got {steps.shape}")
    if not np.all(steps > 0):
        raise ValueError("steps must be positive")
    out = np.empty(steps.shape, dtype=np.float64)
    with threads_for(x.shape[1] * steps.size):
        _quantization_errors(x, steps, float(qmin), float(qmax), out)
    return out


# ---------------------------------------------------------------------------------------------
# output-aware step search (wrapped by bwacal.quant.output_steps.output_errors, which also factors H)


@numba.njit(**JIT_REDUCE)
def hessian_errors(w, steps, hessians, group_of, qmin, qmax, out):
    """Output error ``e^T H e`` of quantizing each row with each candidate step, in place.

    ``e = w[c] - s * clip(rint(w[c] / s), qmin, qmax)`` with ``s = steps[c, r]`` and
    ``H = hessians[group_of[c]]``; ``H e`` is accumulated column by column (``u += H[k] e[k]``, using
    the symmetry of H so each pass reads a contiguous row and vectorises without reassociation),
    then dotted with ``e``; all in float64.

    Parameters
    ----------
    w : float32 or float64 [:, ::1], shape (C, K)
    steps : float64[:, ::1], shape (C, R), all > 0
    hessians : float64[:, :, ::1], shape (G, K, K), symmetric
    group_of : int64[::1], shape (C,), values in [0, G)
    qmin, qmax : float
    out : float64[:, ::1], shape (C, R)
    """
    C, K = w.shape
    R = steps.shape[1]
    for i in numba.prange(C * R):
        c = i // R
        r = i - c * R
        s = steps[c, r]
        h = hessians[group_of[c]]
        e = np.empty(K, dtype=np.float64)
        u = np.zeros(K, dtype=np.float64)
        for j in range(K):
            v = np.float64(w[c, j])
            e[j] = v - s * round_clip(v / s, qmin, qmax)
        for k in range(K):
            ek = e[k]
            if ek != 0.0:
                for j in range(K):
                    u[j] += h[k, j] * ek
        err = 0.0
        for j in range(K):
            err += e[j] * u[j]
        out[c, r] = err


@numba.njit(**JIT_REDUCE)
def factored_errors(w, steps, factors, group_of, qmin, qmax, out):
    """Output error ``|L e|**2`` of quantizing each row with each candidate step, in place.

    As :func:`hessian_errors` with ``H = L^T L`` given by ``L = factors[group_of[c]]``.

    Parameters
    ----------
    w : float32 or float64 [:, ::1], shape (C, K)
    steps : float64[:, ::1], shape (C, R), all > 0
    factors : float64[:, :, ::1], shape (G, r, K)
    group_of : int64[::1], shape (C,)
    qmin, qmax : float
    out : float64[:, ::1], shape (C, R)
    """
    C, K = w.shape
    R = steps.shape[1]
    rank = factors.shape[1]
    for i in numba.prange(C * R):
        c = i // R
        r = i - c * R
        s = steps[c, r]
        f = factors[group_of[c]]
        e = np.empty(K, dtype=np.float64)
        for j in range(K):
            v = np.float64(w[c, j])
            e[j] = v - s * round_clip(v / s, qmin, qmax)
        err = 0.0
        for t in range(rank):
            acc = 0.0
            for j in range(K):
                acc += f[t, j] * e[j]
            err += acc * acc
        out[c, r] = err
