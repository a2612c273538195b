"""An inverted-residual block (MobileNetV2) in one kernel: ``pointwise Conv + clip -> depthwise Conv
+ clip -> pointwise Conv [-> Add of the block input] [+ clip]``, float32, forward only.

Run node by node, its expanded activation (6x the block's channels) is written to memory whole and
read back twice; here each job takes a few images through the whole block, its intermediate values
in buffers of a few hundred KB that stay in cache. Which nodes form a block, and when a run takes
it, is the executor's schedule (``bwacal/schedule.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bwacal.kernels import frames
from bwacal.kernels.flags import FMA, INLINE
from bwacal.kernels.simd import vadd, vbcast, vclip, vfma, vload, vstore, vzero
from bwacal.ops.window import window

# Images per job: enough for the projection to see this many positions (within a quarter of the batch).
PROJECT_POSITIONS = 512


def run_inverted_residual(x, expand, depthwise, project, residual, out_clip):
    """The block's output (CNHW, float32) for the CNHW float32 input ``x``.

    ``expand`` is ``(w, b, clip)`` of the pointwise conv, ``depthwise`` ``(op, w, b, clip)``,
    ``project`` ``(w, b)``; ``residual`` is None or the array added to the projection, and
    ``out_clip`` None or the bounds applied last (the Add's or the projection's activation).
    """
    f32 = np.float32
    c, n, h, w = x.shape
    op, dw, dbias, (dlo, dhi) = depthwise
    hidden = dw.shape[0]
    g = window(h, w, dw.shape[2:], op.strides, op.dilations, op.pads, op.auto_pad)
    lanes = -(-hidden // 32) * 32  # hidden channels padded for the expansion's 32-channel tiles
    ew, eb, (elo, ehi) = expand
    ewt = np.zeros((c, lanes), dtype=f32)
    ewt[:, :hidden] = ew.reshape(hidden, c).T
    ebias = np.zeros(lanes, dtype=f32)
    ebias[:hidden] = 0 if eb is None else eb
    dwt = np.zeros((g.kh * g.kw, lanes), dtype=f32)
    dwt[:, :hidden] = dw.reshape(hidden, -1).T
    db = np.zeros(lanes, dtype=f32)
    db[:hidden] = 0 if dbias is None else dbias
    toff = np.array([ki * g.dh * (w + g.pw + g.pad_end_w) + kj * g.dw for ki in range(g.kh) for kj in range(g.kw)],
                    dtype=np.int64)
    pw, pbias = project
    o = pw.shape[0]
    pwk = frames.dense_weights(pw.reshape(o, hidden).astype(f32))
    lo, hi = out_clip if out_clip is not None else (-np.inf, np.inf)
    y = np.empty((o, n, g.ho, g.wo), dtype=f32)
    res = np.ascontiguousarray(residual, dtype=f32) if residual is not None else np.empty((0, 0, 0, 0), dtype=f32)
    ipj = int(max(1, min(-(-PROJECT_POSITIONS // (g.ho * g.wo)), -(-n // 4))))
    pb = np.zeros(o, dtype=f32) if pbias is None else np.ascontiguousarray(pbias, dtype=f32)
    _inverted_residual(np.ascontiguousarray(x, dtype=f32), ewt, ebias, elo, ehi,
                       toff, dwt, db, dlo, dhi, g.sh, g.sw, g.ph, g.pw, h + g.ph + g.pad_end_h,
                       w + g.pw + g.pad_end_w, hidden, pwk, pb, residual is not None, res, lo, hi, ipj, y)
    return y


@njit(**FMA)
def _inverted_residual(x, ewt, ebias, elo, ehi, toff, dwt, dbias, dlo, dhi, sh, sw, pt, pl, hp, wp,
                       hid_n, pwk, pbias, has_res, res, lo, hi, ipj, y):
    """``y = clip(project(clip(depthwise(clip(expand(x))))) [+ res])``, ``ipj`` images per job.

    ``x`` (C, N, H, W). The expanded activation of one image at a time lives in a zero-padded
    (hp, wp) image with its channels innermost (``ewt`` (C, lanes), the expansion's weights
    transposed, hidden channels padded to ``lanes``), so the depthwise conv runs on 16 channels per
    vector whatever its stride (``dwt`` (taps, lanes), ``toff`` the taps' pixel offsets). Its output
    goes channel-major to a buffer of the job's images, which the projection (``pwk`` (O', hidden)
    from ``dense_weights``) reads as ``dense_forward`` reads a frame. ``res`` (O, N, ho, wo) when
    ``has_res``.
    """
    c_n, n_n, h, w = x.shape
    lanes = ewt.shape[1]
    o_n, _, ho, wo = y.shape
    ohw = ho * wo
    xf = x.reshape(-1)
    h_ent = np.arange(hid_n)
    h_zero = np.zeros(hid_n, dtype=np.int64)
    y2 = y.reshape(o_n, n_n * ohw)
    res2 = res.reshape(res.shape[0], res.shape[1] * res.shape[2] * res.shape[3])
    for job in prange((n_n + ipj - 1) // ipj):
        b0 = job * ipj
        nb = min(n_n, b0 + ipj) - b0
        img = np.empty(hp * wp * lanes, dtype=np.float32)
        _zero_border(img, h, w, pt, pl, hp, wp)
        # rows 16 floats longer than the job's positions: at a power-of-two row length the 16
        # channels of a vector, stored lane by lane, fall in one or two L1 sets (the depthwise stage
        # of the 144-channel 16x16 block took 4.7 ms at batch 128, 2.3 ms with the longer rows)
        dwo = np.empty((hid_n, nb * ohw + 16), dtype=np.float32)
        lane_buf = np.empty(16, dtype=np.float32)
        for bi in range(nb):
            _expand_image(xf, (b0 + bi) * h * w, n_n * h * w, h, w, ewt, ebias, elo, ehi, pt, pl, wp, img)
            _depthwise_image(img, toff, dwt, dbias, dlo, dhi, sh, sw, wp, ho, wo, bi * ohw, lane_buf, dwo)
        pacc = np.empty((8, nb * ohw), dtype=np.float32)
        no_res = np.zeros(0 if has_res else nb * ohw, dtype=np.float32)
        lo_v = np.float32(lo)
        hi_v = np.float32(hi)
        for o in range(0, o_n, 8):
            pacc[:] = 0
            frames.accumulate(dwo.reshape(1, hid_n, dwo.shape[1]), h_zero, h_ent, h_zero, pwk, o, 0, nb * ohw, pacc)
            for k in range(min(8, o_n - o)):
                dst = y2[o + k, b0 * ohw:(b0 + nb) * ohw]
                row = pacc[k]
                bv = pbias[o + k]
                r = res2[o + k, b0 * ohw:(b0 + nb) * ohw] if has_res else no_res
                for i in range(nb * ohw):
                    v = row[i] + bv + r[i]
                    v = lo_v if v < lo_v else v
                    dst[i] = hi_v if v > hi_v else v


@njit(**INLINE)
def _zero_border(img, h, w, pt, pl, hp, wp):
    """Zero the pixels of the (hp, wp, lanes) image ``img`` outside its h x w interior at (pt, pl)."""
    lanes = img.size // (hp * wp)
    for r in range(hp):
        for cc in range(wp):
            if not (pt <= r < pt + h and pl <= cc < pl + w):
                img[(r * wp + cc) * lanes:(r * wp + cc + 1) * lanes] = 0


@njit(**INLINE)
def _expand_image(xf, start, stride, h, w, ewt, ebias, lo, hi, pt, pl, wp, img):
    """The expansion of one image into ``img``: for each pixel q (of h*w, at ``xf[start + c*stride
    + q]`` for channel c), ``img[((i + pt)*wp + j + pl)*lanes + o] = clip(bias[o] + sum_c ewt[c, o] *
    x[c, q])``. Tiles of 8 pixels x 32 channels (``frames.tile_rows``, the channels its entries)."""
    c_n, lanes = ewt.shape
    hw = h * w
    wf = ewt.reshape(-1)
    cent = np.arange(c_n) * stride  # each channel's offset: the tiles' entries
    full = hw - hw % 8
    for o in range(0, lanes, 32):
        bias0 = vload(ebias, o)
        bias1 = vload(ebias, o + 16)
        wo = wf[o:]
        for q in range(0, full, 8):
            t = frames.tile_rows(xf, cent, wo, lanes, start + q)
            _store_pixel(img, q, w, pt, pl, wp, lanes, o, t[0], t[1], bias0, bias1, lo, hi)
            _store_pixel(img, q + 1, w, pt, pl, wp, lanes, o, t[2], t[3], bias0, bias1, lo, hi)
            _store_pixel(img, q + 2, w, pt, pl, wp, lanes, o, t[4], t[5], bias0, bias1, lo, hi)
            _store_pixel(img, q + 3, w, pt, pl, wp, lanes, o, t[6], t[7], bias0, bias1, lo, hi)
            _store_pixel(img, q + 4, w, pt, pl, wp, lanes, o, t[8], t[9], bias0, bias1, lo, hi)
            _store_pixel(img, q + 5, w, pt, pl, wp, lanes, o, t[10], t[11], bias0, bias1, lo, hi)
            _store_pixel(img, q + 6, w, pt, pl, wp, lanes, o, t[12], t[13], bias0, bias1, lo, hi)
            _store_pixel(img, q + 7, w, pt, pl, wp, lanes, o, t[14], t[15], bias0, bias1, lo, hi)
        for q in range(full, hw):
            a0, a1 = vzero(), vzero()
            for c in range(c_n):
                u = vbcast(xf[start + c * stride + q])
                a0 = vfma(u, vload(wf, c * lanes + o), a0)
                a1 = vfma(u, vload(wf, c * lanes + o + 16), a1)
            _store_pixel(img, q, w, pt, pl, wp, lanes, o, a0, a1, bias0, bias1, lo, hi)


@njit(**INLINE)
def _store_pixel(img, q, w, pt, pl, wp, lanes, o, a0, a1, bias0, bias1, lo, hi):
    at = ((q // w + pt) * wp + q % w + pl) * lanes + o
    vstore(img, at, vclip(vadd(a0, bias0), lo, hi))
    vstore(img, at + 16, vclip(vadd(a1, bias1), lo, hi))


@njit(**INLINE)
def _depthwise_image(img, toff, dwt, dbias, lo, hi, sh, sw, wp, ho, wo, col0, lane_buf, dwo):
    """``dwo[ch, col0 + oi*wo + oj] = clip(dbias[ch] + sum_t dwt[t, ch] * img at pixel (oi*sh*wp +
    oj*sw + toff[t]), channel ch)``: 16 channels per vector, stored channel-major lane by lane."""
    hid_n = dwo.shape[0]
    lanes = dwt.shape[1]
    wt = dwt.reshape(-1)
    for oi in range(ho):
        for oj in range(wo):
            pix = oi * sh * wp + oj * sw
            col = col0 + oi * wo + oj
            for g in range(0, hid_n, 16):
                acc = vload(dbias, g)
                for t in range(toff.size):
                    acc = vfma(vload(wt, t * lanes + g), vload(img, (pix + toff[t]) * lanes + g), acc)
                vstore(lane_buf, 0, vclip(acc, lo, hi))
                for k in range(min(16, hid_n - g)):
                    dwo[g + k, col] = lane_buf[k]
