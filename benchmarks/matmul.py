"""A transformer Linear, (N, T, D) @ (D, E): bwacal's MatMul forward+backward (dL/dA and dL/dB)
through a one-node Engine, the batched np.matmul formulation it replaced, and PyTorch.

    python -m benchmarks.matmul [--threads 2] [--repeat 7] [--shape 64,197,192,768]

bwacal runs NumPy's BLAS on one thread unless OPENBLAS_NUM_THREADS is set (bwacal/runtime.py):
``--blas-threads N`` sets it before NumPy loads, so both settings can be measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blas-threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--shape", default="64,197,192,768")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if args.blas_threads is not None:
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)

    import numpy as np
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from bwacal.engine import Engine, unbroadcast
    from bwacal.onnx_io import read_model

    torch.set_num_threads(args.threads)
    n, t, d, e = (int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, t, d), dtype=np.float32)
    b = rng.standard_normal((d, e), dtype=np.float32) * 0.05
    r = rng.standard_normal((n, t, e), dtype=np.float32)

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "linear",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, a.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(b, "b")])
    engine = Engine(read_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))

    def bwacal_step():
        _, tape = engine.run({"a": a}, record=True, wrt=["a", "b"])
        return engine.backward(tape, {"y": r}, wrt=["a", "b"])

    def batched_step():  # the previous MatMul: N GEMMs each way and an (N, D, E) sum
        y = np.matmul(a, b)
        da = np.matmul(r, b.T)
        db = unbroadcast(np.matmul(np.swapaxes(a, -1, -2), r), b.shape)
        return y, da, db

    at, bt = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    rt = torch.tensor(r)

    def torch_step():
        at.grad = bt.grad = None
        (at @ bt).backward(rt)

    got = bwacal_step()
    torch_step()
    for name, want in (("a", at.grad), ("b", bt.grad)):
        err = np.abs(got[name] - want.numpy()).max() / np.abs(want.numpy()).max()
        assert err < 1e-4, f"dL/d{name} differs from torch by {err:.2e}"

    steps = {"bwacal": bwacal_step, "np.matmul batched": batched_step, "torch": torch_step}
    best = {k: float("inf") for k in steps}
    for _ in range(args.repeat):
        for k, fn in steps.items():  # taking turns, so a noisy neighbour hits all three alike
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
            time.sleep(0.05)
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "1 (bwacal's default)")
    print(f"({n}, {t}, {d}) @ ({d}, {e}) float32, forward+backward, {args.threads} threads, "
          f"NumPy BLAS threads {blas}; best of {args.repeat}")
    for k, s in best.items():
        print(f"  {k:18s} {s * 1e3:8.1f} ms   {best['torch'] / s:5.2f}x torch")


if __name__ == "__main__":
    sys.exit(main())
