"""Winograd F(2x2, 3x3) convs (``bwacal/kernels/winograd.py``): each kernel against its naive NumPy
version (``tests/naive.py``), the conv forward and backward against a float64 reference and torch
autograd (through ``Conv``, with the channel threshold lowered so small cases take it), the fall-back
to the direct kernels on non-finite values, and whole models against torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bwacal
from bwacal.kernels import blas, winograd
from bwacal.ops.conv import ConvContext
from tests import naive
from tests import torch_models as tm
from tests.engine.test_frames import HEADS, Geometry, assert_close, check_conv, random_inputs, reference_conv
from tests.engine.test_models import _batch, _matched_parameters, _rel_err

# stride 1, padding 1, 3x3: odd and even sizes (an odd one leaves half-empty output blocks)
GEOMETRIES = {
    "even": Geometry(3, 8, 8, 8, pads=(1, 1, 1, 1)),
    "odd": Geometry(5, 4, 7, 7, pads=(1, 1, 1, 1)),
    "odd_by_even": Geometry(4, 6, 5, 10, pads=(1, 1, 1, 1)),
    "one_pixel": Geometry(2, 3, 1, 1, pads=(1, 1, 1, 1)),
    "one_row": Geometry(2, 3, 1, 6, pads=(1, 1, 1, 1)),
}
KERNEL_TOL = 1e-6  # of the largest |value|: float32 transforms against float64 ones


@pytest.fixture
def every_conv(monkeypatch):
    """Winograd for any channel count."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)


def close(got, want, what):
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, rtol=0, atol=KERNEL_TOL * max(np.abs(want).max(), 1e-30), err_msg=what)


def matrices(buf, stride, rows, cols):
    """The 16 (rows, cols) matrices a kernel stored at ``stride`` in ``buf``."""
    return np.stack([buf[k * stride:k * stride + rows * cols].reshape(rows, cols) for k in range(16)])


# ---------------------------------------------------------------------------------------------
# Each kernel against its naive version


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_transforms_equal_their_naive_versions(name):
    g = GEOMETRIES[name]
    x, w, b = random_inputs(g, 3, np.float32, seed=1)
    n, p = 3, winograd.tiles(3, g.h, g.w)
    u, us = winograd.stacked(g.o, g.c)
    assert winograd._weights(w, u, us) == 0
    close(matrices(u, us, g.o, g.c), naive.winograd_weights(w), "U")
    v, vs = winograd.stacked(g.c, p)
    assert winograd._input(x, v, vs) == 0
    close(matrices(v, vs, g.c, p), naive.winograd_input(x), "V")

    m = np.random.default_rng(2).standard_normal((16, g.o, p)).astype(np.float32)
    ms = g.o * p + winograd.GAP
    flat = np.zeros(16 * ms, dtype=np.float32)
    for k in range(16):
        flat[k * ms:k * ms + g.o * p] = m[k].ravel()
    for clip in [(-np.inf, np.inf), (0.0, 6.0)]:
        y = np.empty((g.o, n, g.h, g.w), dtype=np.float32)
        winograd._output(flat, ms, b, *clip, y)
        close(y, naive.winograd_output(m, b, clip, y.shape), f"y, clip {clip}")

    dy = np.random.default_rng(3).standard_normal((g.o, n, g.h, g.w)).astype(np.float32)
    y = np.random.default_rng(4).standard_normal(dy.shape).astype(np.float32) * 4
    for masked, clip in [(False, (-np.inf, np.inf)), (True, (0.0, 6.0))]:
        vb, bs = winograd.stacked(g.o, p)
        va, as_ = winograd.stacked(g.o, p)
        db = np.empty(g.o)
        assert winograd._grad(dy, y, masked, *clip, vb, bs, va, as_, db) == 0
        want_vb, want_va, want_db = naive.winograd_grad(dy, y if masked else None, clip)
        close(matrices(vb, bs, g.o, p), want_vb, f"VB, masked {masked}")
        close(matrices(va, as_, g.o, p), want_va, f"VA, masked {masked}")
        close(db, want_db, f"db, masked {masked}")

    acc = np.random.default_rng(5).standard_normal((16, g.o, g.c))
    for dtype in (np.float32, np.float64):
        flat, acs = winograd.stacked(g.o, g.c, dtype)
        for k in range(16):
            flat[k * acs:k * acs + g.o * g.c] = acc[k].ravel()
        dw = np.empty((g.o, g.c, 3, 3), dtype=np.float32)
        winograd._weight_grad(flat, acs, dw)
        close(dw, naive.winograd_weight_grad(acc.astype(dtype)), f"dW from {dtype.__name__} sums")


def test_swap_is_the_half_turn_of_the_kernel():
    """U of the kernel turned half a turn is U with its first and last rows and columns swapped."""
    w = np.random.default_rng(0).standard_normal((2, 3, 3, 3))
    u, turned = naive.winograd_weights(w), naive.winograd_weights(w[:, :, ::-1, ::-1])
    np.testing.assert_allclose(turned, u[winograd.SWAP], atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The conv through Conv


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_conv(every_conv, name, head, n):
    """Forward against a float64 sum over taps, dx/dW/db against torch autograd in float64."""
    check_conv(GEOMETRIES[name], n, np.float32, *HEADS[head], seed=11 * n + list(GEOMETRIES).index(name))


def test_layers_of_at_least_min_channels_take_it():
    """At the default threshold, a 128-channel layer runs Winograd and matches the references."""
    g = Geometry(128, 128, 7, 7, pads=(1, 1, 1, 1))
    x, w, b = random_inputs(g, 2, np.float32, seed=3)
    assert g.op().forward(x, w, b)[1].path == "winograd"
    check_conv(g, 2, np.float32, True, (0.0, np.inf), seed=3)
    small = Geometry(64, 128, 7, 7, pads=(1, 1, 1, 1))
    x, w, b = random_inputs(small, 2, np.float32, seed=3)
    assert small.op().forward(x, w, b)[1].path == "frames"


@pytest.mark.parametrize("g, dtype", [
    (Geometry(4, 4, 8, 8, pads=(1, 1, 1, 1), strides=(2, 2)), np.float32),
    (Geometry(4, 4, 8, 8, pads=(2, 2, 2, 2), dilations=(2, 2)), np.float32),
    (Geometry(4, 4, 8, 8, pads=(0, 0, 0, 0)), np.float32),
    (Geometry(4, 4, 8, 8, pads=(1, 1, 1, 0)), np.float32),
    (Geometry(4, 4, 8, 8, kernel=(5, 5), pads=(2, 2, 2, 2)), np.float32),
    (Geometry(4, 4, 8, 8, pads=(1, 1, 1, 1), group=2), np.float32),
    (Geometry(4, 4, 8, 8, pads=(1, 1, 1, 1)), np.float64),
])
def test_other_convs_run_the_direct_kernels(every_conv, g, dtype):
    x, w, b = random_inputs(g, 2, dtype, seed=0)
    assert g.op().forward(x, w, b)[1].path != "winograd"


def test_dw_sums_over_spans_of_tiles(every_conv, monkeypatch):
    """dL/dW's GEMMs in pieces of 5 tiles (the 2 images of 8x8 make 32), summed in float64."""
    monkeypatch.setattr(winograd, "SPAN", 5)
    check_conv(GEOMETRIES["even"], 2, np.float32, True, (0.0, 6.0), seed=9)


def test_serial_gemms_give_the_same_result(every_conv, monkeypatch):
    """With BLAS on several threads the GEMMs run one after another: the same products, bit for bit."""
    g = GEOMETRIES["odd"]
    x, w, b = random_inputs(g, 3, np.float32, seed=4)
    dy = np.random.default_rng(5).standard_normal((g.o, 3, g.h, g.w)).astype(np.float32)

    def run():
        y, ctx = g.op().forward(x, w, b, clip=(0.0, 6.0))
        return (y, *g.op().backward(ctx, dy, need=(True, True, True)))

    threaded = run()
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    assert winograd._gemm("_products") is winograd._GEMMS["_products"][1]
    for got, want in zip(run(), threaded):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# Non-finite values: the direct kernels


def test_infinite_input_gives_infinite_outputs(every_conv):
    """A transform would turn +inf into NaN (inf - inf); the conv falls back and, with positive
    weights, every output whose window covers the +inf pixel is +inf, as in torch."""
    g = GEOMETRIES["even"]
    x, w, b = random_inputs(g, 2, np.float32, seed=6)
    w = np.abs(w) + 0.1
    x[1, 0, 3, 4] = np.inf
    y, ctx = g.op().forward(x, w, b)
    assert ctx.path == "frames"
    want = reference_conv(x, w, b, g)
    assert np.isposinf(want).any() and not np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(y), False)
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(want))


def test_nan_weight_falls_back(every_conv):
    g = GEOMETRIES["odd"]
    x, w, b = random_inputs(g, 2, np.float32, seed=7)
    w[2, 1, 0, 2] = np.nan
    y, ctx = g.op().forward(x, w, b)
    assert ctx.path == "frames"
    assert_close(y, reference_conv(x, w, b, g), 1e-5, "y")


def test_infinite_dy_gives_the_direct_gradients(every_conv, monkeypatch):
    g = GEOMETRIES["odd"]
    x, w, b = random_inputs(g, 2, np.float32, seed=8)
    dy = np.random.default_rng(9).standard_normal((g.o, 2, g.h, g.w)).astype(np.float32)
    dy[1, 0, 2, 2] = np.inf
    y, ctx = g.op().forward(x, w, b, clip=(0.0, 6.0))
    assert ctx.path == "winograd"
    got = g.op().backward(ctx, dy, need=(True, True, True))
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 10**9)
    y_direct, ctx_direct = g.op().forward(x, w, b, clip=(0.0, 6.0))
    want = g.op().backward(ctx_direct, dy, need=(True, True, True))
    for a, b_, what in zip(got, want, ["dx", "dW", "db"]):
        np.testing.assert_array_equal(a, b_, err_msg=what)


# ---------------------------------------------------------------------------------------------
# Whole models


def test_resnet18_gradients_match_torch(tmp_path):
    """ResNet-18 at 32x32: its 128-, 256- and 512-channel layers run Winograd at the default
    threshold; logits, input and weight gradients against torch autograd."""
    torch_model = tm.resnet18(classes=10).eval()
    path = tmp_path / "resnet18.onnx"
    tm.export(torch_model, path, torch.randn(2, 3, 32, 32))
    model = bwacal.load_model(path)
    torch_model = tm.fuse_batchnorm(torch_model)
    params = _matched_parameters(model, torch_model)
    x = _batch(2, 32, seed=1)
    r = np.random.default_rng(2).standard_normal((2, 10)).astype(np.float32)
    wrt = [model.input_name, *params]
    logits, tape = model.forward(x, record=True, wrt=wrt)
    kinds = [ctx.path for ctx in _conv_contexts(tape)]
    assert kinds.count("winograd") >= 9, kinds
    grads = model.backward(tape, r, wrt=wrt)

    xt = torch.tensor(x, requires_grad=True)
    want = torch_model(xt)
    (torch.tensor(r) * want).sum().backward()
    assert _rel_err(logits, want.detach().numpy()) <= 1e-4
    assert _rel_err(grads[model.input_name], xt.grad.numpy()) <= 1e-3, "input"
    for k, p in params.items():
        assert _rel_err(grads[k], p.grad.numpy()) <= 1e-3, k


def _conv_contexts(tape):
    """The saved contexts of the Conv nodes on an engine tape."""
    return [record.ctx for record in tape.entries if isinstance(record.ctx, ConvContext)]


def test_blas_on_its_own_threads_runs_the_serial_gemms():
    """With ``OPENBLAS_NUM_THREADS`` set, bwacal leaves BLAS's threads alone and calls BLAS outside
    numba's threads (inside them OpenBLAS warns "Detect OpenMP Loop" and oversubscribes the cores)."""
    code = """
import numpy as np
from bwacal.kernels import blas, winograd
from tests.engine.test_frames import Geometry, check_conv
assert blas.blas_threads() == 2, blas.blas_threads()
assert winograd._gemm("_products") is winograd._GEMMS["_products"][1]
check_conv(Geometry(128, 128, 7, 7, pads=(1, 1, 1, 1)), 2, np.float32, True, (0.0, np.inf), seed=3)
check_conv(Geometry(120, 4, 9, 9, pads=(1, 1, 1, 1), strides=(2, 2)), 2, np.float32, True, None, seed=4)
print("ok")
"""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")
    assert "OpenMP" not in run.stderr


def test_scipy_blas_is_loaded_and_set_when_first_needed():
    """``import bwacal`` does not import SciPy's linalg (130-150 ms); the first kernel choice loads
    it and leaves every OpenBLAS on one thread."""
    code = """
import sys
import bwacal
assert "scipy.linalg" not in sys.modules
from bwacal.kernels import blas
from bwacal.runtime import openblas_threads
assert blas.blas_threads() == 1
threads = openblas_threads()
assert any("scipy" in path and "numpy" not in path for path in threads), threads
assert set(threads.values()) == {1}, threads
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")
