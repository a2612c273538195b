"""Issue 15's architecture corpus: every family of ``tests.corpus_models``, exported by both torch
exporters, loads, matches ONNX Runtime, matches torch autograd, and calibrates to a model ONNX
Runtime runs.

Each check is a plain function of a ``Corpus`` (the session's cache of exports, loaded models and
calibration files), so the tests and the status table (``python -m tests.test_corpus``) run the
same code. A model an exporter cannot export is skipped for that exporter, with its error.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import bwacal
import bwacal.calibrate
from bwacal.data import write_dataset
from bwacal.errors import UnsupportedOpError
from tests import corpus_models as cm
from tests import torch_models as tm
from tests.engine.test_models import _ort, _rel_err

EXPORTERS = ("torchscript", "dynamo")
CALIB_IMAGES = 64
FORWARD_TOL = 1e-4  # of the largest logit magnitude, against ONNX Runtime (the bound)
# Gradients: bwacal runs float32 and the oracle is torch autograd on a float64 copy, so the error
# is bwacal's alone: float32 rounding accumulated over 20-60 layers and the backward's long sums.
# Measured on the corpus: at most 2.6e-6 of a gradient's largest magnitude (GoogLeNet; torch's own
# float32 autograd is off its float64 by 3.3e-6 there). 1e-4 leaves a 30x margin, while a wrong
# rule (a dropped term, a transposed or mis-broadcast gradient) is off by O(1).
GRAD_TOL = 1e-4
# A gradient that vanishes is compared against this fraction of the largest parameter gradient
# instead of its own magnitude: MLP-Mixer's token-MLP output bias only feeds LayerNorms over the
# channels, which cancel a per-token shift, so its float64 gradient is 1e-16 and float32 noise on
# it would otherwise read as a relative error of 1e8.
GRAD_FLOOR = 1e-2
QUANT_TOL = 1e-4  # calibrated model in ONNX Runtime vs bwacal's quantized forward, as FORWARD_TOL


class ExportFailed(Exception):
    """The torch exporter could not export the model (not a bwacal failure)."""


class Corpus:
    """Exports, loaded models and calibration files, made once each and kept for the session."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._cache = {}

    def _once(self, key, make):
        """``make()`` the first time, its value (or its exception, re-raised) every time after."""
        if key not in self._cache:
            try:
                self._cache[key] = (True, make())
            except Exception as exc:
                self._cache[key] = (False, exc)
        ok, value = self._cache[key]
        if not ok:
            raise value
        return value

    def torch_model(self, arch):
        return self._once(("torch", arch), lambda: cm.BUILDERS[arch][0]())

    def size(self, arch):
        return cm.BUILDERS[arch][1]

    def onnx_path(self, arch, exporter) -> Path:
        def make():
            path = self.root / f"{arch}_{exporter}.onnx"
            size = self.size(arch)
            try:
                with _quiet_exporter():
                    tm.export(self.torch_model(arch), path, _torch_batch(2, size), exporter=exporter)
            except Exception as exc:
                raise ExportFailed(f"{exporter} cannot export {arch}: {type(exc).__name__}: {_first_line(exc)}") from exc
            return path

        return self._once(("onnx", arch, exporter), make)

    def model(self, arch, exporter, fold_batchnorm=True):
        path = self.onnx_path(arch, exporter)
        return self._once(("model", arch, exporter, fold_batchnorm),
                          lambda: bwacal.load_model(path, fold_batchnorm=fold_batchnorm))

    def calibration_file(self, size) -> Path:
        def make():
            rng = np.random.default_rng(size)
            x = rng.standard_normal((CALIB_IMAGES, 3, size, size)).astype(np.float32)
            return write_dataset(self.root / f"calib_{size}.h5", x)

        return self._once(("calib", size), make)


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _summary(exc, root: Path) -> str:
    """One line naming a failure, the same for every case it stops: the corpus folder is dropped
    and unsupported ops are listed once each, grouped by reason."""
    if isinstance(exc, UnsupportedOpError):
        ops_by_reason: dict[str, list[str]] = {}
        for op, _, why in exc.problems:
            ops = ops_by_reason.setdefault(why, [])
            if op not in ops:
                ops.append(op)
        listed = "; ".join(f"{', '.join(ops)} ({why})" for why, ops in ops_by_reason.items())
        return f"UnsupportedOpError at opset {exc.opset}: {listed}"
    text = _first_line(exc).replace(f"{root}/", "")
    return f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters' tracer warnings and progress prints are noise in a table of 34 exports."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def _batch(n, size, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _torch_batch(n, size):
    import torch

    return torch.from_numpy(_batch(n, size, seed=12345))


# ---------------------------------------------------------------------------------------------
# the four checks

def check_loads(corpus: Corpus, arch, exporter):
    model = corpus.model(arch, exporter)
    assert model.num_classes == 10
    assert model.input_shape == (3, corpus.size(arch), corpus.size(arch))


def check_forward(corpus: Corpus, arch, exporter):
    """Logits of a random batch of 3 against ONNX Runtime on the same file."""
    model, path = corpus.model(arch, exporter), corpus.onnx_path(arch, exporter)
    x = _batch(3, corpus.size(arch), seed=3)
    want = _ort(path).run(None, {"input": x})[0]
    got = model.forward(x)
    assert got.shape == want.shape == (3, 10) and got.dtype == np.float32
    err = _rel_err(got, want)
    assert err <= FORWARD_TOL, f"forward differs from ONNX Runtime by {err:.2e} of the largest logit"


def _matched_parameters(model, torch_model) -> dict:
    """Initializer name -> (torch parameter name, transposed): by name when the values agree, else
    by values, as stored or transposed (the TorchScript exporter writes a Linear on 3-D activations
    as MatMul with the weight's transpose; the dynamo exporter names fused conv biases its own way)."""
    params = {k: p.detach().numpy() for k, p in torch_model.named_parameters()}
    out = {}
    for name, value in model.graph.initializers.items():
        if value.dtype != np.float32 or value.size < 2:
            continue
        candidates = [name] if name in params else params
        for k in candidates:
            q = params[k]
            for transposed, view in ((False, q), (True, q.T if q.ndim == 2 else None)):
                if view is not None and view.shape == value.shape and \
                        np.allclose(view, value, rtol=1e-5, atol=1e-6 * np.abs(q).max()):
                    out[name] = (k, transposed)
                    break
            if name in out:
                break
    return out


# Swin's relative position bias table is read through a Gather with a constant index: the result is
# a constant of the graph, and the table no parameter of it
FOLDED_PARAMETERS = {"swin": ("relative_position_bias_table",)}


def check_gradients(corpus: Corpus, arch, exporter):
    """Input gradient and the gradient of every torch parameter (each one an initializer), against
    torch autograd on a float64 copy. BatchNorm stays unfolded so the initializers are the
    parameters; the dynamo exporter fuses Conv-BatchNorm itself, so its oracle is the fused model."""
    import torch

    model = corpus.model(arch, exporter, fold_batchnorm=False)
    torch_model = corpus.torch_model(arch)
    if exporter == "dynamo":
        torch_model = tm.fuse_batchnorm(torch_model)
    matched = _matched_parameters(model, torch_model)
    weights = {n.inputs[1] for n in model.graph.nodes
               if n.op_type in ("Conv", "Gemm", "MatMul") and n.inputs[1] in model.graph.initializers}
    assert weights <= set(matched), f"weights {sorted(weights - set(matched))} match no torch parameter"
    unmatched = {k for k, _ in torch_model.named_parameters()} - {k for k, _ in matched.values()}
    # a parameter read only through constants becomes a constant (folded by the exporter or at load)
    folded = {k for k in unmatched if k.rsplit(".", 1)[-1] in FOLDED_PARAMETERS.get(arch, ())}
    assert unmatched <= folded, f"torch parameters {sorted(unmatched - folded)} are no initializer"

    size = corpus.size(arch)
    x = _batch(2, size, seed=7)
    r = np.random.default_rng(8).standard_normal((2, 10)).astype(np.float32)
    wrt = [model.input_name, *matched]
    logits, tape = model.forward(x, record=True, wrt=wrt)
    grads = model.backward(tape, r, wrt=wrt)

    oracle = copy.deepcopy(torch_model).double().eval()
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    want_logits = oracle(xt)
    (torch.tensor(r, dtype=torch.float64) * want_logits).sum().backward()
    torch_grads = {k: np.zeros(p.shape) if p.grad is None else p.grad.numpy() for k, p in oracle.named_parameters()}

    assert _rel_err(logits, want_logits.detach().numpy()) <= FORWARD_TOL, "logits"
    failures = []
    err = _rel_err(grads[model.input_name], xt.grad.numpy())
    if err > GRAD_TOL:
        failures.append(f"input: {err:.2e}")
    pairs = {}
    for name, (k, transposed) in matched.items():
        want = torch_grads[k]
        pairs[name] = (k, grads[name], want.T if transposed else want)
    largest = max(np.abs(want).max() for _, _, want in pairs.values())
    for name, (k, got, want) in pairs.items():
        if got is None or got.shape != want.shape:
            failures.append(f"{name}: gradient {None if got is None else got.shape}, expected {want.shape}")
            continue
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), GRAD_FLOOR * largest))
        if err > GRAD_TOL:
            failures.append(f"{name} ({k}): {err:.2e}")
    assert not failures, f"gradients off by more than {GRAD_TOL} of their largest magnitude: {'; '.join(failures)}"


def check_calibrate(corpus: Corpus, arch, exporter):
    """``bwacal calibrate MODEL --calib DATA --bits 4 --epochs 1`` through typer's CliRunner; the
    written model in ONNX Runtime gives the logits of the quantized network the command fitted
    (caught on its way out of ``bwacal.calibrate.calibrate``)."""
    from typer.testing import CliRunner

    from cli.main import app

    path = corpus.onnx_path(arch, exporter)
    calib = corpus.calibration_file(corpus.size(arch))
    out = corpus.root / f"{arch}_{exporter}.w4.onnx"
    out.unlink(missing_ok=True)
    fitted = []
    real = bwacal.calibrate.calibrate

    def spy(*args, **kwargs):
        fitted.append(real(*args, **kwargs))
        return fitted[-1]

    with mock.patch.object(bwacal.calibrate, "calibrate", spy):
        # the default method (AdaRound, then bit weights) on every architecture, at few iterations
        result = CliRunner().invoke(app, ["calibrate", str(path), "--calib", str(calib), "--bits", "4",
                                          "--epochs", "1", "--adaround-iterations", "50", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output.strip() or repr(result.exception)
    x = _batch(8, corpus.size(arch), seed=9)
    got = _ort(out).run(None, {"input": x})[0]
    want = fitted[0].net.forward(x)
    err = _rel_err(got, want)
    assert err <= QUANT_TOL, f"written model in ONNX Runtime differs from bwacal's quantized forward by {err:.2e}"
    full_precision = _ort(path).run(None, {"input": x})[0]
    assert _rel_err(got, full_precision) > 10 * QUANT_TOL, "the written model computes the full-precision logits"


CHECKS = {"loads": check_loads, "forward": check_forward, "grads": check_gradients, "calibrate": check_calibrate}


# ---------------------------------------------------------------------------------------------
# the tests

CASES = [pytest.param(arch, exporter, id=f"{arch}-{exporter}") for arch in cm.BUILDERS for exporter in EXPORTERS]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return Corpus(tmp_path_factory.mktemp("corpus"))


def _run(check, corpus, arch, exporter):
    try:
        corpus.onnx_path(arch, exporter)
    except ExportFailed as exc:
        pytest.skip(str(exc))
    check(corpus, arch, exporter)


@pytest.mark.parametrize("arch,exporter", CASES)
def test_loads(corpus, arch, exporter):
    _run(check_loads, corpus, arch, exporter)


@pytest.mark.parametrize("arch,exporter", CASES)
def test_forward_matches_onnxruntime(corpus, arch, exporter):
    _run(check_forward, corpus, arch, exporter)


@pytest.mark.parametrize("arch,exporter", CASES)
def test_gradients_match_torch_autograd(corpus, arch, exporter):
    _run(check_gradients, corpus, arch, exporter)


@pytest.mark.parametrize("arch,exporter", CASES)
def test_calibrate_writes_a_model_onnxruntime_runs(corpus, arch, exporter):
    _run(check_calibrate, corpus, arch, exporter)


# ---------------------------------------------------------------------------------------------
# the status table: python -m tests.test_corpus [--arch NAME ...] [--exporter NAME]

def status(archs, exporters, out=sys.stdout):
    """Run every check on every case; print arch x exporter -> each check's outcome, then the
    distinct failures, each once with the cases it stopped."""
    notes: dict[str, list[str]] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bwacal-corpus-") as root:
        corpus = Corpus(Path(root))
        for arch in archs:
            for exporter in exporters:
                row, failed = [arch, exporter], False
                started = time.perf_counter()
                try:
                    corpus.onnx_path(arch, exporter)
                except ExportFailed as exc:
                    notes.setdefault(_first_line(exc), []).append(f"{arch}/{exporter}")
                    rows.append(row + [f"no export [{list(notes).index(_first_line(exc)) + 1}]"]
                                + ["-"] * (len(CHECKS) - 1))
                    print(f"{arch}/{exporter}: no export", file=sys.stderr, flush=True)
                    continue
                seconds = [f"export {time.perf_counter() - started:.1f} s"]
                for name, check in CHECKS.items():
                    if failed:
                        row.append("-")  # the other checks need the model to load
                        continue
                    started = time.perf_counter()
                    try:
                        check(corpus, arch, exporter)
                        row.append("ok")
                    except Exception as exc:
                        message = _summary(exc, corpus.root)
                        notes.setdefault(message, []).append(f"{arch}/{exporter} {name}")
                        row.append(f"FAIL [{list(notes).index(message) + 1}]")
                        failed = name == "loads"
                    seconds.append(f"{name} {time.perf_counter() - started:.1f} s")
                rows.append(row)
                print(f"{arch}/{exporter}: {' '.join(row[2:])} ({', '.join(seconds)})", file=sys.stderr, flush=True)
    header = ["architecture", "exporter", *CHECKS]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)), file=out)
    print("-|-".join("-" * w for w in widths), file=out)
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)), file=out)
    passed = sum(all(c == "ok" for c in r[2:]) for r in rows)
    print(f"\n{passed} of {len(rows)} cases pass every check", file=out)
    for i, (message, cases) in enumerate(notes.items(), 1):
        print(f"\n[{i}] {message}\n    in: {', '.join(cases)}", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.test_corpus", description=status.__doc__)
    parser.add_argument("--arch", action="append", choices=list(cm.BUILDERS), help="only these (repeatable)")
    parser.add_argument("--exporter", action="append", choices=EXPORTERS, help="only these (repeatable)")
    args = parser.parse_args(argv)
    status(args.arch or list(cm.BUILDERS), args.exporter or list(EXPORTERS))


if __name__ == "__main__":
    main()
