"""Calibration end to end: load, quantize, fit (bit weights, learned rounding or both), report.

``calibrate(model_path, calib_path, options)`` returns a ``Calibration`` holding the fitted
quantized network and the report; ``bwacal.export.write_quantized`` writes it as ONNX.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from bwacal import __version__
from bwacal.adaround import AdaRoundOptions, adaround
from bwacal.data import data_image_shape, open_dataset
from bwacal.errors import BwacalError
from bwacal.export import weight_bytes
from bwacal.files import file_sha256
from bwacal.layer_rules import apply_layer_rules, check_bits, parse_layer_bits
from bwacal.mixed import (SENSITIVITY_IMAGES, WIDTHS, allocate_layers, allocation_report, allocation_rules,
                          average_bits, fisher_sensitivity, layers_to_raise, model_size_bytes, pinned_layers)
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
# a calibration file larger than this gets a note that --num-images takes a subset (the README's
# figures calibrate on 1,024 images; an epoch goes over every image of the file)
LARGE_CALIBRATION = 20_000


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
    # to end; adaround-bwa (the default: the most accurate at every width measured, benchmarks/
    # RESULTS.md "Peers"): AdaRound's codes, then bit weights end to end on them.
    method: str = "adaround-bwa"
    # per layer (AIMET's default is 10,000): at W2 on the zoo 4,000 scored as 10,000 (ResNet-20
    # 92.09 / 92.09, MobileNetV2 89.47 / 89.55, VGG-small 91.67 / 91.26) in 2.5x less AdaRound time
    # (benchmarks/RESULTS.md, "AdaRound's iterations"); with the exact full-set gradient
    # (bwacal/adaround.py) an iteration of a 32x32 classifier's layer costs well under a millisecond
    adaround_iterations: int = 4000
    adaround_images: int = 1024  # calibration images (of the fitting split) AdaRound reconstructs on
    # bwa-codes: the forward takes the hard codes, V's gradient the relaxation's (False: the soft
    # relaxation end to end, which measured worse: benchmarks/RESULTS.md, "Learned rounding")
    codes_straight_through: bool = True
    # a seeded random subset of this many calibration images (None: every image of the file)
    num_images: int | None = None
    # per-layer control (bwacal/layer_rules.py): glob patterns of layers kept in float, and
    # (pattern, bits) width rules applied in order over the protocol's widths
    exclude: tuple = ()
    layer_bits: tuple = ()
    # mixed precision (bwacal/mixed.py): widths from {2, 3, 4, 8} chosen per layer for an average of
    # avg_bits over the quantized weights or a size_budget in MB; max_drop: raise the most sensitive
    # layers from the requested widths until top-1 drops at most this many points
    avg_bits: float | None = None
    size_budget: float | None = None
    max_drop: float | None = None

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
        if self.num_images is not None and self.num_images < 1:
            raise BwacalError(f"--num-images must be at least 1, got {self.num_images}")
        self.exclude, self.layer_bits = _layer_rules(self.exclude, self.layer_bits)
        given = [f for f, v in (("--avg-bits", self.avg_bits), ("--size-budget", self.size_budget),
                                ("--max-drop", self.max_drop)) if v is not None]
        if len(given) > 1:
            raise BwacalError(f"give one of {', '.join(given)}, not both")
        if self.avg_bits is not None and not 2 <= self.avg_bits <= 8:
            raise BwacalError(f"--avg-bits must be between 2 and 8, got {self.avg_bits:g}")
        if self.size_budget is not None and not self.size_budget > 0:
            raise BwacalError(f"--size-budget must be positive (MB), got {self.size_budget:g}")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise BwacalError(f"--max-drop must be 0 or more (top-1 points), got {self.max_drop:g}")


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


def _scores(forward, split: _Split, batch_size, fp_logp=None) -> dict:
    """Top-1 (None without labels) and, given the full-precision log-softmax per image of ``split``,
    top-1 agreement with full precision and the mean KL(FP || network), in one pass."""
    labelled = split.y is not None or split.data.has_labels
    correct = agree = 0
    kl = 0.0
    for x, y, p in split.batches(batch_size):
        logits = forward(x)
        if labelled:
            correct += int((logits.argmax(axis=1) == y).sum())
        if fp_logp is not None:
            ref = fp_logp[p]
            agree += int((logits.argmax(axis=1) == ref.argmax(axis=1)).sum())
            kl += float((np.exp(ref) * (ref - log_softmax(logits))).sum())
    n = max(len(split), 1)
    return {"top1": correct / n if labelled else None,
            "agreement": agree / n if fp_logp is not None else None,
            "kl": kl / n if fp_logp is not None else None}


def _layer_rules(exclude, layer_bits) -> tuple[tuple, tuple]:
    """The rules as tuples (a manifest or config gives lists, or a {pattern: bits} table)."""
    if isinstance(exclude, str) or not all(isinstance(p, str) and p for p in exclude):
        raise BwacalError(f"exclude must be a list of layer-name patterns, got {exclude!r}")
    if isinstance(layer_bits, dict):
        layer_bits = list(layer_bits.items())
    rules = []
    for rule in layer_bits:
        if isinstance(rule, str):
            rule = parse_layer_bits(rule)
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str) and rule[0]):
            raise BwacalError(f"layer_bits must map layer-name patterns to bits, got {rule!r}")
        rules.append((rule[0], check_bits(rule[1], f"layer bits for {rule[0]!r}")))
    return tuple(exclude), tuple(rules)


def plan_layers(graph, options: CalibrationOptions):
    """``(layers, excluded)``: the layers calibration quantizes with their widths (the protocol's,
    then the per-layer rules), and those the rules keep in float."""
    layers = select_layers(graph, options.bits, options.protocol, options.act_bits)
    return apply_layer_rules(layers, options.exclude, options.layer_bits)


def load_for_data(model_path, data_path, input_shape=None) -> Model:
    """The model, its dynamic image dims fixed by ``input_shape`` or else by the images of the data
    file (``data.data_image_shape``)."""
    return load_model(model_path, input_shape=input_shape, data_shape=data_image_shape(data_path, input_shape))


def plan(model_path, calib_path, options: CalibrationOptions, fmt: str = "fake") -> dict:
    """What ``calibrate`` would do, without doing it: the layers and their widths, those kept in float,
    the images and fitting steps, the written file's size (estimated: quantized weights as
    ``bwacal.export.weight_bytes`` counts them; metadata not counted), and the
    measured time of one full-precision forward pass of a batch."""
    options.validate()
    model = load_for_data(model_path, calib_path, options.input_shape)
    layers, excluded = plan_layers(model.graph, options)
    allocation = None
    with open_dataset(calib_path, input_shape=model.input_shape, num_classes=model.num_classes,
                      layout=model.layout) as data:
        pool, train, held = _split_pool(data, options)
        x, _ = data.read(pool[:min(len(pool), options.batch_size)])
        if layers and (options.avg_bits is not None or options.size_budget is not None):
            # the widths calibration would choose: the allocation runs on the same images
            layers, allocation = _allocate(model, layers, _Split(data, pool[train], False), options, lambda m: None)
    inits = model.graph.initializers
    size = sum(int(a.size) * 4 for a in inits.values())
    rows = []
    for layer in layers:
        w = inits[layer.weight]
        channels = w.shape[layer.axis]
        size += weight_bytes(int(w.size), channels, layer.bits, fmt) - 4 * int(w.size)
        rows.append({"layer": layer.node, "op": layer.op_type, "weight": layer.weight, "shape": list(w.shape),
                     "params": int(w.size), "bits": layer.bits, "act_bits": layer.act_bits})
    model.forward(x[:1])  # the first call compiles; the timed one after it does not
    t0 = time.perf_counter()
    model.forward(x)
    forward = time.perf_counter() - t0
    steps = -(-len(train) // options.batch_size)
    return {"model": str(model_path), "calib": str(calib_path), "layers": rows,
            "excluded": [layer.node for layer in excluded], "images": len(pool), "fit_images": len(train),
            "heldout_images": len(held), "epochs": options.epochs, "steps_per_epoch": steps,
            "format": fmt, "estimated_size_bytes": size, "batch": len(x), "forward_seconds": forward,
            "allocation": allocation}


def calibrate(model_path, calib_path, options: CalibrationOptions | None = None, eval_path=None,
              progress=None, log=None, stage=None) -> Calibration:
    """Quantize ``model_path`` and fit its bit weights on ``calib_path``; see ``CalibrationOptions``.

    ``progress(epoch, step, steps, loss, heldout_top1, heldout)`` reports fitting (see
    ``fit_bit_weights``; ``loss`` is None at an epoch's end when nothing is held out);
    ``log(message)`` reports what was found and chosen; ``stage(name, done, total)`` names the phase
    under way (``total`` None when its size is not known).
    """
    options = options or CalibrationOptions()
    options.validate()
    say = log or (lambda message: None)
    stage = stage or (lambda name, done=0, total=None: None)
    started = time.perf_counter()
    stage("loading the model and the data")
    model = load_for_data(model_path, calib_path, options.input_shape)
    data = open_dataset(calib_path, input_shape=model.input_shape, num_classes=model.num_classes, layout=model.layout)
    try:
        if options.max_drop is not None:
            return _accuracy_controlled(model, data, options, eval_path, progress, say, stage, started,
                                        str(model_path))
        return _calibrate(model, data, options, eval_path, progress, say, stage, started, str(model_path))
    finally:
        data.close()


def calibration_subset(n: int, num_images: int | None, seed: int, path="the calibration file") -> np.ndarray:
    """Sorted indices of the images calibration uses: every one, or a seeded random ``num_images``."""
    if num_images is None or num_images == n:
        return np.arange(n)
    if num_images > n:
        raise BwacalError(f"{path}: --num-images {num_images} but the file holds {n} images")
    # a generator of its own, so the subset does not shift the split's or the shuffle's draws
    return np.sort(np.random.default_rng([seed, 0x5EB]).choice(n, num_images, replace=False))


def _split_pool(data, options):
    """The images calibration uses (``--num-images``) and the positions in them of the fitting and
    the held-out part."""
    pool = calibration_subset(data.n, options.num_images, options.seed, data.path)
    sources = data.sources[pool] if data.sources is not None else None
    try:
        train, held = holdout_split(len(pool), options.holdout if len(pool) > 1 else 0.0, options.seed,
                                    sources, options.split)
    except ValueError as exc:
        raise BwacalError(f"{data.path}: {exc}") from None
    return pool, train, held


def _calibrate(model: Model, data, options, eval_path, progress, say, stage, started, model_path):
    loss_mode = options.loss
    if loss_mode in ("ce", "both") and not data.has_labels:
        raise BwacalError(f"{data.path}: --loss {loss_mode} needs 'labels', which the file does not have")
    pool, train_pos, held_pos = _split_pool(data, options)
    in_memory = len(pool) * int(np.prod(model.input_shape)) * 4 <= IN_MEMORY_LIMIT
    train, held = _Split(data, pool[train_pos], in_memory), _Split(data, pool[held_pos], in_memory)
    bs = options.batch_size

    used = f"{len(pool)} of its {data.n} images" if len(pool) < data.n else f"{data.n} images"
    say(f"model {model_path}: {model.num_classes} classes, input {model.input_shape}; "
        f"calibration {used} ({len(train)} fit, {len(held)} held out)")
    if options.num_images is None and data.n > LARGE_CALIBRATION:
        say(f"note: {data.path} holds {data.n} images and every epoch goes over all of them; "
            "--num-images N calibrates on a seeded subset (the README's figures use 1,024)")
    if len(held) == 0:
        if options.holdout == 0:
            say("no held-out split (--holdout 0): the last epoch is kept")
        else:
            few = "1 image is" if len(pool) == 1 else f"{len(pool)} images are"
            say(f"no held-out split: {few} too few for --holdout {options.holdout:g}; the last epoch is kept")
    teacher = {}
    if loss_mode in ("kl", "both"):
        done = 0
        for split_name, split in (("train", train), ("held", held)):
            out = np.zeros((len(split), model.num_classes), np.float64)
            for x, _, p in split.batches(bs):
                stage("full-precision outputs", done, len(pool))
                out[p] = log_softmax(model.forward(x))
                done += len(x)
            teacher[split_name] = out

    layers, excluded = plan_layers(model.graph, options)
    if excluded:
        say(f"kept in float (--exclude): {', '.join(layer.node for layer in excluded)}")
    if not layers:
        what = "every layer is excluded" if excluded else "no Conv, Gemm or MatMul layer with constant weights"
        raise BwacalError(f"{model_path}: nothing to quantize ({what})")
    allocation = None
    if options.avg_bits is not None or options.size_budget is not None:
        stage("choosing the widths")
        layers, allocation = _allocate(model, layers, train, options, say)
    samples = None
    if options.act_bits is not None:
        stage("activation statistics")
        names = {layer.data_input for layer in layers}
        limit = min(len(train), 256)
        samples = collect_activation_samples(model, names, (x for x, _, _ in train.batches(bs, np.arange(limit))),
                                             seed=options.seed)
    starts = ("mse", "minmax") + (("output",) if options.weight_method in ("auto", "output") else ())
    steps = None
    if "output" in starts:
        stage("output-aware steps")
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
        stage("choosing the start grid")
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
        if eval_data is None and "held" in teacher:
            fp_logp = teacher["held"]
        else:
            stage("evaluating full precision", 0, len(evaluation))
            fp_logp = np.zeros((len(evaluation), model.num_classes), np.float32)
            for x, _, p in evaluation.batches(bs):
                fp_logp[p] = log_softmax(model.forward(x))
        acc, agreement, kl = {}, {}, {}

        def score(key, forward, batch_size=bs):
            if not len(evaluation):
                acc[key] = agreement[key] = kl[key] = None
                return
            scores = _scores(forward, evaluation, batch_size, None if key == "fp" else fp_logp)
            acc[key] = scores["top1"]
            if key != "fp":
                agreement[key], kl[key] = scores["agreement"], scores["kl"]

        stage("evaluating the uniform grids")
        score("fp", model.forward)
        uniform = [("uniform_minmax", minmax), ("uniform_mse", mse)]
        if "output" in baselines:
            uniform.append(("uniform_output", baselines["output"]))
        for key, base in uniform:
            params = base.params()  # composed once, not per batch
            score(key, lambda x, base=base, params=params: base.forward(x, params))
        say(_acc_line("before fitting", acc, agreement, len(evaluation)))

        fit_opts = FitOptions(options.epochs, bs, options.lr, loss_mode, options.seed, micro_batch=options.micro_batch)
        epoch_rng = np.random.default_rng(options.seed + 1)

        def train_batches(epoch):
            order = epoch_rng.permutation(len(train))
            return _Sized(batches_of(train, "train", order), -(-len(train) // bs))

        fit_started = time.perf_counter()
        rounding = None
        if options.method in ("adaround", "adaround-bwa"):
            stage("AdaRound")
            limit = min(len(train), options.adaround_images)
            images = np.concatenate([x for x, _, _ in train.batches(bs, np.arange(limit))])
            say(f"AdaRound: {len(net.weights)} layers, {options.adaround_iterations} iterations each (fewer on "
                f"layers where they would cost over {AdaRoundOptions.layer_budget:.0e} multiply-adds), "
                f"{len(images)} images")
            rounding = adaround(net, images, AdaRoundOptions(iterations=options.adaround_iterations,
                                                             seed=options.seed),
                                lambda i, n, s: say(f"AdaRound {i + 1}/{n} {s['node']} ({s['iterations']} "
                                                    f"iterations, {s['solver']}): reconstruction "
                                                    f"{s['loss_nearest']:.4g} -> {s['loss']:.4g}, "
                                                    f"{s['codes_moved']} codes moved, {s['seconds']:.1f} s"))
            del images  # 616 MB for 1,024 images at 224x224: not kept through the fit
        if options.method == "adaround":
            for qw in net.weights:
                qw.train_bit_weights = False  # AdaRound's levels stay uniform
            fit_opts.epochs = 0
        if options.method == "bwa-codes":
            for qw in net.weights:
                qw.start_rounding(model.graph.initializers[qw.name], straight_through=options.codes_straight_through)
        stage("fitting")

        def fit_progress(epoch, step, steps, loss, top1, heldout):
            if progress is not None:
                progress(epoch, step, steps, None if heldout and not len(held) else loss, top1, heldout)

        fit = fit_bit_weights(net, train_batches, lambda: batches_of(held, "held"), fit_opts, fit_progress,
                              keep_best=len(held) > 0)
        fit_seconds = time.perf_counter() - fit_started
        stage("evaluating")
        params = net.params()
        # in the fit's micro-batches, which the heap holds blocks for (see fit_bit_weights)
        score(options.method, lambda x: net.forward(x, params), fit.micro_batch or bs)
        divergence = divergence_note(fit.history) if len(held) else None
        if divergence:
            say(divergence)
    finally:
        if eval_data is not None:
            eval_data.close()

    report = {
        "bwacal_version": __version__,
        "model": model_path,
        "model_sha256": file_sha256(model_path),
        "calib": str(data.path),
        "calib_sha256": data.sha256(),
        "calib_images": data.n,
        "used_images": len(pool),
        "fit_images": len(train),
        "heldout_images": len(held),
        "eval": str(eval_path) if eval_path is not None else "heldout",
        "eval_images": len(evaluation),
        "options": asdict(options),
        "loss": loss_mode,
        "method": options.method,
        "start": start,
        "accuracy": acc,
        "agreement": agreement,
        "kl": kl,
        "best_epoch": fit.best_epoch,
        "history": fit.history,
        "layers": [_layer_report(qw, layer) for qw, layer in zip(net.weights, net.layers)],
        "excluded": [layer.node for layer in excluded],
        "activations": [{"value": a.value, "bits": a.bits, "signed": a.signed, "step": float(a.step),
                         "alpha": (a.alpha.tolist() if a.alpha is not None else None)}
                        for a in net.acts],
        "adaround": rounding,
        "avg_weight_bits": average_bits({layer.node: int(model.graph.initializers[layer.weight].size) for layer in layers},
                                        {layer.node: layer.bits for layer in layers}),
        "quantized_size_bytes": model_size_bytes(model.graph, layers),
        "allocation": allocation,
        "split": options.split,
        "micro_batch": fit.micro_batch,
        "divergence": divergence,
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - started,
    }
    return Calibration(net, report, minmax, mse)


def _sensitivity_images(train: _Split, batch_size: int) -> np.ndarray:
    """The first ``SENSITIVITY_IMAGES`` images of the fitting split."""
    limit = min(len(train), SENSITIVITY_IMAGES)
    return np.concatenate([x for x, _, _ in train.batches(batch_size, np.arange(limit))])


def _allocate(model, layers, train, options, say):
    """The layers with the widths ``--avg-bits`` or ``--size-budget`` chooses, and the report's record."""
    t0 = time.perf_counter()
    images = _sensitivity_images(train, options.batch_size)
    chosen, alloc, sens = allocate_layers(model, layers, images, options.avg_bits, options.size_budget,
                                          options.protocol, options.layer_bits, options.seed)
    record = allocation_report(alloc, sens, chosen, options.avg_bits, options.size_budget)
    record["seconds"] = time.perf_counter() - t0
    counts = {}
    for layer in chosen:
        counts[layer.bits] = counts.get(layer.bits, 0) + 1
    how = "optimal" if alloc.exact else f"within {alloc.gap:.3g} of the optimum"
    say(f"widths: average {record['avg_bits']:.3f} bits ("
        + ", ".join(f"{n} layers at {b}" for b, n in sorted(counts.items()))
        + f"), estimated loss {alloc.estimated_loss:.4g} ({how}); Fisher sensitivities of {sens.images} images "
        f"{sens.fisher_seconds:.1f} s, allocation {alloc.seconds:.2f} s")
    return chosen, record


def _accuracy_controlled(model: Model, data, options, eval_path, progress, say, stage, started, model_path):
    """``--max-drop``: calibrate at the requested widths, then, while top-1 on the evaluation data drops
    more than ``max_drop`` points below full precision, raise the most sensitive layers
    (``bwacal.mixed.layers_to_raise``) and calibrate again. The last calibration's report holds every
    step under ``accuracy_control`` (``met`` False when even the widest widths drop too much)."""
    labelled = data.has_labels
    if eval_path is not None:
        with open_dataset(eval_path, input_shape=model.input_shape, num_classes=model.num_classes,
                          layout=model.layout) as ev:
            labelled = ev.has_labels
    if not labelled:
        where = eval_path if eval_path is not None else f"{data.path} (its held-out split)"
        raise BwacalError(f"--max-drop needs labelled evaluation data: {where} has no 'labels'")
    pool, train_pos, _ = _split_pool(data, options)
    if eval_path is None and options.holdout == 0:
        raise BwacalError("--max-drop measures the drop on the held-out split; --holdout 0 leaves none "
                          "(or give --data EVAL.h5)")
    layers, _ = plan_layers(model.graph, options)
    if not layers:
        return _calibrate(model, data, replace(options, max_drop=None), eval_path, progress, say, stage, started,
                          model_path)
    stage("layer sensitivities")
    train = _Split(data, pool[train_pos], False)
    sens = fisher_sensitivity(model, layers, _sensitivity_images(train, options.batch_size), WIDTHS, options.seed)
    bits = {layer.node: layer.bits for layer in layers}
    loss = {k: dict(v) for k, v in sens.fisher.items()}
    # the protocol's first and last layer and those --layer-bits names keep their widths
    pinned = set(pinned_layers(layers, options.protocol, options.layer_bits))
    steps, raised, raised_now = [], {}, {}
    while True:
        step_options = replace(options, max_drop=None, layer_bits=options.layer_bits + allocation_rules(raised))
        cal = _calibrate(model, data, step_options, eval_path, progress, say, stage, time.perf_counter(), model_path)
        acc = cal.report["accuracy"]
        drop = 100 * (acc["fp"] - acc[options.method])
        steps.append({"step": len(steps) + 1, "raised": dict(raised_now),
                      "avg_bits": cal.report["avg_weight_bits"], "top1": acc[options.method], "fp": acc["fp"],
                      "drop": drop, "seconds": cal.report["seconds"]})
        say(f"accuracy control, step {len(steps)}: average {steps[-1]['avg_bits']:.3f} bits, top-1 "
            f"{100 * acc[options.method]:.2f}% (full precision {100 * acc['fp']:.2f}%), drop {drop:.2f} points"
            + (f" after raising {', '.join(f'{k} to {b}' for k, b in raised_now.items())}" if raised_now else ""))
        met = drop <= options.max_drop
        raised_now = {} if met else layers_to_raise(bits, sens.params, loss, WIDTHS, pinned)
        if met or not raised_now:
            break
        bits.update(raised_now)
        raised.update(raised_now)
    cal.report["accuracy_control"] = {"max_drop": options.max_drop, "met": met, "steps": steps,
                                      "sensitivity_seconds": sens.fisher_seconds,
                                      "layer_bits": [f"{p}={b}" for p, b in allocation_rules(raised)]}
    cal.report["options"]["max_drop"] = options.max_drop
    cal.report["seconds"] = time.perf_counter() - started
    return cal


def _acc_line(what, acc, agreement, images):
    if not images:
        return f"top-1 {what}: not measured (no held-out images; --data EVAL.h5 measures on another file)"
    parts = [f"{k} {100 * v:.2f}%" for k, v in acc.items() if v is not None]
    if parts:
        return f"top-1 {what}: " + ", ".join(parts)
    parts = [f"{k} {100 * v:.2f}%" for k, v in agreement.items() if v is not None]
    return f"top-1 agreement with full precision {what} (no labels): " + ", ".join(parts)


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
