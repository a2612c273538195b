"""Inverted-residual blocks (MobileNetV2) in one kernel, for forward runs that record nothing.

The block is ``[pointwise Conv + clip] -> depthwise Conv + clip -> pointwise Conv [-> Add of the
block input] [+ clip]``. Run node by node, its expanded activation (6x the block's channels) is
written to memory whole and read back twice; here each job takes a few images through the whole
block, its intermediate values in buffers of a few hundred KB that stay in cache. A recorded run
(backward needs the intermediate values) runs the nodes one by one; ``Engine`` decides which.

The same was tried for ResNet's basic block (Conv + Relu, Conv, Add of the input, Relu): no gain on
ResNet-20 (82.6 against 83.2 ms forward) or ResNet-18 (195 against 191 ms), since there the convs'
own work dominates and ``dense_forward`` splits it by output channels as well as images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from bwacal.ops import _frames as FR
from bwacal.ops.window import window

# Images per job: as many as keep the job's intermediate values within this (an L2 cache).
JOB_BYTES = 256 << 10


@dataclass(frozen=True)
class Block:
    """Node indices of a block: ``convs`` in order (``[expand,] depthwise, project``) and the
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
    if x.ndim != 4 or x.dtype not in (np.float32, np.float64):
        return None
    if len(blk.convs) == 3:
        (we, be), (wd, bd), (wp, bp) = params
        hidden = wd.shape[0]
        if we.shape != (hidden, x.shape[0], 1, 1):
            return None
        expand = (we, be, clips[0])
    else:
        (wd, bd), (wp, bp) = params
        hidden = wd.shape[0]
        if x.shape[0] != hidden:
            return None
        expand = None
    if wd.shape[1] != 1 or wp.shape[1:] != (hidden, 1, 1):
        return None
    d = len(blk.convs) - 2
    residual = x if blk.add is not None else None
    out_clip = clips[-1]
    return run_inverted_residual(x, expand, (ops[d], wd, bd, clips[d]), (wp, bp), residual, out_clip)


def run_inverted_residual(x, expand, depthwise, project, residual, out_clip):
    """The block's output (CNHW) for the CNHW input ``x``.

    ``expand`` is None or ``(w, b, clip)`` of the pointwise conv, ``depthwise`` is ``(op, w, b,
    clip)``, ``project`` ``(w, b)``; ``residual`` is None or the array added to the projection, and
    ``out_clip`` None or the bounds applied last (the Add's or the projection's activation).
    """
    dtype = x.dtype
    c, n, h, w = x.shape
    op, dw, dbias, dclip = depthwise
    hidden = dw.shape[0]
    g = window(h, w, dw.shape[2:], op.strides, op.dilations, op.pads, op.auto_pad)
    p = FR.plan(g, h, w)
    pw, pbias = project
    o = pw.shape[0]
    if expand is None:
        ewk = np.zeros((FR.OB, 1), dtype=dtype)
        ebias, (elo, ehi) = np.zeros(1, dtype=dtype), (-np.inf, np.inf)
    else:
        ew, eb, (elo, ehi) = expand
        ewk = FR.dense_weights(ew.reshape(hidden, c).astype(dtype, copy=False))
        ebias = _bias(eb, hidden, dtype)
    dwt = np.ascontiguousarray(dw.reshape(hidden, -1), dtype=dtype)
    pwk = FR.dense_weights(pw.reshape(o, hidden).astype(dtype, copy=False))
    lo, hi = out_clip if out_clip is not None else (-np.inf, np.inf)
    y = np.empty((o, n, g.ho, g.wo), dtype=dtype)
    res = np.ascontiguousarray(residual, dtype=dtype) if residual is not None else np.empty((0, 0, 0, 0), dtype=dtype)
    per_image = (hidden * h * w + hidden * g.ho * g.wo) * x.itemsize
    ipj = int(max(1, min(JOB_BYTES // per_image, -(-n // 4))))
    _inverted_residual(np.ascontiguousarray(x), expand is not None, ewk, ebias, elo, ehi,
                       p.src, p.off, dwt, _bias(dbias, hidden, dtype), dclip[0], dclip[1],
                       g.sh, g.sw, g.ph, g.pw, p.hf, p.wf, p.tail,
                       pwk, _bias(pbias, o, dtype), residual is not None, res, lo, hi, ipj, y)
    return y


def _bias(b, size, dtype):
    return np.zeros(size, dtype=dtype) if b is None else np.ascontiguousarray(b, dtype=dtype)


@njit(**FR.FMA)
def _inverted_residual(x, expand, ewk, ebias, elo, ehi, src, off, dwt, dbias, dlo, dhi,
                       sh, sw, pt, pl, hf, wf, tail, pwk, pbias, has_res, res, lo, hi, ipj, y):
    """``y = clip(project(clip(depthwise(clip(expand(x))))) [+ res])``, ``ipj`` images per job.

    ``x`` (C, N, H, W); ``ewk`` (hidden', C) and ``pwk`` (O', hidden) from ``dense_weights``; ``dwt``
    (hidden, taps) with the depthwise window's phase-frame taps ``src``/``off`` (``plan``); without
    ``expand`` the depthwise reads ``x`` itself (hidden == C). ``res`` (O, N, ho, wo) when ``has_res``.
    """
    c_n, n_n, h, w = x.shape
    hid_n = dwt.shape[0]
    o_n, _, ho, wo = y.shape
    hw, ohw = h * w, ho * wo
    n_pos = (ho - 1) * wf + wo  # depthwise frame positions of the last image
    x3 = x.reshape(1, c_n, n_n * hw)
    c_ent = np.arange(c_n)
    c_zero = np.zeros(c_n, dtype=np.int64)
    h_ent = np.arange(hid_n)
    h_zero = np.zeros(hid_n, dtype=np.int64)
    y2 = y.reshape(o_n, n_n * ohw)
    res2 = res.reshape(res.shape[0], res.shape[1] * res.shape[2] * res.shape[3])
    for job in prange((n_n + ipj - 1) // ipj):
        b0 = job * ipj
        nb = min(n_n, b0 + ipj) - b0
        hid = np.empty((hid_n if expand else 0, nb, h, w), dtype=x.dtype)
        if expand:
            acc = np.empty((8, nb * hw), dtype=x.dtype)
            for o in range(0, hid_n, 8):
                acc[:] = 0
                FR._accumulate(x3, c_zero, c_ent, c_zero, ewk, o, b0 * hw, nb * hw, acc)
                FR._write_image(acc, o, 0, nb, hw, w, ebias, elo, ehi, hid)
        # the depthwise conv on the job's images at once: their frames back to back, as build_frames lays
        # out a batch (an image's bottom padding is the next one's top)
        fsz = hf * wf
        dwo = np.empty((hid_n, nb, ho, wo), dtype=x.dtype)
        buf = np.empty((sh * sw, nb * fsz + tail), dtype=x.dtype)
        dacc = np.empty((1, (nb - 1) * fsz + n_pos), dtype=x.dtype)
        for ch in range(hid_n):
            for bi in range(nb):
                image = hid[ch, bi] if expand else x[ch, b0 + bi]
                FR._fill_image(image, sh, sw, pt, pl, hf, wf, buf[:, bi * fsz:(bi + 1) * fsz + tail])
            dacc[:] = 0
            FR._accumulate_taps(buf.reshape(sh * sw, 1, buf.shape[1]), src, off, dwt, ch, 0, 0, dacc.shape[1], dacc[0])
            FR._write_image(dacc, ch, 0, nb, fsz, wf, dbias, dlo, dhi, dwo)
        d3 = dwo.reshape(1, hid_n, nb * ohw)
        pacc = np.empty((8, nb * ohw), dtype=x.dtype)
        lo_v = y.dtype.type(lo)
        hi_v = y.dtype.type(hi)
        for o in range(0, o_n, 8):
            pacc[:] = 0
            FR._accumulate(d3, h_zero, h_ent, h_zero, pwk, o, 0, nb * ohw, pacc)
            for k in range(min(8, o_n - o)):
                dst = y2[o + k, b0 * ohw:(b0 + nb) * ohw]
                row = pacc[k]
                bv = pbias[o + k]
                if has_res:
                    r = res2[o + k, b0 * ohw:(b0 + nb) * ohw]
                    for i in range(nb * ohw):
                        v = row[i] + bv + r[i]
                        v = lo_v if v < lo_v else v
                        dst[i] = hi_v if v > hi_v else v
                else:
                    for i in range(nb * ohw):
                        v = row[i] + bv
                        v = lo_v if v < lo_v else v
                        dst[i] = hi_v if v > hi_v else v


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
        convs = (d, p)
        if we is not None and _is_pointwise(ops[e], we) and we.shape[0] == wd.shape[0] and only_reader(out(e)) == d:
            convs = (e, d, p)
        blocks[convs[0]] = make(convs, residual_add(p, nodes[convs[0]].inputs[0]))
    return blocks
