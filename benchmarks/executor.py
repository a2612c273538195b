"""Executor overhead: a chain of tiny nodes (``h = Neg(h) + c`` on a 2x3 float32 array), where the
ops' own work is negligible, so what is timed is the executor's per-node cost. bwacal forward,
bwacal forward+backward (gradients for the input and the constant) and ONNX Runtime forward on the
same graph, in one run, their calls taking turns; prints microseconds per node (best and median).

    python -m benchmarks.executor [--nodes 400] [--repeat 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def chain_model(pairs: int):
    """The ONNX model of ``pairs`` (Neg, Add) pairs: ``h{k+1} = -h{k} + c``."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    for k in range(pairs):
        nodes += [helper.make_node("Neg", [f"h{k}"], [f"m{k}"], name=f"neg{k}"),
                  helper.make_node("Add", [f"m{k}", "c"], [f"h{k + 1}"], name=f"add{k}")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info(f"h{pairs}", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.ones((2, 3), np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=300)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from bwacal.engine import Engine
    from bwacal.onnx_io import read_model

    pairs = args.nodes // 2
    model = chain_model(pairs)
    engine = Engine(read_model(model))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.zeros((2, 3), np.float32)
    seed = {f"h{pairs}": np.ones((2, 3), np.float32)}

    def fwd_bwd():
        _, tape = engine.run({"h0": x}, record=True, wrt=["h0", "c"])
        engine.backward(tape, seed, wrt=["h0", "c"])

    fns = {"bwacal fwd": lambda: engine.run({"h0": x}), "bwacal fwd+bwd": fwd_bwd,
           "ORT fwd": lambda: sess.run(None, {"h0": x})}
    want = sess.run(None, {"h0": x})[0]
    np.testing.assert_array_equal(engine.run({"h0": x})[0][f"h{pairs}"], want)
    times = {k: [] for k in fns}
    for _ in range(20):
        for fn in fns.values():
            fn()
    for _ in range(args.repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {2 * pairs} nodes; "
          f"repeat {args.repeat}; date: {time.strftime('%Y-%m-%d')}")
    print("| run | best us/node | median us/node |")
    print("|---|---:|---:|")
    for k, t in times.items():
        t = np.array(t) * 1e6 / (2 * pairs)
        print(f"| {k} | {t.min():.2f} | {np.median(t):.2f} |")


if __name__ == "__main__":
    main()
