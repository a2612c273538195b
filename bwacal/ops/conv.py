"""2-D convolution on channel-major (CNHW) activations.

Dense convs (pointwise ones included: their input is its own frame) and depthwise convs run direct
numba kernels on padded frames of the input (``bwacal/kernels/frames.py``), which can also apply a
following Relu/Clip as they write the output (the engine fuses it); 3x3, stride-1, padding-1 float32
convs of at least 128 channels run Winograd F(2x2, 3x3) instead (``bwacal/kernels/winograd.py``),
falling back to the frames on non-finite values. Other grouped convs are
im2col + one BLAS GEMM per group, ``W_g (O/g, C/g*kh*kw) @ cols_g``, whose result is already the
CNHW output; strided dense convs of at least ``GEMM_BACKWARD_ENTRIES`` (channel, tap) entries take
that path's backward (its GEMMs split over numba's threads for one group).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bwacal.kernels import blas, frames, patches, winograd
from bwacal.kernels.pointwise import clip_grad
from bwacal.ops.base import Op, register
from bwacal.ops.window import Window, check_2d, window


# A layer's patch matrix is kept from forward for dL/dW up to this size and rebuilt above it, and
# patches are built for at most CHUNK_BYTES of images at a time: ResNet-18's stem at batch 64 would
# otherwise hold 472 MB per pass (measured 9 GB peak for a calibration that keeps them all).
KEEP_PATCHES_BYTES = 64 << 20
CHUNK_BYTES = 128 << 20
# A dense conv keeps its input's frames for dL/dW up to this size; above it keeps the input (which
# the graph holds anyway) and rebuilds them in backward. A ResNet-18 calibration at batch 64 on
# 224x224 inputs peaked at 3,594 MB keeping every layer's frames, 3,093 MB with this limit.
KEEP_FRAMES_BYTES = 32 << 20
# A strided dense conv with at least this many (channel, tap) entries per output channel takes its
# backward as im2col + BLAS GEMMs (split over numba's threads) rather than on its phase frames:
# ResNet-18's 256->512 stride-2 3x3 conv's backward took 25.7 ms on the frames (17.1 of it dL/dW)
# and 12.3 as GEMMs, the 128->256 one's 15.9 and 12.2; the 64->128 one's (576 entries) dL/dW took
# 6.6 ms either way (5.4 on the frames since dL/dW sums short groups as one span, below). Its forward
# stays on the frames: 5.7 ms against 6.5 as a GEMM (128->256).
GEMM_BACKWARD_ENTRIES = 1024
# dL/dW sums each group of images' positions as one span (``frames.dense_weight_grad``); groups whose
# span is shorter than this (one image each: strided and pointwise convs, whose images do not
# interleave) are summed as one span over all of them instead, the positions between images
# included. Short spans left the kernel in its per-span set-up and reductions: ResNet-20's 32->64
# stride-2 dL/dW at batch 128 took 5.79 ms, 2.22 as one span; MobileNetV2's dL/dW 29.2 -> 17.7 ms
# per forward+backward. Merging the longer spans of interleaved groups too: no change (65.9 / 65.6 ms
# on ResNet-20).
MERGE_SPANS_BELOW = 1024


def _pointwise(shape, g):
    """A 1x1, stride-1, unpadded conv on an input of ``shape``: its patches are the input itself."""
    return g.kh == 1 and g.kw == 1 and (g.ho, g.wo) == tuple(shape[2:]) and g.ph == 0 and g.pw == 0


def _cols(x, g):
    """(C*kh*kw, N*Ho*Wo) patches of the CNHW array ``x``; a free view for pointwise convs."""
    c, n, h, w = x.shape
    if _pointwise(x.shape, g):
        return np.ascontiguousarray(x).reshape(c, n * h * w)
    cols = np.empty((c * g.kh * g.kw, n * g.ho * g.wo), dtype=x.dtype)
    patches.im2col(x, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, g.ho, g.wo, cols)
    return cols


# the (y, lo, hi) mask of a conv without a fused Relu/Clip: none
NO_MASK = (None, -np.inf, np.inf)


def _frames(x, g, p, mask=NO_MASK):
    """The phase frames of ``x`` for window ``g``; a pointwise conv's frame is the input itself.
    With ``mask=(y, lo, hi)``, the frames of ``_masked(x, mask)``."""
    if _pointwise(x.shape, g):
        return _masked(x, mask).reshape(1, x.shape[0], -1)
    return frames.build_frames(x, g, p, *mask)


def _plan(g, shape):
    """The frame plan of a dense conv's input of ``shape``: groups of images whose rows interleave
    where dL/dx is a mirror conv (stride 1, padding within the window), except for a pointwise conv,
    whose frame is the input itself; images one after another otherwise (what the strided dL/dx,
    and ``to_frame`` for it, read)."""
    interleave = not _pointwise(shape, g) and _mirror(g, shape) is not None
    return frames.plan(g, shape[2], shape[3], shape[1] if interleave else None)


def _masked(dy, mask):
    """dL/dy through a fused Relu/Clip, ``mask=(y, lo, hi)``: ``dy`` where ``lo < y < hi``, else 0
    (0 where y is NaN); ``dy`` itself for ``NO_MASK``."""
    y, lo, hi = mask
    if y is None:
        return dy
    out = np.empty(y.shape, dtype=y.dtype)
    clip_grad(np.ascontiguousarray(dy, dtype=y.dtype), y, lo, hi, out)
    return out


def _bias_and_bounds(b, o, clip, dtype):
    """The kernels' bias (zeros for none) and clip bounds (infinite for no fused clip)."""
    bias = np.zeros(o, dtype=dtype) if b is None else np.ascontiguousarray(b, dtype=dtype)
    lo, hi = clip if clip is not None else (-np.inf, np.inf)
    return bias, lo, hi


def _mirror(g, xshape):
    """For a stride-1 conv, the window of the conv that takes dL/dy to dL/dx (flipped taps, padding
    ``(k-1)*d - p`` on each side); None for strided convs or padding wider than the window."""
    if g.sh != 1 or g.sw != 1:
        return None
    top, left = (g.kh - 1) * g.dh - g.ph, (g.kw - 1) * g.dw - g.pw
    bottom, right = (g.kh - 1) * g.dh - g.pad_end_h, (g.kw - 1) * g.dw - g.pad_end_w
    if min(top, left, bottom, right) < 0:
        return None
    return Window(g.kh, g.kw, 1, 1, g.dh, g.dw, top, left, xshape[2], xshape[3], bottom, right)


def _batch_chunks(x, g):
    """Batch ranges whose patch matrices stay within ``CHUNK_BYTES`` (one range for pointwise convs)."""
    n = x.shape[1]
    if _pointwise(x.shape, g):
        return [(0, n)]
    per_image = x.shape[0] * g.kh * g.kw * g.ho * g.wo * x.itemsize
    step = max(1, CHUNK_BYTES // per_image)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


class ConvContext(NamedTuple):
    """What ``Conv.backward`` reads: the path forward took, what that path's backward needs
    (``_winograd_backward`` and the others unpack it), and the fused clip with the clipped output
    that masks dL/dy (None without one)."""

    path: str  # "winograd", "frames", "depthwise" or "gemm"
    saved: tuple
    clip: tuple | None
    y: np.ndarray | None


@register("Conv")
class Conv(Op):
    layout = "cnhw"
    fuses_clip = True

    def __init__(self, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None,
                 strides=None):
        self.auto_pad, self.dilations, self.group = auto_pad, dilations, group
        self.kernel_shape, self.pads, self.strides = kernel_shape, pads, strides

    def check(self, shapes):
        check_2d(self.kernel_shape, shapes[:2], "convolution")

    def _geometry(self, x, w):
        return window(x.shape[2], x.shape[3], w.shape[2:], self.strides, self.dilations, self.pads,
                      self.auto_pad)

    def _depthwise(self, x, w):
        return self.group > 1 and self.group == x.shape[0] and w.shape[1] == 1

    def _matmul(self, w2, cols):
        """Per group, ``W_g @ cols_g``: (O, columns)."""
        if self.group == 1:
            return w2 @ cols
        k, og = w2.shape[1], w2.shape[0] // self.group
        y = np.empty((w2.shape[0], cols.shape[1]), dtype=cols.dtype)
        for i in range(self.group):
            np.matmul(w2[i * og:(i + 1) * og], cols[i * k:(i + 1) * k], out=y[i * og:(i + 1) * og])
        return y

    def forward(self, x, w, b=None, clip=None):
        """``clip=(lo, hi)`` applies a following Relu/Clip to the output (dense and depthwise convs);
        ``backward`` then takes the gradient of the clipped output."""
        if x.ndim != 4 or w.ndim != 4:
            raise ValueError("only 2-D convolution on 4-D input is supported")
        if x.shape[0] != w.shape[1] * self.group:
            raise ValueError(f"input has {x.shape[0]} channels, weight expects {w.shape[1] * self.group}")
        x = np.ascontiguousarray(x)
        g = self._geometry(x, w)
        done = None  # (y, kept) when Winograd applies to the values (all finite)
        if winograd.applies(x, w, g, self.group):
            done = winograd.forward(x, w, *_bias_and_bounds(b, w.shape[0], clip, x.dtype))
        if done is not None:
            y, kept = done
            path, saved = "winograd", (x, kept, w, g, b is not None)
        elif self._uses_frames(x, w):
            y, path, saved = self._frames_forward(x, w, b, g, clip)
        else:
            y, saved = self._gemm_forward(x, w, b, g)
            path = "gemm"
            if clip is not None:
                lo, hi = clip
                y = np.minimum(np.maximum(y, y.dtype.type(lo)), y.dtype.type(hi))
        return y, ConvContext(path, saved, clip, y if clip is not None else None)

    def _uses_frames(self, x, w):
        return self.group == 1 or self._depthwise(x, w)

    def _frames_forward(self, x, w, b, g, clip):
        """``(y, path, saved)``: on the frames; a strided conv of many entries saves for the GEMM
        backward."""
        o, n = w.shape[0], x.shape[1]
        p = frames.plan(g, x.shape[2], x.shape[3]) if self._depthwise(x, w) else _plan(g, x.shape)
        taps = g.kh * g.kw
        y = np.empty((o, n, g.ho, g.wo), dtype=x.dtype)
        bias, lo, hi = _bias_and_bounds(b, o, clip, x.dtype)
        if self._depthwise(x, w):
            wt = np.ascontiguousarray(w.reshape(o, taps), dtype=x.dtype)
            frames.depthwise_forward(x, p.src, p.off, wt, bias, lo, hi, g.sh, g.sw, g.ph, g.pw, p.hf, p.wf, p.tail, y)
            return y, "depthwise", (x, p, x.shape, w, g, b is not None)
        wk = frames.dense_weights(w.reshape(o, -1).astype(x.dtype, copy=False))
        eph, ech, eoff = frames.entry_tables(x.shape[0], p)
        f = _frames(x, g, p)
        frames.conv(f, eph, ech, eoff, wk, bias, lo, hi, p, y)
        if _mirror(g, x.shape) is None and w[0].size >= GEMM_BACKWARD_ENTRIES:
            return y, "gemm", (x, x.shape, w, g, b is not None)
        keep = f if f.nbytes <= KEEP_FRAMES_BYTES or _pointwise(x.shape, g) else x  # else rebuilt in backward
        return y, "frames", (keep, p, x.shape, w, g, b is not None)

    def _gemm_forward(self, x, w, b, g):
        o, n = w.shape[0], x.shape[1]
        keep = x
        w2 = w.reshape(o, -1)
        chunks = _batch_chunks(x, g)
        if len(chunks) == 1:
            cols = _cols(x, g)
            y = self._matmul(w2, cols)
            if cols.nbytes <= KEEP_PATCHES_BYTES or _pointwise(x.shape, g):
                keep = cols  # what dL/dW needs: kept rather than rebuilt in backward
        else:
            y = np.empty((o, n, g.ho * g.wo), dtype=x.dtype)
            for lo, hi in chunks:
                y[:, lo:hi] = self._matmul(w2, _cols(x[:, lo:hi], g)).reshape(o, hi - lo, -1)
            y = y.reshape(o, -1)
        if b is not None:
            y += b.reshape(o, 1).astype(y.dtype, copy=False)
        return y.reshape(o, n, g.ho, g.wo), (keep, x.shape, w, g, b is not None)

    def backward(self, ctx, dy, need):
        # the fused Relu/Clip: gradient only where the output was not clipped
        mask = NO_MASK if ctx.clip is None else (ctx.y, *ctx.clip)
        if ctx.path == "winograd":
            return self._winograd_backward(ctx.saved, dy, mask, need)
        if ctx.path == "frames":
            return self._frames_backward(ctx.saved, dy, mask, need)
        dy = _masked(dy, mask)
        if ctx.path == "depthwise":
            return self._depthwise_backward(ctx.saved, dy, need)
        return self._gemm_backward(ctx.saved, dy, need)

    def _depthwise_backward(self, ctx, dy, need):
        x, p, xshape, w, g, has_b = ctx
        o = dy.shape[0]
        dy = np.ascontiguousarray(dy, dtype=x.dtype)
        dx = dw = db = None
        if has_b and need[2]:
            db = dy.reshape(o, -1).sum(axis=1)
        taps = g.kh * g.kw
        if need[1]:
            out = np.empty((o, taps), dtype=np.float64)
            frames.depthwise_weight_grad(x, dy, p.src, p.off, g.sh, g.sw, g.ph, g.pw, p.hf, p.wf, p.tail, out)
            dw = out.astype(w.dtype).reshape(w.shape)
        if need[0]:
            dx = np.empty(xshape, dtype=x.dtype)
            wt = np.ascontiguousarray(w.reshape(o, taps), dtype=x.dtype)
            frames.depthwise_input_grad(dy, p.src, p.off, wt, g.sh, g.sw, g.ph, g.pw, p.hf, p.wf, p.tail, dx)
        return dx, dw, db

    def _winograd_backward(self, ctx, dy, mask, need):
        x, kept, w, g, has_b = ctx
        dy = np.ascontiguousarray(dy, dtype=x.dtype)
        done = winograd.backward(x, w, kept, dy, mask, need[0], need[1])
        if done is None:  # dL/dy holds a non-finite value: the direct kernels, on the input's frames
            return self._frames_backward((x, _plan(g, x.shape), x.shape, w, g, has_b), dy, mask, need)
        dx, dw, db = done
        return dx, dw, (db.astype(dy.dtype) if has_b and need[2] else None)

    def _frames_backward(self, ctx, dy, mask, need):
        """``mask`` (y, lo, hi) of a fused clip is applied as dL/dy's frames are built; dL/db is summed
        by the dL/dW kernel from those frames (their entries outside the outputs are zeros)."""
        f, p, xshape, w, g, has_b = ctx
        o, n = dy.shape[0], dy.shape[1]
        dy = np.ascontiguousarray(dy, dtype=f.dtype)
        want_db = has_b and need[2]
        if not (need[0] or need[1]):
            db = _masked(dy, mask).reshape(o, -1).sum(axis=1) if want_db else None
            return None, None, db
        if f.ndim == 4:  # the input itself, kept instead of its (large) frames
            f = _frames(f, g, p)
        dx = dw = db = None
        # A stride-1 conv's dL/dx is a conv of dL/dy (flipped taps, mirrored padding) written
        # straight to pixels; when dL/dy's frames line up with the input's, dL/dW reads them too.
        mirror = _mirror(g, xshape)
        fy = None
        if mirror is not None:
            pm = _plan(mirror, dy.shape)
            fy = _frames(dy, mirror, pm, mask)
        if fy is not None and (pm.hf, pm.wf, pm.group) == (p.hf, p.wf, p.group):
            # the same frame geometry (a "same" conv: both pad to h + kh - 1 rows), so dL/dy sits
            # in its mirror frame at the offset of its padding
            dyf, head = fy[0], mirror.ph * p.rstr + mirror.pw
        else:
            head = int(p.off.max())
            dyf = np.empty((o, head + p.length(n)), dtype=dy.dtype)
            frames.to_frame(dy, *mask, p.group, p.gstr, p.rstr, p.wf, head, dyf)
        if need[1]:
            eph, ech, eoff = frames.padded_entry_tables(xshape[0], p)
            # summed over each group's positions up to its last output (the padding rows between
            # groups skipped), rounded up to whole 16-position vectors where the frames have room
            # (they are zeros there): the kernel's vector loop then leaves no scalar remainder,
            # which cost ResNet-18's 7x7 layers 13% (447 positions: 27 vectors and 15 scalar steps)
            groups = -(-n // p.group)
            glen = p.span(min(n, p.group), dy.shape[2], dy.shape[3])
            room = min(f.shape[2] - int(eoff.max()), dyf.shape[1] - head) - (groups - 1) * p.gstr
            if groups > 1 and glen < MERGE_SPANS_BELOW:
                # short groups (one image each, when the images do not interleave): one span over all
                # of them, the positions between images included (dL/dy is zero there)
                glen, room, groups = p.span(n, dy.shape[2], dy.shape[3]), room + (groups - 1) * p.gstr, 1
            glen = max(glen, min(-(-glen // 16) * 16, p.gstr, room))
            splits = frames.weight_grad_splits(o, eph.size, groups * glen)
            k = w[0].size
            # one split: the kernel's float64 sums are rounded straight into dL/dW
            part = np.empty((splits, o, eph.size), dtype=w.dtype if splits == 1 else np.float64)
            bias_part = np.empty((splits, o), dtype=np.float64)
            frames.dense_weight_grad(dyf, head, f, eph, ech, eoff, groups, glen, p.gstr, splits, part, bias_part)
            if splits == 1:
                dw = np.ascontiguousarray(part[0, :, :k]).reshape(w.shape)
            else:
                dw = np.empty(w.shape, dtype=w.dtype)
                frames.sum_splits(part, k, dw.reshape(o, -1))
            if want_db:
                db = bias_part.sum(axis=0).astype(dy.dtype)
        elif want_db:  # dL/dy's frame is zero outside the outputs
            db = dyf[:, head:head + p.span(n, dy.shape[2], dy.shape[3])].sum(axis=1)
        if need[0]:
            if mirror is not None:
                dx = np.empty(xshape, dtype=dy.dtype)
                wk = frames.transposed_weights(w, np.arange(g.kh * g.kw)[::-1], dy.dtype)
                eph, ech, eoff = frames.entry_tables(o, pm)
                frames.conv(fy, eph, ech, eoff, wk, np.zeros(xshape[0], dtype=dy.dtype), -np.inf, np.inf, pm, dx)
            else:  # dyf was built by to_frame, with the head the strided input gradient reads at
                dx = self._frames_input_grad(dyf, head, p, xshape, w, g)
        return dx, dw, db

    def _frames_input_grad(self, dyf, head, p, xshape, w, g):
        """dL/dx of a strided dense conv: each phase frame's gradient is a conv of dL/dy (as a frame)
        with the taps that read that phase, at mirrored offsets; the frames' gradients are then
        gathered back to pixels."""
        c, n = xshape[0], xshape[1]
        fsz = p.hf * p.wf
        o = dyf.shape[0]
        dyf3 = dyf.reshape(1, o, -1)
        ipc = frames.images_per_job(fsz, n)
        df = np.empty((g.sh * g.sw, c, n * fsz), dtype=dyf.dtype)
        for ph in range(g.sh * g.sw):
            taps = np.flatnonzero(p.src == ph)
            if taps.size == 0:
                df[ph] = 0
                continue
            # entries (o, t): weight w[o, c, t] for output row c, reading dL/dy at head - off[t]
            wk = frames.transposed_weights(w, taps, dyf.dtype)
            eph = np.zeros(o * taps.size, dtype=np.int64)
            ech = np.repeat(np.arange(o, dtype=np.int64), taps.size)
            eoff = np.tile(head - p.off[taps], o)
            frames.dense_frames(dyf3, eph, ech, eoff, wk, fsz, n, ipc, df[ph])
        dx = np.empty(xshape, dtype=dyf.dtype)
        frames.from_frames(df, g.sh, g.sw, g.ph, g.pw, p.hf, p.wf, dx)
        return dx

    def _gemm_backward(self, ctx, dy, need):
        kept, xshape, w, g, has_b = ctx
        o = dy.shape[0]
        dy = np.ascontiguousarray(dy)
        dx = dw = db = None
        if has_b and need[2]:
            db = dy.reshape(o, -1).sum(axis=1)
        w2 = w.reshape(o, -1)
        pointwise = _pointwise(xshape, g)  # one chunk; dL/dx is the patch gradient itself
        if kept.ndim == 2:  # the patches of the whole batch, kept from forward
            chunks = [(0, xshape[1], kept)]
        else:  # the input: rebuild the patches chunk by chunk
            chunks = [(lo, hi, None) for lo, hi in _batch_chunks(kept, g)]
        if need[1]:
            dw = np.zeros_like(w2)
        if need[0] and not pointwise:
            dx = np.zeros(xshape, dtype=dy.dtype)
        for lo, hi, cols in chunks:
            dyc = dy[:, lo:hi].reshape(o, -1) if (lo, hi) != (0, xshape[1]) else dy.reshape(o, -1)
            if need[1]:
                cols = cols if cols is not None else _cols(kept[:, lo:hi], g)
                dw += self._weight_grad(cols, dyc)
            if need[0]:
                dcols = self._input_grad(w2, dyc)
                if pointwise:
                    dx = dcols.reshape(xshape)
                else:
                    patches.col2im(dcols, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw, g.ho, g.wo, dx[:, lo:hi])
        return dx, (dw.reshape(w.shape) if dw is not None else None), db

    def _weight_grad(self, cols, dy2):
        k, og = cols.shape[0] // self.group, dy2.shape[0] // self.group
        dw = np.empty((dy2.shape[0], k), dtype=dy2.dtype)
        if self.group == 1:  # (only strided convs of many entries: dL/dW is no tiny output)
            blas.rows_dot(np.ascontiguousarray(dy2), cols, dw)
            return dw
        for i in range(self.group):
            # NOTE: written as (cols @ dy.T).T: OpenBLAS takes ~100x longer on dy @ cols.T, whose
            # reduction dimension (N*Ho*Wo) is huge and whose output is tiny
            dw[i * og:(i + 1) * og] = (cols[i * k:(i + 1) * k] @ dy2[i * og:(i + 1) * og].T).T
        return dw

    def _input_grad(self, w2, dy2):
        k, og = w2.shape[1], w2.shape[0] // self.group
        dcols = np.empty((k * self.group, dy2.shape[1]), dtype=dy2.dtype)
        if self.group == 1:
            blas.rows_dot(np.ascontiguousarray(w2.T), dy2.T, dcols)
            return dcols
        for i in range(self.group):
            np.matmul(w2[i * og:(i + 1) * og].T, dy2[i * og:(i + 1) * og], out=dcols[i * k:(i + 1) * k])
        return dcols
