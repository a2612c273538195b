"""Inverted-residual blocks (MobileNetV2) in one kernel, for float32 forward runs that record nothing.

The block is ``pointwise Conv + clip -> depthwise Conv + clip -> pointwise Conv [-> Add of the
block input] [+ clip]``. Run node by node, its expanded activation (6x the block's channels) is
written to memory whole and read back twice; here each job takes a few images through the whole
block, its intermediate values in buffers of a few hundred KB that stay in cache. A recorded run
(backward needs the intermediate values) runs the nodes one by one; ``Engine`` decides which.

Blocks without the expansion conv run node by node: copying the channel-major input into the
channels-innermost image cost more than the block saved (MobileNetV2's first block: 6.4 ms in one
kernel, 4.7-5.4 ms node by node in two profiling runs). The same fusion was tried for ResNet's
basic block (Conv + Relu, Conv, Add of the input, Relu): no gain on ResNet-20 (82.6 against 83.2 ms
forward) or ResNet-18 (195 against 191 ms), since there the convs' own work dominates and
``dense_forward`` splits it by output channels as well as images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from bwacal.ops import _frames as FR
from bwacal.ops._simd import vadd, vbcast, vclip, vfma, vload, vstore, vzero
from bwacal.ops.window import window

# Images per job: enough for the projection to see this many positions (within a quarter of the batch).
PROJECT_POSITIONS = 512


@dataclass(frozen=True)
class Block:
    """Node indices of a block: ``convs`` in order (``expand, depthwise, project``) and the
    residual ``add`` (None without one); ``nodes``: all of them, activations included; ``inner``: the
    value names that exist only inside the block."""

    convs: tuple
    add: int | None
    nodes: tuple
    inner: tuple

    @property
    def members(self) -> tuple:
        """The convs and the Add: the nodes whose activations the block applies."""
        return self.convs + (() if self.add is None else (self.add,))


def run_block(blk, ops, x, params, clips):
    """The output (CNHW) of ``blk`` for its CNHW input ``x``, or None when the kernel does not take
    these inputs (the caller then runs the nodes). ``ops`` and ``params`` (weight, bias or None) are
    per conv, ``clips`` per member (None for no activation)."""
    if x.ndim != 4 or x.dtype != np.float32:
        return None
    (we, be), (wd, bd), (wp, bp) = params
    hidden = wd.shape[0]
    if we.shape != (hidden, x.shape[0], 1, 1) or wd.shape[1] != 1 or wp.shape[1:] != (hidden, 1, 1):
        return None
    residual = x if blk.add is not None else None
    return run_inverted_residual(x, (we, be, clips[0]), (ops[1], wd, bd, clips[1]), (wp, bp), residual, clips[-1])


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
    pwk = FR.dense_weights(pw.reshape(o, hidden).astype(f32))
    lo, hi = out_clip if out_clip is not None else (-np.inf, np.inf)
    y = np.empty((o, n, g.ho, g.wo), dtype=f32)
    res = np.ascontiguousarray(residual, dtype=f32) if residual is not None else np.empty((0, 0, 0, 0), dtype=f32)
    ipj = int(max(1, min(-(-PROJECT_POSITIONS // (g.ho * g.wo)), -(-n // 4))))
    pb = np.zeros(o, dtype=f32) if pbias is None else np.ascontiguousarray(pbias, dtype=f32)
    _inverted_residual(np.ascontiguousarray(x, dtype=f32), ewt, ebias, elo, ehi,
                       toff, dwt, db, dlo, dhi, g.sh, g.sw, g.ph, g.pw, h + g.ph + g.pad_end_h,
                       w + g.pw + g.pad_end_w, hidden, pwk, pb, residual is not None, res, lo, hi, ipj, y)
    return y


@njit(**FR.FMA)
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
            FR._accumulate(dwo.reshape(1, hid_n, dwo.shape[1]), h_zero, h_ent, h_zero, pwk, o, 0, nb * ohw, pacc)
            for k in range(min(8, o_n - o)):
                dst = y2[o + k, b0 * ohw:(b0 + nb) * ohw]
                row = pacc[k]
                bv = pbias[o + k]
                r = res2[o + k, b0 * ohw:(b0 + nb) * ohw] if has_res else no_res
                for i in range(nb * ohw):
                    v = row[i] + bv + r[i]
                    v = lo_v if v < lo_v else v
                    dst[i] = hi_v if v > hi_v else v


@njit(inline="always")
def _zero_border(img, h, w, pt, pl, hp, wp):
    """Zero the pixels of the (hp, wp, lanes) image ``img`` outside its h x w interior at (pt, pl)."""
    lanes = img.size // (hp * wp)
    for r in range(hp):
        for cc in range(wp):
            if not (pt <= r < pt + h and pl <= cc < pl + w):
                img[(r * wp + cc) * lanes:(r * wp + cc + 1) * lanes] = 0


@njit(inline="always")
def _expand_image(xf, start, stride, h, w, ewt, ebias, lo, hi, pt, pl, wp, img):
    """The expansion of one image into ``img``: for each pixel q (of h*w, at ``xf[start + c*stride
    + q]`` for channel c), ``img[((i + pt)*wp + j + pl)*lanes + o] = clip(bias[o] + sum_c ewt[c, o] *
    x[c, q])``. Tiles of 8 pixels x 32 channels (``_frames._tile_rows``, the channels its entries)."""
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
            t = FR._tile_rows(xf, cent, wo, lanes, start + q)
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


@njit(inline="always")
def _store_pixel(img, q, w, pt, pl, wp, lanes, o, a0, a1, bias0, bias1, lo, hi):
    at = ((q // w + pt) * wp + q % w + pl) * lanes + o
    vstore(img, at, vclip(vadd(a0, bias0), lo, hi))
    vstore(img, at + 16, vclip(vadd(a1, bias1), lo, hi))


@njit(inline="always")
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


def _is_pointwise(op, w):
    return (w is not None and w.ndim == 4 and w.shape[2:] == (1, 1) and op.group == 1
            and all(s == 1 for s in (op.strides or (1, 1))) and not any(op.pads or ())
            and op.auto_pad in ("NOTSET", "VALID"))


def _is_depthwise(op, w):
    return w is not None and w.ndim == 4 and w.shape[1] == 1 and op.group == w.shape[0] > 1


def find_blocks(graph, ops, fusable) -> dict:
    """The blocks ``run_block`` can run: index of the block's first node -> ``Block``.

    ``fusable`` is ``Engine._find_fusable``'s map (a Conv or Add -> its activation). Every value
    inside a block must have one reader; weights must be initializers (their values, overridden or
    not, are read at run time); a residual must add the block's own input."""
    nodes, inits = graph.nodes, graph.initializers
    readers, producer = {}, {}
    for j, node in enumerate(nodes):
        for name in node.inputs:
            if name:
                readers.setdefault(name, []).append(j)
        for name in node.outputs:
            if name:
                producer[name] = j
    act_of = {j: i for i, (j, _, _) in fusable.items()}  # activation -> the node it is fused into

    def conv_weight(i):
        node = nodes[i] if i is not None else None
        if node is None or node.op_type != "Conv" or len(node.inputs) < 2 or node.inputs[1] not in inits:
            return None
        if len(node.inputs) > 2 and node.inputs[2] and node.inputs[2] not in inits:
            return None
        return np.asarray(inits[node.inputs[1]])

    def out(i):  # what a node's output is called once its activation is fused
        return nodes[fusable[i][0]].outputs[0] if i in fusable else nodes[i].outputs[0]

    def only_reader(name):
        r = readers.get(name, [])
        return r[0] if len(r) == 1 else None

    def residual_add(i, block_input):
        """The Add that alone reads node i's (unfused) output and adds ``block_input`` to it."""
        a = only_reader(nodes[i].outputs[0]) if i not in fusable else None
        if a is not None and nodes[a].op_type == "Add" and len(nodes[a].inputs) == 2 \
                and set(nodes[a].inputs) == {nodes[i].outputs[0], block_input} and block_input != nodes[i].outputs[0]:
            return a
        return None

    def make(convs, add):
        members = convs + (() if add is None else (add,))
        indices = tuple(sorted(set(members) | {fusable[k][0] for k in members if k in fusable}))
        final = out(members[-1])
        inner = tuple(name for k in indices for name in nodes[k].outputs if name and name != final)
        return Block(convs, add, indices, inner)

    blocks = {}
    for d in range(len(nodes)):
        wd = conv_weight(d)
        if d not in fusable or not _is_depthwise(ops[d], wd):
            continue
        p = only_reader(out(d))
        wp = conv_weight(p)
        if wp is None or not _is_pointwise(ops[p], wp) or wp.shape[1] != wd.shape[0] or nodes[p].inputs[0] != out(d):
            continue
        e = act_of.get(producer.get(nodes[d].inputs[0]))
        we = conv_weight(e)
        if we is not None and _is_pointwise(ops[e], we) and we.shape[0] == wd.shape[0] and only_reader(out(e)) == d:
            blocks[e] = make((e, d, p), residual_add(p, nodes[e].inputs[0]))
    return blocks
