"""AIMET AdaRound on one model, run inside AIMET's own virtual environment (never imports bwacal).

Called by benchmarks/peers.py as ``/work/aimet-venv/bin/python benchmarks/aimet_adaround.py ...``
with the calibration images and the test set as .npy files (model-ready float32, NCHW; the venv
has no h5py). Steps, AIMET's documented PTQ flow:

1. ``fold_all_batch_norms_to_weight`` (AIMET's batch-norm folding).
2. ``QuantizationSimModel`` with the "default" config (AIMET's per-channel config: symmetric
   per-output-channel weights for Conv/Gemm, biases not quantized), min-max encodings, weights at
   ``--bits`` (signed, levels -2^(b-1) .. 2^(b-1)-1, the same grid as bwacal's uniform start).
3. Activations: all activation quantizers disabled for weights-only settings; with ``--act-bits A``
   only the quantizers on tensors that feed a Conv/Gemm (through Flatten/Reshape) stay enabled, at A
   bits, so the same tensors as in bwacal are quantized (bwacal quantizes the input of every
   quantized layer); AIMET's asymmetric activation encodings (unsigned after ReLU) are kept.
4. Protocol ``first-last-8bit``: the first Conv's and the last Gemm's weights and their input
   activations at 8 bits; ``all-layers``: every layer at the stated width.
5. ``apply_adaround(sim, batches, num_iterations)`` on the calibration batches (32 images each,
   AIMET's per-iteration batch), then ``sim.compute_encodings`` for the activation quantizers.
6. Evaluation model: ``sim.fold_param_quantizers()`` bakes the AdaRounded, quantized weights into the
   initializers; weights-only: all remaining (disabled) quantizer nodes are removed, leaving a plain
   ONNX model with fake-quantized weights; W4A4: ``sim.to_onnx_qdq()`` (activation QuantizeLinear /
   DequantizeLinear at A bits, opset 21). The sim session's own top-1 on the test set is reported too,
   so the written model can be checked against AIMET's simulation.

Prints one JSON object on stdout: seconds (process start to model written), sim_top1, layers, ...
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

PASS_THROUGH = {"Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose"}
LAYERS = {"Conv", "Gemm", "MatMul"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help=".npy of model-ready calibration images")
    ap.add_argument("--test-x", default=None, help=".npy of model-ready test images (sim top-1)")
    ap.add_argument("--test-y", default=None, help=".npy of test labels")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--act-bits", type=int, default=None)
    ap.add_argument("--protocol", choices=("all-layers", "first-last-8bit"), default="all-layers")
    ap.add_argument("--iterations", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and ORT threads; on a shared machine 2 torch threads ran 9x slower than 1")
    ap.add_argument("--progress", default=None, help="append one JSON line per layer as AdaRound finishes it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()

    import onnx
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import aimet_onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
    from aimet_onnx.common.defs import QuantScheme, qtype
    from aimet_onnx.common.utils import AimetLogger

    model = onnx.load(args.model)
    fold_all_batch_norms_to_weight(model)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    layers = [n for n in graph.node if n.op_type in LAYERS and len(n.input) > 1 and n.input[1] in inits]
    if not layers:
        sys.exit(f"{args.model}: no Conv/Gemm with a constant weight")

    def source(tensor):
        """The tensor a layer really reads: walk up through ops that do not change values."""
        while tensor in producer and producer[tensor].op_type in PASS_THROUGH:
            tensor = producer[tensor].input[0]
        return tensor

    wide = {layers[0].name, layers[-1].name} if args.protocol == "first-last-8bit" else set()
    act_bits_of = {}  # activation tensor -> bits, the inputs of quantized layers
    for n in layers:
        t = source(n.input[0])
        bits = 8 if n.name in wide else (args.act_bits or 0)
        act_bits_of[t] = max(act_bits_of.get(t, 0), bits)

    sim = QuantizationSimModel(
        model,
        param_type=qtype.int(args.bits),
        activation_type=qtype.int(args.act_bits or 8),
        quant_scheme=QuantScheme.min_max,
        config_file="default",
        session_options_kwargs={"intra_op_num_threads": args.threads, "inter_op_num_threads": 1},
    )
    quantized = {}  # layer name -> weight name, bits
    for n in layers:
        w = n.input[1]
        q = sim.qc_quantize_op_dict.get(w)
        if q is None or not q.enabled:
            sys.exit(f"{n.name}: AIMET made no enabled quantizer for weight {w}")
        if not q.quant_info.usePerChannelMode:
            sys.exit(f"{n.name}: weight {w} is not per-channel in AIMET's config")
        bits = 8 if n.name in wide else args.bits
        q.set_bitwidth(bits)
        quantized[n.name] = (w, bits)
    enabled_acts = {}
    for name in sim.activation_names:
        q = sim.qc_quantize_op_dict[name]
        bits = act_bits_of.get(name, 0) if args.act_bits else 0
        if args.protocol == "first-last-8bit" and not args.act_bits:
            bits = 0  # weights-only: no activation quantized, the 8-bit layers included
        if bits:
            q.enabled = True
            q.set_bitwidth(bits)
            enabled_acts[name] = bits
        else:
            q.enabled = False
    missing = [t for t, b in act_bits_of.items() if b and args.act_bits and t not in enabled_acts]
    if missing:
        sys.exit(f"AIMET has no activation quantizer on layer inputs {missing}")

    calib = np.load(args.calib).astype(np.float32)
    input_name = graph.input[0].name
    batches = [{input_name: calib[i:i + args.batch]} for i in range(0, len(calib), args.batch)]

    layer_seconds = {}
    starts = []

    class LayerTimes(logging.Handler):
        """AIMET logs "Started Optimizing weight rounding of module: NAME" as it reaches each layer."""

        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Started Optimizing weight rounding of module:"):
                now = time.perf_counter()
                finish(now)
                starts.append((msg.rsplit(":", 1)[1].strip(), now, time.process_time()))

    def finish(now):
        if starts and starts[-1][0] not in layer_seconds:
            name, began, cpu_began = starts[-1]
            layer_seconds[name] = now - began
            if args.progress:
                with open(args.progress, "a") as f:
                    f.write(json.dumps({"layer": name, "seconds": now - began,
                                        "cpu_seconds": time.process_time() - cpu_began,
                                        "iterations": args.iterations, "since_start": now - T_START}) + "\n")

    AimetLogger.get_area_logger(AimetLogger.LogAreas.Quant).addHandler(LayerTimes())
    t0 = time.perf_counter()
    apply_adaround(sim, batches, num_iterations=args.iterations)
    finish(time.perf_counter())
    t_adaround = time.perf_counter() - t0
    sim.compute_encodings(batches)

    # Check the learned weights are on the grid: at most 2^b distinct values per output channel.
    sim.fold_param_quantizers()
    values = {i.name: onnx.numpy_helper.to_array(i) for i in sim.model.model.graph.initializer}
    distinct = {}
    for layer, (w, bits) in quantized.items():
        arr = values[w]
        per_channel = arr.reshape(arr.shape[0], -1)
        node = next(n for n in layers if n.name == layer)
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute):
            per_channel = arr.T  # Gemm without transB: weight is (in, out), channels are columns
        distinct[layer] = [int(max(len(np.unique(c)) for c in per_channel)), bits]
    if args.act_bits:
        out_model = sim.to_onnx_qdq()
    else:
        out_model = QuantizationSimModel.remove_quantizers(sim.model.model)
    onnx.save(out_model, args.output)
    seconds = time.perf_counter() - T_START
    cpu_seconds = time.process_time()

    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "adaround_seconds": t_adaround, "iterations": args.iterations,
              "layers_adarounded": len(quantized), "seconds_per_layer": t_adaround / len(quantized), "layer_seconds": layer_seconds,
              "distinct_per_channel": distinct, "activation_quantizers": enabled_acts,
              "aimet_onnx": aimet_onnx.__version__, "torch": torch.__version__, "threads": args.threads}
    if args.test_x:
        x = np.load(args.test_x).astype(np.float32)
        y = np.load(args.test_y)
        pred = np.concatenate([sim.session.run(None, {input_name: x[i:i + 1000]})[0].argmax(1)
                               for i in range(0, len(x), 1000)])
        result["sim_top1"] = float((pred == y).mean())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
