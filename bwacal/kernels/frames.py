"""Direct convolution on padded, flattened *frames*: the numba kernels behind Conv.

A frame holds one channel of the zero-padded input of every image in the batch, flattened: padded
pixel (i, j) of image b sits at ``b*hf*wf + i*wf + j``. For a stride-1 conv, output pixel (oi, oj)
of image b is ``sum over taps t of w[t] * frame[p + off[t]]`` with ``p = b*hf*wf + oi*wf + oj`` and
``off[t] = ki*dh*wf + kj*dw``: one constant offset per tap, so the inner loop walks the flattened
frame with contiguous loads and no bounds tests, and vectorises. The positions that fall in the
padding band are computed too and thrown away when the result is copied out, except by
``dense_forward_rows``, whose vectors run over output channels instead (weights ``(K, O)``) and whose
tiles are 8 output pixels of one row: ``conv`` takes it for rows of 8 or 16 pixels and at least 32
channels, where the padding is a large share of the positions.

A stride-1 dense conv's frames put the images in groups whose rows interleave (row i of each image
of the group, then row i + 1; ``Plan``): the taps are still constant offsets, and the padding rows
between images are computed once per group instead of once per image.

A strided conv splits the padded input into ``sh*sw`` phase frames (padded rows ``a, a+sh, ...``
and columns ``b, b+sw, ...``); tap (ki, kj) reads phase ``((ki*dh) % sh, (kj*dw) % sw)`` at offset
``((ki*dh)//sh)*wf + (kj*dw)//sw``, so strided convs run the same kernels.

Weights are laid out ``(O, K)`` over *entries* k = (input channel, tap), with zero output channels
added to make O a multiple of ``OB``: each inner-loop iteration reads ``GROUP`` frame values and
updates ``OB`` output channels (32 FMAs, 8 stores); entries beyond the last full group go one at a
time (a zero-weight padding entry would turn an infinite input into NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from bwacal.kernels.flags import FMA, FMA_REDUCE, INLINE
from bwacal.kernels.simd import vbcast, vfma, vload, vmask, vstore, vzero


OB = 8  # output channels per block
GROUP = 4  # (channel, tap) entries per inner-loop iteration (dL/dW blocks too)
CHUNK = 4096  # frame positions per job, about (whole images at a time)
# positions in a row of a group of images whose rows interleave, at most (``plan``). Forward+backward,
# min of 4 alternating runs in one process: ResNet-20 224 ms with no groups, 212 with 128, 218 with
# 512; ResNet-18 557 without and 544 with 128, and in another process 540 without and 553 with 512.
GROUP_ROW = 128
SPAN = 4096  # positions per float32 partial sum in dL/dW (float64 across them)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: ``plan`` hands out one per geometry
class Plan:
    """Where a window's taps read in the phase frames of an ``h x w`` input. The images sit in groups
    of ``group``, one group after another; inside a group the rows interleave the images (row i of
    each image, then row i + 1), so padded pixel (i, j) of image b is at position
    ``(b // group)*gstr + (b % group)*wf + i*rstr + j``. With groups of one image this is images one
    after another, ``hf*wf`` positions each."""

    hf: int  # frame height and width (a phase of the padded input)
    wf: int
    src: np.ndarray  # (taps,) phase index of each tap
    off: np.ndarray  # (taps,) offset of each tap in its phase frame
    tail: int  # zeros after the last group, so the padding band can be read past the end
    group: int  # images per group
    rstr: int  # row stride: group*wf
    gstr: int  # group stride: hf*rstr

    def length(self, n):
        """Positions in the frames of n images, the tail included."""
        return -(-n // self.group) * self.gstr + self.tail

    def span(self, n, ho, wo):
        """Positions from the first output pixel to the last one, both included, for n images."""
        groups = -(-n // self.group)
        last = n - (groups - 1) * self.group  # images in the last group
        return (groups - 1) * self.gstr + (ho - 1) * self.rstr + (last - 1) * self.wf + wo

    def jobs(self, n, ho):
        """(groups, output rows) per job, about CHUNK positions: whole images when a group holds
        one, whole rows of one group otherwise."""
        if self.group == 1:
            return images_per_job(self.gstr, n), ho
        return 1, max(1, min(ho, CHUNK // self.rstr))


def plan(g, h, w, n=None) -> Plan:
    """The ``Plan`` for window ``g`` on an ``h x w`` input (``n``: see ``_new_plan``), made once per
    geometry and batch size (``Plan``s are read-only): building the plans and their entry tables anew
    for every conv took 3.1 ms of a ResNet-20 forward+backward."""
    return _new_plan(g, h, w, n, GROUP_ROW)


@lru_cache(maxsize=1024)
def _new_plan(g, h, w, n, group_row) -> Plan:
    """Phase frames with images one after another; given the batch size ``n``, a stride-1 window
    gets groups of images whose rows interleave, so the padding rows between images are stored (and
    computed) once per group rather than once per image: on ResNet-18's 7x7 layers (one group of
    8 images) a conv computes 447 positions per 392 outputs instead of 503. A group's rows hold
    about ``GROUP_ROW`` positions at most: a tap reads a pixel again one row later, and further
    apart than that the pixel is no longer in L1."""
    if g.sh == 1 and min(g.ph, g.pad_end_h) <= (g.kh - 1) * g.dh:
        # stride 1: an image's (group's) bottom padding rows are the next one's top ones (all
        # zeros), so only the larger of the two is stored; likewise a row's right padding is the
        # next row's left
        hp = h + max(g.ph, g.pad_end_h)
    else:
        hp = h + g.ph + g.pad_end_h
    if g.sw == 1 and min(g.pw, g.pad_end_w) <= (g.kw - 1) * g.dw:
        wp = w + max(g.pw, g.pad_end_w)
    else:
        wp = w + g.pw + g.pad_end_w
    hf, wf = -(-hp // g.sh), -(-wp // g.sw)
    group = 1
    if n is not None and g.sh == 1 and g.sw == 1:
        group = min(n, max(1, group_row // wf))
        group = -(-n // -(-n // group))  # as many groups, as even as they go
    rstr = group * wf
    src, off = [], []
    for ki in range(g.kh):
        for kj in range(g.kw):
            src.append(((ki * g.dh) % g.sh) * g.sw + (kj * g.dw) % g.sw)
            off.append(((ki * g.dh) // g.sh) * rstr + (kj * g.dw) // g.sw)
    # a phase the taps never read is still built (strided 1x1 convs read only phase 0); the tail
    # covers the bottom padding of the last group and the reads past it, with room for the
    # positions a last whole register tile computes past the end (``_accumulate_tiles``,
    # ``_accumulate_tiles4``)
    tail = max(off) + rstr * (1 + g.pad_end_h) + 64
    return Plan(hf, wf, np.array(src, dtype=np.int64), np.array(off, dtype=np.int64), tail, group, rstr,
                hf * rstr)


def build_frames(x, g, p: Plan, y=None, lo_clip=-np.inf, hi_clip=np.inf):
    """The ``(sh*sw, C, p.length(N))`` phase frames of the CNHW array ``x``. Phases no tap reads
    (three of the four of a strided 1x1 conv) are left unfilled: nothing reads them.

    Given ``y`` (shaped like ``x``), the frames of ``x`` where ``lo_clip < y < hi_clip``, else 0: the
    gradient through a fused Relu/Clip, masked as it is copied (NaN in ``y`` gives 0)."""
    c, n = x.shape[:2]
    x = np.ascontiguousarray(x)
    y = None if y is None else np.ascontiguousarray(y)
    f = np.empty((g.sh * g.sw, c, p.length(n)), dtype=x.dtype)
    used = np.zeros(g.sh * g.sw, dtype=np.bool_)
    used[p.src] = True
    # the kernel reads x and y flattened (``xf``, ``yf``); x gives it their shape
    _fill_frames(x, x.reshape(-1), None if y is None else y.reshape(-1), lo_clip, hi_clip, g.sh, g.sw, g.ph, g.pw,
                 p.hf, p.wf, p.group, p.gstr, p.rstr, used, f)
    return f


# NOTE: the kernels take no default arguments: numba's dispatcher spends ~40 us filling them in,
# as much as to_frame takes on a small layer. A None mask source ``y`` compiles without the mask.


@njit(**FMA)
def _fill_frames(x, xf, yf, lo_clip, hi_clip, sh, sw, pt, pl, hf, wf, group, gstr, rstr, used, f):
    c_n, n_n, h, w = x.shape
    lo = x.dtype.type(lo_clip)
    hi = x.dtype.type(hi_clip)
    g_n = (n_n + group - 1) // group
    for job in prange(sh * sw * c_n):
        ph = job // c_n
        c = job % c_n
        if not used[ph]:
            continue
        a = ph // sw
        b = ph % sw
        row = f[ph, c]
        # columns q whose input column q*sw + b - pl lies in [0, w)
        q0 = max(0, (pl - b + sw - 1) // sw)
        q1 = min(wf, (w - 1 + pl - b) // sw + 1) if w - 1 + pl - b >= 0 else 0
        if q0 >= q1:
            row[:] = 0
            continue
        j0 = q0 * sw + b - pl
        # Every position is written once, but for the overhang of the vector copies (``_copy_row``).
        # First the image rows in position order, each with the padding columns around it: a copy
        # may write up to 15 entries past its row, which what comes after it then covers. Then zeros
        # over the padding rows (whole rows of a group), the empty image slots of the last group and
        # the tail. (A pass of zeros under everything first wrote the frames twice.)
        for gi in range(g_n):
            for r in range(hf):
                i = r * sh + a - pt
                if i < 0 or i >= h:
                    continue
                for bi in range(gi * group, min(n_n, gi * group + group)):
                    at = gi * gstr + (bi - gi * group) * wf + r * rstr
                    for q in range(q0):
                        row[at + q] = 0
                    _copy_row(xf, yf, lo, hi, ((c * n_n + bi) * h + i) * w + j0, sw, q1 - q0, row, at + q0)
                    for q in range(q1, wf):
                        row[at + q] = 0
        for gi in range(g_n):
            for r in range(hf):
                i = r * sh + a - pt
                if i < 0 or i >= h:
                    row[gi * gstr + r * rstr:gi * gstr + (r + 1) * rstr] = 0
                elif gi == g_n - 1 and n_n < g_n * group:
                    row[gi * gstr + r * rstr + (n_n - gi * group) * wf:gi * gstr + (r + 1) * rstr] = 0
        row[g_n * gstr:] = 0


def _copy_row(xf, yf, lo, hi, s, sw, n, row, at):
    """``row[at + q] = xf[s + q*sw]`` for q < n, masked where ``yf`` (shaped like ``xf``) is given:
    0 where not ``lo < yf[s + q*sw] < hi`` (so 0 where it is NaN). Float32 rows of stride 1 are
    copied 16 entries at a time, writing up to 15 entries past ``at + n`` (the caller's frames have
    room and write them later). One entry at a time, a ResNet-20 step's frames took 21.6 ms (sum of
    per-call medians) and 19.3 ms this way: 0.49 -> 0.20 ms on the 64-channel 8x8 layers, 0.56 ->
    0.43 on the 32-channel 16x16 ones."""


def _copy_row_plain(xf, yf, lo, hi, s, sw, n, row, at):
    dst = row[at:at + n]
    xs = xf[s:]
    for q in range(n):  # NOTE: ``dst[:] = xs[:n]`` took twice as long on 8-32 float rows
        dst[q] = xs[q * sw]


def _copy_row_masked(xf, yf, lo, hi, s, sw, n, row, at):
    dst = row[at:at + n]
    xs = xf[s:]
    ys = yf[s:]
    for q in range(n):
        t = ys[q * sw]
        dst[q] = xs[q * sw] if (t > lo) & (t < hi) else 0


def _copy_row_vectors(xf, yf, lo, hi, s, sw, n, row, at):
    if sw != 1 or s + (n + 15) // 16 * 16 > xf.size:  # the array's last row: no overhang to read
        _plain_row(xf, yf, lo, hi, s, sw, n, row, at)
    else:
        for q in range(0, n, 16):
            vstore(row, at + q, vload(xf, s + q))


def _copy_row_masked_vectors(xf, yf, lo, hi, s, sw, n, row, at):
    if sw != 1 or s + (n + 15) // 16 * 16 > xf.size:
        _masked_row(xf, yf, lo, hi, s, sw, n, row, at)
    else:
        for q in range(0, n, 16):
            vstore(row, at + q, vmask(vload(xf, s + q), vload(yf, s + q), lo, hi))


# the loops again as jitted functions, for the vector copies' fallback (an overload returns plain
# Python functions; a jitted function calls jitted ones)
_plain_row = njit(**INLINE)(_copy_row_plain)
_masked_row = njit(**INLINE)(_copy_row_masked)


@overload(_copy_row, **INLINE)
def _choose_copy_row(xf, yf, lo, hi, s, sw, n, row, at):
    masked = yf is not types.none
    vectors = xf.dtype == types.float32 and row.dtype == types.float32 and (not masked or yf.dtype == types.float32)
    if vectors:
        return _copy_row_masked_vectors if masked else _copy_row_vectors
    return _copy_row_masked if masked else _copy_row_plain


@njit(**INLINE)
def _copy_masked(xs, ys, lo, hi, dst):
    """``dst[q] = xs[q]`` where ``lo < ys[q] < hi``, else 0 (so 0 where ``ys`` is NaN)."""
    for q in range(dst.size):
        t = ys[q]
        dst[q] = xs[q] if (t > lo) & (t < hi) else 0


def dense_weights(w2):
    """``(O, K)`` weights (entry k = c*taps + t) with zero rows added to make O a multiple of OB
    (``w2`` itself when it is one already and contiguous)."""
    o, k = w2.shape
    if o % OB == 0 and w2.flags.c_contiguous:
        return w2
    out = np.zeros((-(-o // OB) * OB, k), dtype=w2.dtype)
    out[:o] = w2
    return out


def transposed_weights(w, taps, dtype):
    """``dense_weights`` for a conv from the O channels of dL/dy to the C of dL/dx, given the
    weights ``w`` (O, C, kh, kw): row c, entry o*len(taps) + i holds ``w[o, c]``'s tap
    ``taps[i]`` (flattened). A stride-1 conv's dL/dx takes all taps, reversed (both axes
    flipped); each phase of a strided conv's the taps that read it."""
    o, c = w.shape[:2]
    taps = np.ascontiguousarray(taps, dtype=np.int64)
    out = np.empty((-(-c // OB) * OB, o * taps.size), dtype=dtype)
    out[c:] = 0
    _transposed_weights(np.ascontiguousarray(w, dtype=dtype).reshape(o, c, -1), taps, out)
    return out


@njit(**FMA)
def _transposed_weights(w3, taps, out):
    o_n, c_n = w3.shape[:2]
    t_n = taps.size
    for cb in prange((c_n + 15) // 16):  # 16 rows at a time, so the reads w[o, c0:c0 + 16] stay near
        for c in range(cb * 16, min(c_n, cb * 16 + 16)):
            row = out[c]
            for o in range(o_n):
                src = w3[o, c]
                dst = row[o * t_n:(o + 1) * t_n]
                for i in range(t_n):
                    dst[i] = src[taps[i]]


@njit(**FMA)
def sum_splits(part, k, out):
    """``out[o, j] = sum over s of part[s, o, j]`` for j < k: dL/dW from ``dense_weight_grad``'s
    float64 partial sums, summed in float64 and rounded once to ``out``'s type."""
    for o in prange(part.shape[1]):
        tot = part[0, o, :k].copy()
        for s in range(1, part.shape[0]):
            src = part[s, o]
            for j in range(k):
                tot[j] += src[j]
        dst = out[o]
        for j in range(k):
            dst[j] = tot[j]


def pad_entries(eph, ech, eoff):
    """Entry tables padded to a multiple of GROUP by repeating the last entry, for
    ``dense_weight_grad``, whose sums for the extra entries are dropped."""
    k = eph.size
    kp = -(-k // GROUP) * GROUP
    idx = np.minimum(np.arange(kp), k - 1)
    return eph[idx], ech[idx], eoff[idx]


def weight_grad_splits(o, k, n_pos):
    """How many position ranges dL/dW is summed over in parallel: enough jobs for the threads, with
    the (splits, O, K) float64 partial sums within 32 MB."""
    blocks = -(-o // 4)  # dense_weight_grad's blocks of output channels
    want = max(1, -(-8 // blocks))
    fit = max(1, (32 << 20) // (8 * o * k))
    return int(max(1, min(want, fit, n_pos // 4096 or 1)))


@lru_cache(maxsize=1024)
def entry_tables(c, p: Plan):
    """Per entry k = c*taps + t: (phase, channel, offset) arrays, made once per (c, plan) and shared:
    not to be written to."""
    t = p.src.size
    return np.tile(p.src, c), np.repeat(np.arange(c, dtype=np.int64), t), np.tile(p.off, c)


@lru_cache(maxsize=1024)
def padded_entry_tables(c, p: Plan):
    """``pad_entries(*entry_tables(c, p))``, made once and shared as ``entry_tables``."""
    return pad_entries(*entry_tables(c, p))


def accumulate(f, eph, ech, eoff, wk, o, lo, n_pos, acc):
    """``acc[j, i] += sum_k wk[o + j, k] * f[eph[k], ech[k], lo + eoff[k] + i]`` for j < 8, i < n_pos:
    register tiles for float32 (``_accumulate_tiles``), vectorised loops otherwise."""


def _tiles_for_float32(tiles):
    """An overload choosing ``tiles`` for float32 frames, weights and sums, the loops otherwise."""
    def choose(f, eph, ech, eoff, wk, o, lo, n_pos, acc):
        if f.dtype == types.float32 and wk.dtype == types.float32 and acc.dtype == types.float32:
            return tiles
        return _accumulate_untiled
    return choose


def _accumulate_untiled(f, eph, ech, eoff, wk, o, lo, n_pos, acc):
    _accumulate_loops(f, eph, ech, eoff, wk, o, lo, n_pos, acc)


def _accumulate_tiles(f, eph, ech, eoff, wk, o, lo, n_pos, acc):
    """``accumulate`` on tiles of 32 positions x 8 output channels whose 16 vector sums stay in
    registers over all entries (2 loads, 8 broadcasts, 16 FMAs per entry); the last n_pos % 32
    positions go through ``_accumulate_loops``. On the 2-core Zen 4 this was measured on, 3x3 convs
    ran at 78-111 GMAC/s where the loops ran 69-91 (16 to 256 channels, before the output copy)."""
    c_n, length = f.shape[1], f.shape[2]
    flat = f.reshape(-1)
    ent = (eph * c_n + ech) * length + eoff + lo
    w0, w1, w2, w3, w4, w5, w6, w7 = wk[o], wk[o + 1], wk[o + 2], wk[o + 3], wk[o + 4], wk[o + 5], wk[o + 6], wk[o + 7]
    a0, a1, a2, a3, a4, a5, a6, a7 = acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]
    # The last partial tile is a whole tile too, computing up to 31 positions past n_pos, where the
    # frame and ``acc`` have room for them (the loops took as long for 23 positions as tiles for 64)
    room = min(acc.shape[1], length - lo - eoff.max())
    full = min(n_pos + 31, room) // 32 * 32
    for p in range(0, full, 32):
        c00, c01, c10, c11 = vload(a0, p), vload(a0, p + 16), vload(a1, p), vload(a1, p + 16)
        c20, c21, c30, c31 = vload(a2, p), vload(a2, p + 16), vload(a3, p), vload(a3, p + 16)
        c40, c41, c50, c51 = vload(a4, p), vload(a4, p + 16), vload(a5, p), vload(a5, p + 16)
        c60, c61, c70, c71 = vload(a6, p), vload(a6, p + 16), vload(a7, p), vload(a7, p + 16)
        for k in range(ent.size):
            xa = vload(flat, ent[k] + p)
            xb = vload(flat, ent[k] + p + 16)
            u = vbcast(w0[k])
            c00, c01 = vfma(u, xa, c00), vfma(u, xb, c01)
            u = vbcast(w1[k])
            c10, c11 = vfma(u, xa, c10), vfma(u, xb, c11)
            u = vbcast(w2[k])
            c20, c21 = vfma(u, xa, c20), vfma(u, xb, c21)
            u = vbcast(w3[k])
            c30, c31 = vfma(u, xa, c30), vfma(u, xb, c31)
            u = vbcast(w4[k])
            c40, c41 = vfma(u, xa, c40), vfma(u, xb, c41)
            u = vbcast(w5[k])
            c50, c51 = vfma(u, xa, c50), vfma(u, xb, c51)
            u = vbcast(w6[k])
            c60, c61 = vfma(u, xa, c60), vfma(u, xb, c61)
            u = vbcast(w7[k])
            c70, c71 = vfma(u, xa, c70), vfma(u, xb, c71)
        vstore(a0, p, c00)
        vstore(a0, p + 16, c01)
        vstore(a1, p, c10)
        vstore(a1, p + 16, c11)
        vstore(a2, p, c20)
        vstore(a2, p + 16, c21)
        vstore(a3, p, c30)
        vstore(a3, p + 16, c31)
        vstore(a4, p, c40)
        vstore(a4, p + 16, c41)
        vstore(a5, p, c50)
        vstore(a5, p + 16, c51)
        vstore(a6, p, c60)
        vstore(a6, p + 16, c61)
        vstore(a7, p, c70)
        vstore(a7, p + 16, c71)
    if full < n_pos:
        _accumulate_loops(f, eph, ech, eoff, wk, o, lo + full, n_pos - full, acc[:, full:])


def accumulate_narrow(f, eph, ech, eoff, wk, o, lo, n_pos, acc):
    """``accumulate`` where only rows o..o+3 are wanted: float32 tiles of 64 positions x 4 rows (4
    loads, 4 broadcasts, 16 FMAs per entry), the rest as ``accumulate``. ResNet-18's stem dL/dx has
    3 channels, and tiles of 8 rows spent 5/8 of their FMAs on zero weights."""


def _accumulate_tiles4(f, eph, ech, eoff, wk, o, lo, n_pos, acc):
    c_n, length = f.shape[1], f.shape[2]
    flat = f.reshape(-1)
    ent = (eph * c_n + ech) * length + eoff + lo
    w0, w1, w2, w3 = wk[o], wk[o + 1], wk[o + 2], wk[o + 3]
    a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
    room = min(acc.shape[1], length - lo - eoff.max())  # a whole last tile where there is room
    full = min(n_pos + 63, room) // 64 * 64
    for p in range(0, full, 64):
        c00, c01, c02, c03 = vload(a0, p), vload(a0, p + 16), vload(a0, p + 32), vload(a0, p + 48)
        c10, c11, c12, c13 = vload(a1, p), vload(a1, p + 16), vload(a1, p + 32), vload(a1, p + 48)
        c20, c21, c22, c23 = vload(a2, p), vload(a2, p + 16), vload(a2, p + 32), vload(a2, p + 48)
        c30, c31, c32, c33 = vload(a3, p), vload(a3, p + 16), vload(a3, p + 32), vload(a3, p + 48)
        for k in range(ent.size):
            e = ent[k] + p
            xa, xb, xc, xd = vload(flat, e), vload(flat, e + 16), vload(flat, e + 32), vload(flat, e + 48)
            u = vbcast(w0[k])
            c00, c01, c02, c03 = vfma(u, xa, c00), vfma(u, xb, c01), vfma(u, xc, c02), vfma(u, xd, c03)
            u = vbcast(w1[k])
            c10, c11, c12, c13 = vfma(u, xa, c10), vfma(u, xb, c11), vfma(u, xc, c12), vfma(u, xd, c13)
            u = vbcast(w2[k])
            c20, c21, c22, c23 = vfma(u, xa, c20), vfma(u, xb, c21), vfma(u, xc, c22), vfma(u, xd, c23)
            u = vbcast(w3[k])
            c30, c31, c32, c33 = vfma(u, xa, c30), vfma(u, xb, c31), vfma(u, xc, c32), vfma(u, xd, c33)
        _store4(a0, p, c00, c01, c02, c03)
        _store4(a1, p, c10, c11, c12, c13)
        _store4(a2, p, c20, c21, c22, c23)
        _store4(a3, p, c30, c31, c32, c33)
    if full < n_pos:
        accumulate(f, eph, ech, eoff, wk, o, lo + full, n_pos - full, acc[:, full:])


@njit(**INLINE)
def _store4(a, p, u, v, w, z):
    vstore(a, p, u)
    vstore(a, p + 16, v)
    vstore(a, p + 32, w)
    vstore(a, p + 48, z)


overload(accumulate, **INLINE)(_tiles_for_float32(_accumulate_tiles))
overload(accumulate_narrow, **INLINE)(_tiles_for_float32(_accumulate_tiles4))


@njit(**INLINE)
def _accumulate_loops(f, eph, ech, eoff, wk, o, lo, n_pos, acc):
    """``acc[j, i] += sum_k wk[o + j, k] * f[eph[k], ech[k], lo + eoff[k] + i]`` for j < 8, i < n_pos.

    Written out for 8 output channels x 4 entries: 32 FMAs per 4 frame loads and 8 read-modify-
    writes of ``acc``. On the 2-core Zen 4 this was tuned on, 8 x 4 ran a 16-channel 3x3 conv at
    81 GMAC/s where 4 x 4 ran it at 62.
    """
    a0, a1, a2, a3, a4, a5, a6, a7 = acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]
    n_ent = eph.size
    full = n_ent - n_ent % 4
    for k in range(full, n_ent):  # the entries left over from the groups of 4, one at a time
        s0 = f[eph[k], ech[k], lo + eoff[k]:]
        w0, w1, w2, w3, w4, w5, w6, w7 = (wk[o, k], wk[o + 1, k], wk[o + 2, k], wk[o + 3, k],
                                          wk[o + 4, k], wk[o + 5, k], wk[o + 6, k], wk[o + 7, k])
        for i in range(n_pos):
            x0 = s0[i]
            a0[i] += w0 * x0
            a1[i] += w1 * x0
            a2[i] += w2 * x0
            a3[i] += w3 * x0
            a4[i] += w4 * x0
            a5[i] += w5 * x0
            a6[i] += w6 * x0
            a7[i] += w7 * x0
    for k in range(0, full, 4):
        s0 = f[eph[k], ech[k], lo + eoff[k]:]
        s1 = f[eph[k + 1], ech[k + 1], lo + eoff[k + 1]:]
        s2 = f[eph[k + 2], ech[k + 2], lo + eoff[k + 2]:]
        s3 = f[eph[k + 3], ech[k + 3], lo + eoff[k + 3]:]
        w00, w01, w02, w03 = wk[o + 0, k], wk[o + 0, k + 1], wk[o + 0, k + 2], wk[o + 0, k + 3]
        w10, w11, w12, w13 = wk[o + 1, k], wk[o + 1, k + 1], wk[o + 1, k + 2], wk[o + 1, k + 3]
        w20, w21, w22, w23 = wk[o + 2, k], wk[o + 2, k + 1], wk[o + 2, k + 2], wk[o + 2, k + 3]
        w30, w31, w32, w33 = wk[o + 3, k], wk[o + 3, k + 1], wk[o + 3, k + 2], wk[o + 3, k + 3]
        w40, w41, w42, w43 = wk[o + 4, k], wk[o + 4, k + 1], wk[o + 4, k + 2], wk[o + 4, k + 3]
        w50, w51, w52, w53 = wk[o + 5, k], wk[o + 5, k + 1], wk[o + 5, k + 2], wk[o + 5, k + 3]
        w60, w61, w62, w63 = wk[o + 6, k], wk[o + 6, k + 1], wk[o + 6, k + 2], wk[o + 6, k + 3]
        w70, w71, w72, w73 = wk[o + 7, k], wk[o + 7, k + 1], wk[o + 7, k + 2], wk[o + 7, k + 3]
        for i in range(n_pos):
            x0 = s0[i]
            x1 = s1[i]
            x2 = s2[i]
            x3 = s3[i]
            a0[i] += w00 * x0 + w01 * x1 + w02 * x2 + w03 * x3
            a1[i] += w10 * x0 + w11 * x1 + w12 * x2 + w13 * x3
            a2[i] += w20 * x0 + w21 * x1 + w22 * x2 + w23 * x3
            a3[i] += w30 * x0 + w31 * x1 + w32 * x2 + w33 * x3
            a4[i] += w40 * x0 + w41 * x1 + w42 * x2 + w43 * x3
            a5[i] += w50 * x0 + w51 * x1 + w52 * x2 + w53 * x3
            a6[i] += w60 * x0 + w61 * x1 + w62 * x2 + w63 * x3
            a7[i] += w70 * x0 + w71 * x1 + w72 * x2 + w73 * x3


@njit(**INLINE)
def _accumulate_taps(f, src, off, wt, o, ch, lo, n_pos, acc):
    """``acc[i] += sum_t wt[o, t] * f[src[t], ch, lo + off[t] + i]``, taps three at a time."""
    n_taps = src.size
    full = n_taps - n_taps % 3
    for t in range(full, n_taps):
        s0 = f[src[t], ch, lo + off[t]:]
        u0 = wt[o, t]
        for i in range(n_pos):
            acc[i] += u0 * s0[i]
    for t in range(0, full, 3):
        s0 = f[src[t], ch, lo + off[t]:]
        s1 = f[src[t + 1], ch, lo + off[t + 1]:]
        s2 = f[src[t + 2], ch, lo + off[t + 2]:]
        u0, u1, u2 = wt[o, t], wt[o, t + 1], wt[o, t + 2]
        for i in range(n_pos):
            acc[i] += u0 * s0[i] + u1 * s1[i] + u2 * s2[i]


@njit(**INLINE)
def _write_image(acc, o, g0, g1, i0, i1, group, gstr, rstr, wf, bias, lo_clip, hi_clip, y):
    """Copy the output positions of the images of groups [g0, g1), rows [i0, i1), from ``acc``
    (rows: output channels from ``o``; columns: positions from that of group g0's row i0) into the
    CNHW ``y``, adding the bias and clipping to [lo_clip, hi_clip]."""
    o_n, n_n, ho, wo = y.shape
    lo = y.dtype.type(lo_clip)
    hi = y.dtype.type(hi_clip)
    for k in range(acc.shape[0]):
        oo = o + k
        if oo >= o_n:
            break
        bv = bias[oo]
        ak = acc[k]
        for bi in range(g0 * group, min(n_n, g1 * group)):
            for oi in range(i0, i1):
                src = ak[(bi // group - g0) * gstr + (bi % group) * wf + (oi - i0) * rstr:]
                dst = y[oo, bi, oi]
                for oj in range(wo):
                    v = src[oj] + bv
                    # selects, not min/max (those do not vectorise); NaN passes through as in NumPy
                    v = lo if v < lo else v
                    dst[oj] = hi if v > hi else v


def images_per_job(fsz, n):
    """Whole images per job: about CHUNK frame positions (at most the batch)."""
    return max(1, min(CHUNK // fsz, n))


@njit(**FMA)
def dense_forward(f, eph, ech, eoff, wk, bias, lo_clip, hi_clip, group, gstr, rstr, wf, gpj, rpj, y):
    """``y[o, b, oi, oj] = clip(bias[o] + sum_k wk[o, k] * f[eph[k], ech[k], p + eoff[k]])``.

    ``y`` is (O, N, ho, wo), ``wk`` (O', K) from ``dense_weights``, ``p`` the position of pixel
    (b, oi, oj) (``Plan``); the clip bounds fuse a following Relu/Clip (-inf/inf for none). Each
    job takes ``gpj`` groups x ``rpj`` output rows (``Plan.jobs``) x 8 output channels.
    """
    o_n, n_n, ho, wo = y.shape
    ob_n = wk.shape[0] // 8
    g_n = (n_n + group - 1) // group
    gchunks = (g_n + gpj - 1) // gpj
    rchunks = (ho + rpj - 1) // rpj
    for job in prange(gchunks * rchunks * ob_n):
        ci = job // ob_n
        o = (job % ob_n) * 8
        g0 = (ci // rchunks) * gpj
        g1 = min(g_n, g0 + gpj)
        i0 = (ci % rchunks) * rpj
        i1 = min(ho, i0 + rpj)
        last = min(n_n, g1 * group) - (g1 - 1) * group  # images in the job's last group
        n_pos = (g1 - 1 - g0) * gstr + (i1 - 1 - i0) * rstr + (last - 1) * wf + wo
        acc = np.zeros((8, -(-n_pos // 64) * 64), dtype=y.dtype)  # room for a whole last tile
        if o_n - o <= 4:
            accumulate_narrow(f, eph, ech, eoff, wk, o, g0 * gstr + i0 * rstr, n_pos, acc)
        else:
            accumulate(f, eph, ech, eoff, wk, o, g0 * gstr + i0 * rstr, n_pos, acc)
        _write_image(acc, o, g0, g1, i0, i1, group, gstr, rstr, wf, bias, lo_clip, hi_clip, y)


def conv(f, eph, ech, eoff, wk, bias, lo_clip, hi_clip, p: Plan, y):
    """``dense_forward`` on the frames ``f`` of plan ``p``, or ``dense_forward_rows`` where it was
    measured faster: float32 windows of more than one tap (a pointwise conv's frame has no padding
    to skip) with output rows of 8 or 16 and at least 32 output channels."""
    o, n, ho, wo = y.shape
    if f.dtype == np.float32 and p.off.size > 1 and wo in (8, 16) and o >= 32:
        length = f.shape[2]
        ent = (eph * f.shape[1] + ech) * length + eoff
        op = -(-o // 32) * 32
        wt = np.zeros((wk.shape[1], op), dtype=np.float32)
        wt[:, :o] = wk[:o].T
        dense_forward_rows(f, ent, wt.reshape(-1), op, bias, lo_clip, hi_clip, p.group, p.gstr, p.rstr, p.wf, y)
    else:
        dense_forward(f, eph, ech, eoff, wk, bias, lo_clip, hi_clip, p.group, p.gstr, p.rstr, p.wf, *p.jobs(n, ho), y)


@njit(**INLINE)
def tile_rows(flat, ent, wt, op, at):
    """For 8 pixels i and 32 output channels j, ``sum_k wt[k*op + j] * flat[ent[k] + at + i]``
    (the slice ``wt`` starts at the block's first channel): 16 vector sums over output channels,
    2 weight loads and 8 broadcasts per entry, returned as (pixel 0 channels 0-15, pixel 0
    channels 16-31, pixel 1 ...). MobileNetV2's expansion convs (``block._expand_image``) run it too."""
    c0a = vzero()
    c0b = vzero()
    c1a = vzero()
    c1b = vzero()
    c2a = vzero()
    c2b = vzero()
    c3a = vzero()
    c3b = vzero()
    c4a = vzero()
    c4b = vzero()
    c5a = vzero()
    c5b = vzero()
    c6a = vzero()
    c6b = vzero()
    c7a = vzero()
    c7b = vzero()
    for k in range(ent.size):
        e = ent[k] + at
        wa = vload(wt, k * op)
        wb = vload(wt, k * op + 16)
        u = vbcast(flat[e])
        c0a, c0b = vfma(u, wa, c0a), vfma(u, wb, c0b)
        u = vbcast(flat[e + 1])
        c1a, c1b = vfma(u, wa, c1a), vfma(u, wb, c1b)
        u = vbcast(flat[e + 2])
        c2a, c2b = vfma(u, wa, c2a), vfma(u, wb, c2b)
        u = vbcast(flat[e + 3])
        c3a, c3b = vfma(u, wa, c3a), vfma(u, wb, c3b)
        u = vbcast(flat[e + 4])
        c4a, c4b = vfma(u, wa, c4a), vfma(u, wb, c4b)
        u = vbcast(flat[e + 5])
        c5a, c5b = vfma(u, wa, c5a), vfma(u, wb, c5b)
        u = vbcast(flat[e + 6])
        c6a, c6b = vfma(u, wa, c6a), vfma(u, wb, c6b)
        u = vbcast(flat[e + 7])
        c7a, c7b = vfma(u, wa, c7a), vfma(u, wb, c7b)
    return c0a, c0b, c1a, c1b, c2a, c2b, c3a, c3b, c4a, c4b, c5a, c5b, c6a, c6b, c7a, c7b


@njit(**INLINE)
def _store_sums(scr, t):
    """``tile_rows``'s sums into ``scr``: pixel i's 32 channels at ``scr[32*i:32*i + 32]``."""
    vstore(scr, 0, t[0])
    vstore(scr, 16, t[1])
    vstore(scr, 32, t[2])
    vstore(scr, 48, t[3])
    vstore(scr, 64, t[4])
    vstore(scr, 80, t[5])
    vstore(scr, 96, t[6])
    vstore(scr, 112, t[7])
    vstore(scr, 128, t[8])
    vstore(scr, 144, t[9])
    vstore(scr, 160, t[10])
    vstore(scr, 176, t[11])
    vstore(scr, 192, t[12])
    vstore(scr, 208, t[13])
    vstore(scr, 224, t[14])
    vstore(scr, 240, t[15])


@njit(**FMA)
def dense_forward_rows(f, ent, wt, op, bias, lo_clip, hi_clip, group, gstr, rstr, wf, y):
    """``dense_forward`` for float32 outputs whose rows are a multiple of 8 long, computing only the
    output pixels: tiles of 8 pixels of one output row x 32 output channels, vectors over the
    channels (``tile_rows``), where ``dense_forward``'s vectors over frame positions also compute
    the padding between rows and images (81 positions per 64 outputs on 8x8 images). ``ent[k]`` is
    entry k's flat frame offset, ``wt`` the (K, op) weights flattened (``op``: O rounded up to 32)."""
    o_n, n_n, ho, wo = y.shape
    flat = f.reshape(-1)
    ob_n = op // 32
    rows = n_n * ho
    rpj = 8  # output rows per job
    lo = y.dtype.type(lo_clip)
    hi = y.dtype.type(hi_clip)
    for job in prange(-(-rows // rpj) * ob_n):
        r0 = (job // ob_n) * rpj
        o = (job % ob_n) * 32
        wsl = wt[o:]
        scr = np.empty(256, dtype=np.float32)
        for r in range(r0, min(rows, r0 + rpj)):
            b = r // ho
            oi = r % ho
            at = (b // group) * gstr + (b % group) * wf + oi * rstr
            for q in range(0, wo, 8):
                _store_sums(scr, tile_rows(flat, ent, wsl, op, at + q))
                for j in range(min(32, o_n - o)):
                    bv = bias[o + j]
                    dst = y[o + j, b, oi]
                    for i in range(8):
                        v = scr[i * 32 + j] + bv
                        v = lo if v < lo else v
                        dst[q + i] = hi if v > hi else v


@njit(**FMA)
def dense_frames(f, eph, ech, eoff, wk, fsz, n_img, ipc, yf):
    """As ``dense_forward`` but every position of images' frames, written to ``yf`` (O, n_img*fsz):
    the transposed conv that takes dL/dy (as a frame) to dL/d(phase frame)."""
    o_n = yf.shape[0]
    ob_n = wk.shape[0] // 8
    nchunks = (n_img + ipc - 1) // ipc
    for job in prange(nchunks * ob_n):
        ci = job // ob_n
        o = (job % ob_n) * 8
        lo = ci * ipc * fsz
        n_pos = min(n_img, (ci + 1) * ipc) * fsz - lo
        acc = np.zeros((8, -(-n_pos // 64) * 64), dtype=yf.dtype)
        if o_n - o <= 4:
            accumulate_narrow(f, eph, ech, eoff, wk, o, lo, n_pos, acc)
        else:
            accumulate(f, eph, ech, eoff, wk, o, lo, n_pos, acc)
        for k in range(8):
            if o + k < o_n:
                dst = yf[o + k, lo:lo + n_pos]
                src = acc[k]
                for i in range(n_pos):
                    dst[i] = src[i]


@njit(**FMA)
def to_frame(dy, y, lo_clip, hi_clip, group, gstr, rstr, wf, head, out):
    """``out[o, head + p] = dy[o, b, oi, oj]`` with p the position of pixel (b, oi, oj) (``Plan``),
    zero everywhere else; unless ``y`` is None, masked as in ``build_frames``: 0 where not
    ``lo_clip < y[o, b, oi, oj] < hi_clip``."""
    o_n, n_n, ho, wo = dy.shape
    lo = dy.dtype.type(lo_clip)
    hi = dy.dtype.type(hi_clip)
    for o in prange(o_n):
        row = out[o]
        row[:] = 0
        for b in range(n_n):
            for oi in range(ho):
                at = head + (b // group) * gstr + (b % group) * wf + oi * rstr
                dst = row[at:at + wo]
                if y is None:
                    src = dy[o, b, oi]
                    for oj in range(wo):
                        dst[oj] = src[oj]
                else:
                    _copy_masked(dy[o, b, oi], y[o, b, oi], lo, hi, dst)


@njit(**FMA)
def from_frames(df, sh, sw, pt, pl, hf, wf, dx):
    """The inverse of ``_fill_frames`` on gradients: ``dx[c, b, i, j]`` is the phase-frame entry of
    padded pixel (i + pt, j + pl) (padding entries are dropped)."""
    c_n, n_n = dx.shape[:2]
    fsz = hf * wf
    for job in prange(c_n * n_n):
        c = job // n_n
        b = job % n_n
        _gather_image(df[:, c, b * fsz:], sh, sw, pt, pl, wf, dx[c, b])


@njit(**FMA_REDUCE)
def dense_weight_grad(dyf, head, f, eph, ech, eoff, groups, glen, gstr, splits, part, bias_part):
    """``part[s, o, k] = sum over positions p of split s of dyf[o, head + p] * f[eph[k], ech[k], p + eoff[k]]``
    and ``bias_part[s, o] = sum over the same p of dyf[o, head + p]``: dL/dW, and dL/db when ``dyf``
    is zero outside the outputs (as the frames of dL/dy are). The positions are the first ``glen``
    of each of ``groups`` groups ``gstr`` apart (``Plan``: the padding rows after a group's last
    output row are skipped), split evenly into ``splits`` ranges of whole 16-position vectors.

    Blocks of 4 output channels x 4 entries (16 sums, 8 loads per 16 FMAs); each sum is float32
    over ``SPAN`` positions and float64 across spans. ``part`` is (splits, O, K') with K' a multiple
    of 4 (float64; with one split, the weights' type: the float64 job sums are rounded into it
    directly), ``bias_part`` (splits, O).
    """
    o_n = dyf.shape[0]
    ob_n = (o_n + 3) // 4
    kp = part.shape[2]
    n_pos = groups * glen
    per = (n_pos + splits - 1) // splits
    per = (per + 15) // 16 * 16  # splits of whole 16-position vectors
    zero = f.dtype.type(0)
    for job in prange(ob_n * splits):
        o = (job // splits) * 4
        s = job % splits
        acc = np.zeros((4, kp), dtype=np.float64)
        bsum = np.zeros(4, dtype=np.float64)
        d0 = dyf[min(o, o_n - 1)]
        d1 = dyf[min(o + 1, o_n - 1)]
        d2 = dyf[min(o + 2, o_n - 1)]
        d3 = dyf[min(o + 3, o_n - 1)]
        end = min(n_pos, (s + 1) * per)
        v = s * per  # position v of the groups' positions is frame position (v // glen)*gstr + v % glen
        while v < end:
            g = v // glen
            n = min(SPAN, end - v, (g + 1) * glen - v)
            lo = g * gstr + v - g * glen
            v += n
            e0 = d0[head + lo:]
            e1 = d1[head + lo:]
            e2 = d2[head + lo:]
            e3 = d3[head + lo:]
            u0 = u1 = u2 = u3 = zero
            for i in range(n):
                u0 += e0[i]
                u1 += e1[i]
                u2 += e2[i]
                u3 += e3[i]
            bsum[0] += u0
            bsum[1] += u1
            bsum[2] += u2
            bsum[3] += u3
            for k in range(0, kp, 4):
                x0 = f[eph[k], ech[k], lo + eoff[k]:]
                x1 = f[eph[k + 1], ech[k + 1], lo + eoff[k + 1]:]
                x2 = f[eph[k + 2], ech[k + 2], lo + eoff[k + 2]:]
                x3 = f[eph[k + 3], ech[k + 3], lo + eoff[k + 3]:]
                t00 = t01 = t02 = t03 = zero
                t10 = t11 = t12 = t13 = zero
                t20 = t21 = t22 = t23 = zero
                t30 = t31 = t32 = t33 = zero
                for i in range(n):
                    v0 = x0[i]
                    v1 = x1[i]
                    v2 = x2[i]
                    v3 = x3[i]
                    g = e0[i]
                    t00 += g * v0
                    t01 += g * v1
                    t02 += g * v2
                    t03 += g * v3
                    g = e1[i]
                    t10 += g * v0
                    t11 += g * v1
                    t12 += g * v2
                    t13 += g * v3
                    g = e2[i]
                    t20 += g * v0
                    t21 += g * v1
                    t22 += g * v2
                    t23 += g * v3
                    g = e3[i]
                    t30 += g * v0
                    t31 += g * v1
                    t32 += g * v2
                    t33 += g * v3
                acc[0, k] += t00
                acc[0, k + 1] += t01
                acc[0, k + 2] += t02
                acc[0, k + 3] += t03
                acc[1, k] += t10
                acc[1, k + 1] += t11
                acc[1, k + 2] += t12
                acc[1, k + 3] += t13
                acc[2, k] += t20
                acc[2, k + 1] += t21
                acc[2, k + 2] += t22
                acc[2, k + 3] += t23
                acc[3, k] += t30
                acc[3, k + 1] += t31
                acc[3, k + 2] += t32
                acc[3, k + 3] += t33
        for j in range(4):
            if o + j < o_n:
                bias_part[s, o + j] = bsum[j]
                for k in range(kp):
                    part[s, o + j, k] = acc[j, k]


# ---------------------------------------------------------------------------------------------
# Depthwise convs: one frame per (channel, image), built in a small buffer inside the job, so the
# (often 6x expanded) activation is never copied whole.


@njit(**INLINE)
def _fill_image(xi, sh, sw, pt, pl, hf, wf, buf):
    """The phase frames of one (h, w) image into ``buf`` (phases, hf*wf + tail), zeros elsewhere."""
    h, w = xi.shape
    buf[:] = 0
    for ph in range(sh * sw):
        a = ph // sw
        b = ph % sw
        q0 = max(0, (pl - b + sw - 1) // sw)
        q1 = min(wf, (w - 1 + pl - b) // sw + 1) if w - 1 + pl - b >= 0 else 0
        row = buf[ph]
        for r in range(hf):
            i = r * sh + a - pt
            if i < 0 or i >= h or q0 >= q1:
                continue
            xs = xi[i, q0 * sw + b - pl:]
            dst = row[r * wf + q0:r * wf + q1]
            for q in range(q1 - q0):
                dst[q] = xs[q * sw]


@njit(**INLINE)
def _image_to_frame(yi, wf, out):
    """``out[oi*wf + oj] = yi[oi, oj]``, zero in the columns past ``wo``."""
    ho, wo = yi.shape
    out[:] = 0
    for oi in range(ho):
        dst = out[oi * wf:oi * wf + wo]
        src = yi[oi]
        for oj in range(wo):
            dst[oj] = src[oj]


@njit(**INLINE)
def _gather_image(df, sh, sw, pt, pl, wf, dxi):
    """``dxi[i, j]`` = the entry of padded pixel (i + pt, j + pl) in the phase frames ``df``
    (phases, positions from the image's start): the inverse of ``_fill_image`` on gradients."""
    h, w = dxi.shape
    for i in range(h):
        r = (i + pt) // sh
        a = (i + pt) % sh
        dst = dxi[i]
        for bb in range(sw):
            # columns j with (j + pl) % sw == bb, from j0 in steps of sw
            j0 = (bb - pl) % sw
            src = df[a * sw + bb, r * wf + (j0 + pl) // sw:]
            for q in range((w - j0 + sw - 1) // sw):
                dst[j0 + q * sw] = src[q]


@njit(**FMA)
def depthwise_forward(x, src, off, wt, bias, lo_clip, hi_clip, sh, sw, pt, pl, hf, wf, tail, y):
    """Depthwise conv: output channel o reads input channel ``o // m`` (m = O / C) with its own taps,
    ``wt`` (O, taps); clip as in ``dense_forward``. One job per output channel, which reuses its
    frame and sum buffers for every image."""
    c_n, n_n = x.shape[:2]
    o_n, _, ho, wo = y.shape
    m = o_n // c_n
    n_pos = (ho - 1) * wf + wo
    for o in prange(o_n):
        buf = np.empty((sh * sw, 1, hf * wf + tail), dtype=x.dtype)
        acc = np.empty((1, n_pos), dtype=y.dtype)
        for b in range(n_n):
            _fill_image(x[o // m, b], sh, sw, pt, pl, hf, wf, buf[:, 0])
            acc[:] = 0
            _accumulate_taps(buf, src, off, wt, o, 0, 0, n_pos, acc[0])
            _write_image(acc, o, b, b + 1, 0, ho, 1, hf * wf, wf, wf, bias, lo_clip, hi_clip, y)


@njit(**FMA)
def depthwise_input_grad(dy, src, off, wt, sh, sw, pt, pl, hf, wf, tail, dx):
    """dL/dx of ``depthwise_forward``: per (channel, image), each output gradient is added back to
    the frame entries its taps read, and the frames' entries are gathered back to pixels."""
    c_n, n_n = dx.shape[:2]
    o_n, _, ho, wo = dy.shape
    m = o_n // c_n
    n_pos = (ho - 1) * wf + wo
    taps = src.size
    for job in prange(c_n * n_n):
        c = job // n_n
        b = job % n_n
        df = np.zeros((sh * sw, hf * wf + tail), dtype=dx.dtype)
        dyl = np.empty(n_pos + wf, dtype=dx.dtype)
        for o in range(c * m, c * m + m):
            _image_to_frame(dy[o, b], wf, dyl)
            for t in range(taps):
                d = df[src[t], off[t]:]
                wv = wt[o, t]
                for i in range(n_pos):
                    d[i] += wv * dyl[i]
        _gather_image(df, sh, sw, pt, pl, wf, dx[c, b])


@njit(**FMA_REDUCE)
def depthwise_weight_grad(x, dy, src, off, sh, sw, pt, pl, hf, wf, tail, out):
    """``out[o, t]`` = dL/dW of ``depthwise_forward`` (float32 per image, float64 across images)."""
    c_n, n_n = x.shape[:2]
    o_n, _, ho, wo = dy.shape
    m = o_n // c_n
    n_pos = (ho - 1) * wf + wo
    taps = src.size
    for o in prange(o_n):
        buf = np.empty((sh * sw, hf * wf + tail), dtype=x.dtype)
        dyl = np.empty(n_pos + wf, dtype=x.dtype)
        sums = np.zeros(taps, dtype=np.float64)
        for b in range(n_n):
            _fill_image(x[o // m, b], sh, sw, pt, pl, hf, wf, buf)
            _image_to_frame(dy[o, b], wf, dyl)
            for t in range(taps):
                xs = buf[src[t], off[t]:]
                part = x.dtype.type(0)
                for i in range(n_pos):
                    part += dyl[i] * xs[i]
                sums[t] += part
        for t in range(taps):
            out[o, t] = sums[t]
