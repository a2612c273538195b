"""Accuracy of a classifier on a calibration/evaluation file: top-1, top-5, per class, agreement.

``evaluate`` takes any callable ``x -> logits`` (``Model.forward``, ``onnxruntime_forward(path)``, a
quantized model's forward), so the same numbers come out of ``bwacal evaluate``, ``bwacal check``
and calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bwacal.errors import BwacalError, DataError, ModelError, UnsupportedOpError

RUNTIMES = ("bwacal", "onnxruntime")


@dataclass
class EvalResult:
    """What ``evaluate`` measured. Accuracies are fractions in [0, 1].

    ``top1``/``per_class``/``class_counts``/``correct`` need labels; ``top5`` needs labels and more
    than 5 classes; ``agreement`` (share of images where the top-1 prediction equals the
    reference's) and ``reference_top1`` need a reference. ``per_class[k]`` is None for a class with
    no images.
    """

    n: int
    top1: float | None = None
    top5: float | None = None
    per_class: list | None = None
    class_counts: list | None = None
    correct: int | None = None
    agreement: float | None = None
    reference_top1: float | None = None
    reference_correct: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(fn, x, what) -> np.ndarray:
    out = np.asarray(fn(x))
    if out.ndim != 2 or out.shape[0] != len(x):
        raise ModelError(f"{what} returned shape {out.shape} for a batch of {len(x)}; expected (batch, classes)")
    return out


def evaluate(forward: Callable, data, batch_size: int = 256, reference: Callable | None = None,
             progress: Callable | None = None) -> EvalResult:
    """Run ``forward`` over every image of ``data`` (a ``CalibrationData``) and score it.

    ``reference`` (e.g. the full-precision model's forward) adds top-1 agreement and the
    reference's own top-1. ``progress(done, total)`` is called after each batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise BwacalError(f"batch size must be a positive integer, got {batch_size!r}")
    n = correct = correct5 = agree = ref_correct = 0
    totals = hits = None
    num_classes = None
    has_labels = False
    for x, y in data.batches(int(batch_size)):
        logits = _logits(forward, x, "the model")
        if num_classes is None:
            num_classes = logits.shape[1]
        elif logits.shape[1] != num_classes:
            raise ModelError(f"the model returned {logits.shape[1]} classes, earlier {num_classes}")
        pred = logits.argmax(axis=1)
        if y is not None:
            has_labels = True
            y = np.asarray(y, dtype=np.int64)
            if y.size and (y.min() < 0 or y.max() >= num_classes):
                raise DataError(f"{getattr(data, 'path', 'data')}: label {int(y.max())} is out of range for a "
                                f"model with {num_classes} classes")
            if totals is None:
                totals = np.zeros(num_classes, np.int64)
                hits = np.zeros(num_classes, np.int64)
            ok = pred == y
            correct += int(ok.sum())
            totals += np.bincount(y, minlength=num_classes)
            hits += np.bincount(y[ok], minlength=num_classes)
            if num_classes > 5:
                top = np.argpartition(-logits, 4, axis=1)[:, :5]
                correct5 += int((top == y[:, None]).any(axis=1).sum())
        if reference is not None:
            ref = _logits(reference, x, "the reference model")
            if ref.shape[1] != num_classes:
                raise ModelError(f"the reference model has {ref.shape[1]} classes but the model has {num_classes}")
            ref_pred = ref.argmax(axis=1)
            agree += int((ref_pred == pred).sum())
            if y is not None:
                ref_correct += int((ref_pred == y).sum())
        n += len(x)
        if progress is not None:
            progress(n, data.n)
    if n == 0:
        raise DataError(f"{getattr(data, 'path', 'data')}: no images to evaluate")
    result = EvalResult(n=n)
    if has_labels:
        result.top1 = correct / n
        result.correct = correct
        result.top5 = correct5 / n if num_classes > 5 else None
        result.class_counts = totals.tolist()
        result.per_class = [int(h) / int(t) if t else None for h, t in zip(hits, totals)]
    if reference is not None:
        result.agreement = agree / n
        if has_labels:
            result.reference_top1 = ref_correct / n
            result.reference_correct = ref_correct
    return result


def measure_latency(forward: Callable, images: np.ndarray, batch_sizes=(1, 32), runs: int = 20,
                    clock=None) -> list[dict]:
    """Median wall time of ``forward`` on a batch of each size (images taken from ``images``, repeated
    when there are fewer): one untimed warm-up call per size, then ``runs`` timed calls.

    Returns ``[{"batch", "median_ms", "min_ms", "runs"}]`` in the order of ``batch_sizes``."""
    import time

    if isinstance(runs, bool) or not isinstance(runs, (int, np.integer)) or runs < 1:
        raise BwacalError(f"latency runs must be a positive integer, got {runs!r}")
    if len(images) == 0:
        raise DataError("no images to time the model on")
    clock = clock or time.perf_counter
    out = []
    for batch in batch_sizes:
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise BwacalError(f"latency batch sizes must be positive integers, got {batch!r}")
        x = np.ascontiguousarray(np.resize(images, (batch,) + images.shape[1:]), dtype=np.float32)
        forward(x)
        times = []
        for _ in range(runs):
            t0 = clock()
            forward(x)
            times.append(clock() - t0)
        out.append({"batch": int(batch), "median_ms": 1e3 * float(np.median(times)),
                    "min_ms": 1e3 * float(np.min(times)), "runs": int(runs)})
    return out


class OnnxRuntimeForward:
    """``x -> logits`` on ONNX Runtime (CPU); ``input_shape``, ``layout`` and ``num_classes`` as on ``Model``
    (dynamic image dims fixed by ``input_shape`` (C, H, W) or ``data_shape`` as in ``load_model``, logits
    of shape (batch, K, 1, 1) or (batch, 1, K) squeezed to (batch, K))."""

    def __init__(self, path, input_shape=None, data_shape=None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BwacalError("the onnxruntime runtime needs the onnxruntime package: pip install onnxruntime") from None
        from bwacal.model import detect_layout, image_dims
        from bwacal.onnx_io import read_model

        self.path = Path(path)
        graph = read_model(self.path)  # bwacal's checks on untrusted files (sizes, external data) come first
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"{self.path}: onnxruntime cannot load the model ({_first_line(exc)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{self.path}: expected one image input and one logits output, found "
                             f"{len(inputs)} inputs and {len(outputs)} outputs")
        shape = inputs[0].shape
        if len(shape) != 4 or len(graph.inputs) != 1:
            raise ModelError(f"{self.path}: input '{inputs[0].name}' has shape {shape}; expected (batch, C, H, W) "
                             "or (batch, H, W, C)")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.layout = detect_layout(graph)
        self.input_shape = image_dims(graph.inputs[0], self.layout, input_shape, data_shape, str(self.path))
        self.num_classes = None
        logits = self(np.zeros((2,) + self.input_shape, np.float32))
        out = logits.shape
        if not (len(out) == 2 or (len(out) == 4 and out[2:] == (1, 1)) or (len(out) == 3 and out[1] == 1)) \
                or out[0] != 2:
            raise ModelError(f"{self.path}: output '{self.output_name}' has shape {out} for a batch of 2; "
                             "expected (batch, classes) logits, or (batch, classes, 1, 1) or (batch, 1, classes)")
        self.num_classes = int(np.prod(out[1:]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self.fixed_batch or len(x)
        try:
            parts = [self.session.run([self.output_name], {self.input_name: x[i:i + step]})[0]
                     for i in range(0, len(x), step)]
        except Exception as exc:
            raise ModelError(f"{self.path}: onnxruntime failed to run the model ({_first_line(exc)})") from None
        logits = np.concatenate(parts) if len(parts) != 1 else parts[0]
        return logits if self.num_classes is None else logits.reshape(len(logits), self.num_classes)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self(x)


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _with_path(path, message: str) -> str:
    return message if message.startswith(str(path)) else f"{path}: {message}"


def onnxruntime_forward(path, input_shape=None, data_shape=None, threads: int | None = None) -> OnnxRuntimeForward:
    """A callable ``x -> logits`` running ``path`` on ONNX Runtime (``threads``: its intra-op threads,
    default its own choice); BwacalError if it is not installed."""
    return OnnxRuntimeForward(path, input_shape, data_shape, threads)


def load_forward(path, runtime: str = "bwacal", input_shape=None, data_shape=None, threads: int | None = None):
    """``path`` loaded on ``runtime`` ("bwacal": a ``Model``, or "onnxruntime"): an object with ``forward``,
    ``input_shape``, ``layout`` and ``num_classes``. ``input_shape``/``data_shape`` as in ``load_model``;
    ``threads`` sets ONNX Runtime's intra-op threads (bwacal's engine takes numba's setting)."""
    if runtime == "bwacal":
        from bwacal.model import load_model

        try:
            model = load_model(path, input_shape=input_shape, data_shape=data_shape)
        except UnsupportedOpError as exc:
            hint = " (ONNX Runtime may run it: --runtime onnxruntime)"
            raise ModelError(_with_path(path, str(exc)) + hint) from None
        except ModelError as exc:
            raise ModelError(_with_path(path, str(exc))) from None
        return model
    if runtime == "onnxruntime":
        return onnxruntime_forward(path, input_shape, data_shape, threads)
    raise BwacalError(f"unknown runtime '{runtime}', expected one of: {', '.join(RUNTIMES)}")
