"""The direct-convolution frame kernels (``bwacal/kernels/frames.py``) behind ``Conv``, the engine's
Conv+Relu/Clip fusion, and ``bwacal.runtime``.

``Conv`` forward is checked against a float64 sum over taps of the padded input, backward (dx, dW, db,
with and without a fused clip) against torch autograd, the frame layout against its definition, and a
fused engine run against the same graph run unfused.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit
from onnx import helper

from bwacal.engine import Engine
from bwacal import runtime
from bwacal.runtime import keep_freed_memory
from bwacal.onnx_io import read_model
from bwacal.kernels import blas, frames, pointwise
from bwacal.ops.conv import Conv
from bwacal.ops.window import window
from tests.engine.test_gradients import _model

RELU = (0.0, np.inf)
RELU6 = (0.0, 6.0)
FORWARD_TOL = {np.float32: 1e-5, np.float64: 1e-12}  # of max |y|
GRAD_TOL = {np.float32: 1e-4, np.float64: 1e-10}  # of the largest gradient entry


class Geometry(NamedTuple):
    c: int  # input channels
    o: int  # output channels
    h: int
    w: int
    kernel: tuple = (3, 3)
    pads: tuple = (0, 0, 0, 0)  # top, left, bottom, right
    strides: tuple = (1, 1)
    dilations: tuple = (1, 1)
    group: int = 1

    def op(self):
        return Conv(kernel_shape=list(self.kernel), pads=list(self.pads), strides=list(self.strides),
                    dilations=list(self.dilations), group=self.group)

    def window(self):
        return window(self.h, self.w, self.kernel, self.strides, self.dilations, self.pads, "NOTSET")


GEOMETRIES = {
    "dense_3x3_same": Geometry(3, 8, 8, 8, pads=(1, 1, 1, 1)),
    "dense_valid": Geometry(4, 5, 6, 7),
    "pointwise": Geometry(6, 10, 5, 5, kernel=(1, 1)),
    "pointwise_strided": Geometry(6, 10, 7, 6, kernel=(1, 1), strides=(2, 2)),
    "pointwise_padded": Geometry(3, 4, 4, 5, kernel=(1, 1), pads=(1, 1, 1, 1)),
    "strided": Geometry(5, 9, 9, 9, pads=(1, 1, 1, 1), strides=(2, 2)),
    "strided_uneven": Geometry(3, 4, 7, 8, pads=(1, 0, 0, 1), strides=(2, 3)),
    "strided_3_kernel_5": Geometry(2, 3, 11, 10, kernel=(5, 5), pads=(2, 2, 2, 2), strides=(3, 3)),
    "dilated": Geometry(3, 4, 8, 8, pads=(2, 2, 2, 2), dilations=(2, 2)),
    "dilated_strided": Geometry(3, 4, 9, 8, dilations=(2, 1), strides=(2, 1)),
    "dilated_wider_than_stride": Geometry(2, 3, 10, 10, pads=(1, 2, 0, 1), dilations=(3, 2), strides=(2, 2)),
    "padded_asymmetric": Geometry(3, 4, 6, 6, pads=(0, 2, 1, 0)),
    "padded_top_beyond_window": Geometry(2, 3, 5, 6, pads=(3, 0, 0, 0)),
    "padded_beyond_window": Geometry(2, 3, 4, 5, pads=(3, 3, 3, 3)),
    "one_channel": Geometry(1, 1, 6, 6, pads=(1, 1, 1, 1)),
    "one_input_channel": Geometry(1, 16, 7, 7, pads=(1, 1, 1, 1), strides=(2, 2)),
    "odd_sized_nonsquare_kernel": Geometry(3, 5, 7, 11, kernel=(5, 3), pads=(2, 1, 2, 1)),
    "row_kernel": Geometry(4, 3, 5, 9, kernel=(1, 3), pads=(0, 1, 0, 1)),
    "out_channels_17": Geometry(7, 17, 6, 5, pads=(1, 1, 1, 1)),
    "kernel_covers_input": Geometry(3, 2, 3, 3),
    "large_image": Geometry(2, 4, 64, 64, pads=(1, 1, 1, 1)),
    "depthwise": Geometry(8, 8, 7, 7, pads=(1, 1, 1, 1), group=8),
    "depthwise_multiplier_2": Geometry(4, 8, 6, 7, pads=(1, 1, 1, 1), group=4),
    "depthwise_stride_2": Geometry(6, 6, 9, 8, pads=(1, 1, 1, 1), strides=(2, 2), group=6),
    "depthwise_stride_3": Geometry(3, 3, 10, 11, pads=(1, 1, 1, 1), strides=(3, 3), group=3),
    "depthwise_multiplier_2_strided": Geometry(3, 6, 9, 9, kernel=(5, 5), pads=(2, 1, 2, 1), strides=(2, 2),
                                               group=3),
    "depthwise_dilated_2": Geometry(4, 4, 9, 9, pads=(2, 2, 2, 2), dilations=(2, 2), group=4),
    "depthwise_dilated_strided_uneven": Geometry(2, 4, 10, 9, pads=(0, 1, 2, 0), strides=(1, 2),
                                                 dilations=(2, 2), group=2),
    "grouped": Geometry(4, 6, 6, 6, pads=(1, 1, 1, 1), group=2),
    # output rows of 8 and 16 with at least 32 channels: ``dense_forward_rows`` (dL/dx too for the second)
    "rows_8_wide": Geometry(6, 40, 8, 8, pads=(1, 1, 1, 1)),
    "rows_16_wide": Geometry(34, 32, 16, 16, pads=(1, 1, 1, 1)),
    "rows_8_wide_strided": Geometry(5, 33, 16, 15, pads=(1, 1, 1, 1), strides=(2, 2)),  # phase frames
    # 1,026 entries per output channel: backward as GEMMs (``GEMM_BACKWARD_ENTRIES``)
    "strided_many_entries": Geometry(114, 6, 9, 9, pads=(1, 1, 1, 1), strides=(2, 2)),
}
# (bias, clip): what follows the conv's sum
HEADS = {"plain": (False, None), "bias": (True, None), "bias_relu": (True, RELU), "bias_relu6": (True, RELU6),
         "clip": (False, (-2.0, 3.0))}


def reference_conv(x, w, b, g: Geometry):
    """float64 conv of the CNHW ``x``: per group and tap, weights times a strided slice of the padded input."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    top, left, bottom, right = g.pads
    xp = np.pad(x, [(0, 0), (0, 0), (top, bottom), (left, right)])
    (sh, sw), (dh, dw) = g.strides, g.dilations
    ho = (xp.shape[2] - (g.kernel[0] - 1) * dh - 1) // sh + 1
    wo = (xp.shape[3] - (g.kernel[1] - 1) * dw - 1) // sw + 1
    cg, og = g.c // g.group, g.o // g.group
    y = np.zeros((g.o, x.shape[1], ho, wo))
    for k in range(g.group):
        for i in range(g.kernel[0]):
            for j in range(g.kernel[1]):
                patch = xp[k * cg:(k + 1) * cg, :, i * dh:i * dh + (ho - 1) * sh + 1:sh,
                           j * dw:j * dw + (wo - 1) * sw + 1:sw]
                y[k * og:(k + 1) * og] += np.einsum("oc,cnhw->onhw", w[k * og:(k + 1) * og, :, i, j], patch)
    if b is not None:
        y += b.astype(np.float64)[:, None, None, None]
    return y


def torch_grads(x, w, b, g: Geometry, clip, dy):
    """dL/dx, dL/dW, dL/db of L = sum(dy * clamp(conv(x))) by torch autograd in float64 (CNHW/OIHW NumPy)."""
    xt = torch.tensor(x.transpose(1, 0, 2, 3), dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    bt = None if b is None else torch.tensor(b, dtype=torch.float64, requires_grad=True)
    top, left, bottom, right = g.pads
    y = F.conv2d(F.pad(xt, (left, right, top, bottom)), wt, bt, stride=g.strides, dilation=g.dilations,
                 groups=g.group)
    if clip is not None:
        y = y.clamp(clip[0], clip[1])
    (y * torch.tensor(dy.transpose(1, 0, 2, 3), dtype=torch.float64)).sum().backward()
    return xt.grad.numpy().transpose(1, 0, 2, 3), wt.grad.numpy(), None if bt is None else bt.grad.numpy()


def random_inputs(g: Geometry, n, dtype, seed):
    """x, W, b with pre-activations spread over about [-10, 10], so ReLU6 clips on both sides."""
    rng = np.random.default_rng(seed)
    fan_in = g.c // g.group * g.kernel[0] * g.kernel[1]
    x = rng.standard_normal((g.c, n, g.h, g.w)) * 4
    w = rng.standard_normal((g.o, g.c // g.group, *g.kernel)) / np.sqrt(fan_in)
    b = rng.standard_normal(g.o)
    return x.astype(dtype), w.astype(dtype), b.astype(dtype)


def case_seed(name, n):
    return list(GEOMETRIES).index(name) * 10 + n


def assert_close(got, want, tol, what):
    """Equal up to ``tol`` times the largest |want| (NaNs in the same places)."""
    assert got is not None, f"no {what}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    scale = max(np.nanmax(np.abs(want)), 1e-3)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale, err_msg=what)


def check_conv(g: Geometry, n, dtype, has_bias, clip, seed):
    """Conv forward against ``reference_conv``, then dx, dW (and db) of sum(dy * y) against torch."""
    x, w, b = random_inputs(g, n, dtype, seed)
    b = b if has_bias else None
    op = g.op()
    y, ctx = op.forward(x, w, b, clip=clip)
    want = reference_conv(x, w, b, g)
    if clip is not None:
        want = np.clip(want, *clip)
    assert y.dtype == dtype
    assert_close(y, want, FORWARD_TOL[dtype], "y")

    dy = np.random.default_rng(seed + 1).standard_normal(y.shape).astype(dtype)
    dx, dw, db = op.backward(ctx, dy, need=(True, True, has_bias))
    want_dx, want_dw, want_db = torch_grads(x, w, b, g, clip, dy)
    assert_close(dx, want_dx, GRAD_TOL[dtype], "dx")
    assert_close(dw, want_dw, GRAD_TOL[dtype], "dW")
    if has_bias:
        assert_close(db, want_db, GRAD_TOL[dtype], "db")
    else:
        assert db is None


# ---------------------------------------------------------------------------------------------
# Conv forward and backward


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_conv(name, head, n, dtype):
    check_conv(GEOMETRIES[name], n, dtype, *HEADS[head], seed=case_seed(name, n))


# frames of 32 x 32 (30 x 30 padded): 4 images per job, the last job with fewer (3 groups of 3 images
# for the stride-1 dense conv); dL/dW over 2 splits
@pytest.mark.parametrize("g", [Geometry(3, 4, 30, 30, pads=(1, 1, 1, 1)), Geometry(3, 4, 32, 32, kernel=(1, 1)),
                               Geometry(3, 4, 61, 61, pads=(1, 1, 1, 1), strides=(2, 2)),
                               Geometry(4, 4, 30, 30, pads=(1, 1, 1, 1), group=4)],
                         ids=["dense", "pointwise", "strided", "depthwise"])
def test_conv_many_images_per_job(g):
    check_conv(g, 9, np.float64, True, RELU6, seed=11)


GROUPED = ["dense_3x3_same", "dense_valid", "dilated", "padded_asymmetric", "odd_sized_nonsquare_kernel",
           "row_kernel", "out_channels_17", "pointwise_padded", "large_image"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", GROUPED)
def test_conv_on_groups_of_interleaved_images(name, dtype, monkeypatch):
    """Stride-1 convs on frames whose rows interleave groups of images: 7 images in groups of 2 (the
    last of one), with jobs of a few rows, forward and backward as in ``test_conv``."""
    g = GEOMETRIES[name]
    wf = g.w + g.pads[1] + g.pads[3]
    monkeypatch.setattr(frames, "GROUP_ROW", 2 * wf + 1)
    monkeypatch.setattr(frames, "CHUNK", 5 * wf)
    p = frames.plan(g.window(), g.h, g.w, 7)
    assert p.group == 2 and p.rstr == 2 * p.wf
    check_conv(g, 7, dtype, True, RELU6, seed=case_seed(name, 7))


def test_clip_cases_cross_their_bounds():
    """The clipped cases of ``test_conv`` are not vacuous: wherever there are 40 or more outputs, some
    pre-activations lie below 0, some between 0 and 6, and some above 6."""
    for name, g in GEOMETRIES.items():
        for n in (1, 3):
            x, w, b = random_inputs(g, n, np.float64, case_seed(name, n))
            pre = reference_conv(x, w, b, g)
            if pre.size >= 40:
                assert (pre < 0).any() and ((pre > 0) & (pre < 6)).any() and (pre > 6).any(), (name, n)


@pytest.mark.parametrize("name", ["dense_3x3_same", "strided", "dilated"])
def test_frames_too_large_to_keep_are_rebuilt_in_backward(name, monkeypatch):
    """Above KEEP_FRAMES_BYTES a conv keeps its input, not its frames, and backward rebuilds them:
    same gradients either way."""
    import bwacal.ops.conv as conv_module

    g = GEOMETRIES[name]
    x, w, b = random_inputs(g, 3, np.float64, seed=9)
    dy = np.random.default_rng(10).standard_normal(reference_conv(x, w, b, g).shape)
    y, ctx = g.op().forward(x, w, b, clip=RELU)
    assert ctx.saved[0].ndim == 3  # frames kept
    kept = g.op().backward(ctx, dy, need=(True, True, True))
    monkeypatch.setattr(conv_module, "KEEP_FRAMES_BYTES", 0)
    y2, ctx2 = g.op().forward(x, w, b, clip=RELU)
    assert ctx2.saved[0] is x or ctx2.saved[0].ndim == 4  # the input kept instead
    rebuilt = g.op().backward(ctx2, dy, need=(True, True, True))
    np.testing.assert_array_equal(y2, y)
    for a, c in zip(kept, rebuilt):
        np.testing.assert_array_equal(a, c)


def test_backward_gives_only_what_is_needed():
    g = GEOMETRIES["strided"]
    x, w, b = random_inputs(g, 2, np.float64, seed=3)
    op = g.op()
    y, ctx = op.forward(x, w, b)
    dy = np.ones_like(y)
    dx, dw, db = op.backward(ctx, dy, need=(False, False, True))
    assert dx is None and dw is None
    np.testing.assert_allclose(db, dy.sum(axis=(1, 2, 3)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strided_convs_of_many_entries_take_gemm_gradients(dtype, monkeypatch):
    """A strided conv of at least ``GEMM_BACKWARD_ENTRIES`` entries: forward on the frames, backward by
    im2col + GEMMs split over numba's threads; one BLAS call when BLAS runs its own threads."""
    g = GEOMETRIES["strided_many_entries"]
    x, w, b = random_inputs(g, 3, dtype, seed=4)
    assert g.op().forward(x, w, b)[1].path == "gemm"
    assert GEOMETRIES["strided"].op().forward(*random_inputs(GEOMETRIES["strided"], 1, dtype, 0))[1].path == "frames"
    check_conv(g, 3, dtype, True, RELU6, seed=4)
    y, ctx = g.op().forward(x, w, b, clip=RELU6)
    dy = np.random.default_rng(5).standard_normal(y.shape).astype(dtype)
    threaded = g.op().backward(ctx, dy, need=(True, True, True))
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    for got, want in zip(g.op().backward(ctx, dy, need=(True, True, True)), threaded):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_short_groups_are_summed_as_one_span(monkeypatch):
    """dL/dW of a strided conv (one image per group) runs as one span over all the images, the
    positions between them included, and still matches torch."""
    calls = []
    kernel = frames.dense_weight_grad
    monkeypatch.setattr(frames, "dense_weight_grad", lambda *a: calls.append(a[6:8]) or kernel(*a))
    check_conv(GEOMETRIES["strided"], 3, np.float32, True, RELU, seed=12)
    groups, glen = calls[-1]
    # 3 images of 6x6 phase frames with 5x5 outputs: the last output at 2*36 + 4*6 + 4
    assert (groups, glen) == (1, 101)


def masked(dy, y, lo, hi):
    """dy where lo < y < hi, else 0 (so 0 where y is NaN): the gradient through a Relu/Clip by its output."""
    return np.where((y > lo) & (y < hi), dy, 0).astype(dy.dtype)


# the paths of dense backward: dL/dy's frames built for the mirror conv, the pointwise conv's own
# array, and to_frame (strided, a 1x1 strided, and a stride-1 conv whose padding is wider than its window)
MASK_PATHS = ["dense_3x3_same", "dilated", "pointwise", "pointwise_strided", "strided", "strided_uneven",
              "padded_beyond_window"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", MASK_PATHS)
def test_fused_clip_backward_equals_masking_dy_first(name, dtype):
    """A conv with a fused clip masks dL/dy as it builds dL/dy's frames: dx, dW and db are exactly
    those of the unclipped conv's backward on the masked dL/dy, NaN outputs (masked to 0) included;
    db also against a float64 sum of the masked dL/dy, with and without dW asked for."""
    g = GEOMETRIES[name]
    x, w, b = random_inputs(g, 3, dtype, seed=12)
    x[0, 0, 0, 0] = np.nan  # a pixel every geometry here reads
    op = g.op()
    y, ctx = op.forward(x, w, b, clip=RELU6)
    assert np.isnan(y).any() and (y == 0).any() and (y == 6).any()
    dy = np.random.default_rng(13).standard_normal(y.shape).astype(dtype)
    dy_masked = masked(dy, y, *RELU6)
    unclipped_ctx = ctx._replace(clip=None, y=None)
    fused = op.backward(ctx, dy, need=(True, True, True))
    want = op.backward(unclipped_ctx, dy_masked, need=(True, True, True))
    for got, ref, what in zip(fused, want, ("dx", "dW", "db")):
        np.testing.assert_array_equal(got, ref, err_msg=what)
    want_db = dy_masked.astype(np.float64).sum(axis=(1, 2, 3))
    for need in [(True, True, True), (True, False, True), (False, True, True), (False, False, True)]:
        db = op.backward(ctx, dy, need=need)[2]
        assert db.dtype == dtype
        assert_close(db, want_db, GRAD_TOL[dtype], f"db, need {need}")


@st.composite
def geometries(draw):
    """Any dense or depthwise 2-D conv geometry whose window fits the padded input."""
    depthwise = draw(st.booleans())
    c = draw(st.integers(1, 5))
    o = c * draw(st.integers(1, 3)) if depthwise else draw(st.integers(1, 11))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilations = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pads = tuple(draw(st.integers(0, 4)) for _ in range(4))
    size = []
    for k, d, before, after in zip(kernel, dilations, pads[:2], pads[2:]):
        size.append(draw(st.integers(max(1, (k - 1) * d + 1 - before - after), 12)))
    return Geometry(c, o, size[0], size[1], kernel, pads, strides, dilations, group=c if depthwise else 1)


@settings(max_examples=40, deadline=None)
@given(g=geometries(), n=st.integers(1, 3), head=st.sampled_from(list(HEADS)), seed=st.integers(0, 2**16))
def test_conv_any_geometry(g, n, head, seed):
    check_conv(g, n, np.float64, *HEADS[head], seed=seed)


NONFINITE = ["dense_3x3_same", "pointwise", "strided", "depthwise_multiplier_2", "grouped"]


@pytest.mark.parametrize("name", NONFINITE)
def test_nan_passes_through_the_fused_clip(name):
    """As in NumPy (and torch): an output whose window covers a NaN is NaN, clipped or not; no other is."""
    g = GEOMETRIES[name]
    x, w, b = random_inputs(g, 2, np.float64, seed=5)
    x[0, 0, 0, 0] = x[-1, 1, g.h // 2, g.w - 1] = np.nan
    for clip in (None, RELU, RELU6):
        y, _ = g.op().forward(x, w, b, clip=clip)
        want = reference_conv(x, w, b, g)
        assert np.isnan(want).any()
        assert_close(y, want if clip is None else np.clip(want, *clip), FORWARD_TOL[np.float64], f"y, clip {clip}")


# (the dense kernels once padded their (channel, tap) entries to a multiple of 4 with zero weights
# reading channel 0's first tap: 0 * inf made these NaN)
@pytest.mark.parametrize("name", NONFINITE)
def test_infinite_input_gives_infinite_outputs(name):
    """With positive weights, every output whose window covers a +inf pixel is +inf, as in torch. The
    pixel is the one the first tap of a middle output reads."""
    g = GEOMETRIES[name]
    x, w, b = random_inputs(g, 1, np.float64, seed=6)
    w = np.abs(w) + 0.1
    win = g.window()
    x[0, 0, win.ho // 2 * win.sh - win.ph, win.wo // 2 * win.sw - win.pw] = np.inf
    y, _ = g.op().forward(x, w, b)
    want = reference_conv(x, w, b, g)
    assert np.isposinf(want).any() and not np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(y), False)
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(want))


# ---------------------------------------------------------------------------------------------
# The frame layout


def padded_canvas(x, g: Geometry, hf, wf):
    """The CNHW ``x`` zero-padded on a canvas of ``hf*sh`` x ``wf*sw`` padded pixels."""
    (sh, sw), (top, left) = g.strides, g.pads[:2]
    c, n, h, w = x.shape
    canvas = np.zeros((c, n, max(hf * sh, top + h), max(wf * sw, left + w)), dtype=x.dtype)
    canvas[:, :, top:top + h, left:left + w] = x
    return canvas


LAYOUTS = [name for name, g in GEOMETRIES.items() if g.group in (1, g.c)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", LAYOUTS)
def test_build_frames_holds_the_phases_of_the_padded_input(name, n, dtype):
    """Phase (a, b) row r column q of image i is padded pixel (r*sh + a, q*sw + b); the tail is zeros.
    Only the phases some tap reads are filled (a strided 1x1 conv reads one of four). Float32 rows are
    copied by 16-entry vectors that write past a row's end: what they overwrite is written after."""
    g = GEOMETRIES[name]
    x = np.random.default_rng(1).standard_normal((g.c, n, g.h, g.w)).astype(dtype)
    win = g.window()
    p = frames.plan(win, g.h, g.w)
    f = frames.build_frames(x, win, p)
    sh, sw = g.strides
    assert f.shape == (sh * sw, g.c, n * p.hf * p.wf + p.tail)
    canvas = padded_canvas(x, g, p.hf, p.wf)
    read = sorted(set(p.src.tolist()))
    for a in range(sh):
        for b in range(sw):
            if a * sw + b not in read:
                continue
            want = canvas[:, :, a::sh, b::sw][:, :, :p.hf, :p.wf]
            np.testing.assert_array_equal(f[a * sw + b, :, :n * p.hf * p.wf].reshape(want.shape), want)
    assert not f[read, :, n * p.hf * p.wf:].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("n", [1, 3, 7])
@pytest.mark.parametrize("name", LAYOUTS)
def test_taps_read_the_pixel_their_window_covers(name, n, grouped, dtype, monkeypatch):
    """For every valid output (i, oi, oj) and tap (ki, kj): frame ``src[t]`` at the output's position
    plus ``off[t]`` is padded pixel (oi*sh + ki*dh, oj*sw + kj*dw) of image i, and no read (including
    the discarded padding-band positions the kernels compute, and a last whole register tile) goes
    past the frame's end. Grouped: stride-1 plans get groups of 2 images with interleaved rows; every
    image pixel is then in the frame once and every other entry is zero."""
    g = GEOMETRIES[name]
    monkeypatch.setattr(frames, "GROUP_ROW", 2 * (g.w + g.pads[1] + g.pads[3]) + 1)
    x = (np.random.default_rng(2).standard_normal((g.c, n, g.h, g.w)) + 5).astype(dtype)  # no pixel is 0
    win = g.window()
    p = frames.plan(win, g.h, g.w, n if grouped else None)
    assert p.group == (min(n, 2) if grouped and g.strides == (1, 1) else 1)
    f = frames.build_frames(x, win, p)
    (sh, sw), (dh, dw) = g.strides, g.dilations
    xp = np.pad(x, [(0, 0), (0, 0), (g.pads[0], g.pads[2]), (g.pads[1], g.pads[3])])
    i, oi, oj = np.meshgrid(np.arange(n), np.arange(win.ho), np.arange(win.wo), indexing="ij")
    pos = (i // p.group) * p.gstr + (i % p.group) * p.wf + oi * p.rstr + oj
    for t, (ki, kj) in enumerate(np.ndindex(*g.kernel)):
        got = f[p.src[t]][:, pos + p.off[t]]
        want = xp[:, i, oi * sh + ki * dh, oj * sw + kj * dw]
        np.testing.assert_array_equal(got, want, err_msg=f"tap {(ki, kj)}")
    assert pos.max() == p.span(n, win.ho, win.wo) - 1
    assert p.span(n, win.ho, win.wo) + 31 + p.off.max() <= f.shape[2] == p.length(n)
    if grouped and g.strides == (1, 1):
        for c in range(g.c):
            np.testing.assert_array_equal(np.sort(f[0, c][f[0, c] != 0]), np.sort(x[c], axis=None))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", LAYOUTS)
def test_from_frames_inverts_build_frames(name, n):
    g = GEOMETRIES[name]
    x = np.random.default_rng(3).standard_normal((g.c, n, g.h, g.w))
    win = g.window()
    p = frames.plan(win, g.h, g.w)
    f = frames.build_frames(x, win, p)
    back = np.full_like(x, np.nan)
    frames.from_frames(f, win.sh, win.sw, win.ph, win.pw, p.hf, p.wf, back)
    # pixels of phases no tap reads are not in the frames (and get no gradient)
    rows = (np.arange(g.h) + win.ph) % win.sh
    cols = (np.arange(g.w) + win.pw) % win.sw
    read = np.isin(rows[:, None] * win.sw + cols[None, :], p.src)
    np.testing.assert_array_equal(back[:, :, read], x[:, :, read])


def mask_source(shape, lo, seed):
    """A ``y`` for the masked frame kernels: normal values (x4) with NaN, +-inf and ``lo`` itself among them."""
    y = np.random.default_rng(seed).standard_normal(shape) * 4
    flat = y.reshape(-1)
    flat[::7] = np.nan
    flat[1::11] = np.inf
    flat[2::13] = -np.inf
    flat[3::17] = lo
    return y


BOUNDS = {"none": None, "relu": RELU, "relu6": RELU6, "unbounded": (-np.inf, np.inf)}


@pytest.mark.parametrize("bounds", list(BOUNDS))
@pytest.mark.parametrize("head, extra", [(0, 0), (7, 0), (3, 11)])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("interleaved", [False, True])
def test_to_frame_places_each_output_at_its_frame_position(interleaved, n, head, extra, bounds):
    """``out[o, head + p] = dy[o, i, oi, oj]`` (masked by ``y`` when bounds are given) at the position
    p of pixel (i, oi, oj): ``i*hf*wf + oi*wf + oj`` with images one after another, ``oi*n*wf + i*wf
    + oj`` with one group of n images whose rows interleave; every other entry is zero."""
    o, ho, wo, hf, wf = 5, 3, 4, 5, 6
    group = n if interleaved else 1
    layout = (group, hf * group * wf, group * wf, wf)  # group, gstr, rstr, wf
    dy = np.random.default_rng(4).standard_normal((o, n, ho, wo))
    out = np.full((o, head + n * hf * wf + extra), np.nan)
    if BOUNDS[bounds] is None:
        frames.to_frame(dy, None, -np.inf, np.inf, *layout, head, out)
    else:
        y = mask_source(dy.shape, BOUNDS[bounds][0], seed=5)
        frames.to_frame(dy, y, *BOUNDS[bounds], *layout, head, out)
        dy = masked(dy, y, *BOUNDS[bounds])
    want = np.zeros_like(out)
    placed = want[:, head:head + n * hf * wf]  # a view into want
    placed = placed.reshape(o, hf, n, wf).transpose(0, 2, 1, 3) if interleaved else placed.reshape(o, n, hf, wf)
    placed[:, :, :ho, :wo] = dy
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("bounds", ["relu", "relu6", "unbounded"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", LAYOUTS)
def test_masked_frames_are_the_frames_of_the_masked_array(name, dtype, bounds):
    """``build_frames(x, ..., y, lo, hi)`` equals ``build_frames`` of ``where(lo < y < hi, x, 0)`` in every
    phase some tap reads (NaN and infinite ``y`` give 0, as does y == lo)."""
    g = GEOMETRIES[name]
    x = np.random.default_rng(6).standard_normal((g.c, 3, g.h, g.w)).astype(dtype)
    y = mask_source(x.shape, BOUNDS[bounds][0], seed=7).astype(dtype)
    win = g.window()
    p = frames.plan(win, g.h, g.w)
    got = frames.build_frames(x, win, p, y, *BOUNDS[bounds])
    want = frames.build_frames(masked(x, y, *BOUNDS[bounds]), win, p)
    read = sorted(set(p.src.tolist()))
    np.testing.assert_array_equal(got[read], want[read])


def naive_weight_grad(dyf, head, f, eph, ech, eoff, groups, glen, gstr, splits):
    """``dense_weight_grad``'s two outputs by a float64 dot product per (split, output, entry): the
    positions are the first ``glen`` of each group, ``gstr`` apart, and a split is a whole number of
    16-position vectors of them."""
    o_n, k_n = dyf.shape[0], eph.size
    pos = (np.arange(groups)[:, None] * gstr + np.arange(glen)[None, :]).reshape(-1)
    per = -(-pos.size // splits)
    per = -(-per // 16) * 16
    part, bias_part = np.zeros((splits, o_n, k_n)), np.zeros((splits, o_n))
    for s in range(splits):
        p = pos[s * per:(s + 1) * per]
        d = dyf[:, head + p].astype(np.float64)
        bias_part[s] = d.sum(axis=1)
        for k in range(k_n):
            part[s, :, k] = d @ f[eph[k], ech[k], p + eoff[k]].astype(np.float64)
    return part, bias_part


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("o, splits, groups, gap", [(4, 1, 1, 0), (6, 3, 1, 0), (9, 2, 1, 0), (4, 1, 3, 37),
                                                   (6, 3, 5, 100), (5, 4, 2, 1)])
def test_dense_weight_grad_sums_products_and_dy(o, splits, groups, gap, dtype):
    """Per split of positions: ``part`` sums dyf times each entry's frame, ``bias_part`` dyf itself (the
    positions span several SPANs, and split 1 starts mid-span); with groups, only the first ``glen``
    positions of each (the ``gap`` after them, padding rows in a frame, is skipped)."""
    rng = np.random.default_rng(o + groups)
    c, head = 3, 5
    glen = (2 * frames.SPAN + 1000) // groups
    gstr = glen + gap
    length = groups * gstr
    eph, ech, eoff = frames.pad_entries(np.zeros(c * 2, dtype=np.int64), np.repeat(np.arange(c), 2),
                                    np.tile(np.array([0, 7]), c))
    f = rng.standard_normal((1, c, length + 7)).astype(dtype)
    dyf = rng.standard_normal((o, head + length)).astype(dtype)
    part = np.full((splits, o, eph.size), np.nan)
    bias_part = np.full((splits, o), np.nan)
    frames.dense_weight_grad(dyf, head, f, eph, ech, eoff, groups, glen, gstr, splits, part, bias_part)
    want_part, want_bias = naive_weight_grad(dyf, head, f, eph, ech, eoff, groups, glen, gstr, splits)
    tol = {np.float32: 1e-5, np.float64: 1e-12}[dtype] * np.sqrt(groups * glen)
    np.testing.assert_allclose(part, want_part, rtol=0, atol=tol)
    np.testing.assert_allclose(bias_part, want_bias, rtol=0, atol=tol)


@njit
def _accumulate_into(f, eph, ech, eoff, wk, o, lo, n_pos, acc):
    frames.accumulate(f, eph, ech, eoff, wk, o, lo, n_pos, acc)


@njit
def _accumulate_narrow_into(f, eph, ech, eoff, wk, o, lo, n_pos, acc):
    frames.accumulate_narrow(f, eph, ech, eoff, wk, o, lo, n_pos, acc)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("n_pos, acc_cols, frame_room", [
    (71, 96, 200),  # the last tile (positions 64-95) whole: acc and frame have room
    (71, 71, 200),  # acc ends at n_pos: positions 64-70 by the loops
    (71, 96, 75),  # the frame ends 4 positions past n_pos (plus the largest offset)
    (96, 96, 96), (5, 5, 5), (5, 32, 40), (150, 192, 300), (150, 160, 300), (150, 150, 152)])
def test_accumulate_computes_the_last_partial_tile_within_bounds(n_pos, acc_cols, frame_room, narrow):
    """float32 register tiles run a whole last tile only where ``acc`` and the frame hold it: ``acc``
    is a view into a sentinel-filled buffer, and every position up to n_pos is the float64 sum (rows
    o..o+3 for the narrow tiles of 64 positions x 4 rows)."""
    rng = np.random.default_rng(n_pos + acc_cols)
    c, lo, o = 3, 2, 8
    eoff = np.tile(np.array([0, 1, 9]), c)
    eph, ech = np.zeros(eoff.size, dtype=np.int64), np.repeat(np.arange(c, dtype=np.int64), 3)
    f = rng.standard_normal((1, c, lo + eoff.max() + frame_room)).astype(np.float32)
    wk = rng.standard_normal((16, eoff.size)).astype(np.float32)
    buf = np.full((8, acc_cols + 40), 7.0, dtype=np.float32)
    acc = buf[:, :acc_cols]
    acc[:] = 0
    (_accumulate_narrow_into if narrow else _accumulate_into)(f, eph, ech, eoff, wk, o, lo, n_pos, acc)
    want = sum(wk[o:o + 8, k, None].astype(np.float64) * f[0, ech[k], lo + eoff[k]:lo + eoff[k] + n_pos]
               for k in range(eoff.size))
    rows = 4 if narrow else 8
    np.testing.assert_allclose(acc[:rows, :n_pos], want[:rows], rtol=0, atol=1e-5)
    assert (buf[:, acc_cols:] == 7.0).all()


@pytest.mark.parametrize("clip", [RELU6, (-np.inf, np.inf)])
@pytest.mark.parametrize("c, o, w, n, group_row", [(5, 40, 8, 7, 20), (16, 32, 16, 3, 128), (3, 64, 8, 9, 128),
                                                   (7, 96, 16, 2, 17)])
def test_rows_kernel_gives_the_position_kernels_sums_bit_for_bit(c, o, w, n, group_row, clip, monkeypatch):
    """``conv`` takes ``dense_forward_rows`` for float32 output rows of 8 or 16 and at least 32
    channels; its tiles sum the same products in the same order as ``dense_forward``'s, so the
    outputs are equal bit for bit, for partial channel blocks and a partial last group too."""
    monkeypatch.setattr(frames, "GROUP_ROW", group_row)
    rng = np.random.default_rng(o + w + n)
    x = rng.standard_normal((c, n, w, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    win = window(w, w, (3, 3), [1, 1], None, [1] * 4, "NOTSET")
    p = frames.plan(win, w, w, n)
    f = frames.build_frames(x, win, p)
    wk = frames.dense_weights(wt.reshape(o, -1))
    eph, ech, eoff = frames.entry_tables(c, p)
    calls = []
    rows = frames.dense_forward_rows
    monkeypatch.setattr(frames, "dense_forward_rows", lambda *a: calls.append(1) or rows(*a))
    got = np.full((o, n, w, w), np.nan, dtype=np.float32)
    frames.conv(f, eph, ech, eoff, wk, b, *clip, p, got)
    assert calls, "the rows kernel was not used"
    want = np.full_like(got, np.nan)
    frames.dense_forward(f, eph, ech, eoff, wk, b, *clip, p.group, p.gstr, p.rstr, p.wf, *p.jobs(n, w), want)
    np.testing.assert_array_equal(got, want)


def test_plans_and_entry_tables_are_made_once_per_geometry(monkeypatch):
    """``plan`` and the entry tables are cached per geometry and batch; a different GROUP_ROW (the
    grouping tests set it) gives a different plan, as does a different batch."""
    win = window(8, 8, (3, 3), [1, 1], None, [1] * 4, "NOTSET")
    p = frames.plan(win, 8, 8, 16)
    assert frames.plan(win, 8, 8, 16) is p
    assert frames.entry_tables(5, p) is frames.entry_tables(5, p)
    assert frames.padded_entry_tables(5, p) is frames.padded_entry_tables(5, p)
    np.testing.assert_array_equal(frames.padded_entry_tables(5, p)[2], frames.pad_entries(*frames.entry_tables(5, p))[2])
    assert frames.plan(win, 8, 8, 17) is not p
    monkeypatch.setattr(frames, "GROUP_ROW", 2 * p.wf + 1)
    q = frames.plan(win, 8, 8, 16)
    assert q is not p and (q.group, p.group) == (2, 8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_weights_swap_the_channels_and_take_the_taps(dtype):
    """All taps reversed: the weights with both kernel axes flipped; some taps: those, in order."""
    w = np.random.default_rng(0).standard_normal((5, 11, 3, 2))
    got = frames.transposed_weights(w, np.arange(6)[::-1], dtype)
    want = frames.dense_weights(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(11, -1).astype(dtype))
    assert got.dtype == dtype and got.shape == (16, 5 * 6)
    np.testing.assert_array_equal(got, want)
    got = frames.transposed_weights(w, [4, 1, 3], dtype)
    want = frames.dense_weights(w.reshape(5, 11, 6)[:, :, [4, 1, 3]].transpose(1, 0, 2).reshape(11, -1).astype(dtype))
    np.testing.assert_array_equal(got, want)


def test_sum_splits_adds_the_partial_sums_in_float64():
    part = np.random.default_rng(1).standard_normal((3, 5, 12)) * 1e8
    part[1] += 1.0  # lost in float32 sums of the float32-rounded parts
    out = np.empty((5, 10), dtype=np.float32)
    frames.sum_splits(part, 10, out)
    np.testing.assert_array_equal(out, part.sum(axis=0)[:, :10].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Conv+Relu/Clip fusion in the engine


# the first conv of each chain
CHAINS = {
    "dense": Geometry(3, 4, 6, 6, pads=(1, 1, 1, 1)),
    "strided": Geometry(3, 4, 7, 7, pads=(1, 1, 1, 1), strides=(2, 2)),
    "pointwise": Geometry(3, 4, 6, 6, kernel=(1, 1)),
    "depthwise": Geometry(4, 4, 6, 6, pads=(1, 1, 1, 1), group=4),
    "depthwise_multiplier_2": Geometry(2, 4, 6, 6, pads=(1, 1, 1, 1), group=2),
    "grouped": Geometry(4, 4, 6, 6, pads=(1, 1, 1, 1), group=2),
}


def chain_case(name):
    """x -> Conv(w1, b1) -> h1 -> Relu -> r1 -> Conv(w2, b2) -> h2 -> Clip(lo, hi) -> y, with the bounds
    0 and 6 as initializers (opset 13) and the first conv as ``CHAINS[name]``. Returns the model, its
    initializers, an input and the first conv's geometry."""
    g1 = CHAINS[name]
    rng = np.random.default_rng(len(name))
    x = rng.standard_normal((2, g1.c, g1.h, g1.w))
    consts = {"w1": rng.standard_normal((g1.o, g1.c // g1.group, *g1.kernel)), "b1": np.full(g1.o, 0.1),
              "w2": rng.standard_normal((5, g1.o, 3, 3)) / 2, "b2": np.full(5, 0.5),
              "lo": np.array(0.0), "hi": np.array(6.0)}
    attrs = dict(kernel_shape=list(g1.kernel), pads=list(g1.pads), strides=list(g1.strides), group=g1.group)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1", **attrs),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["h2", "lo", "hi"], ["y"], name="clip2")]
    return _model(nodes, {"x": x}, consts, ["y"], 13), consts, x, g1


def reference_chain(x, consts, g1, hi=6.0):
    """The chain of ``chain_case`` in float64 NCHW, with every intermediate."""
    h1 = reference_conv(x.transpose(1, 0, 2, 3), consts["w1"], consts["b1"], g1)
    r1 = np.maximum(h1, 0)
    g2 = Geometry(g1.o, consts["w2"].shape[0], h1.shape[2], h1.shape[3], pads=(1, 1, 1, 1))
    h2 = reference_conv(r1, consts["w2"], consts["b2"], g2)
    return {name: v.transpose(1, 0, 2, 3) for name, v in
            {"h1": h1, "r1": r1, "h2": h2, "y": np.clip(h2, 0, hi)}.items()}


def run_profiled(engine, feeds, **kwargs):
    profile = {}
    values, tape = engine.run(feeds, profile=profile, **kwargs)
    return values, tape, set(profile)


@pytest.mark.parametrize("name", list(CHAINS))
def test_fused_chain_matches_reference_and_unfused_run(name):
    model, consts, x, g1 = chain_case(name)
    engine = Engine(read_model(model))
    assert engine.fusable == {0: (1, RELU, ()), 2: (3, RELU6, ("lo", "hi"))}
    want = reference_chain(x, consts, g1)
    assert (want["h2"] > 6).any() and (want["h2"] < 0).any() and (want["h1"] < 0).any()

    fused, _, ran = run_profiled(engine, {"x": x})
    assert ran == {"conv1", "conv2"}  # the activations were applied by the convs
    np.testing.assert_allclose(fused["y"], want["y"], rtol=0, atol=1e-12 * np.abs(want["y"]).max())

    unfused, _, ran = run_profiled(engine, {"x": x}, outputs=["h1", "h2", "y"])
    assert ran == {"conv1", "relu1", "conv2", "clip2"}
    for k in ("h1", "h2", "y"):  # the raw conv outputs are the pre-activations, negatives included
        np.testing.assert_allclose(unfused[k], want[k], rtol=0, atol=1e-12 * np.abs(want[k]).max(), err_msg=k)
    np.testing.assert_array_equal(unfused["y"], fused["y"])


@pytest.mark.parametrize("name", list(CHAINS))
def test_fused_chain_gradients_match_unfused(name):
    model, consts, x, _ = chain_case(name)
    engine = Engine(read_model(model))
    wrt = ["x", "w1", "b1", "w2", "b2"]
    values, tape = engine.run({"x": x}, record=True, wrt=wrt)
    seed = np.random.default_rng(5).standard_normal(values["y"].shape)
    fused = engine.backward(tape, {"y": seed}, wrt=wrt)
    values, tape = engine.run({"x": x}, record=True, wrt=wrt, outputs=["h1", "h2", "y"])
    unfused = engine.backward(tape, {"y": seed}, wrt=wrt)
    for k in wrt:
        assert fused[k].shape == unfused[k].shape, k
        np.testing.assert_allclose(fused[k], unfused[k], rtol=0, atol=1e-12 * np.abs(unfused[k]).max(), err_msg=k)


def test_requesting_only_the_first_conv_output_keeps_the_second_pair_fused():
    model, consts, x, g1 = chain_case("dense")
    engine = Engine(read_model(model))
    values, _, ran = run_profiled(engine, {"x": x}, outputs=["h1", "y"])
    assert ran == {"conv1", "relu1", "conv2"}
    want = reference_chain(x, consts, g1)
    assert (values["h1"] < 0).any()
    for k in ("h1", "y"):
        np.testing.assert_allclose(values[k], want[k], rtol=0, atol=1e-12 * np.abs(want[k]).max(), err_msg=k)


def test_overridden_clip_bound_is_used_not_the_fused_initializer():
    model, consts, x, g1 = chain_case("dense")
    engine = Engine(read_model(model))
    values, _, ran = run_profiled(engine, {"x": x}, params={"hi": np.array(3.0)})
    assert "clip2" in ran and "relu1" not in ran
    want = reference_chain(x, consts, g1, hi=3.0)
    assert (want["h2"] > 3).any()
    np.testing.assert_allclose(values["y"], want["y"], rtol=0, atol=1e-12 * np.abs(want["y"]).max())


def test_conv_read_twice_is_not_fused():
    """y = Relu(h) + h: fusing would hand the Add the clipped h."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Add", ["r", "h"], ["y"])]
    rng = np.random.default_rng(6)
    w, x = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((2, 2, 5, 5))
    engine = Engine(read_model(_model(nodes, {"x": x}, {"w": w}, ["y"], 13)))
    assert engine.fusable == {}
    h = reference_conv(x.transpose(1, 0, 2, 3), w, None, Geometry(2, 3, 5, 5, pads=(1, 1, 1, 1)))
    h = h.transpose(1, 0, 2, 3)
    assert (h < 0).any()
    values, _ = engine.run({"x": x})
    np.testing.assert_allclose(values["y"], np.maximum(h, 0) + h, rtol=0, atol=1e-12 * np.abs(h).max())


@pytest.mark.parametrize("act", ["Relu", "Clip"])
def test_residual_add_and_its_activation_fuse(act):
    """y = act(Conv(x) + x): the Add applies the Relu/Clip in one pass; outputs and gradients (through
    both of the Add's inputs) equal the unfused run's, and asking for the sum turns the fusion off."""
    extra = ["lo", "hi"] if act == "Clip" else []
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["h", "x"], ["s"]),
             helper.make_node(act, ["s", *extra], ["y"])]
    rng = np.random.default_rng(8)
    w, x = rng.standard_normal((2, 2, 3, 3)), rng.standard_normal((3, 2, 5, 5))
    consts = {"w": w, **({"lo": np.array(-0.3), "hi": np.array(0.4)} if act == "Clip" else {})}
    engine = Engine(read_model(_model(nodes, {"x": x}, consts, ["y"], 13)))
    assert list(engine.fusable) == [1]  # the Add; the Conv has the Add as its reader
    fused, tape = engine.run({"x": x}, record=True, wrt=["x", "w"])
    plain, plain_tape = engine.run({"x": x}, outputs=["s", "y"], record=True, wrt=["x", "w"])
    lo, hi = (-0.3, 0.4) if act == "Clip" else (0.0, np.inf)
    assert (plain["s"] < lo).any() and (plain["s"] > lo).any()
    np.testing.assert_allclose(fused["y"], plain["y"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(fused["y"], np.clip(plain["s"], lo, hi), rtol=0, atol=1e-12)
    seed = rng.standard_normal(fused["y"].shape)
    got = engine.backward(tape, {"y": seed}, wrt=["x", "w"])
    want = engine.backward(plain_tape, {"y": seed}, wrt=["x", "w"])
    for name in ("x", "w"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


# case -> (the Clip's inputs, its attributes, the bound initializers, opset, graph outputs, bounds,
# fused); a bound input that is no initializer is fed as a graph input
CLIPS = {
    "initializer_bounds": (["h", "lo", "hi"], {}, {"lo": -0.5, "hi": 0.5}, 13, ["y"], (-0.5, 0.5), True),
    "min_only": (["h", "lo"], {}, {"lo": -0.5}, 13, ["y"], (-0.5, np.inf), True),
    "max_only": (["h", "", "hi"], {}, {"hi": 0.5}, 13, ["y"], (-np.inf, 0.5), True),
    "attributes": (["h"], {"min": -0.5, "max": 0.5}, {}, 10, ["y"], (-0.5, 0.5), True),
    "bound_is_graph_input": (["h", "lo", "hi"], {}, {"lo": -0.5}, 13, ["y"], (-0.5, 0.5), False),
    "conv_output_is_graph_output": (["h", "lo", "hi"], {}, {"lo": -0.5, "hi": 0.5}, 13, ["h", "y"], (-0.5, 0.5),
                                    False),
}


@pytest.mark.parametrize("case", list(CLIPS))
def test_which_clips_fuse(case):
    inputs, attrs, bounds, opset, outputs, (lo, hi), fused = CLIPS[case]
    rng = np.random.default_rng(8)
    w, x = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((1, 2, 4, 4))
    feeds = {"x": x}
    if "hi" in inputs and "hi" not in bounds:
        feeds["hi"] = np.array(hi)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", inputs, ["y"], **attrs)]
    consts = {"w": w, **{k: np.array(v) for k, v in bounds.items()}}
    engine = Engine(read_model(_model(nodes, feeds, consts, outputs, opset)))
    assert engine.fusable == ({0: (1, (lo, hi), tuple(bounds))} if fused else {})
    h = reference_conv(x.transpose(1, 0, 2, 3), w, None, Geometry(2, 3, 4, 4, pads=(1, 1, 1, 1)))
    want = np.clip(h, lo, hi).transpose(1, 0, 2, 3)
    values, _ = engine.run(feeds)
    np.testing.assert_allclose(values["y"], want, rtol=0, atol=1e-12 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# bwacal.runtime


def test_keep_freed_memory_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("BWACAL_MALLOC", raising=False)
    assert keep_freed_memory() is True


def test_keep_freed_memory_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("BWACAL_MALLOC", "default")
    assert keep_freed_memory() is False


def test_blas_runs_on_one_thread_unless_the_user_chose(monkeypatch):
    """bwacal sets NumPy's OpenBLAS to one thread (its convs are numba kernels; see bwacal/runtime.py)
    but leaves a user's OPENBLAS_NUM_THREADS alone."""
    numpy_blas = [n for path, n in runtime.openblas_threads().items() if "numpy" in path]
    if not numpy_blas:
        pytest.skip("NumPy is not linked against OpenBLAS here")
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        assert numpy_blas == [1]
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert runtime.single_thread_blas() == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_gradients_sum_exactly_into_a_new_array(dtype, monkeypatch):
    """``Engine.backward`` adds the gradients of a value read twice with a parallel kernel when they are
    large: the result equals ``a + b`` bit for bit (NaN and infinities too), and neither input changes."""
    from bwacal import engine
    from bwacal.engine import _sum

    calls = []
    monkeypatch.setattr(engine, "add_clip", lambda *args: (calls.append(1), pointwise.add_clip(*args)))
    rng = np.random.default_rng(7)
    a = rng.standard_normal((4, 64, 32, 16)).astype(dtype)
    b = rng.standard_normal(a.shape).astype(dtype)
    a.flat[:4] = [np.nan, np.inf, -np.inf, np.inf]
    b.flat[:4] = [1.0, -np.inf, 2.0, np.inf]
    a0, b0 = a.copy(), b.copy()
    got = _sum(a, b)
    assert calls == [1]
    np.testing.assert_array_equal(got, a0 + b0)
    assert got is not a and got is not b
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    np.testing.assert_array_equal(_sum(a.transpose(1, 0, 2, 3), b.transpose(1, 0, 2, 3)), (a0 + b0).transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(_sum(a[:1, :1], b[:1, :1]), a0[:1, :1] + b0[:1, :1])
    assert calls == [1]  # not for strided or small arrays
