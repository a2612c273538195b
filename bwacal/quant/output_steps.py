"""Weight steps that know the activations: each output channel's uniform step minimises the error
of the layer's output on calibration inputs, not only the weight error.

For a layer ``y_c = w_c . x`` (a Conv on im2col patches of its input, a Gemm/MatMul on the rows of
its input), quantizing ``w_c`` to ``Q(w_c; s)`` changes the output by ``e . x`` with
``e = w_c - Q(w_c; s)``, so the mean squared output error is ``e^T H e`` with ``H = E[x x^T]`` over
the calibration inputs (uncentred: a shift of the mean output is an error too). The step is searched
per channel over the same candidates as :func:`bwacal.quant.weights.mse_steps` (with ``H = I`` the
two searches agree exactly).

- :func:`input_covariances` collects ``H`` for every quantized layer from the FP model's
  activations (sampled patches, bounded memory);
- :func:`output_error_steps` searches the steps of one weight given its ``H``;
- :func:`im2col` and :func:`layer_rows` turn a layer's input into the rows ``x`` its weight sees.
"""

from __future__ import annotations

import numpy as np

from bwacal.kernels.flags import threads_for
from bwacal.kernels.quant import factored_errors, hessian_errors
from bwacal.ops.window import window
from bwacal.quant.uniform import check_bits, qrange
from bwacal.quant.weights import MSE_RATIOS, ZERO_CHANNEL_STEP, candidate_steps, channels_first, mse_steps

# Rows (patches or input rows) sampled per layer for its H: K = 576 (64 channels of 3x3) is then
# estimated from 28 samples per entry of the diagonal's order, and building H costs rows * K**2
# multiply-adds (0.5 s at K = 576 on one core).
DEFAULT_ROWS = 1 << 14
# An H whose rank r is at most this fraction of K (fewer sampled rows than inputs: a Gemm with K =
# 1152 fed by 256 images has r <= 256) is searched through a factor L (r, K), H = L^T L, at r * K
# instead of K**2 per candidate. Eigenvalues below RANK_TOLERANCE times the largest are dropped
# (their part of any error is below that fraction).
LOW_RANK_FRACTION = 0.5
# bytes of layer inputs one batch of the H collection may hold at once
ACTIVATION_BYTES = 256 << 20
RANK_TOLERANCE = 1e-12


def low_rank_factors(hessians):
    """``L`` (G, r, K) with ``H_g = L_g^T L_g`` up to ``RANK_TOLERANCE``, or None when the rank r of
    some H exceeds ``LOW_RANK_FRACTION * K`` (then the direct search is as fast)."""
    K = hessians.shape[1]
    values, vectors = np.linalg.eigh(hessians)  # ascending
    keep = values > RANK_TOLERANCE * np.maximum(values[:, -1:], np.finfo(np.float64).tiny)
    rank = int(keep.sum(axis=1).max())
    if rank > LOW_RANK_FRACTION * K:
        return None
    rank = max(rank, 1)
    top = np.where(keep, values, 0.0)[:, -rank:]
    return np.ascontiguousarray((vectors[:, :, -rank:] * np.sqrt(top)[:, None, :]).transpose(0, 2, 1))


def output_errors(w2d, steps, hessians, qmin, qmax) -> np.ndarray:
    """float64 (C, R): ``e^T H e`` for row c of ``w2d`` (C, K) quantized with step ``steps[c, r]``.

    ``hessians`` (G, K, K) holds one symmetric H per group of ``C // G`` consecutive rows (G = 1
    for a dense layer, G = C for a depthwise conv); codes are ``clip(round(w / s), qmin, qmax)``.
    A low-rank H is searched through its factor (:func:`low_rank_factors`).
    """
    w2d = np.ascontiguousarray(w2d)
    if w2d.dtype not in (np.float32, np.float64):
        w2d = w2d.astype(np.float64)
    if w2d.ndim != 2:
        raise ValueError(f"weights must be 2-D (C, K), got shape {w2d.shape}")
    C, K = w2d.shape
    hessians = np.ascontiguousarray(hessians, dtype=np.float64)
    if hessians.ndim == 2:
        hessians = hessians[None]
    if hessians.ndim != 3 or hessians.shape[1:] != (K, K) or hessians.shape[0] < 1 or C % hessians.shape[0]:
        raise ValueError(f"for weights ({C}, {K}) need H of shape (G, {K}, {K}) with G dividing {C}, "
                         f"got {hessians.shape}")
    steps = np.ascontiguousarray(steps, dtype=np.float64)
    if steps.ndim != 2 or steps.shape[0] != C:
        raise ValueError(f"steps must be ({C}, R), got {steps.shape}")
    if not np.all(steps > 0):
        raise ValueError("steps must be positive")
    group_of = np.arange(C, dtype=np.int64) // (C // hessians.shape[0])
    out = np.empty(steps.shape, dtype=np.float64)
    factors = low_rank_factors(hessians) if K > 1 else None
    if factors is not None:
        with threads_for(factors.shape[1] * K * steps.size):
            factored_errors(w2d, steps, factors, group_of, float(qmin), float(qmax), out)
    else:
        with threads_for(K * K * steps.size):
            hessian_errors(w2d, steps, hessians, group_of, float(qmin), float(qmax), out)
    return out


def output_error_steps(w2d, bits: int, hessians, ratios=MSE_RATIOS) -> np.ndarray:
    """float32 (C,): per row of ``w2d`` (C, K), the candidate step with the least output error ``e^T H e``.

    Candidates are those of :func:`candidate_steps`; ties go to the first; all-zero rows get
    ``ZERO_CHANNEL_STEP``. ``hessians``: (K, K) or (G, K, K) as in :func:`output_errors`.
    """
    bits = check_bits(bits)
    w2d = np.asarray(w2d)
    qmin, qmax = qrange(bits, signed=True)
    candidates = candidate_steps(w2d, bits, ratios)
    errors = output_errors(w2d, candidates, hessians, qmin, qmax)
    best = candidates[np.arange(len(candidates)), np.argmin(errors, axis=1)]
    zero = ~np.any(w2d != 0, axis=1)
    return np.where(zero, ZERO_CHANNEL_STEP, best).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the rows a layer's weight sees


def conv_geometry(attrs: dict, input_hw, weight_shape):
    """The ``Window`` (kernel, strides, dilations, padding, output size) of a Conv node's attributes."""
    kernel = attrs.get("kernel_shape") or tuple(weight_shape[2:])
    return window(int(input_hw[0]), int(input_hw[1]), tuple(kernel), attrs.get("strides"),
                  attrs.get("dilations"), attrs.get("pads"), attrs.get("auto_pad", "NOTSET"))


def im2col(x, geometry, positions=None) -> np.ndarray:
    """Patches of the NCHW ``x`` under a conv ``geometry`` (a ``Window``): (P, C * kh * kw) float32.

    Columns are ordered (channel, kernel row, kernel column), as a (O, C, kh, kw) weight flattens;
    padding reads zeros. Without ``positions`` every output position, ordered (image, row, column)
    (``torch.nn.functional.unfold`` transposed); else ``positions`` is an int array (P, 3) of
    (image, output row, output column).
    """
    g = geometry
    x = np.asarray(x, dtype=np.float32)
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + g.ph + g.pad_end_h, w + g.pw + g.pad_end_w), np.float32)
    xp[:, :, g.ph:g.ph + h, g.pw:g.pw + w] = x
    if positions is None:
        taps = np.empty((n, g.ho, g.wo, c, g.kh, g.kw), np.float32)
        for i in range(g.kh):
            for j in range(g.kw):
                r0, c0 = i * g.dh, j * g.dw
                block = xp[:, :, r0:r0 + g.sh * (g.ho - 1) + 1:g.sh, c0:c0 + g.sw * (g.wo - 1) + 1:g.sw]
                taps[..., i, j] = block.transpose(0, 2, 3, 1)
        return taps.reshape(n * g.ho * g.wo, c * g.kh * g.kw)
    pos = np.asarray(positions, dtype=np.int64).reshape(-1, 3)
    rows = pos[:, 1, None, None, None] * g.sh + (np.arange(g.kh) * g.dh)[None, None, :, None]
    cols = pos[:, 2, None, None, None] * g.sw + (np.arange(g.kw) * g.dw)[None, None, None, :]
    patches = xp[pos[:, 0, None, None, None], np.arange(c)[None, :, None, None], rows, cols]
    return patches.reshape(len(pos), c * g.kh * g.kw)


def layer_rows(op_type: str, attrs: dict, x, weight_shape, per_image=None, rng=None) -> np.ndarray:
    """The input rows (P, K_total) a Conv/Gemm/MatMul weight multiplies, for the batch ``x``.

    Conv: im2col patches (K_total = C_in * kh * kw; a grouped conv's group g owns the g-th block of
    C_in/G * kh * kw columns); Gemm: the rows of ``x``; MatMul: ``x`` flattened to (-1, K). With
    ``per_image``, at most that many positions per image are drawn (without replacement) with ``rng``.
    """
    x = np.asarray(x)
    if op_type == "Conv":
        g = conv_geometry(attrs, x.shape[2:], weight_shape)
        n, per = x.shape[0], g.ho * g.wo
        if per_image is None or per_image >= per:
            return im2col(x, g)
        flat = np.concatenate([rng.choice(per, per_image, replace=False) for _ in range(n)])
        image = np.repeat(np.arange(n), per_image)
        return im2col(x, g, np.stack([image, flat // g.wo, flat % g.wo], axis=1))
    if op_type in ("Gemm", "MatMul"):
        rows = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
        if per_image is not None and x.ndim > 2:
            per = rows.shape[0] // x.shape[0]
            if per_image < per:
                pick = np.concatenate([i * per + rng.choice(per, per_image, replace=False)
                                       for i in range(x.shape[0])])
                rows = rows[pick]
        return rows
    raise ValueError(f"no input rows for op {op_type}: expected Conv, Gemm or MatMul")


def input_covariances(model, nodes, images, batch_size: int = 64, rows: int = DEFAULT_ROWS,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """``H = E[x x^T]`` (float64 (G, K, K)) of the input rows of each named Conv/Gemm/MatMul node.

    ``images`` (N, C, H, W) float32 are run through the FP ``model`` (a ``bwacal.model.Model``)
    ``batch_size`` at a time; each layer keeps about ``rows`` rows in all (``ceil(rows / N)``
    positions per image for convs, every row for a Gemm), accumulated per batch, so memory is one
    batch's activations and sampled patches. G is the conv's group count (1 for Gemm/MatMul).
    Seeded: the same images and seed give the same H.
    """
    graph = model.graph
    by_name = {node.name: node for node in graph.nodes}
    missing = [name for name in nodes if name not in by_name]
    if missing:
        raise ValueError(f"no node named {missing[0]!r} in the graph")
    layers = [by_name[name] for name in nodes]
    for node in layers:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.inputs[1] not in graph.initializers:
            raise ValueError(f"node {node.name!r} ({node.op_type}) is not a Conv/Gemm/MatMul with a constant weight")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) array, got shape {images.shape}")
    per_image = -(-int(rows) // len(images))
    rng = np.random.default_rng(seed)
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(nodes, 0)
    inputs = sorted({node.inputs[0] for node in layers})
    # the requested inputs of a batch are all alive at once: at 224x224 a batch of 64 of ResNet-50's
    # would be GBs, so the batch is cut to keep them under ACTIVATION_BYTES
    probe, _ = model.engine.run({model.input_name: images[:1]}, outputs=inputs)
    image_bytes = sum(np.asarray(v).nbytes for v in probe.values())
    batch_size = int(max(1, min(batch_size, ACTIVATION_BYTES // max(image_bytes, 1))))
    for start in range(0, len(images), batch_size):
        values, _ = model.engine.run({model.input_name: images[start:start + batch_size]}, outputs=inputs)
        for node in layers:
            weight = graph.initializers[node.inputs[1]]
            groups = int(node.attrs.get("group", 1)) if node.op_type == "Conv" else 1
            x = layer_rows(node.op_type, node.attrs, values[node.inputs[0]], weight.shape, per_image, rng)
            x = x.astype(np.float64).reshape(len(x), groups, -1).transpose(1, 0, 2)  # (G, P, K)
            part = np.matmul(x.transpose(0, 2, 1), x)
            sums[node.name] = part if node.name not in sums else sums[node.name] + part
            counts[node.name] += len(x)
    return {name: sums[name] / max(counts[name], 1) for name in nodes}


# H of the layers collected in one pass over the images, at most this many bytes (float64): ResNet-50's
# 3x3 convs of 512 channels have K = 4608, an H of 170 MB each
PASS_BYTES = 256 << 20


# Layers whose weight rows are longer than this keep the weight-MSE step: the search costs C * K**2
# per candidate (ResNet-50's 512-channel 3x3 convs, K = 4608: 1.4 TFLOP over 129 candidates)
MAX_ROW = 1152


def _row_length(node, weight_shape) -> tuple[int, int]:
    """(groups, K): the H of a layer is (groups, K, K)."""
    if node.op_type == "Conv":
        return int(node.attrs.get("group", 1)), int(np.prod(weight_shape[1:]))
    return 1, int(weight_shape[0] if node.op_type == "MatMul" or not node.attrs.get("transB", 0) else weight_shape[1])


def output_aware_steps(model, layers, images, batch_size: int = 64, seed: int = 0,
                       pass_bytes: int = PASS_BYTES) -> dict[str, np.ndarray]:
    """Per quantized layer (``bwacal.quantize.QuantLayer``; keyed by weight name) the float32 steps of
    :func:`output_error_steps` at the layer's bits, with ``H`` from the FP ``model`` on ``images``.

    ``H`` is collected for as many layers at a time as fit ``pass_bytes`` (one pass over the images
    each) and dropped once their steps are found, so memory stays bounded on 224x224 models. A
    layer whose weight rows are longer than ``MAX_ROW`` keeps the weight-MSE step.
    """
    graph = model.graph
    by_name = {node.name: node for node in graph.nodes}
    passes, current, used = [], [], 0
    steps = {}
    for layer in layers:
        groups, k = _row_length(by_name[layer.node], graph.initializers[layer.weight].shape)
        if k > MAX_ROW:
            steps[layer.weight] = mse_steps(channels_first(graph.initializers[layer.weight], layer.axis), layer.bits)
            continue
        size = groups * k * k * 8
        if current and used + size > pass_bytes:
            passes.append(current)
            current, used = [], 0
        current.append(layer)
        used += size
    if current:
        passes.append(current)
    for group in passes:
        hessians = input_covariances(model, [layer.node for layer in group], images, batch_size, seed=seed)
        for layer in group:
            w2d = channels_first(graph.initializers[layer.weight], layer.axis)
            steps[layer.weight] = output_error_steps(w2d, layer.bits, hessians.pop(layer.node))
    return steps
