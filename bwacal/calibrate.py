"""Calibration end to end: load, quantize, fit (bit weights, learned rounding or both), report.

``calibrate(model_path, calib_path, options)`` returns a ``Calibration`` holding the fitted
quantized network and the report; ``bwacal.export.write_quantized`` writes it as ONNX.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from bwacal import __version__
from bwacal.adaround import AdaRoundOptions, adaround
from bwacal.data import open_dataset, peek_image_shape
from bwacal.errors import BwacalError
from bwacal.fit import FitOptions, evaluate_loss, fit_bit_weights, log_softmax
from bwacal.model import Model, check_input_shape, load_model
from bwacal.quant.bwa import bit_scale
from bwacal.quant.output_steps import output_aware_steps
from bwacal.quantize import PROTOCOLS, QuantizedNetwork, collect_activation_samples, quantize_network, select_layers
from bwacal.split import SPLIT_MODES, divergence_note, holdout_split

IN_MEMORY_LIMIT = 512 << 20  # calibration images up to this many bytes are read once and kept
METHODS = ("bwa", "adaround", "bwa-codes", "adaround-bwa")
WEIGHT_METHODS = ("auto", "mse", "minmax", "output")
OUTPUT_STEP_IMAGES = 256  # fitting-split images whose activations the output-aware steps see


@dataclass
class CalibrationOptions:
    """Everything that decides the output; the same options and seed give the same bytes."""

    bits: int = 3
    act_bits: int | None = None
    act_bwa: bool = False
    protocol: str = "first-last-8bit"
    # auto | mse | minmax | output: the uniform grid fitting starts from (output: each channel's step
    # minimises the layer's output error on calibration activations; auto: the lowest held-out loss)
    weight_method: str = "auto"
    act_method: str = "mse"
    epochs: int = 5
    batch_size: int = 64
    # images per recorded forward of a fitting step (gradients summed over the batch's micro-batches);
    # None: the largest that keeps the recording for backward under 768 MiB (bwacal/memory.py)
    micro_batch: int | None = None
    lr: float = 1e-3
    holdout: float = 0.2
    # auto | random | source | blocks: how the held-out part is drawn (bwacal/split.py); auto keeps
    # whole sources on one side when the file names its images' sources, else draws at random
    split: str = "auto"
    # kl: distil the FP model's softmax (needs no labels); ce: cross-entropy with the labels; both.
    # kl is the default because it measured better with labels present too (README, "Defaults").
    loss: str = "kl"
    seed: int = 0
    # (C, H, W) for a model with dynamic image dims; None: the calibration file's image size
    input_shape: tuple | None = None
    # bwa: the paper's bit weights on round-to-nearest codes; adaround: learned rounding, layer by
    # layer (uniform levels); bwa-codes: bit weights and the rounding of the codes fitted together end
    # to end; adaround-bwa: AdaRound's codes, then bit weights end to end on them.
    method: str = "bwa"
    # per layer; AIMET's default is 10,000 (the choice is measured in benchmarks/RESULTS.md,
    # "Learned rounding")
    adaround_iterations: int = 1000
    adaround_images: int = 256  # calibration images (of the fitting split) AdaRound reconstructs on
    # bwa-codes: the forward takes the hard codes, V's gradient the relaxation's (False: the soft
    # relaxation end to end, which measured worse: benchmarks/RESULTS.md, "Learned rounding")
    codes_straight_through: bool = True

    def validate(self):
        """Raise ``BwacalError`` naming the first bad option."""
        if not 2 <= self.bits <= 8:
            raise BwacalError(f"--bits must be between 2 and 8, got {self.bits}")
        if self.act_bits is not None and not 2 <= self.act_bits <= 8:
            raise BwacalError(f"--act-bits must be between 2 and 8, got {self.act_bits}")
        if self.act_bwa and self.act_bits is None:
            raise BwacalError("--act-bwa needs --act-bits")
        if self.protocol not in PROTOCOLS:
            raise BwacalError(f"unknown protocol {self.protocol!r}")
        if self.weight_method not in WEIGHT_METHODS:
            raise BwacalError(f"--weight-method must be one of {', '.join(WEIGHT_METHODS)}, got {self.weight_method!r}")
        if self.split not in SPLIT_MODES:
            raise BwacalError(f"--split must be one of {', '.join(SPLIT_MODES)}, got {self.split!r}")
        if self.act_method not in ("mse", "percentile"):
            raise BwacalError(f"--act-method must be 'mse' or 'percentile', got {self.act_method!r}")
        if self.epochs < 0:
            raise BwacalError(f"--epochs must be 0 or more, got {self.epochs}")
        if self.batch_size < 1:
            raise BwacalError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise BwacalError(f"--micro-batch must be at least 1, got {self.micro_batch}")
        if not self.lr > 0:
            raise BwacalError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.holdout < 1:
            raise BwacalError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.loss not in ("ce", "kl", "both"):
            raise BwacalError(f"--loss must be kl, ce or both, got {self.loss!r}")
        self.input_shape = check_input_shape(self.input_shape)
        if self.method not in METHODS:
            raise BwacalError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.adaround_iterations < 1:
            raise BwacalError(f"--adaround-iterations must be at least 1, got {self.adaround_iterations}")
        if self.adaround_images < 1:
            raise BwacalError(f"--adaround-images must be at least 1, got {self.adaround_images}")


@dataclass
class Calibration:
    """The fitted network, the report, and the uniform min-max baseline (same activation steps)."""

    net: QuantizedNetwork
    report: dict = field(default_factory=dict)
    minmax: QuantizedNetwork | None = None
    mse: QuantizedNetwork | None = None


class _Split:
    """Images of one part of the calibration set, kept in memory or read per batch."""

    def __init__(self, data, indices, in_memory):
        self.data, self.indices = data, np.asarray(indices)
        self.x = self.y = None
        if in_memory and len(self.indices):
            self.x, self.y = data.read(self.indices)

    def __len__(self):
        return len(self.indices)

    def batches(self, batch_size, order=None):
        """(x, y, positions) per batch; ``order`` permutes positions within the split."""
        pos = np.arange(len(self.indices)) if order is None else order
        for start in range(0, len(pos), batch_size):
            p = pos[start:start + batch_size]
            if self.x is not None:
                yield self.x[p], (self.y[p] if self.y is not None else None), p
            else:
                x, y = self.data.read(self.indices[p])
                yield x, y, p


class _Sized:
    """An iterator that knows its length, so fitting can count steps without reading every batch first."""

    def __init__(self, iterator, length):
        self.iterator, self.length = iterator, length

    def __iter__(self):
        return iter(self.iterator)

    def __len__(self):
        return self.length


def _top1(forward, split: _Split, batch_size) -> float | None:
    if split.y is None and not split.data.has_labels:
        return None
    correct = 0
    for x, y, _ in split.batches(batch_size):
        correct += int((forward(x).argmax(axis=1) == y).sum())
    return correct / max(len(split), 1)


def calibrate(model_path, calib_path, options: CalibrationOptions | None = None, eval_path=None,
              progress=None, log=None) -> Calibration:
    """Quantize ``model_path`` and fit its bit weights on ``calib_path``; see ``CalibrationOptions``.

    ``progress(epoch, step, steps, loss, heldout_top1, heldout)`` reports fitting (see
    ``fit_bit_weights``); ``log(message)`` reports
    the stages.
    """
    options = options or CalibrationOptions()
    options.validate()
    say = log or (lambda message: None)
    started = time.perf_counter()
    data_shape = None
    if options.input_shape is None:
        try:
            data_shape = peek_image_shape(calib_path)
        except BwacalError:
            pass  # a model with fixed dims needs none; open_dataset reports the file's problem after the model's
    model = load_model(model_path, input_shape=options.input_shape, data_shape=data_shape)
    data = open_dataset(calib_path, input_shape=model.input_shape, num_classes=model.num_classes, layout=model.layout)
    try:
        return _calibrate(model, data, options, eval_path, progress, say, started, str(model_path))
    finally:
        data.close()


def _calibrate(model: Model, data, options, eval_path, progress, say, started, model_path):
    loss_mode = options.loss
    if loss_mode in ("ce", "both") and not data.has_labels:
        raise BwacalError(f"{data.path}: --loss {loss_mode} needs 'labels', which the file does not have")
    try:
        train_idx, held_idx = holdout_split(data.n, options.holdout if data.n > 1 else 0.0, options.seed,
                                            data.sources, options.split)
    except ValueError as exc:
        raise BwacalError(f"{data.path}: {exc}") from None
    in_memory = data.n * int(np.prod(model.input_shape)) * 4 <= IN_MEMORY_LIMIT
    train, held = _Split(data, train_idx, in_memory), _Split(data, held_idx, in_memory)
    bs = options.batch_size

    say(f"model {model_path}: {model.num_classes} classes, input {model.input_shape}; "
        f"calibration {data.n} images ({len(train)} fit, {len(held)} held out)")
    teacher = {}
    if loss_mode in ("kl", "both"):
        for split_name, split in (("train", train), ("held", held)):
            out = np.zeros((len(split), model.num_classes), np.float64)
            for x, _, p in split.batches(bs):
                out[p] = log_softmax(model.forward(x))
            teacher[split_name] = out

    layers = select_layers(model.graph, options.bits, options.protocol, options.act_bits)
    if not layers:
        raise BwacalError(f"{model_path}: no Conv, Gemm or MatMul layer with constant weights to quantize")
    samples = None
    if options.act_bits is not None:
        names = {layer.data_input for layer in layers}
        limit = min(len(train), 256)
        samples = collect_activation_samples(model, names, (x for x, _, _ in train.batches(bs, np.arange(limit))),
                                             seed=options.seed)
    starts = ("mse", "minmax") + (("output",) if options.weight_method in ("auto", "output") else ())
    steps = None
    if "output" in starts:
        limit = min(len(train), OUTPUT_STEP_IMAGES)
        images = np.concatenate([x for x, _, _ in train.batches(bs, np.arange(limit))])
        t0 = time.perf_counter()
        steps = output_aware_steps(model, layers, images, bs, options.seed)
        say(f"output-aware steps from {limit} images: {time.perf_counter() - t0:.1f} s")
    baselines = {method: quantize_network(model, layers, method, samples, options.act_method, options.act_bwa,
                                          steps=steps)
                 for method in starts}

    def batches_of(split, name, order=None):
        for x, y, p in split.batches(bs, order):
            yield x, y, (teacher[name][p] if teacher else None)

    start = options.weight_method
    if start == "auto":
        # the uniform grid with the lower loss (held-out split, else the fitting split) is the start:
        # per-channel weight MSE is not the task loss, and at 2-3 bits it can clip far too hard
        split, name = (held, "held") if len(held) else (train, "train")
        losses = {m: evaluate_loss(baselines[m], baselines[m].params(), batches_of(split, name), loss_mode)[0]
                  for m in starts}
        start = min(losses, key=losses.get)
        say(f"start: uniform {start} (loss " + ", ".join(f"{losses[m]:.4f} with {m} steps" for m in starts) + ")")
    net = quantize_network(model, layers, start, samples, options.act_method, options.act_bwa, steps=steps)
    minmax, mse = baselines["minmax"], baselines["mse"]

    eval_data = None
    if eval_path is not None:
        eval_data = open_dataset(eval_path, input_shape=model.input_shape, num_classes=model.num_classes,
                                 layout=model.layout)
    try:
        evaluation = _Split(eval_data, np.arange(eval_data.n), False) if eval_data is not None else held

        def accuracy(forward, batch_size=bs):
            return _top1(forward, evaluation, batch_size) if len(evaluation) else None

        acc = {"fp": accuracy(model.forward)}
        uniform = [("uniform_minmax", minmax), ("uniform_mse", mse)]
        if "output" in baselines:
            uniform.append(("uniform_output", baselines["output"]))
        for key, base in uniform:
            params = base.params()  # composed once, not per batch
            acc[key] = accuracy(lambda x, base=base, params=params: base.forward(x, params))
        say(_acc_line("before fitting", acc))

        fit_opts = FitOptions(options.epochs, bs, options.lr, loss_mode, options.seed, micro_batch=options.micro_batch)
        epoch_rng = np.random.default_rng(options.seed + 1)

        def train_batches(epoch):
            order = epoch_rng.permutation(len(train))
            return _Sized(batches_of(train, "train", order), -(-len(train) // bs))

        fit_started = time.perf_counter()
        rounding = None
        if options.method in ("adaround", "adaround-bwa"):
            limit = min(len(train), options.adaround_images)
            images = np.concatenate([x for x, _, _ in train.batches(bs, np.arange(limit))])
            say(f"AdaRound: {len(net.weights)} layers, {options.adaround_iterations} iterations each, "
                f"{len(images)} images")
            rounding = adaround(net, images, AdaRoundOptions(iterations=options.adaround_iterations,
                                                             seed=options.seed),
                                lambda i, n, s: say(f"AdaRound {i + 1}/{n} {s['node']}: reconstruction "
                                                    f"{s['loss_nearest']:.4g} -> {s['loss']:.4g}, "
                                                    f"{s['codes_moved']} codes moved, {s['seconds']:.1f} s"))
        if options.method == "adaround":
            for qw in net.weights:
                qw.train_bit_weights = False  # AdaRound's levels stay uniform
            fit_opts.epochs = 0
        if options.method == "bwa-codes":
            for qw in net.weights:
                qw.start_rounding(model.graph.initializers[qw.name], straight_through=options.codes_straight_through)
        if len(held) == 0:
            say("no held-out split (--holdout 0): the last epoch is kept")
        fit = fit_bit_weights(net, train_batches, lambda: batches_of(held, "held"), fit_opts, progress,
                              keep_best=len(held) > 0)
        fit_seconds = time.perf_counter() - fit_started
        params = net.params()
        # in the fit's micro-batches, which the heap holds blocks for (see fit_bit_weights)
        acc[options.method] = accuracy(lambda x: net.forward(x, params), fit.micro_batch or bs)
        say(_acc_line(f"after fitting (best epoch {fit.best_epoch})", acc))
        divergence = divergence_note(fit.history) if len(held) else None
        if divergence:
            say(divergence)
    finally:
        if eval_data is not None:
            eval_data.close()

    report = {
        "bwacal_version": __version__,
        "model": model_path,
        "calib": str(data.path),
        "calib_sha256": data.sha256(),
        "calib_images": data.n,
        "fit_images": len(train),
        "heldout_images": len(held),
        "eval": str(eval_path) if eval_path is not None else "heldout",
        "eval_images": len(evaluation),
        "options": asdict(options),
        "loss": loss_mode,
        "method": options.method,
        "start": start,
        "accuracy": acc,
        "best_epoch": fit.best_epoch,
        "history": fit.history,
        "layers": [_layer_report(qw, layer) for qw, layer in zip(net.weights, net.layers)],
        "activations": [{"value": a.value, "bits": a.bits, "signed": a.signed, "step": float(a.step),
                         "alpha": (a.alpha.tolist() if a.alpha is not None else None)}
                        for a in net.acts],
        "adaround": rounding,
        "split": options.split,
        "micro_batch": fit.micro_batch,
        "divergence": divergence,
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - started,
    }
    return Calibration(net, report, minmax, mse)


def _acc_line(what, acc):
    parts = [f"{k} {100 * v:.2f}%" for k, v in acc.items() if v is not None]
    return f"top-1 {what}: " + (", ".join(parts) if parts else "n/a (no labels)")


def _layer_report(qw, layer) -> dict:
    """Bits, channels, the learned bit weights and how far the levels moved from the uniform grid."""
    levels = qw.levels().astype(np.float64) / qw.step.astype(np.float64)[:, None]
    gaps = np.diff(np.sort(levels, axis=1), axis=1)
    rel = qw.alpha / bit_scale(qw.bits)
    return {
        "layer": layer.node, "op_type": layer.op_type, "weight": layer.weight, "bits": layer.bits,
        "act_bits": layer.act_bits, "channels": qw.channels,
        "alpha_rel_min": float(rel.min()), "alpha_rel_max": float(rel.max()),
        "level_gap_min": float(gaps.min()) if gaps.size else None,
        "level_gap_max": float(gaps.max()) if gaps.size else None,
        "alpha": np.round(qw.alpha, 6).tolist(), "gamma": np.round(qw.gamma, 6).tolist(),
        "step": qw.step.tolist(),
    }
